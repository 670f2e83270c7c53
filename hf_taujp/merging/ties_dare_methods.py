"""The sign-and-sparsify family: ``magnitude_prune`` (PEFT's ``merge_utils.magnitude_prune``), ``ties``
(TIES-merging, Yadav et al., NeurIPS 2023: PEFT's ``merge_utils.ties`` and mergekit 0.1.5's definitions),
``dare_linear`` and ``dare_ties`` (DARE, Yu et al., ICML 2024: PEFT's ``merge_utils.dare_linear`` /
``dare_ties``).

Same contract as :mod:`hf_taujp.merging.methods`; the masks, thresholds and sign election they share
live in :mod:`.sparsify`.
"""
from __future__ import annotations

import torch

from ..errors import MergeConfigError
from .method_helpers import _densities, _per_vector, _signed, _signs_like, _stack, _weights
from .registry import register_merge_method
from .sparsify import (BLOCK, _dare_densities, _disjoint_mean, _magnitude_mask, _majority_sign, _random_prune,
                       kth_largest)


@register_merge_method("magnitude_prune", per_vector=("weights", "density"))
def magnitude_prune(base, vectors, *, weights=None, density: float = 1.0, lambda_: float = 1.0) -> torch.Tensor:
    """Magnitude pruning then task arithmetic: Δ = λ Σ_t α_t · top_k(τ_t), k = int(density_t·numel).

    Follows PEFT's ``merge_utils.magnitude_prune`` (trim over each whole tensor). ``density``: one
    number, or one per vector.
    """
    s = _stack(vectors)
    ds = _densities(density, len(s))
    pruned = torch.stack([t * _magnitude_mask(t, d) for t, d in zip(s, ds)], 0)
    return lambda_ * (pruned * _weights(weights, len(s), s)).sum(0)


@register_merge_method("ties", per_vector=("weights", "density"))
def ties(
    base,
    vectors,
    *,
    weights=None,
    density: float = 1.0,
    majority_sign_method: str = "total",
    lambda_: float = 1.0,
    definition: str = "peft",
    normalize: bool = True,
) -> torch.Tensor:
    """TIES-merging (Yadav et al., NeurIPS 2023): trim → elect sign → disjoint mean, × λ.

    ``definition="peft"`` (default) follows PEFT's ``merge_utils.ties``: trim each τ_t to its
    k = int(density_t·numel) largest |entries| over the tensor; the sign is elected on the
    *unweighted* trimmed τ̂ (``total``: sign Σ_t τ̂_t, ≥ 0 → +; ``frequency``: sign Σ_t sign τ̂_t);
    Δ = Σ_t α_t τ̂_t m_t / max(1, Σ_t m_t) with m_t = [sign τ̂_t = elected sign].
    (With α = 1 this is the official TIES code, except that the official code trims over the whole
    flattened model vector instead of tensor by tensor.)

    ``definition="mergekit"`` follows mergekit 0.1.5: keep the k = max(1, floor(density_t·numel))
    largest |τ_t| (by a linear-time threshold, see :func:`_magnitude_mask_mergekit` for the tie
    case); δ_t = α_t τ̂_t; sign = + where Σ δ_t ≥ 0; Δ = Σ δ_t m_t / Σ |α_t| m_t if ``normalize``
    (zero denominator → 1) else Σ δ_t m_t.

    Negative α_t (both definitions): the vector −τ_t with weight |α_t| — it votes with sign(α_t)·τ̂_t
    and mergekit's normaliser sums |α_t| (mergekit itself divides by Σ α_t m_t, which turns a lone
    negated vector back into +τ). Identical to PEFT / mergekit for α ≥ 0. ``density``: one number or
    one per vector.
    """
    if definition not in ("peft", "mergekit"):
        raise MergeConfigError(f'ties definition must be "peft" or "mergekit", got {definition!r}')
    if definition == "mergekit":
        return _ties_mergekit(vectors, weights, density, majority_sign_method, lambda_, normalize)
    s = _stack(vectors)
    ds = _densities(density, len(s))
    signs, mags = _signed(weights, len(s))
    trimmed = torch.stack([sg * t * _magnitude_mask(t, d) for t, d, sg in zip(s, ds, signs)], 0)
    sign = _majority_sign(trimmed, majority_sign_method)
    mask = (trimmed.sign() == sign).to(s.dtype)
    return lambda_ * _disjoint_mean(trimmed * _weights(mags, len(s), s), mask)


