"""The GLUE recipe's statistics-based merges (issue 25): each task's Fisher / Grams at θ0 + τ_t and the base
Fisher at θ0 on the recipe's own training batches (frozen-prefix ``inputs_embeds``), saved like task vectors,
and fisher_average / gradient_matching / regmean evaluated beside task addition — end to end on a tiny Llama."""
import pytest
import torch

from hf_taujp.hub import HfTaujpError
from hf_taujp.merging.statistics import FisherStatistics, GramStatistics
from hf_taujp.recipes import glue as glue_recipe
from hf_taujp.recipes import glue_evaluation
from hf_taujp.task_vector import TaskVector
from tests.test_recipe_glue import tiny_model_dir

MERGES = ("fisher_average", "gradient_matching", "regmean")


def test_recipe_merges_its_own_vectors_with_fisher_and_gram_statistics(tmp_path, monkeypatch):
    seen = []
    real = glue_evaluation.estimate_statistics

    def spy(model, kind, batches, names, **kw):
        seen.append((kind, batches, kw["task"]))
        return real(model, kind, batches, names, **kw)

    monkeypatch.setattr(glue_evaluation, "estimate_statistics", spy)
    out = tmp_path / "out"
    res = glue_recipe.run_glue(
        tiny_model_dir(tmp_path, "llama"), ("sst2", "cola"), methods="nonlinear,linear", output_dir=str(out), steps=2,
        batch_size=4, learning_rate=1e-2, max_train=40, max_dev=8, alphas=(0.0, 0.5, 1.0), shape_alphas=(1.5,),
        layers=1, matrix_examples=4, eval_batch_size=8, merge_methods=",".join(MERGES), fisher_examples=6,
        fisher_samples=2)
    assert res["frozen_prefix"]["used"]
    # the statistics read the recipe's own batches: cached features, left padding, positions, answer logits only
    for kind, batches, _ in seen:
        assert all({"inputs_embeds", "attention_mask", "position_ids", "labels", "logits_to_keep"} <= set(b)
                   for b in batches)
    assert sorted((k, t or "") for k, _, t in seen) == [("fisher", ""), ("fisher", "cola"), ("fisher", "sst2"),
                                                   ("gram", "cola"), ("gram", "sst2")]
    # only the non-linear vectors are merged; every merge uses that method's single-task scores and the α grid
    assert sorted(res["merges"]) == sorted(f"non-linear FT · {m}" for m in MERGES)
    single = res["methods"]["non-linear FT"]["single"]
    zero = None
    for key, r in res["merges"].items():
        assert r["single"] == single and r["best_alpha"] in (0.0, 0.5, 1.0)
        assert [c["alpha"] for c in r["curve"]] == [0.0, 0.5, 1.0, 1.5]
        at0 = r["curve"][0]["avg_abs"]  # α = 0 is θ0 for every merge
        zero = at0 if zero is None else zero
        assert at0 == pytest.approx(zero)
    gm = res["merges"]["non-linear FT · gradient_matching"]["merge"]
    assert gm["s_t"] == [8, 8] and gm["s0"] == 8.0  # s_t = training examples per task; s0 defaults to their mean
    st = res["statistics"]
    assert st["fisher_examples"] == 6 and st["base_fisher_weight_s0"] == 8.0 and st["s0_default"]
    # saved like task vectors, with the base's identity (not the fine-tuned weights')
    tv = TaskVector.from_pretrained(str(out / "task_vectors" / "nonlinear" / "cola"))
    f = FisherStatistics.from_pretrained(str(out / "statistics"), subfolder="fisher/nonlinear/cola")
    assert set(f.tensors) == set(tv.keys()) and f.num_examples == 12 and f.task == "cola"  # 6 examples × 2 samples
    assert f.base_fingerprint == tv.base_fingerprint and f.extra["at"] == "θ0 + τ_t"
    assert all(torch.isfinite(t).all() and float(t.sum()) > 0 for t in f.tensors.values())
    h0 = FisherStatistics.from_pretrained(str(out / "statistics" / "fisher" / "base"))
    assert h0.num_examples == 24 and h0.extra["at"] == "θ0"
    g = GramStatistics.from_pretrained(str(out / "statistics" / "gram" / "nonlinear" / "cola"))
    assert g.num_examples == 6 and len(g.tensors) == 7 and all(k.endswith("_proj.weight") for k in g.tensors)
    assert not (out / "statistics" / "fisher" / "linear").exists()
    md = (out / "results.md").read_text()
    assert all(f"non-linear FT · {m}" in md for m in MERGES) and "s0 = 8" in md


