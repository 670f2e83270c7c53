"""Sparsification and sign election shared by the TIES / DARE family (mergekit's ``sparsify`` in spirit):
magnitude masks (PEFT's top-k and mergekit's threshold, :func:`kth_largest` without sorting), DARE's
random drop-and-rescale (Yu et al., ICML 2024) with its densities / drop rates and seeded generators
(:func:`parameter_seed`: one stream per parameter name), and TIES's majority sign and disjoint mean
(Yadav et al., NeurIPS 2023).
"""
from __future__ import annotations

import zlib
from typing import Sequence

import torch

from ..errors import MergeConfigError
from .method_helpers import _per_vector, check_density


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
