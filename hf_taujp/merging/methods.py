"""Merge methods: one small pure function per method, over the tensors of ONE parameter name.

mergekit style: every method sees, for a single parameter, the base tensor θ0 (shape S) and the
task vectors τ_1..τ_T (each shape S), plus optional per-task statistics (diagonal Fisher /
curvature, same shape S), and returns the merged *task vector* Δ (shape S); the merged weight is
θ0 + Δ.  Methods are looked up by name in :data:`MERGE_METHODS`, so :func:`hf_taujp.merging.merge`
and streaming merges can call them tensor by tensor.

Parameter names follow PEFT / mergekit: ``weights`` (one per vector, negative allowed),
``density``, ``majority_sign_method`` ("total" | "frequency"), ``lambda_``, ``seed``.
All arithmetic runs in float32 (or float64 if the inputs are float64); the caller casts the result.
"""
from __future__ import annotations

import warnings
import zlib
from typing import Callable, Sequence

import torch

from ..hub import HfTaujpError


class MergeConfigError(HfTaujpError):
    """Bad merge parameters (unknown method, density outside (0, 1], wrong number of weights, ...)."""


class MissingStatisticsError(HfTaujpError):
    """A method needs a per-task statistic (Fisher / Gram matrix) that was not given."""


MERGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {}
# methods that need per-task statistics, and which kind
REQUIRES_STATISTICS: dict[str, str] = {}
# methods whose output entry depends only on the same entry of the inputs (no per-tensor threshold,
# no random stream): streaming merges may run them on slices of a tensor
ELEMENTWISE_METHODS: set[str] = {"task_arithmetic", "fisher_average", "gradient_matching"}


def register_merge_method(name: str, needs: str | None = None):
    """Decorator: register ``fn`` under ``name`` in :data:`MERGE_METHODS`."""

    def deco(fn):
        MERGE_METHODS[name] = fn
        if needs:
            REQUIRES_STATISTICS[name] = needs
        return fn

    return deco


def get_merge_method(name: str) -> Callable[..., torch.Tensor]:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise MergeConfigError(f"unknown merge method {name!r}; known: {sorted(MERGE_METHODS)}") from None


# ----------------------------------------------------------------------------------- helpers
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _stack(vectors: Sequence[torch.Tensor], name: str = "") -> torch.Tensor:
    if len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) != 1:
        raise MergeConfigError(f"task vectors for {name or 'a parameter'} have different shapes: {sorted(shapes)}")
    dt = torch.float64 if any(v.dtype == torch.float64 for v in vectors) else torch.float32
    return torch.stack([v.to(dt) for v in vectors], dim=0)


def _weights(weights, n: int, like: torch.Tensor) -> torch.Tensor:
    """Weights as a tensor of shape (T, 1, ..., 1) broadcasting against the (T, *S) stack."""
    if weights is None:
        w = torch.ones(n, dtype=like.dtype)
    elif isinstance(weights, (int, float)):
        w = torch.full((n,), float(weights), dtype=like.dtype)
    else:
        w = torch.as_tensor(weights, dtype=like.dtype).reshape(-1)
        if w.numel() == 1:
            w = w.expand(n).clone()
        if w.numel() != n:
            raise MergeConfigError(f"got {w.numel()} weights for {n} task vectors")
    return w.reshape((n,) + (1,) * (like.dim() - 1))


def check_density(density: float, what: str = "density") -> float:
    density = float(density)
    if not (0.0 < density <= 1.0):
        raise MergeConfigError(f"{what} must be in (0, 1], got {density}")
    return density


def dare_density(density: float | None, p: float | None) -> float:
    """Keep probability of DARE from ``density`` or the drop rate ``p`` (Yu et al.: drop with p, rescale
    by 1/(1 − p)): density must lie in (0, 1], p in [0, 1); neither given → 1 (no drop)."""
    if p is not None:
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise MergeConfigError(f"p (the DARE drop rate, 1 − density) must be in [0, 1), got {p}")
        if density is not None and abs(float(density) - (1.0 - p)) > 1e-12:
            raise MergeConfigError(f"got density={density} and p={p}; give one of them (p = 1 − density)")
        density = 1.0 - p
    return check_density(1.0 if density is None else density)


