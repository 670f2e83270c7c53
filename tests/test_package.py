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


# Where each name was importable before the restructuring (issue 14): the same object must still be there.
_MOVED = {
    "hf_taujp.errors": ["HfTaujpError", "ArtifactNotFoundError", "BaseModelMismatchError", "CorruptFileError",
                        "UnsafeFileError", "TiedWeightsError", "TauJpConfigError", "TauJpUnsupportedError",
                        "MissingRegularizationDataError", "RegularizationInputError", "UnsupportedAttentionError",
                        "MergeConfigError", "MissingStatisticsError"],
}
_OLD_HOMES = {
    "hf_taujp.hub": ["HfTaujpError", "ArtifactNotFoundError", "BaseModelMismatchError", "CorruptFileError",
                     "UnsafeFileError", "atomic_write_text", "push_folder_to_hub"],
    "hf_taujp.tied": ["TiedWeightsError"],
    "hf_taujp.trainer": ["TauJpConfigError", "TauJpUnsupportedError"],
    "hf_taujp.trainer.taujp_config": ["TauJpConfigError"],
    "hf_taujp.trainer.taujp_trainer": ["TauJpUnsupportedError", "MissingRegularizationDataError",
                                       "RegularizationInputError"],
    "hf_taujp.attention_jvp": ["UnsupportedAttentionError"],
    "hf_taujp.merging": ["MissingStatisticsError"],
    "hf_taujp.merging.methods": ["MergeConfigError", "MissingStatisticsError"],
    "hf_taujp.task_vector": ["TaskVector", "fingerprint"],
}


def test_errors_live_in_one_module_and_keep_their_old_import_paths():
    import importlib

    errors = importlib.import_module("hf_taujp.errors")
    for name in _MOVED["hf_taujp.errors"]:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.HfTaujpError) and issubclass(cls, ValueError), name
        assert cls.__module__ == "hf_taujp.errors", name
    for module, names in _OLD_HOMES.items():
        mod = importlib.import_module(module)
        for name in names:
            assert hasattr(mod, name), f"{module}.{name}"
            if hasattr(errors, name):
                assert getattr(mod, name) is getattr(errors, name), f"{module}.{name}"


def test_one_definition_per_concern():
    # issue 14: the α grid, the loss-key list and the statistics check each exist once.
    import importlib

    evaluation, linearize, merge, methods, regmean, search, streaming = (
        importlib.import_module(f"hf_taujp.{m}") for m in
        ("evaluation", "linearize", "merging.merge", "merging.methods", "merging.regmean", "merging.search",
         "merging.streaming"))

    assert evaluation.DEFAULT_ALPHAS is search.DEFAULT_GRID
    assert search.DEFAULT_GRID == tuple(i / 20 for i in range(21))
    assert regmean.LOSS_KEYS is linearize.LOSS_KEYS and evaluation.LOSS_KEYS is linearize.LOSS_KEYS
    assert merge.require_statistics is methods.require_statistics is streaming.require_statistics


def test_split_modules_are_re_exported():
    import importlib

    from hf_taujp import fingerprints, peft_conversion, task_vector

    assert task_vector.fingerprint is fingerprints.fingerprint is importlib.import_module("hf_taujp").fingerprint
    assert task_vector.tensors_from_peft is peft_conversion.tensors_from_peft


def test_installed_peft_is_the_admitted_range_and_registration_is_one_module():
    # The tuner registry we extend is private PEFT API: the metadata admits only the minor we test here.
    import tomllib
    from pathlib import Path

    import peft
    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == "peft")
    assert req.specifier.contains(peft.__version__), (str(req), peft.__version__)
    out = _run(
        "import sys, hf_taujp; print('peft' in sys.modules)\n"
        "from peft import PeftConfig, get_peft_model\n"
        "from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING\n"
        "from hf_taujp import peft_registration\n"
        "from hf_taujp.tuners import register_linearized\n"
        "from hf_taujp.tuners.linearized.layer import LinearizedTau\n"
        "from hf_taujp.tuners.linearized.model import LinearizedModel\n"
        "print(register_linearized is peft_registration.register_linearized, PEFT_TYPE_TO_PREFIX_MAPPING['LINEARIZED'],\n"
        "      LinearizedModel.tuner_layer_cls is LinearizedTau)"
    )
    assert out.splitlines() == ["False", "True linearized_tau True"]
