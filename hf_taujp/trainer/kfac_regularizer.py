"""The dataless KFAC penalty R_KFAC(τ) = Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ) (Porrello et al., ICLR 2026).

For every trained linear layer (ΔW (out × in) in the (out, in) layout, Δb (out,)) and the other tasks'
aggregated factors (A (in + 1)², G out²; :func:`~hf_taujp.trainer.curvature.aggregate_kfac`):

    R_KFAC = Σ_layers Σ_terms tr(G·ΔW̃·A·ΔW̃ᵀ),   ΔW̃ = [ΔW | Δb]                      (paper Eq. 7 / 8;
                                                                     ``tak.py`` ``penalty_weight``)

= Σ vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) (column-major vec), the KFAC approximation of Σ_s E_{x∼D_s} ‖J f(x; θ0)·τ‖²
— squared, and with the factors' row means: the mean over the other tasks' input rows (tokens) of the
squared drift of a token-level output (for one linear layer this is exact with the exact G; a per-example
output reached through R token rows is counted ≈ 1/R, as in the reference). The loss adds λ·R_KFAC; the
reference's λ is 500 (``--reg_lambda``, CLIP ViT, f = the normalised image embedding).

How ΔW̃ is taken, without forming what need not be formed:

* dense ΔW (linearized full rank, non-linear θ − θ0): sum((G·ΔW̃) ⊙ (ΔW̃·A)), O(out²·in + out·in²);
* low-rank ΔW = Σ_i s_i·B_i·A_i (low-rank linearized, LoRA): ΔW̃ = L·R with L = [B_1 … B_m | Δb] and
  R = [[s_i·A_i, 0] …; [0, 1]], so tr(G·L·R·A·Rᵀ·Lᵀ) = sum((Lᵀ·G·L) ⊙ (R·A·Rᵀ)), O((out² + in²)·r);
* a compressed factor M = F·Fᵀ enters as its root: tr(F_G F_Gᵀ·X·F_A F_Aᵀ·Xᵀ) = ‖F_Gᵀ·X·F_A‖²_F.

No Δb (bias not trained or absent): ΔW̃ = [ΔW | 0], i.e. A's leading in × in block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..compat import describe_base, same_base
from ..errors import (CurvatureBaseMismatchError, CurvatureLayerMismatchError, CurvatureValueError,
                      MissingCurvatureError, OwnCurvatureError)
from .curvature import Factor, KFACStatistics, aggregate_kfac
from .tangents import LayerDelta

__all__ = ["kfac_quadratic", "kfac_penalty", "load_curvature", "prepare_curvature"]


def _operands(delta: LayerDelta, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ΔW̃ as (X, None) (dense, out × (in [+ 1])) or as (L, R) with ΔW̃ = L·R (low-rank parts only)."""
    bias = delta.bias.to(dtype).reshape(-1, 1) if delta.bias is not None else None
    if delta.weight is not None:
        x = delta.weight.to(dtype)
        for b, a, s in delta.factors:  # a dense part as well: the low-rank ones are added to it
            x = x + s * (b.to(dtype) @ a.to(dtype))
        return (torch.cat([x, bias], dim=1) if bias is not None else x), None
    if not delta.factors:  # only Δb
        left = bias
        right = torch.zeros(1, delta.in_features + 1, dtype=dtype, device=bias.device)
        right[0, -1] = 1
        return left, right
    left = torch.cat([b.to(dtype) for b, _, _ in delta.factors] + ([bias] if bias is not None else []), dim=1)
    rows = [s * a.to(dtype) for _, a, s in delta.factors]
    right = torch.cat(rows, dim=0)
    if bias is not None:
        right = torch.cat([right, torch.zeros(right.shape[0], 1, dtype=dtype, device=right.device)], dim=1)
        one = torch.zeros(1, right.shape[1], dtype=dtype, device=right.device)
        one[0, -1] = 1
        right = torch.cat([right, one], dim=0)
    return left, right


class _DenseQuadratic(torch.autograd.Function):
    """tr(G·X·A·Xᵀ) = sum((G·X·A) ⊙ X) with its gradient 2·G·X·A (G and A symmetric, constant): two matrix
    products per step, where autograd through sum((G·X) ⊙ (X·A)) takes four."""

    @staticmethod
    def forward(ctx, x, g, a):
        m = (g @ x) @ a
        ctx.save_for_backward(m)
        return (m * x).sum()

    @staticmethod
    def backward(ctx, grad):
        (m,) = ctx.saved_tensors
        return 2 * grad * m, None, None


def kfac_quadratic(a: Factor, g: Factor, delta: LayerDelta) -> torch.Tensor:
    """tr(G·ΔW̃·A·ΔW̃ᵀ) of one layer (a scalar, differentiable w.r.t. the tensors of ``delta``), in the
    factors' dtype; A is (in + 1) × (in + 1) (its last row / column belong to the bias), G out × out."""
    dtype = (a.dense if a.dense is not None else a.root).dtype
    left, right = _operands(delta, dtype)
    if delta.bias is None:
        a = a.leading(delta.in_features)
    g_dense = g.dense
    if g.root is not None:
        left = g.root.T @ left
    a_dense = a.dense
    if a.root is not None:
        if right is None:
            left = left @ a.root
        else:
            right = right @ a.root
    if right is None:
        if g_dense is not None and a_dense is not None and not (g_dense.requires_grad or a_dense.requires_grad):
            return _DenseQuadratic.apply(left, g_dense, a_dense)
        gx = g_dense @ left if g_dense is not None else left
        xa = left @ a_dense if a_dense is not None else left
        return (gx * xa).sum()
    m1 = left.T @ (g_dense @ left) if g_dense is not None else left.T @ left
    m2 = right @ (a_dense @ right.T) if a_dense is not None else right @ right.T
    return (m1 * m2).sum()


