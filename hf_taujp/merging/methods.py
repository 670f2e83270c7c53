"""Merge methods: one small pure function per method, over the tensors of ONE parameter name.

mergekit style: every method sees, for a single parameter, the base tensor θ0 (shape S) and the
task vectors τ_1..τ_T (each shape S), plus optional per-task statistics (diagonal Fisher /
curvature, same shape S), and returns the merged *task vector* Δ (shape S); the merged weight is
θ0 + Δ.  Methods are looked up by name in :data:`MERGE_METHODS`, so :func:`hf_taujp.merging.merge`
and streaming merges can call them tensor by tensor.

Parameter names follow PEFT / mergekit: ``weights`` (one per vector, negative allowed),
``density``, ``majority_sign_method`` ("total" | "frequency"), ``lambda_``, ``seed``. Each method
*declares* its parameters (its keyword-only arguments, see :class:`MethodSpec`): any other name is a
:class:`MergeConfigError` naming the method and its parameters. Per-vector parameters (``weights``,
``density``, ...) take one number (shared) or one per vector.

Negation: a negative α_t always means "merge −τ_t with weight |α_t|" (see the note above
:func:`task_arithmetic`), so α = [−1] gives Δ = −τ for every method.

Devices: results and every buffer follow the inputs' device (CPU, CUDA, ``meta``).
All arithmetic runs in float32 (or float64 if the inputs are float64); the caller casts the result.
Methods act on τ whatever its reading: merging linear (tangent) vectors gives a tangent, except
for methods registered with ``linear_ok=False`` (RegMean), which need the weights themselves.
"""
from __future__ import annotations

import inspect
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import HfTaujpError, MergeConfigError, MissingStatisticsError


MERGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {}
# methods that need per-task statistics, and which kind
REQUIRES_STATISTICS: dict[str, str] = {}
# methods whose output entry depends only on the same entry of the inputs (no per-tensor threshold,
# no random stream): streaming merges may run them on slices of a tensor
ELEMENTWISE_METHODS: set[str] = set()

# Keywords the merge drivers (merge(), merge_streaming()) fill in themselves, never user parameters:
# the parameter's name and its per-task statistics.
DRIVER_ARGS = frozenset({"name", "fishers", "grams", "base_fisher", "layout"})


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about a merge method (mergekit style: each method declares its parameters).

    ``parameters``: {user parameter: default} from the function's keyword-only arguments (minus
    :data:`DRIVER_ARGS`); ``None`` when the function takes ``**kwargs`` (anything accepted, unchecked).
    ``per_vector``: parameters that take one value per task vector (``weights``, ``density``, ...).
    ``needs``: "fisher" / "gram" statistics per vector, or None. ``elementwise``: entry i of the result
    depends only on entry i of the inputs (streamed in slices). ``linear_ok``: the method's definition
    holds for linear (tangent) vectors too (False: it needs the weights themselves, e.g. RegMean).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    parameters: Mapping[str, Any] | None
    per_vector: frozenset
    needs: str | None
    elementwise: bool
    linear_ok: bool
    driver_args: frozenset

    def check_params(self, params: Mapping[str, Any], where: str = "") -> None:
        """``MergeConfigError`` naming the method and its valid parameters for any unknown parameter."""
        if self.parameters is None:
            return
        unknown = sorted(k for k in params if k not in self.parameters)
        if unknown:
            raise MergeConfigError(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for merge method "
                f"{self.name!r}{where}; its parameters are: {', '.join(sorted(self.parameters)) or '(none)'}")


METHOD_SPECS: dict[str, MethodSpec] = {}


