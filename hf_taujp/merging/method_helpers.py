"""Helpers shared by the merge-method families: stacking and shape checks of the task vectors,
per-vector parameters (a number, shared, or one per vector), weights and the negation rule's signs,
densities, the compute dtype, ``meta``-device detection and the drivers' finite-result check.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import HfTaujpError, MergeConfigError


def check_finite(res: torch.Tensor, name: str) -> None:
    """``HfTaujpError`` if the merged ``res`` has NaN / ±inf (both merge paths call it). One float32 sum
    (NaN / inf propagate through it) is ~30x cheaper than an ``isfinite`` mask; only a non-finite sum
    (or an overflow of it) pays for the mask. Not checked on ``meta``."""
    if not res.is_floating_point() or res.numel() == 0 or _on_meta(res):
        return
    total = res.sum(dtype=torch.float64 if res.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(total)) and not bool(torch.isfinite(res).all()):
        raise HfTaujpError(f"merge produced NaN/inf in {name}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _on_meta(*ts) -> bool:
    """Meta tensors carry shapes, not values: value checks (finite, ≥ 0, all-zero) are skipped on them."""
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in ts)


def _stack(vectors: Sequence[torch.Tensor], name: str = "") -> torch.Tensor:
    if len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) != 1:
        raise MergeConfigError(f"task vectors for {name or 'a parameter'} have different shapes: {sorted(shapes)}")
    dt = torch.float64 if any(v.dtype == torch.float64 for v in vectors) else torch.float32
    return torch.stack([v.to(dt) for v in vectors], dim=0)


def _per_vector(value, n: int, what: str) -> list[float]:
    """One float per task vector from a number (shared) or a sequence of n numbers."""
    if torch.is_tensor(value):
        value = value.reshape(-1).tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * n
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = list(value) * n
        if len(value) != n:
            raise MergeConfigError(f"got {len(value)} values of {what} for {n} task vectors")
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            raise MergeConfigError(f"{what} must be numbers, got {value!r}") from None
    raise MergeConfigError(f"{what} must be a number or one number per task vector, got {value!r}")


def _weights(weights, n: int, like: torch.Tensor) -> torch.Tensor:
    """Weights as a tensor of shape (T, 1, ..., 1) broadcasting against the (T, *S) stack ``like``,
    on ``like``'s device and dtype."""
    w = [1.0] * n if weights is None else _per_vector(weights, n, "weights")
    return torch.tensor(w, dtype=like.dtype, device=like.device).reshape((n,) + (1,) * (like.dim() - 1))


def _signed(weights, n: int) -> tuple[list[float], list[float]]:
    """(sign α_t, |α_t|): a negative weight α_t stands for the negated vector −τ_t merged with weight |α_t|
    (the negation rule of the methods whose definition is not linear in α)."""
    w = [1.0] * n if weights is None else _per_vector(weights, n, "weights")
    return [(-1.0 if a < 0 else 1.0) for a in w], [abs(a) for a in w]


def check_density(density: float, what: str = "density") -> float:
    density = float(density)
    if not (0.0 < density <= 1.0):
        raise MergeConfigError(f"{what} must be in (0, 1], got {density}")
    return density


def _densities(density, n: int) -> list[float]:
    """One density per vector (a number, shared, or one per vector), each in (0, 1]."""
    return [check_density(d) for d in _per_vector(density, n, "density")]


def _signs_like(signs: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(signs, dtype=like.dtype, device=like.device).reshape((len(signs),) + (1,) * (like.dim() - 1))
