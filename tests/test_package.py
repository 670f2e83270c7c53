"""The package's import contract: lazy public names, and the PEFT type registered whatever the import order."""

import subprocess
import sys

import pytest

import hf_taujp


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_every_public_name_resolves():
    for name in hf_taujp.__all__:
        assert getattr(hf_taujp, name) is not None, name
    assert set(hf_taujp.__all__) <= set(dir(hf_taujp))
    with pytest.raises(AttributeError, match="no_such_name"):
        hf_taujp.no_such_name


@pytest.mark.parametrize("order", ["hf_taujp first", "peft first"])
def test_linearized_type_registered_after_import_hf_taujp(order):
    imports = "import hf_taujp; import peft" if order == "hf_taujp first" else "import peft; import hf_taujp"
    out = _run(
        f"{imports}\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING\n"
        "print(PEFT_TYPE_TO_CONFIG_MAPPING['LINEARIZED'].__name__, PEFT_TYPE_TO_TUNER_MAPPING['LINEARIZED'].__name__)"
    )
    assert out == "LinearizedConfig LinearizedModel"


def test_merge_entry_point_does_not_import_the_trainer():
    # `hf-taujp merge` must not pay for transformers.Trainer / peft at start-up.
    out = _run("import sys, hf_taujp.merging.recipe; print('transformers.trainer' in sys.modules, 'peft' in sys.modules)")
    assert out == "False False"


def test_linearize_is_the_function_even_after_its_submodule_is_imported():
    out = _run("import importlib; m = importlib.import_module('hf_taujp.linearize'); from hf_taujp import linearize; print(callable(linearize), linearize is m.linearize)")
    assert out == "True True"
