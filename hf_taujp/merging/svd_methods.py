"""The SVD family of merge methods: TSV-M, Iso-C, Iso-CTS and WUDI (data-free; each sees a whole tensor).

Each method gets, for one parameter, the task vectors τ_1..τ_T (shape S) and returns the merged Δ (the
merged weight is θ0 + Δ, see :mod:`.methods`). A 2-D tensor W of shape (m, n) is merged through its
singular value decompositions; every other tensor (biases, norms, 4-D convolutions) is the mean
(1/T) Σ_t α_t τ_t, as the reference codes do. ``weights`` α_t pre-scale the vectors: each method merges
x_t = α_t τ_t (so α = [−1] gives −τ for all of them); ``lambda_`` (λ) scales the result, default 1 —
the references apply no scale in the method and pick λ on validation data afterwards (their grid
linspace(0, 3, 31)[1:] for TSV-M / Iso; 0.0..1.5 for WUDI), which is what
:func:`hf_taujp.merging.search_coefficients` does with the ``weights``.

Side of a weight. TSV-M and Iso-C commute with transposition (the SVD of xᵀ is that of x, transposed),
so they work on tensors as stored. Iso-CTS (it projects on the left) and WUDI (it constrains the rows)
do not: they declare the driver argument ``layout`` and compute on the (out, in) reading of the weight,
transposing transformers' Conv1D weights (stored (in, out)) on the way in and out; the merge drivers
say which tensors are Conv1D weights (:class:`~hf_taujp.merging.merge.WeightLayouts`).

Numerical rank. Singular values at or below ``max(dims)·ε·σ_1`` (torch.linalg.matrix_rank's tolerance,
ε of the compute dtype) are zero: their singular vectors are an arbitrary basis of a null space. The
references keep them, which only matters for rank-deficient inputs (LoRA vectors, a tensor that one
task leaves at 0, the same vector twice) — there their result depends on which basis the SVD routine
happens to return; here those directions are left out. For full-rank inputs (full fine-tunes) the
results are the references'. Orthogonalisation uses the polar factor over the numerical rank: for X =
P diag(σ) Qᵀ, X⊥ = P_ρ Q_ρᵀ (the reference's P Qᵀ whenever X has full column rank).

All methods act on τ alone (never θ0), so they apply to linear (tangent) vectors as they do to weight
differences (``linear_ok``). Inputs must be finite (``MergeConfigError`` otherwise: an SVD of NaN fails
with a LAPACK error, not a name). On the ``meta`` device only shapes exist: the result is an empty tensor.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

from ..errors import MergeConfigError
from .method_helpers import _on_meta, _per_vector
from .registry import register_merge_method

__all__ = ["tsv", "iso_c", "iso_cts", "wudi", "LAYOUTS"]

LAYOUTS = ("out_in", "in_out")


# ----------------------------------------------------------------------------------- helpers
def _number(value, what: str, *, positive: bool = False, fraction: bool = False) -> float:
    """A finite real number (not a bool); ``positive``: > 0; ``fraction``: in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise MergeConfigError(f"{what} must be a finite number, got {value!r}")
    value = float(value)
    if fraction and not 0.0 < value <= 1.0:
        raise MergeConfigError(f"{what} must be in (0, 1], got {value}")
    if positive and not value > 0.0:
        raise MergeConfigError(f"{what} must be > 0, got {value}")
    return value


def _inputs(vectors: Sequence[torch.Tensor], weights, name: str) -> tuple[list[torch.Tensor], bool]:
    """(x_t = α_t τ_t in float32 / float64, on meta?) after checking count, shapes and finiteness."""
    if vectors is None or len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    where = name or "a parameter"
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) != 1:
        raise MergeConfigError(f"task vectors for {where} have different shapes: {sorted(shapes)}")
    alphas = _per_vector(1.0 if weights is None else weights, len(vectors), "weights")
    if not all(math.isfinite(a) for a in alphas):
        raise MergeConfigError(f"weights must be finite, got {alphas}")
    dt = torch.float64 if any(v.dtype == torch.float64 for v in vectors) else torch.float32
    meta = _on_meta(*vectors)
    xs = []
    for i, (v, a) in enumerate(zip(vectors, alphas)):
        v = v.to(dt)
        if not meta and not bool(torch.isfinite(v).all()):
            raise MergeConfigError(f"task vector {i} has NaN/inf entries in {where}")
        xs.append(v * a)  # a new tensor: the caller's τ is never written
    return xs, meta