def kfac_penalty(deltas: Mapping[str, LayerDelta], curvature: Mapping[str, Sequence[tuple[Factor, Factor]]]
                 ) -> torch.Tensor:
    """R_KFAC = Σ over the layers of ``deltas`` of Σ over their terms in ``curvature`` of tr(G·ΔW̃·A·ΔW̃ᵀ).

    Raises:
        CurvatureLayerMismatchError: a layer of ``deltas`` without factors.
    """
    missing = [p for p in deltas if p not in curvature]
    if missing:
        raise CurvatureLayerMismatchError(f"no KFAC factors for the trained layers {missing[:5]}")
    total = None
    for path, delta in deltas.items():
        for a, g in curvature[path]:
            q = kfac_quadratic(a, g, delta)
            total = q if total is None else total + q
    if total is None:
        raise CurvatureLayerMismatchError("no trained linear layer to penalise")
    return total


def load_curvature(entries: Sequence[KFACStatistics | str]) -> list[KFACStatistics]:
    """KFACStatistics from objects or folders / Hub repo ids (``KFACStatistics.from_pretrained``; a factor folder
    inside a repo: load it with ``subfolder=`` and pass the object)."""
    return [e if isinstance(e, KFACStatistics) else KFACStatistics.from_pretrained(e) for e in entries]


def prepare_curvature(statistics: Sequence[KFACStatistics], deltas: Mapping[str, LayerDelta], *,
                      fingerprint: str | None, base_model: str | None = None, task_name: str | None = None,
                      aggregation: str = "merged", device=None, dtype: torch.dtype = torch.float32,
                      ) -> dict[str, list[tuple[Factor, Factor]]]:
    """Check the other tasks' factors against the model being trained, then aggregate them over its trained
    layers (:func:`~hf_taujp.trainer.curvature.aggregate_kfac`); extra layers of the factors are dropped.

    Args:
        statistics: the other tasks' factors.
        deltas: the trained layers (:func:`~hf_taujp.trainer.tangents.layer_deltas`; only paths and sizes are read).
        fingerprint, base_model: θ0 of the model being trained (``hf_taujp.fingerprint``, its Hub id).
        task_name: the task being trained (``taujp_task_name``), or None (then own factors cannot be told).
    Raises:
        MissingCurvatureError: no factors.
        OwnCurvatureError: factors of ``task_name``, or two factors of the same task.
        CurvatureBaseMismatchError: factors of another base (``hf_taujp.compat`` rule: fingerprints decide).
        CurvatureLayerMismatchError: a trained layer missing from some factors, or of another size.
        CurvatureValueError: NaN / inf in a factor.
    """
    if not statistics:
        raise MissingCurvatureError("taujp_regularizer='kfac' needs the other tasks' KFAC factors: taujp_curvature "
                                    "(or TauJpTrainer(curvature=...)) is empty")
    seen: dict[str, int] = {}
    for i, s in enumerate(statistics):
        who = f"KFAC factors #{i} (task {s.task!r})"
        if task_name is not None and s.task == task_name:
            raise OwnCurvatureError(f"{who} are the training task's own: the penalty is for the *other* tasks' "
                                    "inputs (drop them from taujp_curvature)")
        if s.task is not None and s.task in seen:
            raise OwnCurvatureError(f"{who}: task {s.task!r} is given twice (#{seen[s.task]} and #{i})")
        if s.task is not None:
            seen[s.task] = i
        if any(s is t for t in statistics[:i]):
            raise OwnCurvatureError(f"{who}: the same factors are given twice")
        mine = {"base_fingerprint": fingerprint, "base_model": base_model}
        theirs = {"base_fingerprint": s.base_fingerprint, "base_model": s.base_model}
        if not same_base(mine, theirs):
            raise CurvatureBaseMismatchError(f"{who} were estimated at {describe_base(theirs)}, but the model being "
                                             f"trained is {describe_base(mine)}")
        missing = [p for p in deltas if p not in s.layers]
        if missing:
            raise CurvatureLayerMismatchError(
                f"{who} have no factors for {len(missing)} trained layer(s): {missing[:5]} (they cover "
                f"{len(s.layers)} layers: estimate them with layers= including every trained layer)")
        for p, d in deltas.items():
            info = s.layers[p]
            have, want = (int(info["out_features"]), int(info["in_features"])), (d.out_features, d.in_features)
            if have != want:
                raise CurvatureLayerMismatchError(f"{who}: layer {p!r} has factors for (out, in) = {have}, the model's "
                                                  f"layer is {want}")
            for t in (f"{p}.A", f"{p}.G", f"{p}.A_root", f"{p}.G_root"):
                v = s.tensors.get(t)
                if v is not None and not bool(torch.isfinite(v).all()):
                    raise CurvatureValueError(f"{who}: {t} holds NaN or inf")
    return aggregate_kfac(statistics, aggregation, layers=list(deltas), device=device, dtype=dtype)
