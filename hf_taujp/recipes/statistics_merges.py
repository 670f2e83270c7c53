"""The recipes' statistics-based merges (``--merge-methods``): estimate each task's Fisher / Grams on its own
training batches and merge the recipe's non-linear vectors with them.

Statistics-based merges of the recipes' own non-linear vectors (opt-in, ``--merge-methods``), beside the
recipes' task addition θ0 + α Σ_t τ_t; each is searched over the same α grid on validation:

| name                | statistics (on each task's training examples)          | merged model at α                       |
|---------------------|--------------------------------------------------------|-----------------------------------------|
| `fisher_average`    | diagonal Fisher F_t at θ0 + τ_t                        | θ0 + α·T·Σ_t F_t τ_t / Σ_s F_s          |
| `gradient_matching` | F_t at θ0 + τ_t, base Fisher H0 at θ0                  | θ0 + Σ_t α(P + s_t F_t)/(P + α Σ_s s_s F_s) τ_t, P = s0·H0 |
| `regmean`           | input Grams G_t of the trained Linear layers at θ0 + τ_t | θ0 + α·T·(Σ_t G_t)⁻¹ Σ_t G_t τ_t (per layer) |

The averaging methods are scaled by T so that equal statistics give task arithmetic θ0 + α Σ_t τ_t at the
same α; gradient matching's α is Daheim et al.'s own global α (λ of ``merging.methods.gradient_matching``),
which also reduces to task arithmetic for equal Fishers when s0·H0 dominates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..hub import HfTaujpError
from ..task_vector import TaskVector
from .common import weights_of
from .finetuning import Method

__all__ = ["STATISTICS_MERGES", "parse_merge_methods", "check_statistics_options", "statistics_batches",
           "estimate_statistics", "statistics_merge", "add_statistics_arguments", "evaluate_statistics_merges"]


STATISTICS_MERGES = {"fisher_average": "fisher", "gradient_matching": "fisher", "regmean": "gram"}


def parse_merge_methods(merge_methods: str | Sequence[str] | None) -> list[str]:
    """Statistics-based merge methods from a comma list / sequence of names in :data:`STATISTICS_MERGES`
    (empty for None / ""); unknown or repeated names raise."""
    if merge_methods is None:
        return []
    names = [m.strip() for m in merge_methods.split(",")] if isinstance(merge_methods, str) else list(merge_methods)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in STATISTICS_MERGES]
    if unknown:
        raise HfTaujpError(f"unknown merge method(s) {unknown}; choose from {list(STATISTICS_MERGES)} (task arithmetic is "
                           "the recipe's own task addition, always run)")
    if len(set(names)) != len(names):
        raise HfTaujpError(f"a merge method is listed twice: {names}")
    return names


def check_statistics_options(merge_methods: Sequence[str], methods: Sequence[Method], fisher_examples: int,
                             fisher_samples: int, base_fisher_weight: float | None) -> None:
    """Raise HfTaujpError for statistics options that cannot run or would mean nothing (before any training)."""
    for flag, v in (("--fisher-examples", fisher_examples), ("--fisher-samples", fisher_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise HfTaujpError(f"{flag} must be a positive integer, got {v!r}")
    if base_fisher_weight is not None:
        if "gradient_matching" not in merge_methods:
            raise HfTaujpError("--base-fisher-weight (s0) applies to gradient_matching only: add it to --merge-methods")
        if not (float(base_fisher_weight) >= 0 and math.isfinite(float(base_fisher_weight))):
            raise HfTaujpError(f"--base-fisher-weight must be a finite number >= 0, got {base_fisher_weight!r}")
    if merge_methods and not any(not m.linear for m in methods):
        raise HfTaujpError(f"--merge-methods {','.join(merge_methods)} merges non-linear vectors (θ0 + τ_t is the model "
                           "whose statistics are taken): add nonlinear (or nonlinear+taujp) to --methods")


def statistics_batches(examples: Sequence, collate_fn: Callable, batch_size: int, n: int, samples: int = 1) -> list[dict]:
    """The first ``n`` of ``examples`` collated in batches of ``batch_size`` — the batches the recipe's own
    forward reads (``input_ids`` or cached ``inputs_embeds``, mask, position ids, ``logits_to_keep``) —,
    repeated ``samples`` times (each pass draws new labels for the true Fisher)."""
    chosen = list(examples[:n])
    batches = [collate_fn(chosen[i:i + batch_size]) for i in range(0, len(chosen), batch_size)]
    return batches * samples


def estimate_statistics(model: nn.Module, kind: str, batches: Sequence[dict], names: Sequence[str], *, task: str | None,
                        seed: int, meta: Mapping | None = None, output_type: str | None = None):
    """Fisher (``kind="fisher"``: :func:`~hf_taujp.merging.fisher.estimate_fisher`, labels sampled from the model,
    of the parameters ``names``) or Gram (``"gram"``: :func:`~hf_taujp.merging.regmean.estimate_gram` of the
    Linear / Conv1D layers whose weight is in ``names``) of ``model`` at its current weights over ``batches``.
    ``meta``: base_model / base_fingerprint recorded on the statistics (the base θ0, not the fine-tuned weights
    they are taken at) and any other config entries. ``output_type``: the Fisher's, for a model that
    :func:`~hf_taujp.merging.fisher.output_type_of` cannot tell (default: read from the model)."""
    from ..merging import estimate_fisher, estimate_gram
    from ..merging.regmean import linear_layers

    meta = dict(meta or {})
    if kind == "fisher":
        st = estimate_fisher(model, batches, parameters=list(names), seed=seed, task=task, progress=False,
                             output_type=output_type)
    else:
        wanted = set(names)
        modules = [p for p in linear_layers(model) if f"{p}.weight" in wanted]
        if not modules:
            raise HfTaujpError("regmean: no trained parameter is a Linear / Conv1D weight (nothing to take Grams of)")
        st = estimate_gram(model, batches, modules=modules, task=task, progress=False)
    st.base_model = meta.pop("base_model", st.base_model)
    st.base_fingerprint = meta.pop("base_fingerprint", st.base_fingerprint)
    st.extra.update(meta)
    return st


def statistics_merge(base: nn.Module, vectors: Sequence[TaskVector], method: str, stats: Sequence, *,
                     sizes: Sequence[float] | None = None, base_fisher=None, base_weight: float | None = None
                     ) -> Callable[[float], dict[str, torch.Tensor]]:
    """α → the merged Δ of ``method`` (table in the module docstring), {name: tensor}. ``stats``: one Fisher
    (fisher_average, gradient_matching) or Gram (regmean) per vector; gradient matching also takes the tasks'
    dataset sizes s_t (``sizes``), the base Fisher H0 and s0 (``base_weight``). ``base`` holds θ0 for every
    name in the vectors (the recipes' frozen-prefix model does; its fingerprint is not the full model's, so it
    is not compared). The averaging methods are merged once and scaled; gradient matching is merged per α."""
    from ..merging import merge

    common = dict(return_task_vector=True, check_base_model=False, progress=False)
    T = len(vectors)
    if method == "gradient_matching":  # α enters the precision sum: one (elementwise, cheap) merge per α
        def at(alpha: float) -> dict[str, torch.Tensor]:
            return merge(base, list(vectors), method, fishers=list(stats), base_fisher=base_fisher,
                         num_examples=list(sizes), base_num_examples=float(base_weight), lambda_=float(alpha),
                         **common).tensors

        return at
    kw = {"fishers": list(stats)} if method == "fisher_average" else {"grams": list(stats)}
    delta = merge(base, list(vectors), method, **kw, **common).tensors
    return lambda alpha: {k: (float(alpha) * T) * v for k, v in delta.items()}


def add_statistics_arguments(p) -> None:
    """The recipes' ``--merge-methods``, ``--fisher-examples``, ``--fisher-samples`` and ``--base-fisher-weight``."""
    p.add_argument("--merge-methods", default=None,
                   help=f"comma list from {', '.join(STATISTICS_MERGES)}: also merge the non-linear vectors with these "
                        "(each task's Fisher / Grams at θ0 + τ_t, the base Fisher at θ0, on training examples; saved "
                        "under <output-dir>/statistics/), α chosen on validation like task addition; default: none")
    p.add_argument("--fisher-examples", type=int, default=32,
                   help="training examples per task for each Fisher / Gram (and per task for the base Fisher)")
    p.add_argument("--fisher-samples", type=int, default=1,
                   help="labels sampled from the model per example for the Fisher (the true Fisher's Monte-Carlo size)")
    p.add_argument("--base-fisher-weight", type=float, default=None, metavar="S0",
                   help="gradient_matching's s0, how much the base Fisher counts against the tasks' s_t (their training "
                        "examples): large s0 → task arithmetic, s0 = 0 → Fisher averaging; no principled value when "
                        "the pretraining data is unseen; default: the mean s_t")