def _prepare(vectors, weights, lambda_, name: str) -> tuple[list[torch.Tensor], float, torch.Tensor | None]:
    """(x_t, λ, result or None): the shared start of every SVD method — checked inputs and λ; for a tensor that
    is not 2-D the result is already known (λ·mean, as the references), and so it is on ``meta`` / when empty."""
    xs, meta = _inputs(vectors, weights, name)
    lam = _number(lambda_, "lambda_")
    if xs[0].dim() != 2:
        return xs, lam, _mean(xs).mul_(lam)
    if meta or xs[0].numel() == 0:
        return xs, lam, _empty_like(xs) if meta else torch.zeros_like(xs[0])
    return xs, lam, None


def _sum(xs: list[torch.Tensor]) -> torch.Tensor:
    out = xs[0].clone()
    for x in xs[1:]:
        out.add_(x)
    return out


def _mean(xs: list[torch.Tensor]) -> torch.Tensor:
    return _sum(xs).div_(len(xs))


def _rank(s: torch.Tensor, ref: float, dims: Sequence[int]) -> int:
    """How many of the (descending) singular values ``s`` exceed max(dims)·ε·ref."""
    if s.numel() == 0 or not ref > 0:
        return 0
    return int((s > max(dims) * torch.finfo(s.dtype).eps * ref).sum())


def _svd(x: torch.Tensor):
    return torch.linalg.svd(x, full_matrices=False)  # x = U diag(S) Vh


def _polar(x: torch.Tensor) -> torch.Tensor:
    """The polar factor of x (m × c) over its numerical rank ρ: P_ρ Q_ρᵀ for x = P diag(σ) Qᵀ; it has
    orthonormal columns when x has full column rank (then it is the nearest such matrix to x)."""
    p, s, qh = _svd(x)
    rho = _rank(s, float(s[0]) if s.numel() else 0.0, x.shape)
    return p[:, :rho] @ qh[:rho]


def _layout(layout: str) -> bool:
    """True when the stored weight is (in, out) and must be transposed."""
    if layout not in LAYOUTS:
        raise MergeConfigError(f'layout must be "out_in" (nn.Linear) or "in_out" (Conv1D), got {layout!r}')
    return layout == "in_out"


def _empty_like(xs):
    return torch.empty(xs[0].shape, dtype=xs[0].dtype, device=xs[0].device)


