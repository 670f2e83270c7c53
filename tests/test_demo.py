"""The main job's smoke run (--quick, tiny random model) and the CLI dispatch."""

import json
import os

import pytest

from hf_taujp.cli import main as cli_main
from hf_taujp.demo import build_tasks
from hf_taujp.task_vector import TaskVector


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--tasks", "sentiment,animal", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear FT + τJp" in printed and "wall time" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"non-linear FT", "linear FT", "linear FT + τJp"}
    for r in res["methods"].values():
        # normalized accuracy is merged / single, averaged (recomputed from the stored numbers)
        tasks = r["tasks"]
        norm = [r["one_shot"]["abs"][t] / r["single"]["test"][t] for t in tasks if r["single"]["test"][t] > 0]
        assert r["one_shot"]["avg_norm"] == pytest.approx(sum(norm) / len(tasks))
        assert r["best_alpha"] in [c["alpha"] for c in r["curve"]]
    assert (out / "alpha_curves.png").read_bytes()[:4] == b"\x89PNG"
    tv = TaskVector.from_pretrained(str(out / "task_vectors" / "linear_FT_plus_τJp" / "animal"))
    assert tv.kind == "linear" and tv.task == "animal" and len(tv) > 0


def test_tasks_are_deterministic_and_balanced():
    a = build_tasks(["topic"], 30, 6, 6, seed=3)
    b = build_tasks(["topic"], 30, 6, 6, seed=3)
    assert a == b
    assert sorted(y for _, y in a["topic"]["train"]) == sorted([0, 1, 2] * 10)


def test_cli_unknown_command_and_help(capsys):
    assert cli_main(["frobnicate"]) == 2
    assert cli_main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
