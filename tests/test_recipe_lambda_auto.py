"""--lambda auto in the CLIP and toxicity recipes (issue 21): the validation score each recipe gives the search
(checked against an independent computation), the search wired end to end (per-task λ and curve recorded), and
the named errors of the shared λ options (hf_taujp.recipes.lambda_options)."""

import copy
import json
import os

import pytest
import torch

from hf_taujp import HfTaujpError, TaskVector
from hf_taujp.recipes import clip as C
from hf_taujp.recipes.clip_evaluation import _validation_score
from hf_taujp.recipes.lambda_options import cli_lambda, lambda_record, parse_lambdas
from hf_taujp.recipes.runner import METHODS


# ------------------------------------------------------------------------------------------ shared options
def test_parse_lambdas_rules_and_errors():
    plan = parse_lambdas("auto", None, "rms")
    assert plan.auto and plan.lambdas == ["auto"] and plan.grid == [0.1, 1.0, 10.0, 100.0]
    assert parse_lambdas(["auto"], [10, 1], "l2").grid == [1.0, 10.0]
    assert parse_lambdas([0.1, 0.0], None, "l2").lambdas == [0.1, 0.0]
    assert parse_lambdas("0.5", None, "kl").lambdas == [0.5]
    for bad in (-1, "big", [0.1, 0.1], [], True, float("nan"), float("inf")):
        with pytest.raises(HfTaujpError, match="taujp_lambda"):
            parse_lambdas(bad, None, "l2")
    with pytest.raises(HfTaujpError, match="trains each method once"):
        parse_lambdas([0.1, 1.0], None, "l2", several=False, recipe="the CLIP recipe")
    with pytest.raises(HfTaujpError, match="lambda_grid is the grid"):
        parse_lambdas(0.1, [1.0], "l2")
    with pytest.raises(HfTaujpError, match="grid"):
        parse_lambdas("auto", [0.0, 1.0], "l2")
    with pytest.raises(HfTaujpError, match="taujp_norm must be one of"):
        parse_lambdas(0.1, None, "kl", norms=("l2", "rms"))
    with pytest.raises(HfTaujpError, match="taujp_norm must be one of"):
        parse_lambdas(0.1, None, "l1")
    assert cli_lambda([0.1]) == 0.1 and cli_lambda(["auto"]) == "auto" and cli_lambda([0.1, 1.0]) == [0.1, 1.0]


def test_lambda_record():
    rec = {"chosen": 1.0, "curve": [{"lambda": 0.0, "score": 0.5}, {"lambda": 1.0, "score": 0.49}]}
    stats = {"a": {"lambda_search": rec, "seconds": 12.34}, "b": {"lambda_search": {**rec, "chosen": 0.0},
                                                                  "seconds": 3.0}}
    out = lambda_record(True, "auto", stats)
    assert out["taujp_lambda"] == {"a": 1.0, "b": 0.0} and out["lambda_search"]["a"]["seconds"] == 12.3
    assert lambda_record(True, 0.1, {"a": {"lambda_search": None, "seconds": 1.0}}) == {"taujp_lambda": 0.1}
    assert lambda_record(False, 0.1, {"a": {"lambda_search": None, "seconds": 1.0}}) == {"taujp_lambda": 0.0}
    assert lambda_record(True, 0.1, {"a": {}}) == {"taujp_lambda": 0.1}  # a loaded vector: no training stats


# ------------------------------------------------------------------------------------------------- CLIP
@pytest.fixture(scope="module")
def tiny():
    return C.tiny_clip(image_size=28, patch_size=7, seed=0)


def _setup(tiny):
    clip, tok, _ = tiny
    enc = C.image_encoder(copy.deepcopy(clip))
    heads = {"a": C.zero_shot_head(clip, tok, ["cat", "dog", "car"], ("a {c}.",)),
             "b": C.zero_shot_head(clip, tok, ["x", "y"], ("{c}",))}
    clf = C.ZeroShotCLIP(enc, heads).eval()
    torch.manual_seed(0)
    pix = {(t, s): torch.randn(10, 3, 28, 28) for t in ("a", "b") for s in ("val", "test")}
    gold = {(t, s): torch.randint(0, 2, (10,)) for t in ("a", "b") for s in ("val", "test")}
    tid = {"a": 0, "b": 1}

    def acc(t, s, emb):
        return C._accuracy(clf, tid[t], emb, gold[(t, s)])

    return enc, pix, acc


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_clip_validation_score_is_the_accuracy_of_the_vector(tiny, kind):
    """The score of τ equals the validation accuracy of TaskVector.apply_to's model (θ0 + τ, or its linearized
    model at τ), computed here independently; the encoder is θ0 again afterwards."""
    enc, pix, acc = _setup(tiny)
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    tau = {n: 0.5 * torch.randn_like(p) for n, p in enc.named_parameters()}
    got = _validation_score(METHODS[kind], enc, "a", pix, acc, 4)(tau)
    model = TaskVector(tau, kind=kind).apply_to(enc, 1.0, linear=kind == "linear")
    with torch.no_grad():
        want = acc("a", "val", model(pixel_values=pix[("a", "val")]).image_embeds)
    assert got == pytest.approx(want)
    assert all(torch.equal(p, before[n]) for n, p in enc.named_parameters())
    # and the score sees τ: a zero vector scores as θ0
    zero = {n: torch.zeros_like(t) for n, t in tau.items()}
    with torch.no_grad():
        base = acc("a", "val", enc(pixel_values=pix[("a", "val")]).image_embeds)
    assert _validation_score(METHODS[kind], enc, "a", pix, acc, 4)(zero) == pytest.approx(base)


