"""The methods that need per-task statistics: ``fisher_average`` (Fisher merging, Matena & Raffel,
NeurIPS 2022, Eq. 3, diagonal Fisher), ``gradient_matching`` (uncertainty-based gradient matching, Daheim
et al., ICLR 2024, Eq. 11; UKPLab/iclr2024-model-merging) and ``regmean`` (RegMean, Jin et al., ICLR 2023,
Eq. 2 with §3.3's off-diagonal scaling; per-layer input Grams).

Same contract as :mod:`hf_taujp.merging.methods`; the statistics come from :mod:`.fisher` /
:mod:`.regmean` (``estimate_fisher``, ``estimate_gram``) and are registered as ``needs="fisher"`` /
``"gram"``.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import HfTaujpError, MergeConfigError, MissingStatisticsError
from .method_helpers import _on_meta, _per_vector, _signed, _signs_like, _stack, _weights
from .registry import register_merge_method


def _check_stats(stats, n: int, name: str, what: str = "fisher", nonnegative: bool = True):
    """One statistic per task vector, present and finite; diagonal curvature also ≥ 0 (a Gram matrix's
    off-diagonal entries may be negative). Values are not checked on the meta device."""
    if stats is None or len(stats) == 0:
        raise MissingStatisticsError(f"method needs a {what} per task vector, none given for {name or 'parameter'}")
    if len(stats) != n:
        raise MissingStatisticsError(f"got {len(stats)} {what} tensors for {n} task vectors ({name})")
    for i, f in enumerate(stats):
        if f is None:
            raise MissingStatisticsError(f"{what} of task vector {i} missing for {name or 'parameter'}")
        if _on_meta(f):
            continue
        if not torch.isfinite(f).all():
            raise HfTaujpError(f"{what} of task vector {i} has NaN/inf entries for {name or 'parameter'}")
        if nonnegative and (f < 0).any():
            raise HfTaujpError(f"{what} of task vector {i} has negative entries for {name or 'parameter'}")


@register_merge_method("fisher_average", needs="fisher", elementwise=True)
def fisher_average(base, vectors, *, fishers=None, weights=None, fisher_floor: float = 1e-6,
                   name: str = "") -> torch.Tensor:
    """Fisher merging (Matena & Raffel, NeurIPS 2022, Eq. 3), diagonal Fisher:

        θ = Σ_t α_t F̃_t ⊙ θ_t / Σ_t α_t F̃_t,   θ_t = θ0 + τ_t,   F̃_t = max(F_t, fisher_floor)

    returned as Δ = θ − θ0 = Σ_t α_t F̃_t ⊙ τ_t / Σ_t |α_t| F̃_t. ``weights`` = α (the paper's λ_t,
    default 1). Negation: a negative α_t merges −τ_t with weight |α_t| (hence |α_t| in the
    denominator: with Σ α_t F̃_t there, α = [1, −1] divides by ~0 and α = [−1] gives +τ); for α ≥ 0
    this is the paper's formula. The floor keeps entries where every Fisher is 0 at the plain weighted
    average (mergekit-style "epsilon"); an all-zero Fisher warns. All-zero α raises.
    """
    s = _stack(vectors, name)
    _check_stats(fishers, len(s), name)
    F = torch.stack([f.to(device=s.device, dtype=s.dtype) for f in fishers], 0)
    if F.shape != s.shape:
        raise MergeConfigError(f"fisher shape {tuple(F.shape[1:])} != parameter shape {tuple(s.shape[1:])} ({name})")
    signs, mags = _signed(weights, len(s))
    if not any(mags):
        raise MergeConfigError("fisher_average: every weight is 0")
    if not _on_meta(F):
        for i, f in enumerate(F):
            if not (f > 0).any():
                warnings.warn(f"Fisher of task vector {i} is all zero for {name or 'a parameter'}; using the floor {fisher_floor}")
    F = F.clamp(min=fisher_floor)
    wF = _weights(mags, len(s), s) * F
    return (wF * _signs_like(signs, s) * s).sum(0) / wF.sum(0)


@register_merge_method("gradient_matching", needs="fisher", elementwise=True, per_vector=("weights", "num_examples"))
def gradient_matching(base, vectors, *, fishers=None, base_fisher=None, weights=None, num_examples=None,
                      base_num_examples: float = 1.0, lambda_: float = 1.0, delta: float = 1e-12,
                      name: str = "") -> torch.Tensor:
    """Uncertainty-based gradient matching (Daheim et al., ICLR 2024, Eq. 11 with diagonal Fisher and
    per-task α_t; UKPLab/iclr2024-model-merging's ``uncertainty_based_gradient_matching.py`` is the
    case of one shared α):

        Δ = Σ_t a_t [(P + Σ_s |a_s|·s_s·H_s)⁻¹ ⊙ (P + s_t·H_t)] ⊙ τ_t,   P = s0·H0 + δ,   a_t = λ·α_t

    α_t = ``weights`` (default 1), λ = ``lambda_`` (the reference's one global scale), H_t =
    ``fishers[t]`` (mean squared gradients), s_t = ``num_examples[t]`` (turns means into sums; default 1),
    H0 = ``base_fisher`` (required: the base model's Fisher, e.g. ``estimate_fisher(base, data)``),
    s0 = ``base_num_examples``, δ = ``delta``. Without H0 the prior is δ alone, λ cancels out
    (Δ = Σ_t s_t H_t τ_t / Σ_s s_s H_s for λ = 1, i.e. Fisher averaging), so H0 is required
    (``MissingStatisticsError``); use ``fisher_average`` for that merge. Negation: a negative a_t merges
    −τ_t with weight |a_t| (|a_s| in the precision sum, which stays positive); for α, λ ≥ 0 this is the
    paper's formula. With H_t = H0 = c constant and equal s it reduces to task arithmetic with a
    rescaled α (the paper's remark).
    """
    s = _stack(vectors, name)
    _check_stats(fishers, len(s), name)
    if base_fisher is None:
        raise MissingStatisticsError(
            f"gradient_matching needs the base model's Fisher H0 (base_fisher=...) for {name or 'a parameter'}: "
            "without it the prior is δ alone and the merge equals fisher_average with λ inert; estimate it with "
            "estimate_fisher(base_model, data), or use method='fisher_average'")
    H = torch.stack([f.to(device=s.device, dtype=s.dtype) for f in fishers], 0)
    if H.shape != s.shape:
        raise MergeConfigError(f"fisher shape {tuple(H.shape[1:])} != parameter shape {tuple(s.shape[1:])} ({name})")
    n = len(s)
    st = _weights(1.0 if num_examples is None else num_examples, n, s)
    if not _on_meta(st) and (st <= 0).any():
        raise MergeConfigError(f"num_examples must be positive, got {num_examples}")
    _check_stats([base_fisher], 1, name, "base fisher")
    if tuple(base_fisher.shape) != tuple(s.shape[1:]):
        raise MergeConfigError(f"base fisher shape {tuple(base_fisher.shape)} != parameter shape {tuple(s.shape[1:])} ({name})")
    a = [float(lambda_) * w for w in _per_vector(1.0 if weights is None else weights, n, "weights")]
    prior = float(base_num_examples) * base_fisher.to(device=s.device, dtype=s.dtype) + delta
    sH = st * H
    denom = prior + (_weights([abs(x) for x in a], n, s) * sH).sum(0)
    if not _on_meta(denom) and (denom == 0).any():
        raise HfTaujpError(f"gradient_matching: zero curvature with delta=0 for {name or 'a parameter'}; use delta > 0")
    return (_weights(a, n, s) * (prior + sH) / denom * s).sum(0)


@register_merge_method("regmean", needs="gram", linear_ok=False)
def regmean(base, vectors, *, grams=None, weights=None, reduce_non_diagonal_ratio: float = 0.9,
            layout: str = "out_in", nonlinear: str = "average", name: str = "") -> torch.Tensor:
    """RegMean (Jin et al., ICLR 2023, Eq. 2 with the off-diagonal scaling of §3.3).

    Linear weight with per-task input Grams G_t (in × in): G̃_t = |α_t|·(a·G_t + (1 − a)·diag(G_t)),
    a = ``reduce_non_diagonal_ratio`` (the paper's α; 1 = exact least squares, 0 = diagonal only),
    α_t = ``weights`` (default 1). With W = θ0 + τ, the merged W* = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t gives
    Δ = W* − θ0 = (Σ_t G̃_t)⁻¹ Σ_t G̃_t σ_t τ_t for ``layout="in_out"`` (Conv1D, y = xW) and
    Δ = (Σ_t σ_t τ_t G̃_t)(Σ_t G̃_t)⁻¹ for ``layout="out_in"`` (nn.Linear, y = xWᵀ), σ_t = sign α_t.
    Solved in float64. Negation: a negative α_t merges −τ_t with weight |α_t| (with α_t itself in
    G̃_t the Gram sum is indefinite or singular); for α ≥ 0 the paper's formula.

    Weights without a Gram (``grams=None``: biases, embeddings, norms) follow ``nonlinear``:
    ``"average"`` (the paper: Δ = Σ α_t τ_t / Σ |α_t|) or ``"task_arithmetic"`` (Δ = Σ α_t τ_t).
    RegMean is defined on the weights of each layer (it matches layer outputs X·W_t), so it refuses
    linear (tangent) task vectors.
    """
    if not 0.0 <= float(reduce_non_diagonal_ratio) <= 1.0:
        raise MergeConfigError(f"reduce_non_diagonal_ratio must be in [0, 1], got {reduce_non_diagonal_ratio}")
    if nonlinear not in ("average", "task_arithmetic"):
        raise MergeConfigError(f'nonlinear must be "average" or "task_arithmetic", got {nonlinear!r}')
    if layout not in ("out_in", "in_out"):
        raise MergeConfigError(f'layout must be "out_in" (nn.Linear) or "in_out" (Conv1D), got {layout!r}')
    s = _stack(vectors, name)
    signs, mags = _signed(weights, len(s))
    if not any(mags):
        raise MergeConfigError("regmean: every weight is 0")
    if grams is None:
        num = (s * _weights(weights, len(s), s)).sum(0)
        return num / sum(mags) if nonlinear == "average" else num
    _check_stats(grams, len(s), name, "Gram matrix", nonnegative=False)
    if s.dim() != 3:
        raise MergeConfigError(f"regmean: {name} has a Gram matrix but is not a 2-D weight ({tuple(s.shape[1:])})")
    d_in = s.shape[2] if layout == "out_in" else s.shape[1]
    a = float(reduce_non_diagonal_ratio)
    total, rhs = None, None
    for t, G, m, sg in zip(s, grams, mags, signs):
        G = G.to(device=s.device, dtype=torch.float64)
        if tuple(G.shape) != (d_in, d_in):
            raise MergeConfigError(f"regmean: Gram of {name} has shape {tuple(G.shape)}, expected {(d_in, d_in)} "
                                   f"for a {layout} weight of shape {tuple(s.shape[1:])}")
        Gt = m * (a * G + (1.0 - a) * torch.diag(torch.diagonal(G)))
        tt = sg * t.to(torch.float64)
        term = Gt @ tt if layout == "in_out" else tt @ Gt
        total = Gt if total is None else total + Gt
        rhs = term if rhs is None else rhs + term
    try:
        if layout == "in_out":
            delta = torch.linalg.solve(total, rhs)
        else:  # X Σ = R  ⇔  Σᵀ Xᵀ = Rᵀ, Σ symmetric
            delta = torch.linalg.solve(total, rhs.T).T
    except RuntimeError:
        warnings.warn(f"regmean: singular Gram sum for {name or 'a weight'}; using the pseudo-inverse")
        pinv = torch.linalg.pinv(total)
        delta = pinv @ rhs if layout == "in_out" else rhs @ pinv
    return delta.to(s.dtype)
