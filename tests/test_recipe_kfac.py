"""`--methods kfac` in the GLUE recipe (Porrello et al., ICLR 2026): each task's KFAC factors estimated once at
θ0 on its own training prompts (the frozen-prefix suffix model, answer-position logits, Fisher probe), saved as
Hub artifacts under curvature/<task>; every task trained against the *other* tasks' factors only. Checked:
λ = 0 reproduces linear FT exactly (the penalty is the only difference), λ > 0 lowers the penalty
Σ tr(G·ΔW̃·A·ΔW̃ᵀ) of the trained vector — recomputed here from the saved factors and the saved vector — and
the factors on disk are the ones the report sizes; bad options fail before the model is loaded."""

import json
import os

import pytest
import torch

from hf_taujp.hub import HfTaujpError
from hf_taujp.recipes import glue as glue_recipe
from hf_taujp.recipes import glue_parts
from hf_taujp.task_vector import TaskVector
from hf_taujp.trainer import KFACStatistics, aggregate_kfac, kfac_penalty
from hf_taujp.trainer.tangents import LayerDelta
from tests.test_recipe_glue import tiny_model_dir

TASKS = ("sst2", "cola", "rte")


def _penalty(tv: TaskVector, others: list[KFACStatistics]) -> float:
    """R_KFAC of a saved vector under the other tasks' saved factors (Linear weights, (out, in), no bias)."""
    terms = aggregate_kfac(others, dtype=torch.float64)
    deltas = {p: LayerDelta(int(tv[f"{p}.weight"].shape[0]), int(tv[f"{p}.weight"].shape[1]),
                            weight=tv[f"{p}.weight"].double()) for p in terms}
    return float(kfac_penalty(deltas, terms))


def test_kfac_method_trains_each_task_against_the_others_factors(tmp_path, monkeypatch):
    seen = {}
    real = glue_parts.finetune

    def spy(base, names, method, train, args, **kw):
        if method.kfac:
            seen.setdefault(args.taujp_lambda, {})[kw["meta"]["task"]] = [c.task for c in kw["curvature"]]
            assert kw["regularization_datasets"] is not None  # passed, but the kfac method never reads them
        return real(base, names, method, train, args, **kw)

    monkeypatch.setattr(glue_parts, "finetune", spy)
    out = tmp_path / "out"
    res = glue_recipe.run_glue(
        tiny_model_dir(tmp_path, "llama"), TASKS, methods="linear,kfac", output_dir=str(out), steps=8, batch_size=4,
        learning_rate=1e-2, kfac_lambda=[0.0, 1e6], kfac_examples=8, max_train=40, max_dev=8, alphas=(0.0, 1.0),
        shape_alphas=(), layers=1, matrix_examples=4, eval_batch_size=8)
    for lam in (0.0, 1e6):
        assert seen[lam] == {t: [o for o in TASKS if o != t] for t in TASKS}
    cv = res["curvature"]
    assert cv["probe"] == "fisher" and cv["examples"] == 8 and cv["aggregation"] == "merged"
    factors = {}
    for t in TASKS:
        folder = out / "curvature" / t
        st = KFACStatistics.from_pretrained(str(folder))
        assert st.task == t and st.num_examples == 8 and st.extra["probe"] == "fisher"
        assert len(st.layers) == 7 and all(p.endswith("_proj") for p in st.layers)  # the trained layer's Linears
        on_disk = sum(os.path.getsize(folder / f) for f in os.listdir(folder) if f.endswith(".safetensors"))
        assert cv["tasks"][t]["bytes"] == on_disk and cv["tasks"][t]["layers"] == 7
        factors[t] = st
    labels = {lam: f"linear FT + KFAC (λ={lam:g})" for lam in (0.0, 1e6)}
    assert set(res["methods"]) == {"linear FT", *labels.values()}
    assert res["lambda_selection"]["linear FT + KFAC"]["chosen"] in (0.0, 1e6)
    for t in TASKS:
        lin = TaskVector.from_pretrained(str(out / "task_vectors" / "linear" / t))
        zero = TaskVector.from_pretrained(str(out / "task_vectors" / "kfac_lambda0" / t))
        big = TaskVector.from_pretrained(str(out / "task_vectors" / "kfac_lambda1e+06" / t))
        assert big.training["regularizer"] == "kfac" and big.training["curvature_tasks"] == [o for o in TASKS if o != t]
        for k in lin:  # λ = 0: the same run as linear FT, to rounding
            torch.testing.assert_close(zero[k], lin[k], rtol=1e-5, atol=1e-7)
        others = [factors[o] for o in TASKS if o != t]
        assert _penalty(big, others) < 0.5 * _penalty(lin, others)
    md = (out / "results.md").read_text()
    assert "+ KFAC: the dataless penalty" in md and "MiB per task on disk" in md
    assert json.loads((out / "results.json").read_text())["arguments"]["kfac_probe"] == "fisher"


@pytest.mark.parametrize("kw, match", [
    (dict(kfac_lambda=-1.0), "kfac_lambda"), (dict(kfac_lambda=[1.0, 1.0]), "kfac_lambda"),
    (dict(kfac_probe="hutchinson"), "kfac_probe"), (dict(kfac_examples=0), "kfac_examples"),
    (dict(kfac_aggregation="mean"), "kfac_aggregation")])
def test_kfac_options_are_checked_before_the_model_is_loaded(tmp_path, kw, match):
    with pytest.raises(HfTaujpError, match=match):
        glue_recipe.run_glue(str(tmp_path / "no-model"), ("sst2", "cola"), methods="kfac",
                             output_dir=str(tmp_path / "o"), **kw)
    assert not (tmp_path / "o").exists()


def test_kfac_with_a_trained_lm_head_fails_before_any_training(tmp_path):
    """--layers 0 trains the (tied) LM head, whose G would be vocabulary²: refused before the first run trains."""
    out = tmp_path / "o"
    with pytest.raises(HfTaujpError, match="output layer frozen"):
        glue_recipe.run_glue(tiny_model_dir(tmp_path, "llama"), ("sst2", "cola"), methods="nonlinear,kfac", layers=0,
                             output_dir=str(out), steps=1, batch_size=4, max_train=40, max_dev=8, alphas=(0.0, 1.0),
                             shape_alphas=(), kfac_examples=4, eval_batch_size=8)
    assert not (out / "task_vectors").exists()


@pytest.mark.parametrize("flag", ["--kfac-lambda", "--lambda", "--lambda-grid"])
def test_cli_empty_number_list_is_a_one_line_error(capsys, flag):
    """One parser for the recipes' comma lists of numbers: an empty one is argparse's error, never a traceback."""
    from hf_taujp.cli import main

    with pytest.raises(SystemExit) as e:
        main(["glue", "--methods", "kfac", flag, ","])
    assert e.value.code == 2 and flag in capsys.readouterr().err