def test_clip_lambda_auto_end_to_end(tmp_path):
    from clip_offline import offline_data_dir

    data = offline_data_dir(tmp_path, held_out=None)
    out = str(tmp_path / "run")
    r = C.run_clip(C.TINY, "mnist,fashion_mnist", data_dir=data, methods="linear,taujp", output_dir=out, steps=4,
                   batch_size=8, learning_rate=1e-3, warmup_steps=0, max_train=40, max_test=16, alphas=(0.0, 1.0),
                   shape_alphas=(), eval_batch_size=64, matrix_examples=8, negation_control="none",
                   taujp_lambda="auto", lambda_grid=(0.1, 10.0), taujp_norm="rms")
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["taujp"]["lambda"] == "auto" and saved["taujp"]["lambda_grid"] == [0.1, 10.0]
    assert saved["taujp"]["norm"] == "rms"
    res = r["methods"]["linear FT + τJp"]
    assert set(res["taujp_lambda"]) == {"mnist", "fashion_mnist"}
    for task, search in res["lambda_search"].items():
        curve = search["curve"]
        assert curve[0]["lambda"] == 0.0 and search["pilot_steps"] == 1 and search["chosen"] in (0.1, 10.0)
        assert res["taujp_lambda"][task] == search["chosen"]
        n_val = saved["sizes"][task]["val"]
        for c in curve:  # validation accuracies: multiples of 1 / n_val
            assert 0.0 <= c["score"] <= 1.0 and abs(c["score"] * n_val - round(c["score"] * n_val)) < 1e-6
        assert search["metric"] == "taujp_auto_score" and search["greater_is_better"] is True
    assert r["methods"]["linear FT"]["taujp_lambda"] == 0.0 and "lambda_search" not in r["methods"]["linear FT"]
    # the saved vector records the λ its full run used
    tv = TaskVector.from_pretrained(os.path.join(out, "task_vectors", "taujp", "mnist"))
    assert tv.training["taujp_lambda"] == res["taujp_lambda"]["mnist"]


def test_clip_lambda_options_are_checked_first(tmp_path):
    from clip_offline import offline_data_dir

    data = offline_data_dir(tmp_path, held_out=None)
    kw = dict(data_dir=data, negation_control="none", output_dir=str(tmp_path / "x"))
    with pytest.raises(HfTaujpError, match="taujp_norm must be one of"):
        C.run_clip(C.TINY, "mnist,fashion_mnist", taujp_norm="kl", **kw)
    with pytest.raises(HfTaujpError, match="trains each method once"):
        C.run_clip(C.TINY, "mnist,fashion_mnist", taujp_lambda=[0.1, 1.0], **kw)
    with pytest.raises(HfTaujpError, match="lambda_grid is the grid"):
        C.run_clip(C.TINY, "mnist,fashion_mnist", lambda_grid=[1.0], **kw)
    assert not os.path.exists(str(tmp_path / "x"))
    a = C.add_arguments(__import__("argparse").ArgumentParser()).parse_args(["--lambda", "auto", "--taujp-norm", "rms"])
    assert a.taujp_lambda == ["auto"] and a.taujp_norm == "rms"