def _ties_mergekit(vectors, weights, density: float, majority_sign_method: str, lambda_: float,
                   normalize: bool) -> torch.Tensor:
    """mergekit's TIES (see :func:`ties`), blocked: the trim thresholds come from :func:`kth_largest`
    over each whole τ_t; then every block of ``BLOCK`` entries goes through trim → weight → sign
    election → disjoint (normalised) sum in reused L2-sized buffers, ~10 passes per vector that
    never leave the cache, instead of ~10 model-sized temporaries per vector.

    Per entry: δ_t = α_t·τ_t·[|τ_t| ≥ thr_t]; σ = +1 if Σ_t δ_t ≥ 0 (``frequency``: Σ_t sign δ_t) else −1;
    agree_t = [σ·δ_t > 0]; Δ = σ·Σ_t relu(σ·δ_t) / D with D = Σ_t |α_t|·agree_t (0 → 1; D = 1 when not
    ``normalize``), times λ. σ·relu(σ·δ_t) = δ_t·agree_t exactly (a sign flip rounds nothing).
    """
    if len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    if majority_sign_method not in ("total", "frequency"):
        raise MergeConfigError(f'majority_sign_method must be "total" or "frequency", got {majority_sign_method!r}')
    shape = tuple(vectors[0].shape)
    if any(tuple(v.shape) != shape for v in vectors):
        raise MergeConfigError(f"task vectors have different shapes: {sorted({tuple(v.shape) for v in vectors})}")
    dt = torch.float64 if any(v.dtype == torch.float64 for v in vectors) else torch.float32
    dev = vectors[0].device
    T = len(vectors)
    ws = _per_vector(1.0 if weights is None else weights, T, "weights")
    ds = _densities(density, T)
    flat = [v.reshape(-1).to(dt) for v in vectors]
    n = flat[0].numel()
    thr = [None if d >= 1.0 else kth_largest(f, max(1, int(d * n)), absolute=True).item() for f, d in zip(flat, ds)]
    out = torch.empty(n, dtype=dt, device=dev)
    c = min(BLOCK, max(n, 1))

    def empty(dtype=dt):
        return torch.empty(c, dtype=dtype, device=dev)

    d = [empty() for _ in range(T)]
    x, elect, div, fmask, sgn, bmask = empty(), empty(), empty(), empty(), empty(), empty(torch.bool)
    for s in range(0, n, c):
        e = min(n, s + c)
        m = e - s
        xb, el, dv, fm, sg, bm, acc = x[:m], elect[:m], div[:m], fmask[:m], sgn[:m], bmask[:m], out[s:e]
        for t in range(T):
            src = flat[t][s:e]
            db = d[t][:m]
            if thr[t] is not None:  # multiply by a 0/1 mask: faster than masked_fill_ on CPU
                torch.abs(src, out=xb)
                torch.ge(xb, thr[t], out=fm)
                torch.mul(src, fm, out=db)
            else:
                db.copy_(src)
            if ws[t] != 1:
                db.mul_(ws[t])
            if majority_sign_method == "total":
                el.copy_(db) if t == 0 else el.add_(db)
            else:
                torch.sign(db, out=xb)
                el.copy_(xb) if t == 0 else el.add_(xb)
        torch.ge(el, 0, out=bm)
        sg.copy_(bm).mul_(2.0).sub_(1.0)  # ±1
        acc.zero_()
        dv.zero_()
        for t in range(T):
            torch.mul(d[t][:m], sg, out=xb)  # > 0 exactly where δ_t agrees with the elected sign
            if normalize:
                torch.gt(xb, 0, out=fm)
                dv.add_(fm, alpha=abs(ws[t]))  # |α_t|: see the negation rule in ties()
            acc.add_(xb.clamp_(min=0))
        if normalize:
            torch.eq(dv, 0, out=fm)
            dv.add_(fm)
            acc.div_(dv)
        acc.mul_(sg)
    if lambda_ != 1:
        out.mul_(lambda_)
    return out.reshape(shape)


@register_merge_method("dare_linear", per_vector=("weights", "density", "p"))
def dare_linear(base, vectors, *, weights=None, density: float | None = None, p: float | None = None,
                seed: int | None = None, lambda_: float = 1.0) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024) + task arithmetic: Δ = λ Σ_t α_t (m_t ⊙ τ_t)/density_t,
    m_t ~ Bernoulli(density_t). Give ``density`` (PEFT / mergekit) or the paper's drop rate ``p`` =
    1 − density (see :func:`dare_density`), each one number or one per vector. Follows PEFT's
    ``merge_utils.dare_linear``."""
    s = _stack(vectors)
    pruned = _random_prune(s, _dare_densities(density, p, len(s)), seed)
    return lambda_ * (pruned * _weights(weights, len(s), s)).sum(0)


@register_merge_method("dare_ties", per_vector=("weights", "density", "p"))
def dare_ties(base, vectors, *, weights=None, density: float | None = None, p: float | None = None,
              majority_sign_method: str = "total", seed: int | None = None, lambda_: float = 1.0) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint mean (PEFT's
    ``merge_utils.dare_ties``): τ̂_t = m_t ⊙ τ_t / density_t, sign elected on τ̂, Δ = λ·disjoint mean
    of α_t τ̂_t; ``density`` or drop rate ``p`` as in :func:`dare_linear`. A negative α_t votes with
    −τ̂_t (see :func:`ties`). (mergekit's dare_ties rescales to keep each tensor's L1 norm and sums
    instead.)"""
    s = _stack(vectors)
    pruned = _random_prune(s, _dare_densities(density, p, len(s)), seed)
    signs, mags = _signed(weights, len(s))
    pruned = pruned * _signs_like(signs, s)
    sign = _majority_sign(pruned, majority_sign_method)
    mask = (pruned.sign() == sign).to(s.dtype)
    return lambda_ * _disjoint_mean(pruned * _weights(mags, len(s), s), mask)