# ----------------------------------------------------------------------------------- methods
@register_merge_method("tsv")
def tsv(base, vectors, *, weights=None, lambda_: float = 1.0, name: str = "") -> torch.Tensor:
    """TSV-M, Task Singular Vectors merging (Gargiulo et al., "Task Singular Vectors: Reducing Task
    Interference in Model Merging", CVPR 2025; reference AntoAndGar/task_singular_vectors ``src/utils/TSVM_utils.py: compute_and_sum_svd_mem_reduction``).

    For a 2-D tensor (m × n), k = min(m, n), x_t = α_t τ_t = U_t diag(σ_t) V_tᵀ and p = ⌊k/T⌋ (the
    reference's ``int(k · 1/T)``; it has no knob for this share):

        U = [U_1[:, :p] … U_T[:, :p]] (m × Tp),   V = [V_1[:, :p] … V_T[:, :p]] (n × Tp),
        σ = [σ_1[:p] … σ_T[:p]],
        Δ = λ · U⊥ diag(σ) V⊥ᵀ,   X⊥ = polar factor of X (P Qᵀ of X = P diag(s) Qᵀ)

    Other tensors: Δ = λ (1/T) Σ_t x_t. One vector: Δ = λ x (all k components, already orthonormal).
    Rank < T (k < T, e.g. a 2-row classifier head merged from 8 tasks): p = 0 components per task, so the
    formula's Δ is 0 and that tensor keeps θ0 (as the reference, which zero-fills); a warning names it.
    Differences from the reference: components under the numerical rank are left out (module docstring:
    they change the result only for rank-deficient x_t); the reference averages CLIP's 2-D
    ``text_projection`` (a key test), here every 2-D tensor is merged by TSV (zero τ gives Δ = 0 either way).
    Shapes: vectors (m, n) or any other shape; result the same shape. Transposition-equivariant.
    """
    xs, lam, done = _prepare(vectors, weights, lambda_, name)
    if done is not None:
        return done
    m, n = xs[0].shape
    k, T = min(m, n), len(xs)
    p = k // T
    if p == 0:
        warnings.warn(f"tsv: {name or 'a 2-D tensor'} {(m, n)} has rank at most {k} < {T} task vectors: ⌊{k}/{T}⌋ = 0 "
                      "singular components per task, so its Δ is 0 (θ0 kept)")
        return torch.zeros_like(xs[0])
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vh = _svd(x)
        keep = _rank(s[:p], float(s[0]), (m, n))
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep].T)
    s = torch.cat(ss)
    if s.numel() == 0:
        return torch.zeros_like(xs[0])
    u, v = _polar(torch.cat(us, 1)), _polar(torch.cat(vs, 1))
    return ((u * s) @ v.T).mul_(lam)


@register_merge_method("iso_c")
def iso_c(base, vectors, *, weights=None, lambda_: float = 1.0, name: str = "") -> torch.Tensor:
    """Iso-C, isotropic merging in the common subspace (Marczak et al., "No Task Left Behind: Isotropic
    Model Merging with Common and Task-Specific Subspaces", ICML 2025; reference danielm1405/iso-merging ``src/utils/iso.py: iso_c``).

    For a 2-D tensor: M = Σ_t x_t = U diag(σ) Vᵀ (task arithmetic's sum), ρ = numerical rank of M,

        Δ = λ · σ̄ · U[:, :ρ] V[:, :ρ]ᵀ,   σ̄ = (1/ρ) Σ_{i≤ρ} σ_i

    (every singular value replaced by the mean one: a flat, isotropic spectrum). Other tensors: the
    mean (1/T) Σ_t x_t (the reference averages them). Difference from the reference: it flattens all
    min(m, n) singular values, so for a rank-deficient M (LoRA vectors, one vector of low rank) it adds
    min(m, n) − ρ arbitrary null-space directions at magnitude σ̄ and shrinks σ̄ by ρ / min(m, n); here
    only the ρ directions of M are kept (identical for full-rank M). Transposition-equivariant.
    """
    xs, lam, done = _prepare(vectors, weights, lambda_, name)
    if done is not None:
        return done
    total = _sum(xs)
    u, s, vh = _svd(total)
    rho = _rank(s, float(s[0]), total.shape)
    if rho == 0:
        return torch.zeros_like(total)
    return (u[:, :rho] @ vh[:rho]).mul_(s[:rho].mean() * lam)