# --------------------------------------------------------------------------------------------- toxicity
@pytest.mark.parametrize("kind", ["nonlinear", "linear"])
def test_toxicity_lm_fit_score_is_minus_log_perplexity_of_the_vector(kind):
    """−ln perplexity of θ0 + τ (of its linearized model at τ for linear vectors), against the token-by-token hand
    computation of test_recipe_toxicity on TaskVector.apply_to's model; the base is θ0 again afterwards."""
    import math

    from hf_taujp.recipes.toxicity_measure import lm_fit_score, perplexity
    from tests.test_recipe_toxicity import _hand_ppl, tiny_gpt2

    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tau = {n: 0.3 * torch.randn_like(p) for n, p in model.named_parameters() if n.startswith("transformer.h.1.")}
    ids = torch.randint(0, 50, (21,))

    def ppl(input_ids, m, tangents=None, alphas=(1.0,)):
        return perplexity(m, input_ids, block_size=8, stride=8, batch_size=2, tangents=tangents, alphas=alphas)

    got = lm_fit_score(METHODS[kind], model, ppl, ids)(tau)
    ref_model = TaskVector(tau, kind=kind).apply_to(model, 1.0, linear=kind == "linear")
    assert got == pytest.approx(-math.log(_hand_ppl(ref_model, ids, 8, 8)), rel=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_toxicity_lambda_auto_end_to_end(tmp_path):
    from tests.test_recipe_toxicity import data_dir, tiny_model_dir

    from hf_taujp.recipes import toxicity as tox

    out = str(tmp_path / "out")
    res = tox.main([
        "--model", tiny_model_dir(tmp_path), "--data-dir", data_dir(tmp_path), "--methods", "linear,taujp",
        "--output-dir", out, "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--layers", "1",
        "--alphas", "0,1", "--n", "2", "--n-val", "2", "--max-new-tokens", "4", "--gen-batch-size", "4",
        "--elicit", "no", "--scorer", "profanity-check", "--block-size", "16", "--val-tokens", "32",
        "--test-tokens", "32", "--threads", "1", "--lambda", "auto", "--lambda-grid", "0.01,1",
        "--taujp-norm", "rms"])
    assert res["taujp"]["lambda"] == "auto" and res["taujp"]["norm"] == "rms"
    assert res["taujp"]["lambda_grid"] == [0.01, 1.0] and res["taujp"]["lambda_validation_comments"] == 2
    # 6 toxic comments: 2 held out (eliciting prompts), 2 more held out to score λ, 2 train
    assert res["sizes"]["train"] == 2
    r = res["methods"]["linear FT + τJp"]
    search = r["lambda_search"]["toxicity"]
    assert r["taujp_lambda"] == {"toxicity": search["chosen"]} and search["chosen"] in (0.01, 1.0)
    assert search["curve"][0]["lambda"] == 0.0 and search["pilot_steps"] == 1 and search["pilot_start_step"] == 0
    assert all(c["score"] < 0 for c in search["curve"])  # −ln perplexity (perplexity > 1)
    assert res["methods"]["linear FT"]["taujp_lambda"] == 0.0
    with pytest.raises(HfTaujpError, match="trains each method once"):
        tox.run_toxicity("unused", data_dir=data_dir(tmp_path / "b"), taujp_lambda=[0.1, 1.0])


# ------------------------------------------------------------------------------------------------- GLUE
def test_glue_label_log_likelihood_by_hand():
    """--lambda-score loss: mean over rows of log p(gold) with p the softmax over the K label words' summed token
    log-likelihoods — here by hand in plain Python floats."""
    import math
    from types import SimpleNamespace

    from hf_taujp.recipes.glue_parts import GlueRecipe
    from hf_taujp.recipes.tasks import GLUE_TASKS

    rows = [{"sentence": "a", "label": "1"}, {"sentence": "b", "label": "0"}, {"sentence": "c", "label": "1"}]
    fake = SimpleNamespace(task_objs={"sst2": GLUE_TASKS["sst2"]}, rows={"sst2": {"val": rows}})
    scores = torch.tensor([[-3.0, -1.0], [-0.5, -2.5], [-7.0, -7.5]])  # (N, K): negative, positive
    want = 0.0
    for (a, b), gold in zip(scores.tolist(), [1, 0, 1]):
        z = math.log(math.exp(a) + math.exp(b))
        want += ((a, b)[gold] - z) / 3
    got = GlueRecipe.label_log_likelihood(fake, "sst2", "val", scores)
    assert got == pytest.approx(want, abs=1e-12) and got < 0


def test_glue_lambda_score_option_is_checked(tmp_path):
    from hf_taujp.recipes.glue import run_glue

    with pytest.raises(HfTaujpError, match="lambda_score must be one of"):
        run_glue("unused", "cola,sst2", lambda_score="accuracy", taujp_lambda="auto", output_dir=str(tmp_path / "o"))
    with pytest.raises(HfTaujpError, match="needs decode='rank'"):
        run_glue("unused", "cola,sst2", lambda_score="loss", decode="generate", taujp_lambda="auto",
                 output_dir=str(tmp_path / "o"))
    with pytest.raises(HfTaujpError, match="lambda_pilot"):
        run_glue("unused", "cola,sst2", lambda_pilot=0.0, taujp_lambda="auto", output_dir=str(tmp_path / "o"))
    with pytest.raises(HfTaujpError, match="lambda_tolerance"):
        run_glue("unused", "cola,sst2", lambda_tolerance=-1, taujp_lambda="auto", output_dir=str(tmp_path / "o"))
    assert not os.path.exists(str(tmp_path / "o"))
