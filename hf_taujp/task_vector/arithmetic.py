"""Task arithmetic (Ilharco et al. 2023): τ_a + τ_b, −τ, c·τ, τ_a − τ_b over the union of keys, and the
inner product, norm and cosine of task vectors (:func:`cosine_matrix`), factored entries kept factored
where that is exact (see :mod:`hf_taujp.task_vector`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from ..errors import HfTaujpError
from ..low_rank_tau import LowRankTau, low_rank_sum

if TYPE_CHECKING:
    from .core import TaskVector


class TaskVectorArithmetic:
    """Mixin of :class:`~hf_taujp.task_vector.TaskVector`: its arithmetic. ``isinstance(x, TaskVectorArithmetic)``
    is ``isinstance(x, TaskVector)``: TaskVector is the one class built on this mixin."""

    # ---------------------------------------------------------------- arithmetic
    def _merged_meta(self, other: TaskVector) -> dict:
        return {
            "task": self.task if self.task == other.task else None,
            "training": self.training if self.training == other.training else {},
            "base_fingerprint": self.base_fingerprint or other.base_fingerprint,
            "base_model": self.base_model or other.base_model,
            "base_model_revision": self.base_model_revision or other.base_model_revision,
        }

    def add(self, other: TaskVector, *, check_base: bool = True) -> TaskVector:
        """τ_a + τ_b over the union of keys (a missing key counts as 0); ``check_base=False`` skips the
        base comparison (not the kind comparison)."""
        if not isinstance(other, TaskVectorArithmetic):
            raise HfTaujpError(f"Can only add a TaskVector, got {type(other).__name__}.")
        if check_base:
            self.check_compatible(other)
        elif self.kind != other.kind:
            raise HfTaujpError(f"Cannot combine a {self.kind!r} task vector with a {other.kind!r} one.")
        out = {}
        mine, theirs = self._entries, other._entries
        for k in list(mine) + [k for k in theirs if k not in mine]:
            a, b = mine.get(k), theirs.get(k)
            if a is None or b is None:
                out[k] = (a if b is None else b).clone()
                continue
            if tuple(a.shape) != tuple(b.shape):
                raise HfTaujpError(f"Shape mismatch for {k!r}: {tuple(a.shape)} vs {tuple(b.shape)}.")
            if isinstance(a, LowRankTau) and isinstance(b, LowRankTau):
                out[k] = low_rank_sum([(1.0, a), (1.0, b)])  # exact: factors concatenated, rank a.rank + b.rank
                continue
            a = a.full() if isinstance(a, LowRankTau) else a  # factored + full is full
            b = b.full() if isinstance(b, LowRankTau) else b
            dt = torch.promote_types(a.dtype, b.dtype)
            out[k] = a.to(dt) + b.to(device=a.device, dtype=dt)
        return self._with(out, **self._merged_meta(other))

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:
            return self._with({k: t.clone() for k, t in self._entries.items()})
        if not isinstance(other, TaskVectorArithmetic):
            return NotImplemented
        return self.add(other)

    def __radd__(self, other):
        # sum([...]) starts from 0.
        return self.__add__(other)

    def __neg__(self) -> TaskVector:
        return self._with({k: -t for k, t in self._entries.items()})

    def __sub__(self, other):
        if not isinstance(other, TaskVectorArithmetic):
            return NotImplemented
        return self.add(-other)

    def __mul__(self, scalar):
        if isinstance(scalar, torch.Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        # a factored entry scales its scalar s (exact); a full tensor is multiplied
        return self._with({k: (t.scaled(scalar) if isinstance(t, LowRankTau) else t * scalar) for k, t in self._entries.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return self * (1.0 / scalar)

    def dot(self, other: TaskVector) -> float:
        """⟨τ_a, τ_b⟩ = Σ_k Σ τ_a[k]·τ_b[k] over shared keys, accumulated in float64 (factored entries by
        the trace identities of :meth:`LowRankTau.dot`, without materialising them)."""
        self.check_compatible(other)
        s = 0.0
        for k, a in self._entries.items():
            b = other._entries.get(k)
            if b is not None:
                if tuple(a.shape) != tuple(b.shape):
                    raise HfTaujpError(f"Shape mismatch for {k!r}: {tuple(a.shape)} vs {tuple(b.shape)}.")
                if isinstance(a, LowRankTau):
                    s += a.dot(b)
                elif isinstance(b, LowRankTau):
                    s += b.dot(a)
                else:
                    s += float((a.double() * b.double().to(a.device)).sum())
        return s

    def norm(self) -> float:
        """‖τ‖₂ = sqrt(Σ_k ‖τ[k]‖²) over all tensors, accumulated in float64 (‖s·B·A‖² from the factors)."""
        return math.sqrt(sum(t.norm_sq() if isinstance(t, LowRankTau) else float(t.double().pow(2).sum())
                             for t in self._entries.values()))

    def cosine(self, other: TaskVector) -> float:
        """⟨τ_a, τ_b⟩ / (‖τ_a‖‖τ_b‖) (0 when either is zero)."""
        na, nb = self.norm(), other.norm()
        if na == 0 or nb == 0:
            return 0.0
        return self.dot(other) / (na * nb)


def cosine_matrix(vectors: Iterable[TaskVector]) -> torch.Tensor:
    """C[i, j] = cos(τ_i, τ_j), a float64 T×T tensor (ones on the diagonal for nonzero vectors)."""
    vs = list(vectors)
    n = len(vs)
    norms = [v.norm() for v in vs]
    c = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            d = vs[i].dot(vs[j]) if i != j else norms[i] ** 2
            val = d / (norms[i] * norms[j]) if norms[i] and norms[j] else 0.0
            c[i, j] = c[j, i] = val
    return c