def test_statistics_options_are_checked_before_loading(tmp_path):
    d = tiny_model_dir(tmp_path, "llama")
    for kw, msg in ((dict(merge_methods="ties"), "unknown merge method"),
                    (dict(merge_methods="fisher_average", methods="linear,taujp"), "non-linear"),
                    (dict(merge_methods="fisher_average", base_fisher_weight=10.0), "gradient_matching only"),
                    (dict(merge_methods="gradient_matching", base_fisher_weight=-1.0), ">= 0"),
                    (dict(merge_methods="regmean", fisher_examples=0), "--fisher-examples")):
        with pytest.raises(HfTaujpError, match=msg):
            glue_recipe.run_glue(d, ("sst2", "cola"), output_dir=str(tmp_path / "o"), **kw)
    assert not (tmp_path / "o").exists()
    a = glue_recipe.add_arguments(__import__("argparse").ArgumentParser()).parse_args([])
    assert a.merge_methods is None  # off by default: the main job's run is unchanged


def test_statistics_on_the_frozen_prefix_cache_equal_the_full_model_on_token_ids(tmp_path):
    """The recipe's cached batches (inputs_embeds entering layer k, logits of the answer span only) give the
    Fisher and Grams of the trained layers that the full model gives on the token ids of the same rows."""
    from hf_taujp.merging import estimate_fisher, estimate_gram
    from hf_taujp.recipes.models import load_text_model
    from hf_taujp.recipes.tasks import GLUE_TASKS, embedded_glue_dir, load_task_data
    from hf_taujp.recipes.text_to_text import FrozenPrefix, TextToTextEncoder

    model, tok, family = load_text_model(tiny_model_dir(tmp_path, "llama"))
    model = model.double().eval()
    enc = TextToTextEncoder(tok, family, keep_logits=True)
    task = GLUE_TASKS["rte"]  # multi-token label words
    examples = enc.encode_train(task, load_task_data(task, embedded_glue_dir())["train"][:6])
    prefix = FrozenPrefix(model, enc, start=3, batch_size=4)
    suffix = prefix.suffix_model()
    ids_batch = enc.collate(examples)
    emb_batch = enc.collate(prefix.features(examples))
    assert ids_batch["attention_mask"][:, 0].min() == 0 and "logits_to_keep" in emb_batch  # left-padded, answer span
    names = [n for n, _ in model.named_parameters() if ".layers.3." in n]
    for empirical in (True, False):
        full = estimate_fisher(model, [ids_batch], parameters=names, empirical=empirical, seed=1, progress=False)
        cached = estimate_fisher(suffix, [emb_batch], parameters=names, empirical=empirical, seed=1, progress=False)
        for n in names:
            torch.testing.assert_close(cached.tensors[n], full.tensors[n], rtol=1e-7, atol=1e-12)
    modules = [n[:-len(".weight")] for n in names if n.endswith("_proj.weight")]
    g_full = estimate_gram(model, [ids_batch], modules=modules, progress=False)
    g_cached = estimate_gram(suffix, [emb_batch], modules=modules, progress=False)
    for n in g_full.tensors:
        torch.testing.assert_close(g_cached.tensors[n], g_full.tensors[n], rtol=1e-7, atol=1e-12)