@register_merge_method("iso_cts")
def iso_cts(base, vectors, *, weights=None, common_space_fraction: float = 0.8, lambda_: float = 1.0,
            layout: str = "out_in", name: str = "") -> torch.Tensor:
    """Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025, see
    :func:`iso_c`; reference danielm1405/iso-merging ``src/utils/iso.py: iso_cts``, default
    ``common_space_fraction`` f = 0.8 from its ``config/method/iso_cts.yaml``).

    For a 2-D weight in its (out, in) reading W (m × n; a Conv1D weight, stored (in, out), is transposed
    in and out: ``layout`` from the driver), r = min(m, n), the reference's sizes
        k0 = ⌊f·r⌋,  s = round((r − k0)/T) (Python's round, half to even),  k = r − s·T:
    M = Σ_t x_t = U diag(σ) Vᵀ; common subspace U_c = U[:, :k], σ_c = σ[:k], V_c = V[:, :k]; per task the
    residual off it (a projection on the left: this is why the side matters)
        R_t = x_t − U_c U_cᵀ x_t = U_t' diag(σ_t') V_t'ᵀ,  keeping U_t'[:, :s], σ_t'[:s], V_t'[:, :s];
    then Û = polar([U_1' … U_T' U_c]), V̂ = polar([V_1' … V_T' V_c]) and
        Δ = λ · σ̄ · Û V̂ᵀ,   σ̄ = mean of all the kept singular values [σ_1'[:s] … σ_T'[:s] σ_c].
    f = 1 (s = 0) is Iso-C. Other tensors: the mean (1/T) Σ_t x_t.
    Edges: when s·T would exceed r (tiny r, small f: the reference's k goes negative), s = ⌊r/T⌋; for
    r < T, s = 0 and the tensor gets Iso-C. Components under the numerical rank (of M, or of each R_t
    relative to ‖x_t‖_F) are left out — the reference flattens them to σ̄ too, adding arbitrary
    directions for rank-deficient inputs (module docstring); identical for full-rank ones.
    """
    f = _number(common_space_fraction, "common_space_fraction", fraction=True)
    transposed = _layout(layout)
    xs, lam, done = _prepare(vectors, weights, lambda_, name)
    if done is not None:
        return done
    if transposed:
        xs = [x.T for x in xs]
    m, n = xs[0].shape
    r, T = min(m, n), len(xs)
    k0 = int(r * f)
    s_t = min(round((r - k0) / T), r // T)
    k = r - s_t * T
    total = _sum(xs)
    u, sig, vh = _svd(total)
    kc = _rank(sig[:k], float(sig[0]), (m, n))
    uc, sc, vc = u[:, :kc], sig[:kc], vh[:kc].T
    us, ss, vs = [], [], []
    for x in (xs if s_t > 0 else []):
        resid = x - uc @ (uc.T @ x)
        ur, sr, vrh = _svd(resid)
        keep = _rank(sr[:s_t], float(torch.linalg.matrix_norm(x)), (m, n))
        us.append(ur[:, :keep])
        ss.append(sr[:keep])
        vs.append(vrh[:keep].T)
    spectrum = torch.cat(ss + [sc])
    if spectrum.numel() == 0:
        out = torch.zeros_like(total)
    else:
        out = (_polar(torch.cat(us + [uc], 1)) @ _polar(torch.cat(vs + [vc], 1)).T).mul_(spectrum.mean() * lam)
    return out.T.contiguous() if transposed else out


@register_merge_method("wudi")
def wudi(base, vectors, *, weights=None, lambda_: float = 1.0, solver: str = "exact", steps: int = 300,
         lr: float = 1e-5, rtol: float | None = None, layout: str = "out_in", name: str = "") -> torch.Tensor:
    """WUDI merging (Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free
    Model Merging via Task Vectors", ICML 2025: its data-free objective per linear layer; references
    nathanielyvo/WUDI-Merging ``vit/coef.py: get_redundant_task_vector`` and FusionBench
    ``fusion_bench/method/wudi/wudi.py``).

    For a 2-D weight in its (out, in) reading (m × n; Conv1D weights transposed in and out, ``layout``
    from the driver), with x_t = α_t τ_t (x_t ≠ 0), w_t = 1/‖x_t‖²_F and G_t = x_tᵀ x_t (n × n):

        Δ* = argmin_Δ Σ_t w_t ‖(Δ − x_t) x_tᵀ‖²_F         (the rows of x_t span task t's inputs)

    The objective is a convex quadratic, its gradient 2(Δ S − R) with S = Σ_t w_t G_t (n × n) and
    R = Σ_t w_t x_t G_t (m × n), so ``solver="exact"`` (default) solves Δ S = R:

        Δ = λ · R S⁺

    in float64 (S⁺ from an eigendecomposition, ``torch.linalg.pinv(S, hermitian=True)``). Why exact:
    it is the objective's minimiser, in one O(T·m·n² + n³) solve instead of the authors' 300 Adam steps
    (each as costly as forming S); Adam moves an entry by about lr per step, so from Σ_t x_t at lr = 1e-5
    the authors' Δ stays within ~3·10⁻³ of task arithmetic, not at the minimiser. When S is singular
    (Σ_t rank x_t < n: few tasks, LoRA vectors) the minimisers are R S⁺ + Z with Z S = 0, directions no
    task's inputs reach; S⁺ picks Z = 0, the minimum-norm minimiser and the limit of gradient descent
    from Σ_t x_t. Directions whose singular value in the stacked [√w_t x_t] is below ``rtol`` (relative;
    default max(T·m, n)·ε of the inputs' dtype, matrix_rank's rule; never below √(n·ε₆₄), the accuracy
    of S's float64 eigenvalues) count as singular, which bounds the amplification of rounding noise.
    ``solver="adam"`` runs the authors' procedure: Adam (β = 0.9, 0.999, ε = 1e-8, no weight decay) from
    Δ = Σ_t x_t, ``steps`` steps at ``lr`` (their 300 and 1e-5), gradient in closed form, in the inputs'
    dtype, on the paper's objective (the authors' README reports 85.2 % on ViT-B/32 × 8 tasks from that
    procedure, with their unsquared weights).
    Other tensors: the mean (1/T) Σ_t x_t (FusionBench). A zero x_t (absent from that task, or α_t = 0)
    has no direction and no term.
    Differences from the authors' code, following the paper: their loss divides by ‖τ_t‖_F, not
    ‖τ_t‖²_F (FusionBench squares it); they merge only attention / MLP matrices and leave every other
    tensor at θ0 (here every 2-D tensor gets WUDI and the rest the mean, as FusionBench).
    """
    transposed = _layout(layout)
    if solver not in ("exact", "adam"):
        raise MergeConfigError(f'wudi solver must be "exact" or "adam", got {solver!r}')
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MergeConfigError(f"steps must be a positive integer, got {steps!r}")
    lr = _number(lr, "lr", positive=True)
    if rtol is not None and not 0.0 < _number(rtol, "rtol") < 1.0:
        raise MergeConfigError(f"rtol must be in (0, 1), got {rtol}")
    xs, lam, done = _prepare(vectors, weights, lambda_, name)
    if done is not None:
        return done
    dt, dev = xs[0].dtype, xs[0].device
    if transposed:
        xs = [x.T for x in xs]
    m, n = xs[0].shape
    S = torch.zeros(n, n, dtype=torch.float64, device=dev)
    R = torch.zeros(m, n, dtype=torch.float64, device=dev)
    live = 0
    for x in xs:  # one float64 copy at a time
        x = x.to(torch.float64)
        sq = float((x * x).sum())
        if sq == 0.0:
            continue  # no direction, no term
        live += 1
        G = x.T @ x
        S.add_(G, alpha=1.0 / sq)
        R.add_(x @ G if n <= m else (x @ x.T) @ x, alpha=1.0 / sq)  # x G_t, the cheaper way round
    if live == 0:
        out = torch.zeros(m, n, dtype=dt, device=dev)
    elif solver == "exact":
        cut = rtol if rtol is not None else max(live * m, n) * torch.finfo(dt).eps
        # a cut on σ of [√w_t x_t] is cut² on the eigenvalues of S, which float64 resolves to ~n·ε₆₄ only
        cut = max(cut * cut, n * torch.finfo(torch.float64).eps)
        out = (R @ torch.linalg.pinv(S, rtol=cut, hermitian=True)).to(dt)
    else:
        out = _sum(xs)
        Sd, Rd = S.to(dt), R.to(dt)
        m1, v2 = torch.zeros_like(out), torch.zeros_like(out)
        b1, b2, eps = 0.9, 0.999, 1e-8
        for t in range(1, steps + 1):  # torch.optim.Adam's update, with the gradient in closed form
            g = (out @ Sd).sub_(Rd).mul_(2.0)
            m1.mul_(b1).add_(g, alpha=1 - b1)
            v2.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v2.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
            out.addcdiv_(m1, denom, value=-lr / (1 - b1 ** t))
    out = out.mul_(lam)
    return out.T.contiguous() if transposed else out
