"""Factored task-vector entries: τ of one weight kept as scale·B·A (a low-rank TaskVector's storage).

A LoRA adapter (Hu et al. 2021, Eq. 3: ΔW = (α/r)·B·A) and a low-rank LINEARIZED adapter
(τ_W = s·B·A, :mod:`hf_taujp.low_rank`) change each targeted weight W by a matrix of rank ≤ r. Kept as
its factors A (r × in) and B (out × r), τ_W takes r·(in + out) values instead of in·out: a rank-16 τ of
an 8B model is tens of MB, not 16 GB. :class:`LowRankTau` is one such entry; ``TaskVector`` stores it
in place of the full tensor and materialises it (:meth:`LowRankTau.full`) wherever a consumer needs
the tensor itself, so nothing is ever truncated to a lower rank.

Layout (the weight's own storage, as PEFT's ``fan_in_fan_out``):
- ``transposed=False``: the weight is stored (out, in) (``nn.Linear``): τ = scale·B·A.
- ``transposed=True``: the weight is stored (in, out) (transformers' ``Conv1D``; ``nn.Embedding``
  (num_embeddings, dim), read as a map ids → vectors, PEFT's ``lora_embedding_A`` (r × num_embeddings)
  / ``lora_embedding_B`` (dim × r)): τ = (scale·B·A)ᵀ.

Precision: the full tensor is scale·(B·A) computed in float64 and cast to the factors' dtype
(``torch.promote_types(A.dtype, B.dtype)``) — the rule ``TaskVector.from_peft`` uses for the full τ of
LoRA and low-rank LINEARIZED adapters, so the factored and the full conversion agree bit for bit.

Exact algebra on factors (no materialisation):
- c·τ: scale → c·scale (the factors are untouched; exact).
- Σ_t c_t·τ_t (:func:`low_rank_sum`): A = [A_1; …; A_T] (Σ r_t × in), B = [B_1, …, B_T] (out × Σ r_t):
  Σ_t c_t s_t B_t A_t = B·diag(c_t s_t)·A exactly; the rank adds. When the |c_t·s_t| differ they are
  folded into B (one rounding of B in its dtype), else only signs are (exact).
- ⟨τ_1, τ_2⟩ = s_1 s_2 Σ (B_1ᵀB_2) ⊙ (A_1 A_2ᵀ), ‖τ‖² = s² Σ (BᵀB) ⊙ (A Aᵀ), ⟨τ, D⟩ = s Σ B ⊙ (D Aᵀ)
  (trace identities, float64, r × r work).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import CorruptFileError, HfTaujpError

__all__ = ["LowRankTau", "low_rank_sum", "LowRankVectorReader", "task_vector_reader", "factored_specs", "factors_from",
           "LAYOUTS", "FACTOR_KEYS"]

LAYOUTS = ("direct", "transposed")
# Saved keys of a factored entry ``<name>``: ``<name>.lora_A`` (r × in) and ``<name>.lora_B`` (out × r),
# PEFT LoRA's factor names.
FACTOR_KEYS = ("lora_A", "lora_B")
# Row blocks of at most this many entries when a full tensor is computed piecewise (streaming reads):
# bounds the float64 temporary to 8 MB whatever the tensor's size.
_BLOCK_ELEMENTS = 1 << 20


class LowRankTau:
    """τ of one weight as factors: ``scale·B·A`` (``transposed=False``) or ``(scale·B·A)ᵀ`` (``True``).

    Args:
        A: (r, in) factor, floating.
        B: (out, r) factor, floating, on A's device.
        scale: the scalar s (LoRA's lora_alpha / r, times any α applied since).
        transposed: the weight is stored (in, out) (Conv1D, Embedding): τ has shape (in, out).

    ``shape``, ``dtype``, ``device``, ``numel()`` and ``dim()`` describe the full tensor (as a
    ``torch.Tensor`` would); ``rank`` is r, ``num_stored`` = r·(in + out). :meth:`full` materialises it.

    Raises:
        HfTaujpError: factors that are not 2-D floating tensors with matching r, on different devices, or a
            scale that is not a finite real number.
    """

    __slots__ = ("A", "B", "scale", "transposed")

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0, transposed: bool = False):
        if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
            raise HfTaujpError(f"LowRankTau factors must be tensors, got {type(A).__name__} and {type(B).__name__}.")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise HfTaujpError(f"LowRankTau needs A (r, in) and B (out, r); got A {tuple(A.shape)}, B {tuple(B.shape)}.")
        if not A.is_floating_point() or not B.is_floating_point():
            raise HfTaujpError(f"LowRankTau factors must be floating, got {A.dtype} and {B.dtype}.")
        if A.device != B.device:
            raise HfTaujpError(f"LowRankTau factors are on different devices ({A.device}, {B.device}).")
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            scale = scale.item()
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise HfTaujpError(f"LowRankTau scale must be a finite number, got {scale!r}.")
        if not isinstance(transposed, bool):
            raise HfTaujpError(f"LowRankTau transposed must be a bool, got {transposed!r}.")
        self.A, self.B, self.scale, self.transposed = A.detach(), B.detach(), float(scale), transposed

    # ------------------------------------------------------------------ tensor-like description
    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def layout(self) -> str:
        return "transposed" if self.transposed else "direct"

    @property
    def shape(self) -> torch.Size:
        out, inn = int(self.B.shape[0]), int(self.A.shape[1])
        return torch.Size((inn, out) if self.transposed else (out, inn))

    @property
    def dtype(self) -> torch.dtype:
        return torch.promote_types(self.A.dtype, self.B.dtype)

    @property
    def device(self) -> torch.device:
        return self.A.device

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape.numel()

    def is_floating_point(self) -> bool:
        return True

    @property
    def num_stored(self) -> int:
        """Values the factors hold: r·(in + out)."""
        return self.A.numel() + self.B.numel()

    def __repr__(self) -> str:
        return (f"LowRankTau(shape={tuple(self.shape)}, rank={self.rank}, scale={self.scale!r}, layout={self.layout!r}, "
                f"dtype={self.dtype})")

    # ------------------------------------------------------------------ materialisation
    def full(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full τ (``shape``), scale·(B·A) in float64, transposed for ``transposed``, cast to ``dtype``
        (default :attr:`dtype`); a fresh contiguous tensor on :attr:`device`."""
        delta = self.scale * (self.B.double() @ self.A.double())
        delta = delta.t() if self.transposed else delta
        return delta.to(dtype or self.dtype).contiguous()

    def rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of :meth:`full` without forming the rest: scale·B[rows]·A (direct) or
        scale·A[:, rows]ᵀ·Bᵀ (transposed), in float64, cast to ``dtype``."""
        if self.transposed:
            block = self.scale * (self.A[:, start:stop].double().t() @ self.B.double().t())
        else:
            block = self.scale * (self.B[start:stop].double() @ self.A.double())
        return block.to(dtype or self.dtype)

    def read_flat_into(self, start: int, out: torch.Tensor) -> torch.Tensor:
        """Entries ``[start, start + out.numel())`` of the flattened full τ written into ``out`` (1-D, any
        float dtype), computed in row blocks of ≤ 2²⁰ entries so that memory stays bounded (streaming merges)."""
        n = out.numel()
        rows_total, cols = self.shape
        if start < 0 or start + n > rows_total * cols:
            raise HfTaujpError(f"range [{start}, {start + n}) outside a τ of {rows_total * cols} entries.")
        step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
        pos, row = 0, start // max(cols, 1)
        while pos < n:
            stop = min(rows_total, row + step)
            block = self.rows(row, stop, out.dtype).reshape(-1)
            lo = (start + pos) - row * cols  # offset of the next wanted entry inside this block
            take = min(n - pos, block.numel() - lo)
            out[pos:pos + take].copy_(block[lo:lo + take])
            pos += take
            row = stop
        return out

    # ------------------------------------------------------------------ exact algebra
    def scaled(self, c: float) -> LowRankTau:
        """c·τ: only ``scale`` changes (exact); shares the factors."""
        return LowRankTau(self.A, self.B, self.scale * float(c), self.transposed)

    def __neg__(self) -> LowRankTau:
        return self.scaled(-1.0)

    def clone(self) -> LowRankTau:
        return LowRankTau(self.A.clone(), self.B.clone(), self.scale, self.transposed)

    def to(self, *args, **kwargs) -> LowRankTau:
        """Both factors through ``torch.Tensor.to(*args, **kwargs)`` (dtype / device); scale and layout kept."""
        return LowRankTau(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs), self.scale, self.transposed)

    def as_layout(self, transposed: bool) -> LowRankTau:
        """The same τ with the other layout flag: (s·B·A)ᵀ = s·Aᵀ·Bᵀ, so B' = Aᵀ, A' = Bᵀ (exact)."""
        if transposed == self.transposed:
            return self
        return LowRankTau(self.B.t().contiguous(), self.A.t().contiguous(), self.scale, transposed)

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.A).all()) and bool(torch.isfinite(self.B).all())

    def norm_sq(self) -> float:
        """‖τ‖_F² = s²·Σ (BᵀB) ⊙ (A·Aᵀ) in float64."""
        A, B = self.A.double(), self.B.double()
        # ≥ 0 mathematically; rounding may leave a tiny negative sum for a (near-)zero τ
        return max(0.0, float(self.scale ** 2 * ((B.t() @ B) * (A @ A.t())).sum()))

    def dot(self, other: LowRankTau | torch.Tensor) -> float:
        """⟨τ, other⟩ (Frobenius) in float64: s_1 s_2 Σ (B_1ᵀB_2) ⊙ (A_1 A_2ᵀ) for two factored entries,
        s·Σ B ⊙ (D·Aᵀ) against a full tensor D (in τ's layout). Raises ``HfTaujpError`` on a shape mismatch."""
        if tuple(other.shape) != tuple(self.shape):
            raise HfTaujpError(f"Shape mismatch: {tuple(self.shape)} vs {tuple(other.shape)}.")
        A, B = self.A.double(), self.B.double()
        if isinstance(other, LowRankTau):
            o = other.as_layout(self.transposed)
            A2, B2 = o.A.double().to(A.device), o.B.double().to(A.device)
            return float(self.scale * o.scale * ((B.t() @ B2) * (A @ A2.t())).sum())
        D = other.double().to(A.device)
        D = D.t() if self.transposed else D  # (out, in)
        return float(self.scale * (B * (D @ A.t())).sum())


def low_rank_sum(terms: Sequence[tuple[float, LowRankTau]]) -> LowRankTau:
    """Σ_t c_t·τ_t of factored entries of one shape, still factored: factors concatenated along r
    (rank Σ r_t), in the first term's layout, dtype ``promote_types`` of all factors, on the first term's
    device. Exact when the |c_t·s_t| are equal (signs go into B); otherwise each c_t·s_t is folded into
    its B_t (computed in float64, one rounding to the dtype) and the scale is 1.

    Raises:
        HfTaujpError: no terms, or terms of different shapes.
    """
    terms = [(float(c), t) for c, t in terms]
    if not terms:
        raise HfTaujpError("low_rank_sum needs at least one term.")
    first = terms[0][1]
    for _, t in terms:
        if tuple(t.shape) != tuple(first.shape):
            raise HfTaujpError(f"Shape mismatch: {tuple(first.shape)} vs {tuple(t.shape)}.")
    dt = first.dtype
    for _, t in terms[1:]:
        dt = torch.promote_types(dt, t.dtype)
    dev = first.device
    parts = [(c * t.scale, t.as_layout(first.transposed)) for c, t in terms]
    mags = {abs(k) for k, _ in parts}
    if len(mags) == 1:
        s = mags.pop()
        Bs = [(t.B if k >= 0 or s == 0 else -t.B).to(device=dev, dtype=dt) for k, t in parts]
    else:
        s = 1.0
        Bs = [(t.B.double() * k).to(device=dev, dtype=dt) for k, t in parts]
    A = torch.cat([t.A.to(device=dev, dtype=dt) for _, t in parts], dim=0)
    return LowRankTau(A, torch.cat(Bs, dim=1), s, first.transposed)


# --------------------------------------------------------------------------------------------
# Streaming: a factored task-vector folder read tensor by tensor as its full τ
# --------------------------------------------------------------------------------------------
def factored_specs(cfg: dict) -> dict[str, dict]:
    """``config.json``'s ``low_rank`` table of a task-vector folder, checked: ``{name: {"rank", "scale",
    "layout", "shape"}}`` (empty for a vector without factors). Raises ``CorruptFileError`` when malformed."""
    table = cfg.get("low_rank") or {}
    if not isinstance(table, dict):
        raise CorruptFileError(f"config.json 'low_rank' must be a mapping name -> factors, got {type(table).__name__}.")
    for name, spec in table.items():
        ok = (isinstance(spec, dict) and isinstance(spec.get("rank"), int) and spec["rank"] >= 0
              and isinstance(spec.get("scale"), (int, float)) and not isinstance(spec.get("scale"), bool)
              and math.isfinite(spec["scale"]) and spec.get("layout") in LAYOUTS
              and isinstance(spec.get("shape"), list) and len(spec["shape"]) == 2)
        if not ok:
            raise CorruptFileError(f"config.json 'low_rank' entry {name!r} is {spec!r}: expected rank (int), scale "
                                   f"(finite number), layout {LAYOUTS} and shape [rows, cols].")
    return table


def factors_from(name: str, spec: dict, A: torch.Tensor, B: torch.Tensor) -> LowRankTau:
    """The :class:`LowRankTau` of saved factors, checked against the config's ``spec``
    (``CorruptFileError`` for a rank, shape or layout that disagrees)."""
    r = spec["rank"]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
        raise CorruptFileError(f"Factors of {name!r}: A {tuple(A.shape)}, B {tuple(B.shape)}; config.json says rank {r} "
                               "(A is (r, in), B is (out, r)).")
    lr = LowRankTau(A, B, spec["scale"], spec["layout"] == "transposed")
    if list(lr.shape) != list(spec["shape"]):
        raise CorruptFileError(f"Factors of {name!r} give shape {tuple(lr.shape)}; config.json says {spec['shape']}.")
    return lr


class LowRankVectorReader:
    """A factored task-vector folder seen as its full τ, tensor by tensor (``SafetensorsReader``'s interface
    as the streaming merge uses it): ``keys()`` / ``in`` / ``shape`` / ``dtype`` / ``torch_dtype`` name the full
    tensors; ``get(name)`` and ``read_into(name, start, out)`` materialise a factored entry (row blocks, never
    more than one entry's factors held); other entries are read as stored.

    Raises ``CorruptFileError`` on opening when a listed entry lacks a factor or the factors disagree with
    ``config.json``.
    """

    def __init__(self, directory: str, cfg: dict, prefix: str = "task_vector"):
        from .safetensors_io import SafetensorsReader

        self._r = SafetensorsReader(directory, prefix)
        self._specs = factored_specs(cfg)
        factor_keys = {f"{n}.{k}": n for n in self._specs for k in FACTOR_KEYS}
        missing = [k for k in factor_keys if k not in self._r]
        if missing:
            self._r.close()
            raise CorruptFileError(f"Factored task vector in {directory!r} lacks {missing[:3]} (listed in config.json).")
        self._names = [k for k in self._r.keys() if k not in factor_keys]
        clash = [n for n in self._specs if n in self._names]
        if clash:
            self._r.close()
            raise CorruptFileError(f"{clash[:3]} are stored both as full tensors and as factors in {directory!r}.")
        self._names += list(self._specs)
        self._cached: tuple[str, LowRankTau] | None = None
        for n in self._specs:  # shapes from the headers, checked once here
            rA, rB = self._r.shape(f"{n}.lora_A"), self._r.shape(f"{n}.lora_B")
            factors_from(n, self._specs[n], torch.empty(rA, device="meta"), torch.empty(rB, device="meta"))

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._specs or (name in self._r and name in self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._specs:
            return tuple(self._specs[name]["shape"])
        return self._r.shape(name)

    def torch_dtype(self, name: str) -> torch.dtype:
        if name in self._specs:
            return torch.promote_types(self._r.torch_dtype(f"{name}.lora_A"), self._r.torch_dtype(f"{name}.lora_B"))
        return self._r.torch_dtype(name)

    def dtype(self, name: str) -> str:
        from .safetensors_io import dtype_name

        return dtype_name(self.torch_dtype(name)) if name in self._specs else self._r.dtype(name)

    def factors(self, name: str) -> LowRankTau:
        """The factored entry ``name`` (its factors read once and kept until another entry is asked for)."""
        if self._cached is None or self._cached[0] != name:
            self._cached = None  # drop the previous entry's factors before reading the next
            self._cached = (name, factors_from(name, self._specs[name], self._r.get(f"{name}.lora_A"),
                                               self._r.get(f"{name}.lora_B")))
        return self._cached[1]

    def get(self, name: str) -> torch.Tensor:
        return self.factors(name).full() if name in self._specs else self._r.get(name)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        if name in self._specs:
            return self.factors(name).read_flat_into(start, out)
        return self._r.read_into(name, start, out)

    def metadata(self) -> dict[str, str]:
        return self._r.metadata()

    def close(self) -> None:
        self._cached = None
        self._r.close()

    def __enter__(self) -> LowRankVectorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def task_vector_reader(directory: str, cfg: dict, prefix: str = "task_vector"):
    """The tensor-by-tensor reader of a task-vector folder: ``SafetensorsReader`` for a full vector,
    :class:`LowRankVectorReader` (full τ materialised per tensor) when ``cfg`` lists factored entries."""
    from .safetensors_io import SafetensorsReader

    return LowRankVectorReader(directory, cfg, prefix) if cfg.get("low_rank") else SafetensorsReader(directory, prefix)
