"""The GLUE recipe's evaluation of one run's vectors: task addition (α chosen on validation, scores on dev), the
statistics-based merges of a non-linear run's vectors, and the comparison of merge methods on them. The scores
are the recipe's (:meth:`hf_taujp.recipes.glue_parts.GlueRecipe.choices_scores` and ``metric``): a merged tangent
by the linear reading (one forward-mode pass), merged weights by the model itself.
"""

from __future__ import annotations

import os
import time

from ..evaluation import _addition_protocol
from .runner import STATISTICS_MERGES, compare_and_save, estimate_statistics, evaluate_statistics_merges, weights_of

__all__: list[str] = []  # the recipe's private parts


def _evaluate_addition(model, method, vectors, tasks, choices_scores, metric, alphas, shape_alphas) -> dict:
    """Task addition for one method: single-task scores, α on validation, test at best α and α = 1."""
    total = vectors[tasks[0]]
    for t in tasks[1:]:
        total = total + vectors[t]
    grid = [float(a) for a in alphas]
    all_alphas = sorted(set(grid) | {1.0} | {float(a) for a in shape_alphas})
    if method.linear:
        single = {s: {t: metric(t, s, choices_scores(s, t, vectors[t].tensors)[..., 0]) for t in tasks} for s in ("val", "test")}
        memo = {}
        for t in tasks:  # the whole validation grid from one forward-mode pass per batch
            sc = choices_scores("val", t, total.tensors, all_alphas)
            for j, a in enumerate(all_alphas):
                memo[(a, t, "val")] = metric(t, "val", sc[..., j])

        def acc(a, t, s, _m):
            if (float(a), t, s) not in memo:  # test: only the α the protocol reports, the best and 1 — one pass
                both = sorted({float(a), 1.0})  # for both (the same primal and J·τ, so the same scores as two)
                sc = choices_scores(s, t, total.tensors, both)
                for j, b in enumerate(both):
                    memo[(b, t, s)] = metric(t, s, sc[..., j])
            return memo[(float(a), t, s)]

        return _addition_protocol(tasks, single, grid, True, acc, extra_alphas=shape_alphas)
    with weights_of(model) as set_weights:
        single = {"val": {}, "test": {}}
        for t in tasks:
            set_weights(1.0, vectors[t])
            for s in ("val", "test"):
                single[s][t] = metric(t, s, choices_scores(s, t))
            set_weights(0.0, vectors[t])

        def model_fn(alpha):
            set_weights(alpha, total)
            return model

        return _addition_protocol(tasks, single, grid, False,
                                  lambda a, t, s, m: metric(t, s, choices_scores(s, t)), model_fn,
                                  extra_alphas=shape_alphas)


def _statistics_merges(model, label, folder, vectors, single, tasks, ctx, results, choices_scores, metric, alphas,
                       shape_alphas, names) -> None:
    """The statistics-based merges of one non-linear method's vectors (run_glue's ``merge_methods``): estimate
    and save the statistics they need (the base Fisher once, at θ0), then evaluate each merge with the task-addition
    protocol (same single-task scores, α grid on validation, dev at the best α and at α = 1)."""
    t0 = time.time()
    need = {STATISTICS_MERGES[m] for m in ctx["merge_list"]}
    root = os.path.join(ctx["output_dir"], "statistics")
    stats: dict[str, dict] = {}
    for i, t in enumerate(tasks):
        tv = vectors[t]
        with weights_of(model) as set_weights:
            set_weights(1.0, tv)  # θ0 + τ_t: the fine-tuned model the statistics describe
            for kind in sorted(need):
                batches = ctx["batches"][t] * (ctx["samples"] if kind == "fisher" else 1)
                st = estimate_statistics(model, kind, batches, list(tv.keys()), task=t, seed=ctx["seed"] + 1000 + i,
                                         meta={**ctx["meta"], "at": "θ0 + τ_t", "vectors": folder,
                                               **({"samples_per_example": ctx["samples"]} if kind == "fisher" else {})})
                st.save_pretrained(os.path.join(root, kind, folder, t))
                stats.setdefault(kind, {})[t] = st
    if "gradient_matching" in ctx["merge_list"] and ctx["base_fisher"] is None:
        batches = [b for t in tasks for b in ctx["batches"][t]] * ctx["samples"]
        h0 = estimate_statistics(model, "fisher", batches, names, task=None, seed=ctx["seed"] + 999,
                                 meta={**ctx["meta"], "at": "θ0", "samples_per_example": ctx["samples"]})
        h0.save_pretrained(os.path.join(root, "fisher", "base"))
        ctx["base_fisher"] = h0
    results["statistics"]["seconds"] = round(results["statistics"]["seconds"] + time.time() - t0, 1)
    print(f"[hf-taujp glue] {label}: {' and '.join(sorted(need))} statistics in {time.time() - t0:.1f} s, saved in {root}/")
    evaluate_statistics_merges(model, label, vectors, tasks, single, stats, ctx, results,
                               lambda a, t, s, m: metric(t, s, choices_scores(s, t)), alphas, shape_alphas,
                               say=print, prefix="[hf-taujp glue]")


def _compare_merges(model, method, label, folder, vectors, single, tasks, bench_list, choices_scores, metric,
                    output_dir, results) -> None:
    """compare_merges on one method's vectors with the recipe's scores: merged tangents are scored by the
    linear reading (one forward-mode pass), merged weights by the model itself; saved beside results.json."""
    def evaluate(merged, split):
        if method.linear:
            tangents = merged.get_tangents()
            return {t: metric(t, split, choices_scores(split, t, tangents)[..., 0]) for t in tasks}
        merged.eval()
        return {t: metric(t, split, choices_scores(split, t, model=merged)) for t in tasks}

    # the suffix model of the frozen-prefix cache is not the base the vectors' fingerprint names
    compare_and_save(model, label, folder, vectors, single, bench_list, evaluate, output_dir, results,
                     prefix="[hf-taujp glue]", check_base_model=False)
