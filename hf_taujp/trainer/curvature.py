"""KFAC curvature factors of one task at θ0: the shareable artifact, their aggregation over tasks, compression.

Porrello et al., "Dataless Weight Disentanglement in Task Arithmetic via Kronecker-Factored Approximate
Curvature" (ICLR 2026, arXiv 2602.17385; code: aimagelab/mammoth ``models/tak.py``,
``models/tak_utils/fisher_kfac.py``, ``hooks.py``). The representation drift a task vector τ_t causes on
another task s, E_{x∼D_s} ‖J f(x; θ0)·τ_t‖², is the quadratic form vec(τ)ᵀ·GGN_s·vec(τ) of the Gauss-Newton
matrix of f on D_s. Per linear layer y = W·x + b (W (out × in)), KFAC approximates its block by a Kronecker
product A_s ⊗ G_s, with ã = [x; 1] (a ones entry for the bias):

    A_s = mean over the layer's (valid) input rows of ã·ãᵀ                                (in + 1) × (in + 1)
    G_s = mean over the same rows of g·gᵀ,  g = ∂(εᵀ f(x; θ0)) / ∂y,  ε ∼ N(0, I)          out × out

so that E_{D_s} ‖J·τ‖² ≈ Σ_layers tr(G_s·ΔW̃·A_s·ΔW̃ᵀ), ΔW̃ = [ΔW | Δb] (``kfac_penalty``). Each task computes
its factors once from its own training inputs (no labels) — :func:`~hf_taujp.trainer.kfac_estimate.estimate_kfac`
— and publishes them as a :class:`KFACStatistics` folder; whoever trains another task downloads the factors,
never the data.

Normalisation (as the reference): a "row" is one token position of the layer's input (one example for a
2-D input). The reference sums (1/R)·Σ_j over the R positions of each example and divides by the number
of examples (``hook_forward_batch`` / ``hook_backward``, then ``div_(cur_num_aaT)`` in ``tak.py``), i.e.
the mean over all rows when every example has R rows; here padded positions are excluded and the mean is
over the valid rows (equal to the reference without padding).

Folder layout (the :class:`~hf_taujp.merging.statistics.Statistics` one, prefix ``kfac``): ``config.json``
({"format": "hf-taujp/kfac", "format_version": 1, "num_examples", "base_model", "base_fingerprint",
"task", "layers": {path: {"in_features", "out_features", "layout", "rows"}}, "output", "probe",
"samples", "seed", "compression"}), ``kfac.safetensors``, ``README.md``. Tensors per layer ``<path>``:
``<path>.A`` and ``<path>.G`` (dense, symmetric), or after :meth:`KFACStatistics.compress` ``<path>.A_root``
(d × k) and ``<path>.G_root`` with A ≈ A_root·A_rootᵀ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..errors import CorruptFileError, CurvatureValueError, HfTaujpError
from ..merging.statistics import Statistics
from .taujp_config import KFAC_AGGREGATIONS

__all__ = ["KFACStatistics", "Factor", "aggregate_kfac", "KFAC_AGGREGATIONS"]



class Factor:
    """A symmetric positive semi-definite d × d matrix M, held ``dense`` or as a ``root`` F (d × k), M = F·Fᵀ."""

    __slots__ = ("dense", "root")

    def __init__(self, dense: torch.Tensor | None = None, root: torch.Tensor | None = None):
        if (dense is None) == (root is None):
            raise HfTaujpError("a Factor is either dense or a root")
        self.dense, self.root = dense, root

    @property
    def dim(self) -> int:
        return int((self.dense if self.dense is not None else self.root).shape[0])

    def matrix(self) -> torch.Tensor:
        """The d × d matrix (a root is multiplied out)."""
        return self.dense if self.dense is not None else self.root @ self.root.T

    def leading(self, n: int) -> "Factor":
        """The leading n × n block (A without its bias row / column: ΔW̃ = [ΔW | 0])."""
        if n == self.dim:
            return self
        return Factor(dense=self.dense[:n, :n]) if self.dense is not None else Factor(root=self.root[:n])

    def to(self, device=None, dtype=None) -> "Factor":
        t = self.dense if self.dense is not None else self.root
        t = t.to(device=device, dtype=dtype)
        return Factor(dense=t) if self.dense is not None else Factor(root=t)

    def nbytes(self) -> int:
        t = self.dense if self.dense is not None else self.root
        return t.numel() * t.element_size()


def _finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class KFACStatistics(Statistics):
    """One task's KFAC factors at θ0, per linear layer (module path of the base model).

    ``tensors``: ``<path>.A`` ((in + 1) × (in + 1)) and ``<path>.G`` (out × out), or their roots
    ``<path>.A_root`` / ``<path>.G_root``; ``num_examples`` = examples used (the aggregation weight n_s);
    ``extra["layers"]`` = ``{path: {"in_features", "out_features", "layout": "out_in" | "in_out", "rows"}}``
    (``layout``: the weight's storage, nn.Linear (out, in) or Conv1D (in, out); factors are always in the
    (out, in) reading).

    Raises:
        CurvatureValueError: a factor holds NaN or inf.
        CorruptFileError: a listed layer has no factors, or factors whose shapes do not fit its sizes.
    """

    kind = "kfac"
    label = "KFAC statistics"
    card_what = "KFAC curvature factors (A = E[ã ãᵀ] of the inputs, G = E[g gᵀ] of the output gradients)"
    card_use = "the dataless regularizer of hf-taujp's TauJpTrainer (taujp_regularizer=\"kfac\", Porrello et al. 2026)"

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, num_examples: int, base_model: str | None = None,
                 base_fingerprint: str | None = None, task: str | None = None, extra: dict | None = None):
        bad = _finite(tensors)
        if bad:
            raise CurvatureValueError(f"KFAC factors of task {task!r} hold NaN or inf in {bad[:5]}"
                                      + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
            raise CurvatureValueError(f"KFAC factors of task {task!r}: num_examples must be an integer >= 1 (it "
                                      f"weighs A in the aggregation), got {num_examples!r}")
        # second moments are positive semi-definite: a negative diagonal entry is not one (the penalty could go < 0)
        neg = [k for k, t in tensors.items() if not k.endswith("_root") and t.dim() == 2
               and float(torch.diagonal(t).min()) < 0]
        if neg:
            raise CurvatureValueError(f"KFAC factors of task {task!r} are not positive semi-definite (negative "
                                      f"diagonal) in {neg[:5]}")
        super().__init__(tensors, num_examples=num_examples, base_model=base_model,
                         base_fingerprint=base_fingerprint, task=task, extra=extra)
        if not self.layers:
            raise CorruptFileError(f"KFAC factors of task {task!r} list no layers")
        for path, info in self.layers.items():
            a, g = self.factors(path)
            want = (int(info["in_features"]) + 1, int(info["out_features"]))
            if (a.dim, g.dim) != want:
                raise CorruptFileError(f"KFAC factors of layer {path!r}: A is {a.dim}-dimensional and G {g.dim}-"
                                       f"dimensional, but the layer has (in + 1, out) = {want}")

    @property
    def layers(self) -> dict[str, dict]:
        """``{module path: {"in_features", "out_features", "layout", "rows"}}``."""
        return dict(self.extra.get("layers") or {})

    def factors(self, path: str) -> tuple[Factor, Factor]:
        """(A, G) of layer ``path`` as :class:`Factor` (dense or root, as stored).

        Raises:
            CorruptFileError: the layer has no A or no G tensor.
        """
        out = []
        for side in ("A", "G"):
            dense, root = self.tensors.get(f"{path}.{side}"), self.tensors.get(f"{path}.{side}_root")
            if (dense is None) == (root is None):
                raise CorruptFileError(f"KFAC factors of layer {path!r}: expected one of {path}.{side} / "
                                       f"{path}.{side}_root")
            out.append(Factor(dense=dense, root=root))
        return out[0], out[1]

    def nbytes(self) -> int:
        """Bytes of the factor tensors (the size of ``kfac.safetensors`` up to its header)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def card_extra(self) -> str:
        e = self.extra
        comp = e.get("compression")
        names = list(self.layers)
        shown = ", ".join(f"`{n}`" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        lines = [
            "", "",
            f"- base model: {self.base_model or 'no Hub id'}; base fingerprint: `{self.base_fingerprint}`",
            f"- task: `{self.task}`; examples used: {self.num_examples}",
            f"- layers ({len(names)}, {self.nbytes() / 2 ** 20:.3g} MiB of factors): {shown}",
            f"- penalised output f: `{e.get('output')}`; probe: {e.get('probe')} "
            + (f"({e.get('samples')} Monte-Carlo sample(s) per batch, seed {e.get('seed')})" if e.get("samples")
               else "(exact: one backward per output entry)"),
            "- A = mean over valid input rows (tokens) of [x; 1][x; 1]ᵀ, G = mean over the same rows of g gᵀ, "
            + _PROBE_TEXT.get(e.get("probe"), "g = ∂(εᵀ f)/∂(layer output)"),
            f"- compression: {comp if comp else 'none (dense float factors)'}",
            "", "Use: `TauJpConfig(taujp_regularizer=\"kfac\", taujp_curvature=[\"<this repo>\", ...])` while training "
            "*another* task: the penalty λ·Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ) keeps that task's vector from moving f on this "
            "task's inputs, without its data.",
        ]
        return "\n".join(lines)

    def compress(self, rank: int | None = None, energy: float | None = None, dtype: torch.dtype | None = None
                 ) -> "KFACStatistics":
        """A copy with smaller factors: truncated eigendecompositions and / or a smaller storage dtype.

        Each factor M = U·diag(λ)·Uᵀ (λ descending, clamped at 0) is replaced by its root F = U_k·diag(√λ_k)
        (d × k), M ≈ F·Fᵀ, keeping ``rank`` eigenpairs or the fewest whose eigenvalues sum to at least ``energy``
        of tr(M) (both given: the smaller k); a factor whose k would be ≥ d stays dense. The penalty uses the roots directly (never forms F·Fᵀ):
        tr(G·D·A·Dᵀ) = ‖F_Gᵀ·D·F_A‖²_F. ``dtype`` (torch.float16 / torch.bfloat16) stores every tensor in that
        dtype (compute is float32). Truncation only removes PSD energy: the penalty never rises. Measured
        (tests/test_kfac.py, 2-layer GPT-2 of width 32, random τ, worst relative error of the penalty / bytes
        against float32 factors): energy 0.999 → 8e-4 / 0.64×, energy 0.99 → 2.5e-2 / 0.42×, float16 → 3e-5 /
        0.5×, bfloat16 → 4e-4 / 0.5×, energy 0.99 + bfloat16 → 2.5e-2 / 0.21×.

        Raises:
            HfTaujpError: neither option; ``rank`` < 1; ``energy`` outside (0, 1]; a non-float dtype; a value
                that overflows ``dtype`` (e.g. float16: use bfloat16).
        """
        if rank is None and energy is None and dtype is None:
            raise HfTaujpError("compress() needs rank=, energy= or dtype=")
        if self.extra.get("compression"):  # its record would no longer say what the tensors are
            raise HfTaujpError(f"these factors are already compressed ({self.extra['compression']}): compress the "
                               "dense factors once, with every option")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise HfTaujpError(f"rank must be an integer >= 1, got {rank!r}")
        if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
            raise HfTaujpError(f"energy must lie in (0, 1], got {energy!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise HfTaujpError(f"dtype must be a floating torch dtype, got {dtype!r}")
        tensors = {}
        for path in self.layers:
            for side, f in zip(("A", "G"), self.factors(path)):
                if (rank is not None or energy is not None) and f.dense is not None:
                    f = _truncate(f.dense, rank, energy)
                t = f.dense if f.dense is not None else f.root
                key = f"{path}.{side}" if f.dense is not None else f"{path}.{side}_root"
                tensors[key] = t.to(dtype) if dtype is not None else t
        bad = _finite(tensors)
        if bad:
            raise HfTaujpError(f"compress(dtype={dtype}) overflows in {bad[:5]}: use torch.bfloat16")
        extra = dict(self.extra)
        extra["compression"] = {"rank": rank, "energy": energy,
                                "dtype": str(dtype).replace("torch.", "") if dtype is not None else None}
        return KFACStatistics(tensors, num_examples=self.num_examples, base_model=self.base_model,
                              base_fingerprint=self.base_fingerprint, task=self.task, extra=extra)


_PROBE_TEXT = {
    "gaussian": "g = ∂(εᵀ f)/∂(layer output), ε ∼ N(0, I)",
    "fisher": "g = ∂(εᵀ f)/∂(layer output), ε = onehot(y) − softmax(f), y ∼ softmax(f) (the categorical Fisher)",
    "exact": "Σ_j g_j g_jᵀ, g_j = ∂f_j/∂(layer output) (every output entry, no probe)",
}


def _truncate(m: torch.Tensor, rank: int | None, energy: float | None) -> Factor:
    """Root of the top eigenpairs of a symmetric PSD matrix (see :meth:`KFACStatistics.compress`)."""
    d = m.shape[0]
    lam, u = torch.linalg.eigh(m.double())
    lam, u = lam.flip(0).clamp_min(0), u.flip(1)
    k = d if rank is None else min(rank, d)
    if energy is not None:
        total = float(lam.sum())
        if total > 0:
            need = int(torch.searchsorted(torch.cumsum(lam, 0), torch.tensor(energy * total, dtype=lam.dtype)).item()) + 1
            k = min(k, max(1, need))
    if k >= d:
        return Factor(dense=m)
    return Factor(root=(u[:, :k] * lam[:k].sqrt()).to(m.dtype))


def _weighted_sum(factors: Sequence[Factor], weights: Sequence[float]) -> Factor:
    """Σ w_s·M_s, exact: roots are stacked side by side (√w_s·F_s) while that is smaller than d columns."""
    d = factors[0].dim
    if all(f.root is not None for f in factors):
        cols = sum(int(f.root.shape[1]) for f in factors)
        if cols < d:
            return Factor(root=torch.cat([math.sqrt(w) * f.root for f, w in zip(factors, weights)], dim=1))
    return Factor(dense=sum(w * f.matrix() for f, w in zip(factors, weights)))


def aggregate_kfac(statistics: Sequence[KFACStatistics], aggregation: str = "merged", *,
                   layers: Sequence[str] | None = None, device=None, dtype: torch.dtype = torch.float32,
                   ) -> dict[str, list[tuple[Factor, Factor]]]:
    """The other tasks' factors combined, per layer: ``{path: [(A, G), ...]}`` for
    :func:`~hf_taujp.trainer.kfac_regularizer.kfac_penalty`, whose value is Σ_layers Σ_terms tr(G·ΔW̃·A·ΔW̃ᵀ).

    * ``"merged"`` (default; the reference's default, ``--fisher_ideal 0``, the paper's Eq. 8): one term,
      A = Σ_s (n_s / N)·A_s and G = Σ_s G_s, N = Σ_s n_s (n_s = ``num_examples``), as ``tak.py``
      ``begin_task`` accumulates them. Memory and cost per step are those of one task, whatever their number.
    * ``"per_task"`` (Eq. 7, "ideal"): one term per task, (A_s, G_s): Σ_s tr(G_s·ΔW̃·A_s·ΔW̃ᵀ), the KFAC of
      Σ_s E_{D_s}‖J·τ‖² term by term; cost grows with the number of tasks. The reference (``fisher_ideal=1``)
      multiplies each term by n_s / N, which makes it ≈ 1/(T − 1) of "merged" for equal-sized tasks;
      here the terms are summed unweighted, so both aggregations estimate the same sum over tasks (they are
      equal when the tasks' A agree).

    Args:
        statistics: the *other* tasks' factors (at least one).
        aggregation: one of :data:`KFAC_AGGREGATIONS`.
        layers: the layers to keep (default: those of the first statistics); each must be in every one.
        device, dtype: where and in which dtype the combined factors are returned (compute dtype).
    Raises:
        HfTaujpError: no statistics, an unknown aggregation, a layer missing from one of them, factors of a
            layer whose shapes differ between tasks.
    """
    if not statistics:
        raise HfTaujpError("aggregate_kfac needs at least one task's factors")
    if aggregation not in KFAC_AGGREGATIONS:
        raise HfTaujpError(f"unknown KFAC aggregation {aggregation!r} (expected one of {KFAC_AGGREGATIONS})")
    layers = list(statistics[0].layers if layers is None else layers)
    total = sum(s.num_examples for s in statistics)
    out: dict[str, list[tuple[Factor, Factor]]] = {}
    for path in layers:
        pairs = []
        for s in statistics:
            if path not in s.layers:
                raise HfTaujpError(f"the KFAC factors of task {s.task!r} have no layer {path!r}")
            pairs.append(tuple(f.to(device, dtype) for f in s.factors(path)))
        dims = {(a.dim, g.dim) for a, g in pairs}
        if len(dims) > 1:
            raise HfTaujpError(f"layer {path!r} has factors of different sizes across tasks: {sorted(dims)}")
        if aggregation == "per_task":
            out[path] = pairs
        else:
            a = _weighted_sum([a for a, _ in pairs], [s.num_examples / total for s in statistics])
            g = _weighted_sum([g for _, g in pairs], [1.0] * len(pairs))
            out[path] = [(a, g)]
    return out
