"""The CLIP recipe's evaluation protocols (:mod:`hf_taujp.recipes.clip`), on cached pixels and embeddings:
top-1 accuracy with a task's frozen zero-shot head (:func:`_accuracy`), task addition with α on validation
(:func:`_evaluate_addition`), task negation against the held-out control (:func:`_evaluate_negation`), the
statistics-based merges of the non-linear vectors (:func:`_statistics_merges`: each task's Fisher of its
classifier w.r.t. the image encoder, :class:`_TaskLogits`) and compare_merges' ``evaluate`` (:func:`_merged_accuracy`).
Every embedding goes through :func:`.clip_distributed._embed` (collective under DDP: every process calls these).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import torch
from torch import nn

from ..evaluation import _addition_protocol, evaluate_task_negation
from .clip_distributed import _embed
from .clip_model import ZeroShotCLIP, ZeroShotOutput
from .lambda_options import vector_score
from .report import mean_defined
from .runner import STATISTICS_MERGES, estimate_statistics, evaluate_statistics_merges, weights_of

__all__: list[str] = []  # private helpers of the recipe (hf_taujp.recipes.clip re-exports what tests use)


def _accuracy(clf: ZeroShotCLIP, task_id: int, emb: torch.Tensor, gold: torch.Tensor) -> float:
    ids = torch.full((emb.shape[0],), task_id, dtype=torch.long)
    dev = clf.heads.device
    return float((clf.classify(emb.to(dev), ids.to(dev)).argmax(-1).cpu() == gold).float().mean())


def _merged_accuracy(method, encoder, tasks, pix, acc, bs):
    """``evaluate(merged, split)`` of compare_merges for this recipe: accuracy with each task's zero-shot head of
    the merged encoder's embeddings (a merged tangent by the linear reading f(x; θ0) + J f·τ)."""
    def evaluate(merged, split):
        if method.linear:
            tangents = merged.get_tangents()
            return {t: acc(t, split, sum(_embed(encoder, pix[(t, split)], bs, tangents))) for t in tasks}
        return {t: acc(t, split, _embed(merged.eval(), pix[(t, split)], bs)) for t in tasks}

    return evaluate


def _validation_score(method, encoder, task, pix, acc, bs):
    """``fn(τ tensors) -> top-1 accuracy of task `task` on its validation split`` for taujp_lambda="auto" (the
    recipe's own metric, on the vector a pilot trained so far): the linear reading f(x; θ0) + J f·τ for linear
    methods, θ0 + τ written into the encoder (restored after) for the others."""
    x = pix[(task, "val")]
    return vector_score(method, encoder, lambda tensors: acc(task, "val", sum(_embed(encoder, x, bs, tensors))),
                        lambda: acc(task, "val", _embed(encoder, x, bs)))


def _evaluate_addition(encoder, method, vectors, tasks, pix, emb0, acc, alphas, shape_alphas, bs) -> dict:
    """Task addition for one method: single-task accuracy, α on validation, test at best α and α = 1.

    Linear: the embedding is linear in α, f(x; θ0) + α·J f·τ, so one jvp per split gives every α."""
    total = vectors[tasks[0]]
    for t in tasks[1:]:
        total = total + vectors[t]
    grid = [float(a) for a in alphas]
    if method.linear:
        single = {s: {t: acc(t, s, sum(_embed(encoder, pix[(t, s)], bs, vectors[t].tensors))) for t in tasks}
                  for s in ("val", "test")}
        jt = {(t, s): _embed(encoder, pix[(t, s)], bs, total.tensors)[1] for t in tasks for s in ("val", "test")}
        return _addition_protocol(tasks, single, grid, True,
                                  lambda a, t, s, _m: acc(t, s, emb0[(t, s)] + float(a) * jt[(t, s)]),
                                  extra_alphas=shape_alphas)
    with weights_of(encoder) as set_weights:
        single = {"val": {}, "test": {}}
        for t in tasks:
            set_weights(1.0, vectors[t])
            for s in ("val", "test"):
                single[s][t] = acc(t, s, _embed(encoder, pix[(t, s)], bs))
            set_weights(0.0, vectors[t])

        def model_fn(alpha):
            set_weights(alpha, total)
            return encoder

        return _addition_protocol(tasks, single, grid, False,
                                  lambda a, t, s, m: acc(t, s, _embed(m, pix[(t, s)], bs)), model_fn,
                                  extra_alphas=shape_alphas)


class _TaskLogits(nn.Module):
    """The zero-shot classifier of one task from ``pixel_values`` alone: ``clf``'s logits with task ``task_id``'s
    frozen head, its ``num_classes`` classes only (no padded class to sample) — the model whose Fisher the
    statistics merges take (estimate_fisher passes a batch's model inputs, not its ``task_ids``). Its parameters
    are ``clf``'s: the encoder's parameter ``n`` is ``PREFIX + n`` here."""

    PREFIX = "clf.image_encoder."

    def __init__(self, clf: ZeroShotCLIP, task_id: int, num_classes: int):
        super().__init__()
        self.clf, self.task_id, self.num_classes = clf, int(task_id), int(num_classes)

    @property
    def config(self):
        return self.clf.config

    def forward(self, pixel_values, **_):
        emb = self.clf.image_encoder(pixel_values=pixel_values).image_embeds
        ids = torch.full((emb.shape[0],), self.task_id, dtype=torch.long, device=emb.device)
        return ZeroShotOutput(logits=self.clf.classify(emb, ids)[:, :self.num_classes])


