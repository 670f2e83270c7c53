"""The notebooks run top to bottom (offline: tiny models); shell/magic lines are skipped."""

import json
import os

import pytest

NB_DIR = os.path.join(os.path.dirname(__file__), "..", "notebooks")
NOTEBOOKS = sorted(f for f in os.listdir(NB_DIR) if f.endswith(".ipynb"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nb = json.load(open(os.path.join(NB_DIR, name), encoding="utf-8"))
    scope: dict = {"__name__": "__notebook__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(line for line in cell["source"] if not line.lstrip().startswith(("%", "!")))
        exec(compile(src, f"{name}[cell {i}]", "exec"), scope)