def _magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density·numel) largest |t| entries over the whole tensor (PEFT's rule)."""
    if density >= 1.0:
        return torch.ones_like(t, dtype=torch.bool)
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = True
    return mask.reshape(t.shape)


# Elements per block in blocked kernels: 32 Ki float32 = 128 KiB per buffer, so the dozen buffers a
# TIES block touches stay in L2 instead of streaming every intermediate through DRAM; and at or below
# torch's intra-op grain size (32768), so block ops run on the calling thread: no OpenMP fork/join per
# op, which costs milliseconds when the cores are shared with other processes.
BLOCK = 1 << 15


def kth_largest(a: torch.Tensor, k: int, *, absolute: bool = False) -> torch.Tensor:
    """The k-th largest entry of the 1-D tensor ``a`` (of ``|a|`` if ``absolute``), exact, without sorting.

    Small tensors: ``torch.kthvalue``. Large ones: the k-th largest of a fixed-seed sample of 2¹⁶
    entries ± 6 binomial standard deviations (in ranks) brackets the answer as [lo, hi]; one blocked
    pass counts the entries > hi and keeps those in [lo, hi] (~1 % of them), and ``kthvalue`` runs on
    that band. If the bracket misses, ``kthvalue`` on everything (never wrong, only slower). Uses
    its own generator: the global RNG is untouched.
    """
    a = a.reshape(-1)
    n = a.numel()
    if not 1 <= k <= n:
        raise MergeConfigError(f"k={k} outside [1, {n}]")
    if n <= 1 << 18:
        return torch.kthvalue(a.abs() if absolute else a, n - k + 1).values
    m = 1 << 16
    g = torch.Generator().manual_seed(n)
    sample = a[torch.randint(n, (m,), generator=g)]
    if absolute:
        sample = sample.abs()
    r = m * k / n  # expected rank (from the top) of the answer in the sample
    margin = 6.0 * (r * (1 - k / n)) ** 0.5 + 8
    r_hi, r_lo = int(r - margin), int(r + margin) + 1  # ranks from the top; hi is the larger value
    if r_hi < 1 or r_lo > m:  # answer near an end of the range (k or n − k small): partial selection
        v = a.abs() if absolute else a
        return torch.topk(v, k).values[-1] if r_hi < 1 else torch.topk(v, n - k + 1, largest=False).values[-1]
    hi = torch.kthvalue(sample, m - r_hi + 1).values.item()
    lo = torch.kthvalue(sample, m - r_lo + 1).values.item()
    mid, half = (hi + lo) / 2, (hi - lo) / 2 + 1e-6 * (abs(hi) + abs(lo)) + 1e-30
    above, band = 0, []
    c = min(1 << 16, n)
    x, y, kb = torch.empty(c, dtype=a.dtype), torch.empty(c, dtype=a.dtype), torch.empty(c, dtype=torch.bool)
    for s in range(0, n, c):
        e = min(n, s + c)
        xb, yb, bb = x[: e - s], y[: e - s], kb[: e - s]
        if absolute:
            torch.abs(a[s:e], out=xb)
        else:
            xb.copy_(a[s:e])
        above += int(torch.count_nonzero(torch.gt(xb, hi, out=bb)))
        # lo ≤ x ≤ hi as |x − mid| ≤ half (widened past rounding): subtraction and abs are cheaper than
        # two comparisons; the small band is then cut exactly to [lo, hi] below
        torch.sub(xb, mid, out=yb).abs_()
        band.append(xb[torch.le(yb, half, out=bb)])
    band = torch.cat(band)
    band = band[(band >= lo) & (band <= hi)]
    need = k - above
    if 1 <= need <= band.numel():  # the top `above` entries are > hi, the next ones all in the band
        return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(a.abs() if absolute else a, n - k + 1).values


def _magnitude_mask_mergekit(t: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit 0.1.5's ``sparsify.magnitude`` mask: the k = max(1, int(density·numel)) largest |t|.

    mergekit picks them with ``argsort(|t|, descending)[:k]``; here |t| ≥ (k-th largest |t|), found
    by :func:`kth_largest` (O(numel) instead of a sort). Identical whenever the k-th and (k+1)-th
    largest |t| differ; when several entries tie at the threshold all of them are kept (mergekit
    keeps an arbitrary k of them, the order argsort happens to leave).
    """
    if density >= 1.0:
        return torch.ones_like(t, dtype=torch.bool)
    k = max(1, int(density * t.numel()))
    return t.abs() >= kth_largest(t, k, absolute=True)


def _generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def parameter_seed(seed: int, name: str) -> int:
    """Seed of parameter ``name``'s own random stream in a seeded merge: 1_000_003·seed + crc32(name)
    modulo 2⁶³. Name-based, so reading tensors in another order (streaming, sharded files) draws the
    same DARE masks."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def _random_prune(stack: torch.Tensor, density: float, seed: int | None) -> torch.Tensor:
    """DARE (Yu et al. 2024, Eq. 2): keep each entry with prob. density, rescale by 1/density.

    Drop probability p = 1 − density. With ``seed``, masks are drawn from a generator seeded once
    and used for τ_1, τ_2, … in order — the same stream as PEFT's ``torch.manual_seed(seed)`` and
    then ``merge_utils.dare_*``.
    """
    if density >= 1.0:
        return stack
    g = _generator(seed)
    out = []
    for t in stack:
        mask = torch.bernoulli(torch.full_like(t, density), generator=g)
        out.append(t * mask / density)
    return torch.stack(out, 0)


def _majority_sign(stack: torch.Tensor, method: str) -> torch.Tensor:
    if method == "total":
        mag = stack.sum(0)
    elif method == "frequency":
        mag = stack.sign().sum(0)
    else:
        raise MergeConfigError(f'majority_sign_method must be "total" or "frequency", got {method!r}')
    return torch.where(mag >= 0, 1.0, -1.0).to(stack.dtype)


def _disjoint_mean(weighted: torch.Tensor, sign_mask: torch.Tensor) -> torch.Tensor:
    return (weighted * sign_mask).sum(0) / sign_mask.sum(0).clamp(min=1.0)


# ----------------------------------------------------------------------------------- methods
@register_merge_method("task_arithmetic")
def task_arithmetic(base, vectors, *, weights=None, lambda_: float = 1.0, **_) -> torch.Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023, Eq. 1): Δ = λ Σ_t α_t τ_t.

    ``weights`` = α (one per vector or one shared; negative α negates a task). Same as PEFT's
    ``merge_utils.task_arithmetic`` and mergekit's ``task_arithmetic`` (normalize: false).
    """
    if len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    w = _weights(weights, len(vectors), torch.empty(len(vectors), dtype=_compute_dtype(vectors[0]))).reshape(-1)
    # accumulate instead of stacking: one output-sized buffer, not T of them
    out = None
    for t, a in zip(vectors, w.tolist()):
        if tuple(t.shape) != tuple(vectors[0].shape):
            raise MergeConfigError(f"task vectors have different shapes: {tuple(vectors[0].shape)} vs {tuple(t.shape)}")
        out = t.to(w.dtype) * a if out is None else out.add_(t.to(w.dtype), alpha=a)
    return out if lambda_ == 1 else out.mul_(lambda_)


@register_merge_method("magnitude_prune")
def magnitude_prune(base, vectors, *, weights=None, density: float = 1.0, lambda_: float = 1.0, **_) -> torch.Tensor:
    """Magnitude pruning then task arithmetic: Δ = λ Σ_t α_t · top_k(τ_t), k = int(density·numel).

    Follows PEFT's ``merge_utils.magnitude_prune`` (trim over each whole tensor).
    """
    density = check_density(density)
    s = _stack(vectors)
    pruned = torch.stack([t * _magnitude_mask(t, density) for t in s], 0)
    return lambda_ * (pruned * _weights(weights, len(s), s)).sum(0)


@register_merge_method("ties")
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
    **_,
) -> torch.Tensor:
    """TIES-merging (Yadav et al., NeurIPS 2023): trim → elect sign → disjoint mean, × λ.

    ``definition="peft"`` (default) follows PEFT's ``merge_utils.ties``: trim each τ_t to its
    k = int(density·numel) largest |entries| over the tensor; the sign is elected on the
    *unweighted* trimmed τ̂ (``total``: sign Σ_t τ̂_t, ≥ 0 → +; ``frequency``: sign Σ_t sign τ̂_t);
    Δ = Σ_t α_t τ̂_t m_t / max(1, Σ_t m_t) with m_t = [sign τ̂_t = elected sign].
    (With α = 1 this is the official TIES code, except that the official code trims over the whole
    flattened model vector instead of tensor by tensor.)

    ``definition="mergekit"`` follows mergekit 0.1.5: keep the k = max(1, floor(density·numel))
    largest |τ_t| (by a linear-time threshold, see :func:`_magnitude_mask_mergekit` for the tie
    case); δ_t = α_t τ̂_t; sign = + where Σ δ_t ≥ 0; Δ = Σ δ_t m_t / Σ α_t m_t if ``normalize``
    (zero denominator → 1) else Σ δ_t m_t.
    """
    density = check_density(density)
    if definition == "peft":
        s = _stack(vectors)
        w = _weights(weights, len(s), s)
        trimmed = torch.stack([t * _magnitude_mask(t, density) for t in s], 0)
        sign = _majority_sign(trimmed, majority_sign_method)
        mask = (trimmed.sign() == sign).to(s.dtype)
        return lambda_ * _disjoint_mean(trimmed * w, mask)
    if definition == "mergekit":
        return _ties_mergekit(vectors, weights, density, majority_sign_method, lambda_, normalize)
    raise MergeConfigError(f'ties definition must be "peft" or "mergekit", got {definition!r}')


def _ties_mergekit(vectors, weights, density: float, majority_sign_method: str, lambda_: float,
                   normalize: bool) -> torch.Tensor:
    """mergekit's TIES (see :func:`ties`), blocked: the trim thresholds come from :func:`kth_largest`
    over each whole τ_t; then every block of ``BLOCK`` entries goes through trim → weight → sign
    election → disjoint (normalised) sum in reused L2-sized buffers, ~10 passes per vector that
    never leave the cache, instead of ~10 model-sized temporaries per vector.

    Per entry: δ_t = α_t·τ_t·[|τ_t| ≥ thr_t]; σ = +1 if Σ_t δ_t ≥ 0 (``frequency``: Σ_t sign δ_t) else −1;
    agree_t = [σ·δ_t > 0]; Δ = σ·Σ_t relu(σ·δ_t) / D with D = Σ_t α_t·agree_t (0 → 1; D = 1 when not
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
    T = len(vectors)
    ws = _weights(weights, T, torch.empty(T, dtype=dt)).reshape(-1).tolist()
    flat = [v.reshape(-1) for v in vectors]
    n = flat[0].numel()
    k = max(1, int(density * n))
    thr = [None if density >= 1.0 else kth_largest(f, k, absolute=True).item() for f in flat]
    out = torch.empty(n, dtype=dt)
    c = min(BLOCK, max(n, 1))
    d = [torch.empty(c, dtype=dt) for _ in range(T)]
    x, elect, div = torch.empty(c, dtype=dt), torch.empty(c, dtype=dt), torch.empty(c, dtype=dt)
    fmask, sgn = torch.empty(c, dtype=dt), torch.empty(c, dtype=dt)
    bmask = torch.empty(c, dtype=torch.bool)
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
                dv.add_(fm, alpha=ws[t])
            acc.add_(xb.clamp_(min=0))
        if normalize:
            torch.eq(dv, 0, out=fm)
            dv.add_(fm)
            acc.div_(dv)
        acc.mul_(sg)
    if lambda_ != 1:
        out.mul_(lambda_)
    return out.reshape(shape)


@register_merge_method("dare_linear")
def dare_linear(base, vectors, *, weights=None, density: float | None = None, p: float | None = None,
                seed: int | None = None, lambda_: float = 1.0, **_) -> torch.Tensor:
    """DARE (Yu et al., ICML 2024) + task arithmetic: Δ = λ Σ_t α_t (m_t ⊙ τ_t)/density,
    m_t ~ Bernoulli(density). Give ``density`` (PEFT / mergekit) or the paper's drop rate ``p`` =
    1 − density (see :func:`dare_density`). Follows PEFT's ``merge_utils.dare_linear``."""
    density = dare_density(density, p)
    s = _stack(vectors)
    pruned = _random_prune(s, density, seed)
    return lambda_ * (pruned * _weights(weights, len(s), s)).sum(0)


@register_merge_method("dare_ties")
def dare_ties(base, vectors, *, weights=None, density: float | None = None, p: float | None = None,
              majority_sign_method: str = "total", seed: int | None = None, lambda_: float = 1.0,
              **_) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint mean (PEFT's
    ``merge_utils.dare_ties``): τ̂_t = m_t ⊙ τ_t / density, sign elected on τ̂, Δ = λ·disjoint mean
    of α_t τ̂_t; ``density`` or drop rate ``p`` as in :func:`dare_linear`. (mergekit's dare_ties
    rescales to keep each tensor's L1 norm and sums instead.)"""
    density = dare_density(density, p)
    s = _stack(vectors)
    pruned = _random_prune(s, density, seed)
    sign = _majority_sign(pruned, majority_sign_method)
    mask = (pruned.sign() == sign).to(s.dtype)
    return lambda_ * _disjoint_mean(pruned * _weights(weights, len(s), s), mask)


def _check_stats(stats, n: int, name: str, what: str = "fisher", nonnegative: bool = True):
    """One statistic per task vector, present and finite; diagonal curvature also ≥ 0 (a Gram matrix's
    off-diagonal entries may be negative)."""
    if stats is None or len(stats) == 0:
        raise MissingStatisticsError(f"method needs a {what} per task vector, none given for {name or 'parameter'}")
    if len(stats) != n:
        raise MissingStatisticsError(f"got {len(stats)} {what} tensors for {n} task vectors ({name})")
    for i, f in enumerate(stats):
        if f is None:
            raise MissingStatisticsError(f"{what} of task vector {i} missing for {name or 'parameter'}")
        if not torch.isfinite(f).all():
            raise HfTaujpError(f"{what} of task vector {i} has NaN/inf entries for {name or 'parameter'}")
        if nonnegative and (f < 0).any():
            raise HfTaujpError(f"{what} of task vector {i} has negative entries for {name or 'parameter'}")


@register_merge_method("fisher_average", needs="fisher")
def fisher_average(base, vectors, *, fishers=None, weights=None, fisher_floor: float = 1e-6,
                   name: str = "", **_) -> torch.Tensor:
    """Fisher merging (Matena & Raffel, NeurIPS 2022, Eq. 3), diagonal Fisher:

        θ = Σ_t α_t F̃_t ⊙ θ_t / Σ_t α_t F̃_t,   θ_t = θ0 + τ_t,   F̃_t = max(F_t, fisher_floor)

    returned as Δ = θ − θ0 = Σ_t α_t F̃_t ⊙ τ_t / Σ_t α_t F̃_t. ``weights`` = α (the paper's λ_t,
    default 1). The floor keeps entries where every Fisher is 0 at the plain weighted average
    (mergekit-style "epsilon"); an all-zero Fisher warns.
    """
    s = _stack(vectors, name)
    _check_stats(fishers, len(s), name)
    F = torch.stack([f.to(s.dtype) for f in fishers], 0)
    if F.shape != s.shape:
        raise MergeConfigError(f"fisher shape {tuple(F.shape[1:])} != parameter shape {tuple(s.shape[1:])} ({name})")
    for i, f in enumerate(F):
        if not (f > 0).any():
            warnings.warn(f"Fisher of task vector {i} is all zero for {name or 'a parameter'}; using the floor {fisher_floor}")
    F = F.clamp(min=fisher_floor)
    w = _weights(weights, len(s), s)
    return (w * F * s).sum(0) / (w * F).sum(0)


@register_merge_method("gradient_matching", needs="fisher")
def gradient_matching(base, vectors, *, fishers=None, num_examples=None, base_fisher=None,
                      base_num_examples: float = 1.0, lambda_: float = 1.0, delta: float = 1e-12,
                      name: str = "", **_) -> torch.Tensor:
    """Uncertainty-based gradient matching (Daheim et al., ICLR 2024, Eq. 11 with diagonal Fisher;
    as in UKPLab/iclr2024-model-merging):

        Δ = α Σ_t [(s0·H0 + δ + α Σ_s s_s·H_s)⁻¹ ⊙ (s0·H0 + δ + s_t·H_t)] ⊙ τ_t

    α = ``lambda_`` (one global scale), H_t = ``fishers[t]`` (mean squared gradients),
    s_t = ``num_examples[t]`` (turns means into sums; default 1), H0 = ``base_fisher`` (optional;
    absent → 0, δ alone), s0 = ``base_num_examples``, δ = ``delta``. With H_t = H0 = c constant and
    equal s it reduces to task arithmetic with a rescaled α (the paper's remark).
    """
    s = _stack(vectors, name)
    _check_stats(fishers, len(s), name)
    H = torch.stack([f.to(s.dtype) for f in fishers], 0)
    if H.shape != s.shape:
        raise MergeConfigError(f"fisher shape {tuple(H.shape[1:])} != parameter shape {tuple(s.shape[1:])} ({name})")
    n = len(s)
    if num_examples is None:
        num_examples = [1.0] * n
    if len(num_examples) != n:
        raise MergeConfigError(f"got {len(num_examples)} num_examples for {n} task vectors")
    st = torch.as_tensor([float(x) for x in num_examples], dtype=s.dtype).reshape((n,) + (1,) * (s.dim() - 1))
    if base_fisher is not None:
        _check_stats([base_fisher], 1, name, "base fisher")
        prior = base_num_examples * base_fisher.to(s.dtype) + delta
    else:
        prior = torch.full(s.shape[1:], float(delta), dtype=s.dtype)
    sH = st * H
    denom = prior + lambda_ * sH.sum(0)
    if (denom == 0).any():
        raise HfTaujpError(f"gradient_matching: zero curvature with delta=0 for {name or 'a parameter'}; use delta > 0")
    return lambda_ * ((prior + sH) / denom * s).sum(0)


@register_merge_method("regmean", needs="gram")
def regmean(base, vectors, *, grams=None, weights=None, reduce_non_diagonal_ratio: float = 0.9,
            layout: str = "out_in", nonlinear: str = "average", name: str = "", **_) -> torch.Tensor:
    """RegMean (Jin et al., ICLR 2023, Eq. 2 with the off-diagonal scaling of §3.3).

    Linear weight with per-task input Grams G_t (in × in): G̃_t = α_t·(a·G_t + (1 − a)·diag(G_t)),
    a = ``reduce_non_diagonal_ratio`` (the paper's α; 1 = exact least squares, 0 = diagonal only),
    α_t = ``weights`` (default 1). With W = θ0 + τ, the merged W* = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t gives
    Δ = W* − θ0 = (Σ_t G̃_t)⁻¹ Σ_t G̃_t τ_t for ``layout="in_out"`` (Conv1D, y = xW) and
    Δ = (Σ_t τ_t G̃_t)(Σ_t G̃_t)⁻¹ for ``layout="out_in"`` (nn.Linear, y = xWᵀ). Solved in float64.

    Weights without a Gram (``grams=None``: biases, embeddings, norms) follow ``nonlinear``:
    ``"average"`` (the paper: Δ = Σ α_t τ_t / Σ α_t) or ``"task_arithmetic"`` (Δ = Σ α_t τ_t).
    """
    if not 0.0 <= float(reduce_non_diagonal_ratio) <= 1.0:
        raise MergeConfigError(f"reduce_non_diagonal_ratio must be in [0, 1], got {reduce_non_diagonal_ratio}")
    s = _stack(vectors, name)
    w = _weights(weights, len(s), s)
    if grams is None:
        if nonlinear == "average":
            return (s * w).sum(0) / w.sum()
        if nonlinear == "task_arithmetic":
            return (s * w).sum(0)
        raise MergeConfigError(f'nonlinear must be "average" or "task_arithmetic", got {nonlinear!r}')
    _check_stats(grams, len(s), name, "Gram matrix", nonnegative=False)
    if s.dim() != 3:
        raise MergeConfigError(f"regmean: {name} has a Gram matrix but is not a 2-D weight ({tuple(s.shape[1:])})")
    if layout not in ("out_in", "in_out"):
        raise MergeConfigError(f'layout must be "out_in" (nn.Linear) or "in_out" (Conv1D), got {layout!r}')
    d_in = s.shape[2] if layout == "out_in" else s.shape[1]
    a = float(reduce_non_diagonal_ratio)
    total, rhs = None, None
    for t, G, alpha in zip(s, grams, w.reshape(-1).tolist()):
        G = G.to(torch.float64)
        if tuple(G.shape) != (d_in, d_in):
            raise MergeConfigError(f"regmean: Gram of {name} has shape {tuple(G.shape)}, expected {(d_in, d_in)} "
                                   f"for a {layout} weight of shape {tuple(s.shape[1:])}")
        Gt = alpha * (a * G + (1.0 - a) * torch.diag(torch.diagonal(G)))
        term = Gt @ t.to(torch.float64) if layout == "in_out" else t.to(torch.float64) @ Gt
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