def _encoder_fisher(clf, task_id, num_classes, batches, names, *, task, seed, meta):
    """The Fisher of one task's classifier (:class:`_TaskLogits`) w.r.t. the image encoder's parameters ``names``,
    keyed by the encoder's names (the task vectors' keys)."""
    pre = _TaskLogits.PREFIX
    st = estimate_statistics(_TaskLogits(clf, task_id, num_classes), "fisher", batches, [pre + n for n in names],
                             task=task, seed=seed, meta=meta, output_type="sequence_classification")
    assert all(k.startswith(pre) for k in st.tensors)  # exactly the names asked for, each with the prefix
    st.tensors = {k[len(pre):]: v for k, v in st.tensors.items()}
    return st


def _statistics_merges(clf, label, folder, vectors, single, tasks, ctx, results, pix, acc, alphas, shape_alphas, bs,
                       say) -> None:
    """The statistics-based merges of one non-linear method's vectors (run_clip's ``merge_methods``; run_glue's
    protocol): estimate (every process) and save (the main one) the statistics they need — the base Fisher once,
    at θ0 —, then evaluate each merge like task addition (same single-task scores, α on validation, test at the
    best α and at α = 1)."""
    from ..merging.statistics import FisherStatistics

    encoder = clf.image_encoder
    t0 = time.time()
    need = {STATISTICS_MERGES[m] for m in ctx["merge_list"]}
    root = os.path.join(ctx["output_dir"], "statistics")
    samples = ctx["samples"]
    stats: dict[str, dict] = {}
    for i, t in enumerate(tasks):
        tv = vectors[t]
        names = list(tv.keys())
        with weights_of(encoder) as set_weights:
            set_weights(1.0, tv)  # θ0 + τ_t: the fine-tuned model the statistics describe
            for kind in sorted(need):
                meta = {**ctx["meta"], "at": "θ0 + τ_t", "vectors": folder,
                        **({"samples_per_example": samples} if kind == "fisher" else {})}
                if kind == "fisher":
                    st = _encoder_fisher(clf, *ctx["heads"][t], ctx["batches"][t] * samples, names, task=t,
                                         seed=ctx["seed"] + 1000 + i, meta=meta)
                else:  # the encoder's Linear inputs do not depend on the head: the encoder itself, on its pixels
                    st = estimate_statistics(encoder, "gram", [{"pixel_values": b["pixel_values"]}
                                                               for b in ctx["batches"][t]],
                                             names, task=t, seed=ctx["seed"] + 1000 + i, meta=meta)
                if ctx["save"]:
                    st.save_pretrained(os.path.join(root, kind, folder, t))
                stats.setdefault(kind, {})[t] = st
    if "gradient_matching" in ctx["merge_list"] and ctx["base_fisher"] is None:
        # H0 at θ0 over every task's examples, each read through its own head: the per-task means, pooled
        names = list(vectors[tasks[0]].keys())
        parts = [_encoder_fisher(clf, *ctx["heads"][t], ctx["batches"][t] * samples, names, task=None,
                                 seed=ctx["seed"] + 999 + 7919 * i, meta={}) for i, t in enumerate(tasks)]
        total = sum(p.num_examples for p in parts)
        h0 = FisherStatistics({k: sum(p.tensors[k] * (p.num_examples / total) for p in parts) for k in names},
                              num_examples=total, base_model=ctx["meta"]["base_model"],
                              base_fingerprint=ctx["meta"]["base_fingerprint"], task=None,
                              extra={**{k: v for k, v in ctx["meta"].items() if k not in ("base_model", "base_fingerprint")},
                                     "at": "θ0", "samples_per_example": samples, "empirical": False,
                                     "tasks": list(tasks)})
        if ctx["save"]:
            h0.save_pretrained(os.path.join(root, "fisher", "base"))
        ctx["base_fisher"] = h0
    results["statistics"]["seconds"] = round(results["statistics"]["seconds"] + time.time() - t0, 1)
    say(f"[hf-taujp clip] {label}: {' and '.join(sorted(need))} statistics in {time.time() - t0:.1f} s"
        + (f", saved in {root}/" if ctx["save"] else ""))
    evaluate_statistics_merges(encoder, label, vectors, tasks, single, stats, ctx, results,
                               lambda a, t, s, m: acc(t, s, _embed(m, pix[(t, s)], bs)), alphas, shape_alphas,
                               say=say, prefix="[hf-taujp clip]")


def _evaluate_negation(encoder, method, vectors, tasks, control, pix, acc, alphas, bs) -> dict:
    """θ0 − α τ_t for every target task t (:func:`hf_taujp.evaluation.evaluate_task_negation`; the control is held
    out of the targets), plus the normalized target accuracy (negated / zero-shot) and control accuracy relative
    to the base."""
    out = {}
    for t in tasks:

        def eval_fn(model, which, split, t=t):
            n = t if which == "target" else control
            return acc(n, split, _embed(model, pix[(n, split)], bs))

        r = evaluate_task_negation(encoder, vectors[t], eval_fn, alphas=alphas, linear=method.linear)
        b = r["base"]["test"]
        r["target_norm"] = r["target"] / b["target"] if b["target"] > 0 else None
        r["control_norm"] = r["control"] / b["control"] if b["control"] > 0 else None
        out[t] = r
    return out


def _negation_rows(negation: Mapping[str, Mapping]) -> list[dict]:
    rows = []
    for label, per in negation.items():
        if not per:
            continue
        rows.append({"method": label,
                     "target (base)": mean_defined(r["base"]["test"]["target"] for r in per.values()),
                     "target": mean_defined(r["target"] for r in per.values()),
                     "control": mean_defined(r["control"] for r in per.values()),
                     "target norm": mean_defined(r["target_norm"] for r in per.values()),
                     "control norm": mean_defined(r["control_norm"] for r in per.values()),
                     "α": ", ".join(f"{r['alpha']:.2f}" for r in per.values())})
    return rows
