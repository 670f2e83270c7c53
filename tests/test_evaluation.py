"""Evaluation protocol: τJp matrix vs finite differences, ξ(α1, α2) vs a direct count, task addition /
negation α selection and normalized accuracy vs hand computation, table / JSON / PNG output."""

import json
import math

import pytest
import torch
from torch.func import functional_call

from hf_taujp.evaluation import (
    DEFAULT_ALPHAS,
    accuracy,
    disentanglement_error,
    evaluate_task_addition,
    evaluate_task_negation,
    format_table,
    plot_alpha_curves,
    save_json,
    taujp_matrix,
)
from hf_taujp.task_vector import TaskVector
from tests.tiny_models import Scalar
from tests.tiny_models import tiny_bert as _tiny_bert


def tiny_bert(seed=0):
    return _tiny_bert(seed=seed, vocab_size=50, hidden_size=32, intermediate_size=64, max_position_embeddings=16,
                      num_labels=3, dropout=0.0)


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 50, (6,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long), "labels": ids[0] % 3})
    return out


def rand_tv(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return TaskVector({n: scale * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()
                       if "encoder.layer.1" in n or "classifier" in n})


def test_taujp_matrix_equals_finite_differences():
    base = tiny_bert()
    tvs = {"a": rand_tv(base, 1), "b": rand_tv(base, 2)}
    data = {"a": rows(5, 3), "b": rows(7, 4)}
    res = taujp_matrix(base, tvs, data, batch_size=4)
    assert res["tasks"] == ["a", "b"] and len(res["matrix"]) == 2
    ref = tiny_bert().double().eval()
    p0 = {n: p.detach() for n, p in ref.named_parameters()}
    h = 1e-4
    for i, t in enumerate(tvs):
        for j, d in enumerate(data):
            batch = {k: torch.stack([r[k] for r in data[d]]) for k in ("input_ids", "attention_mask")}
            tau = {n: v.double() for n, v in tvs[t].items()}
            with torch.no_grad():
                lp = functional_call(ref, {n: p0[n] + h * tau.get(n, 0 * p0[n]) for n in p0}, args=(), kwargs=batch).logits
                lm = functional_call(ref, {n: p0[n] - h * tau.get(n, 0 * p0[n]) for n in p0}, args=(), kwargs=batch).logits
            want = float(((lp - lm) / (2 * h)).norm(dim=-1).mean())
            assert res["matrix"][i][j] == pytest.approx(want, rel=1e-4)


def test_disentanglement_error_matches_direct_count():
    base = tiny_bert()
    tv1, tv2 = rand_tv(base, 1, 0.5), rand_tv(base, 2, 0.5)
    d1, d2 = rows(12, 5), rows(12, 6)
    res = disentanglement_error(base, tv1, tv2, d1, d2, alphas=(0.0, 1.0))
    assert res["xi"][0][0] == 0.0

    def pred(delta, data):
        m = tiny_bert().eval()
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in delta:
                    p.add_(delta[n])
            batch = {k: torch.stack([r[k] for r in data]) for k in ("input_ids", "attention_mask")}
            return m(**batch).logits.argmax(-1)

    both = {n: tv1[n] + tv2[n] for n in tv1.keys()}
    want = float((pred(both, d1) != pred(dict(tv1.items()), d1)).float().mean()
                 + (pred(both, d2) != pred(dict(tv2.items()), d2)).float().mean())
    assert res["xi"][1][1] == pytest.approx(want)


def test_task_addition_picks_alpha_on_validation_and_normalizes():
    base = Scalar()
    tvs = {"a": TaskVector({"w": torch.tensor([1.0])}), "b": TaskVector({"w": torch.tensor([1.0])})}
    # accuracy peaks where w equals a task/split-specific centre
    centre = {("a", "val"): 1.0, ("b", "val"): 1.2, ("a", "test"): 0.9, ("b", "test"): 1.0}

    def eval_fn(model, task, split):
        return max(0.0, 1.0 - abs(float(model.w) - centre[(task, split)]))

    res = evaluate_task_addition(base, tvs, eval_fn)
    # merged w = 2α; single w = 1. Val mean normalized: single val = (1.0, 0.8).
    def val_norm(a):
        w = 2 * a
        return ((1 - abs(w - 1.0)) / 1.0 + max(0, 1 - abs(w - 1.2)) / 0.8) / 2
    best = max(DEFAULT_ALPHAS, key=val_norm)
    assert res["best_alpha"] == pytest.approx(best)
    assert res["single"]["test"] == {"a": pytest.approx(0.9), "b": pytest.approx(1.0)}
    w = 2 * best
    assert res["best"]["abs"]["a"] == pytest.approx(1 - abs(w - 0.9))
    assert res["best"]["norm"]["a"] == pytest.approx((1 - abs(w - 0.9)) / 0.9)
    assert res["one_shot"]["alpha"] == 1.0 and res["one_shot"]["abs"]["b"] == pytest.approx(0.0)
    assert len(res["curve"]) == 21


def test_task_negation_respects_control_threshold():
    base = Scalar()
    tv = TaskVector({"w": torch.tensor([1.0])})

    def eval_fn(model, task, split):  # w = −α: target falls with α, control falls faster after 0.5
        a = -float(model.w)
        return 0.9 - 0.8 * a if task == "target" else (0.8 if a <= 0.5 else 0.8 - (a - 0.5))

    res = evaluate_task_negation(base, tv, eval_fn)
    # control ≥ 0.95·0.8 = 0.76 ⇔ α ≤ 0.54 → largest grid α is 0.50
    assert res["alpha"] == pytest.approx(0.5)
    assert res["target"] == pytest.approx(0.5) and res["control"] == pytest.approx(0.8)


def test_accuracy_counts_matches():
    m = tiny_bert().eval()
    data = rows(9, 7)
    with torch.no_grad():
        batch = {k: torch.stack([r[k] for r in data]) for k in ("input_ids", "attention_mask")}
        pred = m(**batch).logits.argmax(-1)
    want = float((pred == torch.stack([r["labels"] for r in data])).float().mean())
    assert accuracy(m, data, batch_size=4) == pytest.approx(want)


def test_table_json_and_plot(tmp_path):
    text = format_table([{"method": "linear", "abs": 0.5, "norm": 0.75}, {"method": "τJp", "abs": 1.0, "norm": None}])
    lines = text.splitlines()
    assert lines[0].split() == ["method", "abs", "norm"] and "0.750" in lines[2] and len(lines) == 4
    save_json({"a": [1.0, 2]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1.0, 2]}
    curve = [{"alpha": a, "avg_norm": a} for a in (0.0, 0.5, 1.0)]
    out = plot_alpha_curves({"m": {"curve": curve, "best_alpha": 1.0}}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and out.endswith("c.png")


def test_linear_task_addition_from_cached_logits_equals_the_model_path():
    """f_lin(θ0 + α Σ τ) = f(θ0) + α·J·Στ: the cached-logits path (datasets=) gives the same accuracies as
    building the linearized model for every α (eval_fn path)."""
    base = tiny_bert()
    tvs = {}
    for i, t in enumerate(("a", "b")):
        tv = rand_tv(base, 10 + i, scale=0.3)
        tvs[t] = TaskVector(dict(tv.items()), kind="linear", task=t)
    data = {"a": {"val": rows(10, 1), "test": rows(12, 2)}, "b": {"val": rows(10, 3), "test": rows(12, 4)}}
    grid = (0.0, 0.3, 0.7, 1.0)
    fast = evaluate_task_addition(base, tvs, datasets=data, alphas=grid, linear=True, batch_size=4)
    slow = evaluate_task_addition(base, tvs, lambda m, t, s: accuracy(m, data[t][s]), alphas=grid, linear=True)
    assert fast["single"] == slow["single"]
    assert [c["abs"] for c in fast["curve"]] == [c["abs"] for c in slow["curve"]]
    assert fast["best_alpha"] == slow["best_alpha"] and fast["one_shot"] == slow["one_shot"]
    assert len({round(c["avg_abs"], 6) for c in fast["curve"]}) > 1  # α actually changes predictions
    with pytest.raises(Exception, match="eval_fn or datasets"):
        evaluate_task_addition(base, tvs)
