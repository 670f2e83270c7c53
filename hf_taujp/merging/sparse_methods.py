"""The LLM staples and consensus merges: ``model_stock``, ``slerp``, ``della`` / ``della_linear``,
``breadcrumbs`` / ``breadcrumbs_ties``, ``consensus`` / ``consensus_ties``.

Same contract as :mod:`hf_taujp.merging.methods`: one pure function per method over the tensors of
ONE parameter (base θ0, task vectors τ_1..τ_T), returning the merged Δ (the merged weight is θ0 + Δ);
declared keyword-only parameters; per-vector parameters take one number or one per vector; a
negative α_t merges −τ_t with weight |α_t|. mergekit's YAML names are kept (``density``, ``gamma``,
``epsilon``, ``t``, ``normalize``, ``lambda``). Every method refuses NaN / inf inputs
(``HfTaujpError`` naming the vector and parameter). Where a reference implementation and the paper
disagree, the paper is followed and the difference is named in the method's docstring.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from ..errors import HfTaujpError, MergeConfigError
from .method_helpers import _densities, _on_meta, _per_vector, _signed, _stack, _weights
from .registry import register_merge_method
from .sparsify import _generator, _majority_sign, kth_largest
from .ties_dare_methods import ties

SLERP_DOT_THRESHOLD = 0.9995  # mergekit merge_methods/slerp.py: |cos| above it → linear interpolation
SLERP_EPS = 1e-8  # mergekit's normalize(): a vector of norm ≤ eps is not normalised


# ----------------------------------------------------------------------------------- checks
def _number(value, what: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real in [lo, hi], else ``MergeConfigError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise MergeConfigError(f"{what} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" ≥ {lo}" if lo is not None else "")
        raise MergeConfigError(f"{what} must be a finite number{rng}, got {value!r}")
    return v


def _flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise MergeConfigError(f"{what} must be true or false, got {value!r}")
    return value


def _finite_inputs(vectors, name: str, base=None) -> None:
    """``HfTaujpError`` if a task vector (or the base, when the method reads it) has NaN / inf entries.
    One sum per tensor (NaN / inf propagate through it); the mask only when the sum is not finite."""
    items = [(f"task vector {i}", v) for i, v in enumerate(vectors)]
    if base is not None:
        items.append(("the base", base))
    for label, v in items:
        if not torch.is_tensor(v) or not v.is_floating_point() or v.numel() == 0 or _on_meta(v):
            continue
        if not bool(torch.isfinite(v.sum(dtype=torch.float64))) and not bool(torch.isfinite(v).all()):
            raise HfTaujpError(f"{label} has NaN/inf entries in {name or 'a parameter'}")


def _no_weights(weights, n: int, method: str) -> None:
    """model_stock and slerp have no per-vector weights (mergekit ignores them): only 1s are accepted."""
    if weights is not None and any(w != 1.0 for w in _per_vector(weights, n, "weights")):
        raise MergeConfigError(f"{method} takes no weights (its coefficients come from the vectors themselves); "
                               f"got weights={weights!r}")


def _combine(pruned: torch.Tensor, weights, *, consensus: bool, majority_sign_method: str, normalize: bool,
             lambda_: float) -> torch.Tensor:
    """mergekit's ``GTATask`` mix of sparsified vectors τ̂_t (``generalized_task_arithmetic.py``):
    δ_t = α_t·τ̂_t; without consensus Δ = Σ_t δ_t (/ Σ_t |α_t| if ``normalize``); with consensus the sign
    σ = sign Σ_t δ_t (``total``, ≥ 0 → +) or sign Σ_t sign δ_t (``frequency``) is elected on the
    *weighted* δ_t, agree_t = [sign δ_t = σ], Δ = Σ_t δ_t·agree_t (/ Σ_t |α_t|·agree_t, 0 → 1, if
    ``normalize``); × λ. |α_t| where mergekit sums α_t: the negation rule (identical for α ≥ 0)."""
    n = len(pruned)
    _, mags = _signed(weights, n)
    d = pruned * _weights(weights, n, pruned)
    if consensus:
        agree = (d.sign() == _majority_sign(d, majority_sign_method)).to(d.dtype)
        out = (d * agree).sum(0)
        if normalize:
            div = (_weights(mags, n, d) * agree).sum(0)
            out = out / torch.where(div == 0, torch.ones_like(div), div)
    else:
        out = d.sum(0)
        if normalize:
            out = out / (sum(mags) if sum(mags) >= 1e-8 else 1.0)  # mergekit: |divisor| < 1e-8 → 1
    return out if lambda_ == 1 else out * lambda_


# ----------------------------------------------------------------------------------- model stock
@register_merge_method("model_stock")
def model_stock(base, vectors, *, weights=None, filter_wise: bool = False, name: str = "") -> torch.Tensor:
    """Model Stock (Jang et al., ECCV 2024: the interpolation ratio for N fine-tuned models and the
    angle between them), mergekit's definition (``merge_methods/model_stock.py``):

        cos θ = mean_{i<j} ⟨τ_i, τ_j⟩ / (‖τ_i‖·‖τ_j‖),   t = N·cos θ / (1 + (N − 1)·cos θ),   Δ = t·mean_t τ_t

    i.e. θ = t·mean(θ_t) + (1 − t)·θ0, N = number of vectors (≥ 2), cosines over each flattened tensor;
    ``filter_wise=True`` (mergekit's option, default False): one θ and t per row (output filter;
    a 1-D tensor is one row, a > 2-D tensor is cut into ``shape[0]`` rows where mergekit would use its
    last dimension). The pairwise mean is mergekit's choice for N > 2 (its comment: the paper gives no rule).
    Differences: mergekit clamps ‖τ_i‖·‖τ_j‖ at 1e-6, which shrinks cos θ for tensors of small τ
    (norm products below 1e-6: biases, norms); here the exact cosine (0 when a τ is zero). Where
    1 + (N − 1)·cos θ ≈ 0 (|·| < 1e-6: unit τ's summing to zero, t undefined) Δ = 0, the base kept, as
    mergekit 0.1.5. No weights (mergekit ignores them). Fewer than two vectors is an error. Reads only
    τ, so linear (tangent) vectors merge the same way.
    """
    _flag(filter_wise, "filter_wise")
    s = _stack(vectors, name)
    n = len(s)
    if n < 2:
        raise MergeConfigError(f"model_stock needs at least two task vectors (its angle is between fine-tuned "
                               f"models; mergekit: base plus two or more models), got {n}")
    _no_weights(weights, n, "model_stock")
    _finite_inputs(vectors, name)
    rows = s.shape[1] if filter_wise and s.dim() > 2 else 1
    flat = s.reshape(n, rows, -1)
    gram = torch.einsum("trk,srk->tsr", flat, flat)  # ⟨τ_t, τ_s⟩ per row: (T, T, rows)
    norms = torch.diagonal(gram, dim1=0, dim2=1).clamp(min=0).sqrt().T  # (T, rows)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            prod = norms[i] * norms[j]
            cos.append(torch.where(prod > 0, gram[i, j] / torch.where(prod > 0, prod, 1.0), 0.0).clamp(-1, 1))
    cos = torch.stack(cos).mean(0)
    denom = 1 + (n - 1) * cos  # ≥ 0: ‖Σ_t τ_t/‖τ_t‖‖² ≥ 0; 0 only when the unit vectors sum to zero
    singular = denom.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denom)).unsqueeze(-1)
    return (t * flat.mean(0)).reshape(s.shape[1:])


# ----------------------------------------------------------------------------------- slerp
@register_merge_method("slerp", linear_ok=False)
def slerp(base, vectors, *, weights=None, t: float | None = None, name: str = "") -> torch.Tensor:
    """Spherical interpolation from the fine-tuned model v0 = θ0 + τ_1 to v1 = θ0 + τ_2 at ``t``
    (Shoemake 1985; mergekit's ``merge_methods/slerp.py``, formula, normalisation and fallback):

        ω = arccos⟨v0/‖v0‖, v1/‖v1‖⟩,   slerp = sin((1−t)ω)/sin ω · v0 + sin(tω)/sin ω · v1,
        Δ = slerp − θ0 = s0·τ_1 + s1·τ_2 + (s0 + s1 − 1)·θ0

    over each whole tensor; a vector of norm ≤ 1e-8 is not normalised (mergekit's eps); when
    |cos ω| > 0.9995 (nearly colinear, mergekit's DOT_THRESHOLD) it is the linear interpolation
    Δ = (1 − t)·τ_1 + t·τ_2. Δ is assembled as above rather than slerp − θ0, the same number without
    the cancellation. ``t`` (required, in [0, 1]) has no default (mergekit requires it); t = 0 gives τ_1,
    t = 1 gives τ_2. Exactly two vectors. Difference from mergekit: mergekit interpolates from the
    *base* model to one other model; here the two endpoints are the two fine-tuned models (with
    ``vectors=[0·τ, τ]`` it is mergekit's base → model slerp). Not linear in τ and it reads θ0 itself, so
    linear (tangent) vectors are refused (``linear_ok=False``): θ0 + τ is no model for a tangent τ.
    """
    if len(vectors) != 2:
        raise MergeConfigError(f"slerp interpolates between exactly two task vectors, got {len(vectors)}")
    if t is None:
        raise MergeConfigError("slerp needs t (0 = the first fine-tuned model, 1 = the second)")
    t = _number(t, "slerp's t", 0.0, 1.0)
    _no_weights(weights, 2, "slerp")
    if base is None:
        raise MergeConfigError("slerp needs the base tensor θ0 (it interpolates the weights θ0 + τ)")
    s = _stack(vectors, name)
    if tuple(base.shape) != tuple(s.shape[1:]):
        raise MergeConfigError(f"slerp: base of {name or 'a parameter'} has shape {tuple(base.shape)}, the vectors "
                               f"{tuple(s.shape[1:])}")
    _finite_inputs(vectors, name, base)
    t1, t2 = s[0], s[1]
    b = base.to(device=s.device, dtype=s.dtype)
    v0, v1 = b + t1, b + t2
    n0, n1 = float(torch.linalg.vector_norm(v0)), float(torch.linalg.vector_norm(v1))
    c0, c1 = (1 / n0 if n0 > SLERP_EPS else 1.0), (1 / n1 if n1 > SLERP_EPS else 1.0)
    dot = float(torch.dot(v0.reshape(-1), v1.reshape(-1))) * c0 * c1
    del v0, v1
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return (1 - t) * t1 + t * t2
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s0, s1 = math.sin(omega - omega * t) / math.sin(omega), math.sin(omega * t) / math.sin(omega)
    return s0 * t1 + s1 * t2 + (s0 + s1 - 1.0) * b


# ----------------------------------------------------------------------------------- DELLA
def _della_params(density, epsilon, n: int) -> tuple[list[float], list[float]]:
    ds = _densities(density, n)
    es = [_number(e, "epsilon", lo=0.0) for e in _per_vector(epsilon, n, "epsilon")]
    for d, e in zip(ds, es):
        if d < 1.0 and (d - e < -1e-12 or d + e > 1.0 + 1e-12):  # past rounding: p is clamped to [0, 1]
            raise MergeConfigError(f"della: epsilon={e} puts the keep probabilities [density − ε, density + ε] = "
                                   f"[{d - e:g}, {d + e:g}] outside [0, 1]; use ε ≤ min(density, 1 − density) = "
                                   f"{min(d, 1 - d):g}")
    return ds, es


def _magprune(t: torch.Tensor, density: float, epsilon: float, rescale: str, g) -> torch.Tensor:
    """MAGPRUNE of one τ (DELLA's Drop step, as the authors implemented it in mergekit PR #366): per row,
    keep-probability p = (density − ε) + 2ε·(r − 1)/(n − 1) for the entry of magnitude rank r (1 = smallest)
    of n, mask ~ Bernoulli(p), kept entries rescaled by 1/p (``inverse``), to the tensor's L1 norm (``l1``,
    mergekit ≥ 0.1's ``rescale: true``) or not at all (``none``)."""
    if density >= 1.0:
        return t
    rows = t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)
    n = rows.shape[1]
    if n == 1:  # one entry per row: the mid probability (mergekit divides 0 by 0 here)
        rank_norm = torch.full_like(rows, 0.5)
    else:
        order = torch.argsort(rows.abs(), dim=1, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=t.device).expand_as(order))
        rank_norm = ranks.to(rows.dtype) / (n - 1)
    p = ((density - epsilon) + rank_norm * 2 * epsilon).clamp_(0.0, 1.0)
    mask = torch.bernoulli(p, generator=g)
    if rescale == "inverse":
        out = torch.where(mask > 0, rows / torch.where(p > 0, p, 1.0), 0.0)
    else:
        out = rows * mask
        if rescale == "l1":  # mergekit sparsify.rescaled_masked_tensor(norm=l1, eps=1e-7)
            before, after = rows.abs().sum(), out.abs().sum()
            if before >= 1e-7 and after >= 1e-7:
                out = out * (before / after)
    return out.reshape(t.shape)


def _della(vectors, weights, density, epsilon, seed, rescale, name, **mix) -> torch.Tensor:
    if rescale not in ("inverse", "l1", "none"):
        raise MergeConfigError(f'della rescale must be "inverse" (the paper: 1/p), "l1" (mergekit) or "none", '
                               f"got {rescale!r}")
    s = _stack(vectors, name)
    ds, es = _della_params(density, epsilon, len(s))
    _finite_inputs(vectors, name)
    g = _generator(seed, s.device)
    pruned = torch.stack([_magprune(v, d, e, rescale, g) for v, d, e in zip(s, ds, es)], 0)
    return _combine(pruned, weights, **mix)


_DELLA_DOC = """DELLA (Deep et al. 2024, "DELLA-Merging": Drop with MAGPRUNE, Elect, Fuse; mergekit's
    ``{name}``, ``sparsify.della_magprune`` + ``generalized_task_arithmetic.py``):

        p_t,i = (ρ_t − ε_t) + 2ε_t·(r_i − 1)/(n − 1),   τ̂_t,i = m_t,i·τ_t,i / p_t,i,   m_t,i ~ Bernoulli(p_t,i)

    r_i = rank of |τ_t,i| in its row (1 = smallest; ranks per row as the paper's row-wise ranking and the
    authors' code; a 1-D tensor is one row, ties broken by position), then
    {mix}
    ρ = ``density`` (default 1.0: no drop, ε ignored, as mergekit), ε = ``epsilon`` (default 0.15,
    mergekit's), each one number or one per vector; ``seed``: the masks' generator (per parameter in
    merges, as DARE); ``lambda_`` (default 1). ε must keep p in [0, 1]: ε ≤ min(ρ, 1 − ρ), else
    ``MergeConfigError``. Differences from mergekit: it refuses p = 0 or 1 (ρ ± ε must lie in the open
    (0, 1)), here allowed (valid probabilities); it rescales the kept entries to the tensor's L1 norm
    (``rescale: true``), the paper and the authors' first implementation (mergekit PR #366) by 1/p —
    the default here (``rescale="l1"`` gives mergekit's, ``"none"`` none); a row of one entry gets p = ρ
    (mergekit divides 0 by 0 there); a > 2-D tensor is ranked in ``shape[0]`` rows (mergekit: along dim 1).
    """


@register_merge_method("della", per_vector=("weights", "density", "epsilon"))
def della(base, vectors, *, weights=None, density: float = 1.0, epsilon: float = 0.15, seed: int | None = None,
          lambda_: float = 1.0, normalize: bool = True, majority_sign_method: str = "total", rescale: str = "inverse",
          name: str = "") -> torch.Tensor:
    return _della(vectors, weights, density, epsilon, seed, rescale, name, consensus=True,
                  majority_sign_method=majority_sign_method, normalize=_flag(normalize, "normalize"),
                  lambda_=_number(lambda_, "lambda_"))


@register_merge_method("della_linear", per_vector=("weights", "density", "epsilon"))
def della_linear(base, vectors, *, weights=None, density: float = 1.0, epsilon: float = 0.15,
                 seed: int | None = None, lambda_: float = 1.0, normalize: bool = False, rescale: str = "inverse",
                 name: str = "") -> torch.Tensor:
    return _della(vectors, weights, density, epsilon, seed, rescale, name, consensus=False,
                  majority_sign_method="total", normalize=_flag(normalize, "normalize"),
                  lambda_=_number(lambda_, "lambda_"))


della.__doc__ = _DELLA_DOC.format(name="della", mix=(
    "TIES' sign election on δ_t = α_t·τ̂_t and the disjoint mean Δ = λ·Σ_t δ_t·agree_t / Σ_t |α_t|·agree_t\n"
    "    (``normalize=True``, mergekit's default; ``majority_sign_method`` \"total\" | \"frequency\"; see\n"
    "    :func:`_combine`)."))
della_linear.__doc__ = _DELLA_DOC.format(name="della_linear", mix=(
    "the weighted sum Δ = λ·Σ_t α_t·τ̂_t (``normalize=True``: / Σ_t |α_t|; default False, mergekit's)."))


# ----------------------------------------------------------------------------------- breadcrumbs
def _breadcrumbs_mask(t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Drop the n_top = ⌊γN⌋ largest |τ| and keep the next k = max(1, ⌊ρN⌋) (n_top lowered to N − k
    when n_top + k > N); thresholds from :func:`kth_largest`: entries tied at a threshold are all
    dropped (upper) / all kept (lower), where a sort keeps an arbitrary subset of them."""
    if density >= 1.0:
        return torch.ones_like(t, dtype=torch.bool)
    n = t.numel()
    keep = max(1, int(density * n))
    top = min(int(gamma * n), n - keep)
    a = t.abs()
    mask = a >= kth_largest(a.reshape(-1), top + keep)
    if top > 0:
        mask &= a < kth_largest(a.reshape(-1), top)
    return mask


def _breadcrumbs(vectors, weights, density, gamma, name, **mix) -> torch.Tensor:
    s = _stack(vectors, name)
    ds = _densities(density, len(s))
    gs = [_number(x, "gamma") for x in _per_vector(gamma, len(s), "gamma")]
    if any(not 0.0 <= x < 1.0 for x in gs):
        raise MergeConfigError(f"gamma (the fraction of largest entries dropped) must be in [0, 1), got {gamma!r}")
    _finite_inputs(vectors, name)
    pruned = torch.stack([v * _breadcrumbs_mask(v, d, x) for v, d, x in zip(s, ds, gs)], 0)
    return _combine(pruned, weights, **mix)


_BREADCRUMBS_DOC = """Model Breadcrumbs (Davari & Belilovsky, ECCV 2024: mask the largest outliers and the small
    perturbations of each layer's τ; mergekit's ``{name}``, ``sparsify.magnitude_outliers``):

        m_t = [γ_t·N ≤ rank↓|τ_t| < γ_t·N + ρ_t·N],   τ̂_t = m_t ⊙ τ_t,   then {mix}

    per tensor of N entries, rank↓ from the largest (0-based): n_top = ⌊γN⌋ largest dropped, the next
    k = max(1, ⌊ρN⌋) kept (n_top lowered to N − k when n_top + k > N, as mergekit). ρ = ``density``
    (default 1.0 = keep all, mergekit's), γ = ``gamma`` (default 0.01, mergekit's), each one number or
    one per vector; ``normalize`` default False (mergekit's); ``lambda_`` default 1. Differences: the
    mergekit GitHub source (``sparsify.py`` at a6e4028) keeps ``sorted[n_bot:-n_top]``, an empty slice
    when n_top = 0, so every tensor with fewer than 1/γ entries (and every tensor when γ = 0) is zeroed;
    here, as the paper, such a tensor keeps its top k (mergekit 0.1.5 on PyPI agrees). k ≥ 1: a positive
    density keeps at least one entry (mergekit's ``magnitude`` rule). Ties at a threshold: see
    :func:`_breadcrumbs_mask`.
    """


@register_merge_method("breadcrumbs", per_vector=("weights", "density", "gamma"))
def breadcrumbs(base, vectors, *, weights=None, density: float = 1.0, gamma: float = 0.01, lambda_: float = 1.0,
                normalize: bool = False, name: str = "") -> torch.Tensor:
    return _breadcrumbs(vectors, weights, density, gamma, name, consensus=False, majority_sign_method="total",
                        normalize=_flag(normalize, "normalize"), lambda_=_number(lambda_, "lambda_"))


@register_merge_method("breadcrumbs_ties", per_vector=("weights", "density", "gamma"))
def breadcrumbs_ties(base, vectors, *, weights=None, density: float = 1.0, gamma: float = 0.01,
                     lambda_: float = 1.0, normalize: bool = False, majority_sign_method: str = "total",
                     name: str = "") -> torch.Tensor:
    return _breadcrumbs(vectors, weights, density, gamma, name, consensus=True,
                        majority_sign_method=majority_sign_method, normalize=_flag(normalize, "normalize"),
                        lambda_=_number(lambda_, "lambda_"))


breadcrumbs.__doc__ = _BREADCRUMBS_DOC.format(name="breadcrumbs", mix=(
    "Δ = λ·Σ_t α_t·τ̂_t\n    (``normalize=True``: / Σ_t |α_t|)."))
breadcrumbs_ties.__doc__ = _BREADCRUMBS_DOC.format(name="breadcrumbs_ties", mix=(
    "TIES' sign election on\n    δ_t = α_t·τ̂_t, Δ = λ·Σ_t δ_t·agree_t (``normalize=True``: / Σ_t |α_t|·agree_t; "
    "see :func:`_combine`).\n    mergekit sums the agreeing deltas by default (TIES itself averages them)."))


# ----------------------------------------------------------------------------------- consensus (TALL masks)
def _consensus(nu: torch.Tensor, mtl: torch.Tensor, threshold, k, lambda_) -> torch.Tensor:
    n = len(nu)
    lam = [_number(x, "threshold", lo=0.0) for x in _per_vector(threshold, n, "threshold")]
    if isinstance(k, bool) or not isinstance(k, Real) or not float(k).is_integer() or k < 0:
        raise MergeConfigError(f"k (how many task masks must agree) must be an integer ≥ 0, got {k!r}")
    lambda_ = _number(lambda_, "lambda_")
    masks = nu.abs() >= _weights(lam, n, nu) * (mtl - nu).abs()  # TALL mask of each task
    keep = masks.sum(0) >= int(k)
    return torch.where(keep, mtl * lambda_, torch.zeros((), dtype=mtl.dtype, device=mtl.device))


_CONSENSUS_DOC = """Consensus merging with TALL masks (Wang et al., ICML 2024, "Localizing Task Information for
    Improved Model Merging and Compression": TALL masks and Consensus Merging; authors' code
    nik-dim/tall_masks, ``tallmask_utils.py``):

        m_t = [ |ν_t| ≥ λ_t·|τ_MTL − ν_t| ],   Δ = λ·[ Σ_t m_t ≥ k ] ⊙ τ_MTL,   ν_t = α_t·τ_t

    with {mtl} λ_t = ``threshold`` (the paper's per-task λ_t, one number or one per
    vector; default 1.0, the authors' ``generate_task_masks`` default; they select it on validation from
    0.2–2.0), k = ``k`` (default 2, the paper: drop "catastrophic" and "selfish" weights; k = 0 gives
    the plain merge, k > T zero), λ = ``lambda_`` (default 1). Differences: FusionBench's
    ``tall_mask`` compares |θ0 − τ_t| (the pretrained weights against a task vector) where the paper
    has |θ_t − θ0| = |τ_t|; here the paper's, so Δ does not depend on θ0. ≥ as the paper writes it
    (the authors' code uses >, which differs only on exact equality). {extra}
    """


@register_merge_method("consensus", elementwise=True, per_vector=("weights", "threshold"))
def consensus(base, vectors, *, weights=None, threshold: float = 1.0, k: int = 2, lambda_: float = 1.0,
              name: str = "") -> torch.Tensor:
    s = _stack(vectors, name)
    _finite_inputs(vectors, name)
    nu = s * _weights(weights, len(s), s)
    return _consensus(nu, nu.sum(0), threshold, k, lambda_)


@register_merge_method("consensus_ties", per_vector=("weights", "threshold", "density"))
def consensus_ties(base, vectors, *, weights=None, threshold: float = 1.0, k: int = 2, density: float = 0.2,
                   majority_sign_method: str = "total", lambda_: float = 1.0, name: str = "") -> torch.Tensor:
    s = _stack(vectors, name)
    _finite_inputs(vectors, name)
    mtl = ties(base, list(s), weights=weights, density=density, majority_sign_method=majority_sign_method)
    return _consensus(s * _weights(weights, len(s), s), mtl, threshold, k, lambda_)


consensus.__doc__ = _CONSENSUS_DOC.format(
    mtl="τ_MTL = Σ_t ν_t (task arithmetic: the paper's Consensus TA);",
    extra="Entry i of Δ reads entry i of the vectors only: streamed in slices.")
consensus_ties.__doc__ = _CONSENSUS_DOC.format(
    mtl="τ_MTL = the TIES merge of the vectors (:func:`hf_taujp.merging.methods.ties`, PEFT\n    definition, "
        "``density`` default 0.2 = TIES' top-20 %, ``majority_sign_method``; the paper's Consensus TIES);",
    extra="The masks compare the untrimmed ν_t with the TIES merge, as the authors' code does.")