def register_merge_method(name: str, needs: str | None = None, *, elementwise: bool = False,
                          per_vector: Sequence[str] = ("weights",), linear_ok: bool = True):
    """Decorator: register ``fn`` under ``name`` in :data:`MERGE_METHODS`.

    ``fn(base, vectors, *, weights=None, <parameters>..., name="")`` returns the merged Δ of one parameter.
    Its keyword-only arguments are its declared parameters: ``merge(..., method=name, **params)`` and
    recipes refuse any other name (a function with ``**kwargs`` accepts everything, unchecked). The
    drivers pass ``name`` and the statistics (``fishers`` / ``grams`` / ``base_fisher`` / ``layout``)
    only when ``fn`` accepts them. See :class:`MethodSpec` for the other flags.
    """

    def deco(fn):
        sig = inspect.signature(fn)
        open_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        kwonly = {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
        params = None if open_kw else {k: v for k, v in kwonly.items() if k not in DRIVER_ARGS}
        driver = frozenset(DRIVER_ARGS if open_kw else DRIVER_ARGS & set(kwonly))
        METHOD_SPECS[name] = MethodSpec(name, fn, params, frozenset(per_vector), needs, elementwise, linear_ok, driver)
        MERGE_METHODS[name] = fn
        if needs:
            REQUIRES_STATISTICS[name] = needs
        if elementwise:
            ELEMENTWISE_METHODS.add(name)
        return fn

    return deco


def get_method_spec(name: str) -> MethodSpec:
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise MergeConfigError(f"unknown merge method {name!r}; known: {sorted(METHOD_SPECS)}") from None


def get_merge_method(name: str) -> Callable[..., torch.Tensor]:
    return get_method_spec(name).fn


# ----------------------------------------------------------------------------------- helpers
def require_statistics(method: str, spec: MethodSpec, given: Sequence | None, n_vectors: int, base_fisher: Any,
                       noun: str = "statistic") -> None:
    """``MissingStatisticsError`` unless the statistics ``spec.needs`` are given, one per task vector, and the
    base Fisher when the method's driver takes ``base_fisher`` (both merge paths call it; ``noun`` says what
    the caller passes: statistics objects or folders)."""
    needs = spec.needs
    if needs:
        arg = "fishers" if needs == "fisher" else "grams"
        if not given:
            raise MissingStatisticsError(f"method {method!r} needs one {needs} {noun} per task vector ({arg}=...)")
        if len(given) != n_vectors:
            raise MissingStatisticsError(f"got {len(given)} {needs} {noun}s for {n_vectors} task vectors ({arg}=...)")
    if "base_fisher" in spec.driver_args and base_fisher is None:
        raise MissingStatisticsError(
            f"method {method!r} needs the base model's Fisher H0 (base_fisher=...): without it the prior is δ "
            "alone and the merge equals fisher_average with λ inert; estimate it with estimate_fisher(base, data) "
            "or use method='fisher_average'")


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


def _dare_densities(density, p, n: int) -> list[float]:
    """Per-vector DARE keep probabilities from ``density`` and / or ``p`` (each a number or one per vector)."""
    ds = [None] * n if density is None else _per_vector(density, n, "density")
    ps = [None] * n if p is None else _per_vector(p, n, "p")
    return [dare_density(d, q) for d, q in zip(ds, ps)]


def _magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = int(density·numel) largest |t| entries over the whole tensor (PEFT's rule)."""
    if density >= 1.0:
        return torch.ones_like(t, dtype=torch.bool)
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
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
    # sample positions from a CPU generator (the same sample on every device), moved to a's device
    g = torch.Generator().manual_seed(n)
    sample = a[torch.randint(n, (m,), generator=g).to(a.device)]
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
    x, y = torch.empty(c, dtype=a.dtype, device=a.device), torch.empty(c, dtype=a.dtype, device=a.device)
    kb = torch.empty(c, dtype=torch.bool, device=a.device)
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


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed`` (None without a seed: the global RNG; none on
    ``meta``, which draws no values). Masks of a seeded merge are reproducible per device type
    (CPU and CUDA generators are different streams)."""
    if seed is None or device.type == "meta":
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def parameter_seed(seed: int, name: str) -> int:
    """Seed of parameter ``name``'s own random stream in a seeded merge: 1_000_003·seed + crc32(name)
    modulo 2⁶³. Name-based, so reading tensors in another order (streaming, sharded files) draws the
    same DARE masks."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def _random_prune(stack: torch.Tensor, densities: Sequence[float], seed: int | None) -> torch.Tensor:
    """DARE (Yu et al. 2024, Eq. 2): keep each entry of τ_t with prob. density_t, rescale by 1/density_t.

    Drop probability p = 1 − density. With ``seed``, masks are drawn from a generator (on the stack's
    device) seeded once and used for τ_1, τ_2, … in order — the same stream as PEFT's
    ``torch.manual_seed(seed)`` and then ``merge_utils.dare_*`` on CPU.
    """
    if all(d >= 1.0 for d in densities):
        return stack
    g = _generator(seed, stack.device)
    out = []
    for t, d in zip(stack, densities):
        if d >= 1.0:
            out.append(t)
            continue
        mask = torch.bernoulli(torch.full_like(t, d), generator=g)
        out.append(t * mask / d)
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


def _signs_like(signs: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(signs, dtype=like.dtype, device=like.device).reshape((len(signs),) + (1,) * (like.dim() - 1))


# ----------------------------------------------------------------------------------- methods
# Negation. For the methods linear in α (task arithmetic, magnitude pruning, DARE + task arithmetic) a
# negative α_t negates τ_t by the formula itself. For the others a negative α_t is *defined* as merging
# the negated vector −τ_t with weight |α_t|: the sign election votes with sign(α_t)·τ_t, and
# normalisations divide by Σ |α_t|·(...) — for α ≥ 0 exactly the published definitions, and α = [−1]
# always gives Δ = −τ (the definitions with Σ α_t in a denominator would give +τ or ±inf).
@register_merge_method("task_arithmetic", elementwise=True)
def task_arithmetic(base, vectors, *, weights=None, lambda_: float = 1.0) -> torch.Tensor:
    """Task arithmetic (Ilharco et al., ICLR 2023, Eq. 1): Δ = λ Σ_t α_t τ_t.

    ``weights`` = α (one per vector or one shared; negative α negates a task). Same as PEFT's
    ``merge_utils.task_arithmetic`` and mergekit's ``task_arithmetic`` (normalize: false).
    """
    if len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    w = _per_vector(1.0 if weights is None else weights, len(vectors), "weights")
    dt = _compute_dtype(vectors[0])
    # accumulate instead of stacking: one output-sized buffer, not T of them
    out = None
    for t, a in zip(vectors, w):
        if tuple(t.shape) != tuple(vectors[0].shape):
            raise MergeConfigError(f"task vectors have different shapes: {tuple(vectors[0].shape)} vs {tuple(t.shape)}")
        out = t.to(dt) * a if out is None else out.add_(t.to(dt), alpha=a)
    return out if lambda_ == 1 else out.mul_(lambda_)


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
