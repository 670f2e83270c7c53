"""The linear family: ``task_arithmetic`` (Ilharco et al., ICLR 2023, Eq. 1; PEFT's
``merge_utils.task_arithmetic``, mergekit's ``task_arithmetic`` with normalize: false).

Same contract as :mod:`hf_taujp.merging.methods`: one pure function per method over the tensors of ONE
parameter, returning the merged Δ. The negation rule of every family is stated below, above
:func:`task_arithmetic`.
"""
from __future__ import annotations

import torch

from ..errors import MergeConfigError
from .method_helpers import _compute_dtype, _per_vector
from .registry import register_merge_method


# ----------------------------------------------------------------------------------- methods
# Negation. For the methods linear in α (task arithmetic, magnitude pruning, DARE + task arithmetic) a
# negative α_t negates τ_t by the formula itself. For the others a negative α_t is *defined* as merging
# the negated vector −τ_t with weight |α_t|: the sign election votes with sign(α_t)·τ_t, and
# normalisations divide by Σ |α_t|·(...) — for α ≥ 0 exactly the published definitions, and α = [−1]
# always gives Δ = −τ (the definitions with Σ α_t in a denominator would give +τ or ±inf).
@register_merge_method("task_arithmetic", elementwise=True)
def task_arithmetic(base, vectors, *, weights=None, lambda_: float = 1.0) -> torch.Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023, Eq. 1): Δ = λ Σ_t α_t τ_t.

    ``weights`` = α (one per vector or one shared; negative α negates a task). Same as PEFT's
    ``merge_utils.task_arithmetic`` and mergekit's ``task_arithmetic`` (normalize: false).
    """
    if len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    w = _per_vector(1.0 if weights is None else weights, len(vectors), "weights")
    dt = _compute_dtype(vectors[0])
    # accumulate instead of stacking: one output-sized buffer, not T of them
    out = None
    for t, a in zip(vectors, w):
        if tuple(t.shape) != tuple(vectors[0].shape):
            raise MergeConfigError(f"task vectors have different shapes: {tuple(vectors[0].shape)} vs {tuple(t.shape)}")
        out = t.to(dt) * a if out is None else out.add_(t.to(dt), alpha=a)
    return out if lambda_ == 1 else out.mul_(lambda_)