def evaluate_statistics_merges(model, label, vectors, tasks, single, stats, ctx, results, score, alphas, shape_alphas,
                               *, say, prefix: str) -> None:
    """Each of ``ctx["merge_list"]`` on one method's (non-linear) vectors with their statistics, evaluated by
    the task-addition protocol over α (θ0 + Δ(α) written into ``model``; ``score(α, task, split, model)``
    is the recipe's score); recorded in ``results["merges"]["<label> · <merge>"]``. Shared by GLUE and CLIP."""
    from ..evaluation import _addition_protocol

    vecs = [vectors[t] for t in tasks]
    for method in ctx["merge_list"]:
        kind = STATISTICS_MERGES[method]
        delta = statistics_merge(model, vecs, method, [stats[kind][t] for t in tasks],
                                 sizes=[ctx["sizes"][t] for t in tasks], base_fisher=ctx["base_fisher"],
                                 base_weight=ctx["base_weight"])
        with weights_of(model) as set_weights:
            def model_fn(alpha):
                set_weights(1.0, delta(alpha))
                return model

            res = _addition_protocol(tasks, single, [float(a) for a in alphas], False, score, model_fn,
                                     extra_alphas=shape_alphas)
        res["merge"] = {"method": method, "vectors": label,
                        **({"s0": ctx["base_weight"], "s_t": [ctx["sizes"][t] for t in tasks]}
                           if method == "gradient_matching" else {})}
        key = f"{label} · {method}"
        results["merges"][key] = res
        say(f"{prefix} {key}: one-shot normalized {res['one_shot']['avg_norm']}, best α {res['best_alpha']:.2f}")
