"""The rank rule (``r`` or ``energy``) and the truncated SVD of a τ entry (Eckart–Young):
:func:`truncated_factors` for one entry (from its factors by QR when it is factored, never the full
matrix), :func:`low_rank_approximation` for a whole task vector. The conventions are in the docstring of
:mod:`hf_taujp.lora_extraction`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..errors import HfTaujpError
from ..low_rank_tau import LowRankTau


def _few(names: Iterable[str], n: int = 6) -> str:
    names = list(names)
    return ", ".join(repr(x) for x in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# --------------------------------------------------------------------------------------------
# The rank rule and the truncated SVD (Eckart–Young)
# --------------------------------------------------------------------------------------------
def _check_rule(r, energy, allow_neither: bool, err=HfTaujpError) -> None:
    if r is not None and energy is not None:
        raise err(f"Give one rank rule: r (a fixed rank) or energy (a fraction of ‖τ_W‖²), not both (r={r!r}, "
                  f"energy={energy!r}).")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise err(f"r must be a positive integer (the LoRA rank), got {r!r}.")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not math.isfinite(energy) or not 0 < energy <= 1):
        raise err(f"energy must be a number in (0, 1] (the fraction of ‖τ_W‖_F² kept per tensor), got {energy!r}.")
    if r is None and energy is None and not allow_neither:
        raise err("Give a rank rule: r (a fixed rank) or energy (the fraction of ‖τ_W‖_F² kept per tensor).")


def _svd(entry: torch.Tensor | LowRankTau, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ, Vᵀ (float64, reduced) of τ_W in the (out, in) orientation: τ_W itself (``transposed=False``) or τ_Wᵀ.

    A factored entry s·B·A is decomposed from its factors: B = Q_B R_B, Aᵀ = Q_A R_A, SVD of s·R_B·R_Aᵀ (≤ k × k),
    U = Q_B·U_c, Vᵀ = V_cᵀ·Q_Aᵀ — the SVD of s·B·A without forming it."""
    if isinstance(entry, LowRankTau):
        lr = entry.as_layout(transposed)
        Qb, Rb = torch.linalg.qr(lr.B.double())
        Qa, Ra = torch.linalg.qr(lr.A.double().t())
        Uc, S, Vhc = torch.linalg.svd(lr.scale * (Rb @ Ra.t()), full_matrices=False)
        return Qb @ Uc, S, Vhc @ Qa.t()
    M = entry.double()
    return torch.linalg.svd(M.t() if transposed else M, full_matrices=False)


def _rank_of(S: torch.Tensor, r: int | None, energy: float | None, full: int) -> int:
    """k of the rank rule: min(r, min(out, in), len σ) for a fixed r; the smallest k with Σ_{i≤k} σ_i² ≥ energy·Σ σ²
    for ``energy``; 0 for a zero τ_W."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    if energy is not None:
        c = torch.cumsum(S.double() ** 2, 0)
        return min(int((c < energy * c[-1]).sum()) + 1, S.numel())
    return min(r, full, S.numel())


def truncated_factors(entry: torch.Tensor | LowRankTau, r: int | None = None, *, energy: float | None = None,
                      transposed: bool = False) -> LowRankTau:
    """The best approximation of rank ≤ k of one 2-D τ entry (Eckart–Young), as factors in the given layout.

    Args:
        entry: τ_W as stored ((out, in) for ``transposed=False``, (in, out) for ``True``), or a ``LowRankTau``.
        r / energy: the rank rule (exactly one): k = min(r, out, in) or the smallest k keeping ``energy`` of ‖τ_W‖²
            (see the module docstring). A factored entry of rank ≤ min(r, out, in) is returned as it is (in
            ``transposed``'s layout; exact).
        transposed: the layout of the result (``LowRankTau.transposed``): True for Conv1D / Embedding weights.

    Returns:
        ``LowRankTau(A, B, 1.0, transposed)`` with A = diag(√σ_k)·V_kᵀ (k × in), B = U_k·diag(√σ_k) (out × k), in
        ``promote_types(dtype, float32)``, on the entry's device; k = 0 (empty factors) for a zero τ_W.

    Raises:
        HfTaujpError: a bad rank rule, an entry that is not 2-D, or NaN / inf values.
    """
    _check_rule(r, energy, allow_neither=False)
    if entry.dim() != 2:
        raise HfTaujpError(f"A LoRA factorisation needs a 2-D tensor, got shape {tuple(entry.shape)}.")
    finite = entry.is_finite() if isinstance(entry, LowRankTau) else bool(torch.isfinite(entry).all())
    if not finite:
        raise HfTaujpError(f"Cannot factorise a tensor of shape {tuple(entry.shape)} holding NaN or inf values.")
    out_in = tuple(entry.shape)[::-1] if transposed else tuple(entry.shape)
    full = min(out_in)
    if isinstance(entry, LowRankTau) and r is not None and entry.rank <= min(r, full):
        return entry.as_layout(transposed)
    dt = torch.promote_types(entry.dtype, torch.float32)
    U, S, Vh = _svd(entry, transposed)
    k = _rank_of(S, r, energy, full)
    root = S[:k].clamp_min(0).sqrt()
    A = (root[:, None] * Vh[:k]).to(dt).contiguous()
    B = (U[:, :k] * root[None, :]).to(dt).contiguous()
    return LowRankTau(A, B, 1.0, transposed)


def low_rank_approximation(tv, r: int | None = None, *, energy: float | None = None,
                           keys: Iterable[str] | None = None):
    """τ with every 2-D entry (or each of ``keys``) replaced by its best rank-k approximation, kept as factors.

    Per entry :func:`truncated_factors` in the entry's own layout (τ_W = B·A as stored; a factored entry keeps its
    layout): ‖τ_W − B·A‖_F² = Σ_{i>k} σ_i² (Eckart–Young). Other entries (1-D biases / norms, or those not in
    ``keys``) are kept unchanged; the metadata is the vector's. The result is a factored ``TaskVector`` (saved with
    size ∝ k; ``.to_lora(base)`` without a rank rule turns it into the adapter as it is).

    Raises:
        HfTaujpError: a bad rank rule, ``keys`` naming entries the vector lacks or that are not 2-D, NaN / inf.
    """
    _check_rule(r, energy, allow_neither=False)
    entries = tv.entries
    if keys is None:
        chosen = [k for k, e in entries.items() if e.dim() == 2]
    else:
        chosen = list(keys)
        missing = [k for k in chosen if k not in entries]
        if missing:
            raise HfTaujpError(f"keys not in the task vector: {_few(missing)}.")
        bad = [k for k in chosen if entries[k].dim() != 2]
        if bad:
            raise HfTaujpError(f"Only 2-D entries have a low-rank approximation; {_few(bad)} are not 2-D.")
    out = {}
    for k, e in entries.items():
        if k in chosen:
            try:
                out[k] = truncated_factors(e, r, energy=energy, transposed=isinstance(e, LowRankTau) and e.transposed)
            except HfTaujpError as exc:
                raise HfTaujpError(f"Entry {k!r}: {exc}") from None
        else:
            out[k] = e
    return type(tv)(out, **tv.metadata())
