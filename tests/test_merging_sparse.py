"""The LLM staples and consensus merges (model_stock, slerp, della, breadcrumbs, consensus) against
independent references written from their definitions in float64 numpy (and mergekit's own functions
when mergekit is importable), their edges (breadcrumbs under 1/γ entries, slerp's colinear fallback,
model_stock with one vector, DELLA's ε bounds), in-memory == streaming, and YAML recipes."""
import inspect
import math

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

import hf_taujp.merging.sparse_methods as S
from hf_taujp.errors import HfTaujpError, MergeConfigError
from hf_taujp.merging import merge, merge_from_config, merge_streaming
from hf_taujp.merging import methods as M
from hf_taujp.task_vector import TaskVector, fingerprint
from tests.tiny_models import GPT2_MINI, tiny_gpt2

D = torch.float64
NAMES = ["model_stock", "slerp", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "consensus",
         "consensus_ties"]


def _rand(n=3, shape=(6, 9), seed=0, shared=0.0, dtype=D):
    """n random tensors; ``shared`` adds a common component (positive cosines, as fine-tunes of one base)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(*shape, generator=g, dtype=dtype)
    return [torch.randn(*shape, generator=g, dtype=dtype) + shared * common for _ in range(n)]


def _np(ts):
    return [t.detach().numpy().astype(np.float64) for t in ts]


# ------------------------------------------------------------------ references (numpy, float64)
def ref_model_stock(taus, filter_wise=False):
    x = np.stack(_np(taus))
    shape = x.shape[1:]
    x = x.reshape(len(x), x.shape[1] if (filter_wise and x.ndim > 2) else 1, -1)
    n = len(x)
    cos = np.mean([np.sum(x[i] * x[j], -1) / (np.linalg.norm(x[i], axis=-1) * np.linalg.norm(x[j], axis=-1))
                   for i in range(n) for j in range(i + 1, n)], axis=0)
    t = n * cos / (1 + (n - 1) * cos)
    return (t[:, None] * x.mean(0)).reshape(shape)


def ref_slerp(b, t1, t2, t, thr=0.9995, eps=1e-8):
    """mergekit's slerp (merge_methods/slerp.py) from θ0 + τ1 to θ0 + τ2, minus θ0."""
    b, t1, t2 = _np([b, t1, t2])
    v0, v1 = b + t1, b + t2
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    u0 = v0 / n0 if n0 > eps else v0
    u1 = v1 / n1 if n1 > eps else v1
    dot = np.sum(u0 * u1)
    if abs(dot) > thr:
        return (1 - t) * v0 + t * v1 - b
    th = np.arccos(dot)
    return np.sin(th * (1 - t)) / np.sin(th) * v0 + np.sin(th * t) / np.sin(th) * v1 - b


def ref_keep_probabilities(tau, density, eps):
    """MAGPRUNE's keep probabilities: per row, rank 0 = smallest |τ| ... n − 1 = largest."""
    x = tau.detach().numpy().astype(np.float64)
    rows = x.reshape(1, -1) if x.ndim < 2 else x.reshape(x.shape[0], -1)
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    return (density - eps) + ranks / (n - 1) * 2 * eps


def ref_mix(pruned, weights, consensus, normalize, lam=1.0):
    d = np.stack(pruned) * np.asarray(weights, dtype=np.float64).reshape((-1,) + (1,) * pruned[0].ndim)
    if not consensus:
        out = d.sum(0)
        return lam * (out / np.sum(np.abs(weights)) if normalize else out)
    sign = np.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = (np.sign(d) == sign).astype(np.float64)
    out = (d * agree).sum(0)
    if normalize:
        div = (np.abs(np.asarray(weights)).reshape((-1,) + (1,) * pruned[0].ndim) * agree).sum(0)
        out = out / np.where(div == 0, 1.0, div)
    return lam * out


def ref_breadcrumbs_mask(tau, density, gamma):
    a = np.abs(tau.numpy().reshape(-1))
    n = a.size
    keep = n if density >= 1 else max(1, int(density * n))
    top = min(int(gamma * n), n - keep)
    order = np.argsort(-a, kind="stable")  # largest first
    m = np.zeros(n)
    m[order[top: top + keep]] = 1
    return m.reshape(tau.shape)


def ref_mergekit_main_breadcrumbs_mask(tau, density, gamma):
    """mergekit's GitHub sparsify.magnitude_outliers (commit a6e4028): keep sorted↑[n_bot:-n_top]."""
    a = np.abs(tau.numpy().reshape(-1))
    n = a.size
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    m = np.zeros(n)
    m[np.argsort(a)[n_bot:-n_top]] = 1  # empty when n_top == 0
    return m.reshape(tau.shape)


def ref_consensus(taus, weights, lam_t, k, mtl=None):
    nu = np.stack(_np(taus)) * np.asarray(weights).reshape((-1,) + (1,) * taus[0].dim())
    mtl = nu.sum(0) if mtl is None else mtl
    masks = np.abs(nu) >= np.asarray(lam_t).reshape((-1,) + (1,) * taus[0].dim()) * np.abs(mtl - nu)
    return np.where(masks.sum(0) >= k, mtl, 0.0)


def ref_ties(taus, weights, density):
    """TIES with PEFT's definition: trim to top-⌊ρN⌋ |τ|, elect on the unweighted sum, disjoint mean."""
    x = np.stack(_np(taus))
    trimmed = []
    for t in x:
        k = int(density * t.size)
        thr = np.sort(np.abs(t).reshape(-1))[::-1][k - 1]
        trimmed.append(np.where(np.abs(t) >= thr, t, 0.0))
    trimmed = np.stack(trimmed)
    sign = np.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    m = (np.sign(trimmed) == sign).astype(np.float64)
    w = np.asarray(weights).reshape((-1,) + (1,) * taus[0].dim())
    return (trimmed * w * m).sum(0) / np.maximum(m.sum(0), 1.0)


def close(got, want, **kw):
    torch.testing.assert_close(got.double(), torch.as_tensor(want, dtype=D), **kw)


# ------------------------------------------------------------------ registry
def test_registered_with_declared_parameters_and_flags():
    for n in NAMES:
        assert n in M.MERGE_METHODS and M.METHOD_SPECS[n].parameters is not None, n
    specs = M.METHOD_SPECS
    assert {n for n in NAMES if specs[n].elementwise} == {"consensus"}  # every other one reads a whole tensor
    assert not specs["slerp"].linear_ok and all(specs[n].linear_ok for n in NAMES if n != "slerp")
    assert specs["della"].per_vector == {"weights", "density", "epsilon"}
    assert specs["breadcrumbs_ties"].per_vector == {"weights", "density", "gamma"}
    assert specs["consensus"].per_vector == {"weights", "threshold"}
    assert specs["della"].parameters["epsilon"] == 0.15 and specs["breadcrumbs"].parameters["gamma"] == 0.01
    assert specs["consensus"].parameters["k"] == 2 and specs["slerp"].parameters["t"] is None
    for n in NAMES:  # one formula with its source per method
        assert "Δ" in (M.METHOD_SPECS[n].fn.__doc__ or ""), n


@pytest.mark.parametrize("call, match", [
    (lambda v: S.slerp(v[0], v[:2], t="half"), "t must be a number"),
    (lambda v: S.slerp(v[0], v[:2], t=True), "t must be a number"),
    (lambda v: S.model_stock(None, v, filter_wise=1), "filter_wise must be true or false"),
    (lambda v: S.della(None, v, density=0.5, epsilon="wide"), "epsilon must be a number"),
    (lambda v: S.della(None, v, normalize="yes"), "normalize must be true or false"),
    (lambda v: S.della(None, v, density=0.5, rescale="l2"), "rescale must be"),
    (lambda v: S.breadcrumbs(None, v, gamma=None), "gamma must be a number"),
    (lambda v: S.breadcrumbs_ties(None, v, majority_sign_method="most"), "majority_sign_method"),
    (lambda v: S.consensus(None, v, k=1.5), "k .* integer"),
    (lambda v: S.consensus(None, v, k="2"), "k .* integer"),
    (lambda v: S.consensus(None, v, threshold=[0.5, 1.0]), "2 values of threshold for 3"),
    (lambda v: S.consensus(None, v, threshold=-0.1), "threshold must be a finite number"),
    (lambda v: S.consensus_ties(None, v, lambda_=float("nan")), "lambda_ must be a finite number"),
])
def test_wrong_types_and_values_are_merge_config_errors(call, match):
    with pytest.raises(MergeConfigError, match=match):
        call(_rand())


def test_unknown_parameters_through_merge_name_the_method():
    base = tiny_gpt2(seed=0, **GPT2_MINI)
    tv = TaskVector({n: 0.1 * torch.randn(p.shape) for n, p in base.named_parameters()})
    with pytest.raises(MergeConfigError, match=r"'density'.*'slerp'.*\bt\b"):
        merge(base, [tv, tv], "slerp", density=0.5, progress=False)
    with pytest.raises(MergeConfigError, match=r"'epsilon'.*'breadcrumbs'.*gamma"):
        merge(base, [tv, tv], "breadcrumbs", epsilon=0.1, progress=False)
    with pytest.raises(MergeConfigError, match=r"'seed'.*'consensus'"):
        merge(base, [tv, tv], "consensus", seed=1, progress=False)


@pytest.mark.parametrize("method, kw", [("della", {}), ("della_linear", {}), ("breadcrumbs", {}),
                                        ("breadcrumbs_ties", {}), ("consensus_ties", {})])
@pytest.mark.parametrize("density", [0.0, -0.2, 1.5, float("nan")])
def test_density_outside_0_1_is_an_error(method, kw, density):
    with pytest.raises(MergeConfigError, match="density must be in"):
        M.get_merge_method(method)(None, _rand(), density=density, **kw)
    with pytest.raises(MergeConfigError, match="density must be in"):  # per vector, too
        M.get_merge_method(method)(None, _rand(), density=[0.5, density, 0.5], **kw)


@pytest.mark.parametrize("method, kw", [
    ("model_stock", {}), ("slerp", {"t": 0.5}), ("della", {"density": 0.5, "epsilon": 0.1, "seed": 0}),
    ("della_linear", {"density": 0.5, "seed": 0}), ("breadcrumbs", {"density": 0.5}),
    ("breadcrumbs_ties", {"density": 0.5}), ("consensus", {}), ("consensus_ties", {}),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_inputs_are_named_errors(method, kw, bad):
    v = _rand(2 if method == "slerp" else 3)
    v[1] = v[1].clone()
    v[1][2, 3] = bad
    fn = M.get_merge_method(method)
    with pytest.raises(HfTaujpError, match=r"task vector 1 has NaN/inf entries in layer\.w"):
        fn(torch.zeros(6, 9, dtype=D), v, name="layer.w", **kw)
    if method == "slerp":
        b = torch.zeros(6, 9, dtype=D)
        b[0, 0] = bad
        with pytest.raises(HfTaujpError, match="the base has NaN/inf"):
            fn(b, _rand(2), **kw)


# ------------------------------------------------------------------ model stock
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_its_formula(n, filter_wise):
    taus = _rand(n, shared=1.5, seed=n)
    close(S.model_stock(None, taus, filter_wise=filter_wise), ref_model_stock(taus, filter_wise))
    bias = _rand(n, shape=(7,), shared=1.0, seed=9)  # a 1-D tensor is one row in both modes
    close(S.model_stock(None, bias, filter_wise=filter_wise), ref_model_stock(bias, False))
    # weight space: θ = t·mean(θ_t) + (1 − t)·θ0, with θ0 cancelling (mergekit's form)
    b = torch.randn(6, 9, dtype=D)
    t = torch.as_tensor(ref_model_stock(taus) / np.mean(_np(taus), 0)).reshape(-1)[0]
    close(b + S.model_stock(b, taus), t * torch.stack([b + x for x in taus]).mean(0) + (1 - t) * b)


def test_model_stock_edges():
    taus = _rand(2)
    with pytest.raises(MergeConfigError, match="at least two task vectors"):
        S.model_stock(None, taus[:1])
    with pytest.raises(MergeConfigError, match="takes no weights"):
        S.model_stock(None, taus, weights=[1.0, 0.5])
    S.model_stock(None, taus, weights=[1.0, 1.0])  # a recipe's default weight 1 is fine
    # opposite vectors: 1 + (N − 1)·cos θ = 0, t undefined → the base is kept (mergekit 0.1.5)
    assert torch.equal(S.model_stock(None, [taus[0], -taus[0]]), torch.zeros(6, 9, dtype=D))
    # identical vectors: cos θ = 1, t = 1, Δ = τ
    close(S.model_stock(None, [taus[0]] * 3), taus[0])
    # tiny τ (norm product < 1e-6): the exact cosine, where mergekit's clamp at 1e-6 shrinks it
    small = [1e-5 * x for x in _rand(2, shape=(5,), shared=3.0)]
    close(S.model_stock(None, small), ref_model_stock(small))
    a, b = _np(small)
    cos_mergekit = np.sum(a * b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-6)
    assert cos_mergekit < 0.1 * np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))
    base = tiny_gpt2(seed=0, **GPT2_MINI)
    one = TaskVector({n: 0.1 * torch.randn(p.shape) for n, p in base.named_parameters()})
    with pytest.raises(MergeConfigError, match="at least two"):
        merge(base, [one], "model_stock", progress=False)


# ------------------------------------------------------------------ slerp
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_equals_mergekits_formula(t):
    b = torch.randn(6, 9, dtype=D, generator=torch.Generator().manual_seed(4))
    t1, t2 = _rand(2, seed=5)
    got = S.slerp(b, [t1, t2], t=t)
    close(got, ref_slerp(b, t1, t2, t))
    if t == 0.0:
        assert torch.equal(got, t1)
    if t == 1.0:
        close(got, t2)
    # float32 inputs, a float32 result
    assert S.slerp(b.float(), [t1.float(), t2.float()], t=t).dtype == torch.float32


def _pair_at_cosine(c, seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(n, dtype=D, generator=g)
    u = torch.randn(n, dtype=D, generator=g)
    u -= (u @ v0) / (v0 @ v0) * v0
    v1 = 2.0 * (c * v0 / v0.norm() + math.sqrt(1 - c * c) * u / u.norm())
    b = torch.randn(n, dtype=D, generator=g)
    return b, v0 - b, v1 - b


def test_slerp_colinear_fallback_is_linear_interpolation():
    t = 0.3
    # exactly colinear: v1 = 2·v0 (the spherical formula would divide 0 by 0)
    b, t1, _ = _pair_at_cosine(0.5)
    t2 = 2 * (b + t1) - b
    close(S.slerp(b, [t1, t2], t=t), (1 - t) * t1 + t * t2)
    # just above mergekit's DOT_THRESHOLD 0.9995: linear; just below: spherical (and not linear)
    for c, linear in ((0.9996, True), (-0.9996, True), (0.999, False)):
        b, t1, t2 = _pair_at_cosine(c)
        got = S.slerp(b, [t1, t2], t=t)
        close(got, ref_slerp(b, t1, t2, t))
        lerp = (1 - t) * t1 + t * t2
        assert torch.allclose(got, lerp, rtol=0, atol=1e-12) == linear, c
    # the spherical case keeps the norm of unit endpoints (a rotation), linear interpolation does not
    b, t1, t2 = _pair_at_cosine(0.0)
    v0, v1 = b + t1, b + t2
    v0, v1 = v0 / v0.norm(), v1 / v1.norm()
    z = torch.zeros_like(b)
    out = S.slerp(z, [v0, v1], t=0.5)
    assert abs(float(out.norm()) - 1.0) < 1e-12


def test_slerp_bad_inputs():
    b = torch.zeros(6, 9, dtype=D)
    for n in (1, 3):
        with pytest.raises(MergeConfigError, match="exactly two task vectors"):
            S.slerp(b, _rand(n), t=0.5)
    for t in (-0.1, 1.2, float("nan")):
        with pytest.raises(MergeConfigError, match=r"t must be a finite number in \[0.0, 1.0\]"):
            S.slerp(b, _rand(2), t=t)
    with pytest.raises(MergeConfigError, match="needs t"):
        S.slerp(b, _rand(2))
    with pytest.raises(MergeConfigError, match="needs the base"):
        S.slerp(None, _rand(2), t=0.5)
    with pytest.raises(MergeConfigError, match="takes no weights"):
        S.slerp(b, _rand(2), t=0.5, weights=[1.0, -1.0])


def test_slerp_refuses_linear_vectors():
    base = tiny_gpt2(seed=0, **GPT2_MINI)
    fp = fingerprint(base)
    lin = [TaskVector({n: 0.1 * torch.randn(p.shape) for n, p in base.named_parameters()}, kind="linear",
                      base_fingerprint=fp) for _ in range(2)]
    with pytest.raises(MergeConfigError, match="'slerp' is defined on the weights"):
        merge(base, lin, "slerp", t=0.5, return_task_vector=True, progress=False)
    out = merge(base, lin, "della_linear", density=0.5, epsilon=0.1, seed=0, return_task_vector=True,
                progress=False)  # the τ-only methods merge tangents into a tangent
    assert out.kind == "linear"


# ------------------------------------------------------------------ DELLA
def _ref_della(taus, weights, ds, es, seed, consensus, normalize, lam=1.0):
    """MAGPRUNE masks drawn with torch.bernoulli from one generator, τ_1, τ_2, ... in order (the stream of
    a seeded merge); everything else numpy."""
    g = torch.Generator().manual_seed(seed)
    pruned = []
    for tau, d, e in zip(taus, ds, es):
        p = ref_keep_probabilities(tau, d, e)
        m = torch.bernoulli(torch.tensor(p, dtype=tau.dtype), generator=g).numpy()
        x = tau.numpy().reshape(p.shape)
        pruned.append(np.where(m > 0, x / np.where(p > 0, p, 1.0), 0.0).reshape(tau.shape))
    return ref_mix(pruned, weights, consensus, normalize, lam)


@pytest.mark.parametrize("shape", [(6, 9), (11,)])
def test_della_equals_its_definition(shape):
    taus = _rand(3, shape=shape, seed=2)
    w, ds, es = [1.0, 0.5, -2.0], [0.5, 0.3, 0.7], [0.2, 0.1, 0.3]
    got = S.della(None, taus, weights=w, density=ds, epsilon=es, seed=7, lambda_=0.8)
    close(got, _ref_della(taus, w, ds, es, 7, True, True, 0.8))
    got = S.della_linear(None, taus, weights=w, density=ds, epsilon=es, seed=7)
    close(got, _ref_della(taus, w, ds, es, 7, False, False))
    got = S.della_linear(None, taus, weights=w, density=0.4, epsilon=0.25, seed=3, normalize=True)
    close(got, _ref_della(taus, w, [0.4] * 3, [0.25] * 3, 3, False, True))
    # same seed, same merge; density 1 → no drop (ε ignored, as mergekit): TIES without trim / task arithmetic
    assert torch.equal(S.della(None, taus, density=0.5, seed=1), S.della(None, taus, density=0.5, seed=1))
    close(S.della(None, taus, weights=w), ref_mix(_np(taus), w, True, True))
    close(S.della_linear(None, taus, weights=w), ref_mix(_np(taus), w, False, False))


def test_della_is_unbiased_with_the_papers_rescaling():
    # E[m_i·τ_i/p_i] = τ_i: the 1/p rescaling preserves τ in expectation (why the paper rescales)
    tau = _rand(1, shape=(4, 6), seed=3)[0]
    mean = sum(S.della_linear(None, [tau], density=0.5, epsilon=0.3, seed=s) for s in range(600)) / 600
    assert float(((mean - tau).abs() / tau.abs()).max()) < 0.35
    # keep probabilities by rank: the largest entry of each row is kept most often, the smallest least
    kept = sum((S.della_linear(None, [tau], density=0.5, epsilon=0.3, seed=s) != 0).double() for s in range(600))
    order = tau.abs().argsort(dim=1)
    assert bool((kept.gather(1, order[:, -1:]) > kept.gather(1, order[:, :1])).all())


def test_della_epsilon_bounds():
    taus = _rand(2)
    for d, e in ((0.3, 0.31), (0.8, 0.21), (0.5, 0.6)):
        with pytest.raises(MergeConfigError, match=r"epsilon=.*outside \[0, 1\].*ε ≤ min\(density, 1 − density\)"):
            S.della(None, taus, density=d, epsilon=e, seed=0)
    with pytest.raises(MergeConfigError, match="epsilon must be a finite number ≥ 0"):
        S.della_linear(None, taus, density=0.5, epsilon=-0.1)
    with pytest.raises(MergeConfigError, match="outside"):  # per vector
        S.della(None, taus, density=[0.5, 0.1], epsilon=0.2, seed=0)
    # the bounds themselves are valid probabilities (mergekit refuses them): p = 0 drops the smallest
    # entry of every row always, p = 1 keeps the largest always, with weight 1/1
    t = taus[0]
    for s in range(20):
        lo = S.della_linear(None, [t], density=0.3, epsilon=0.3, seed=s)
        hi = S.della_linear(None, [t], density=0.8, epsilon=0.2, seed=s)
        rows = torch.arange(6)
        assert bool((lo[rows, t.abs().argmin(1)] == 0).all())
        assert torch.equal(hi[rows, t.abs().argmax(1)], t[rows, t.abs().argmax(1)])
    # one entry per row: p = density (mergekit divides 0 by 0 there)
    col = _rand(1, shape=(5, 1))[0]
    out = S.della_linear(None, [col], density=0.5, epsilon=0.2, seed=1)
    assert bool(((out == 0) | torch.isclose(out, col / 0.5)).all())


def test_della_seeds_draw_different_masks():
    taus = _rand(2, dtype=torch.float32)
    a = S.della(None, taus, density=0.4, epsilon=0.2, seed=11)
    b = S.della(None, taus, density=0.4, epsilon=0.2, seed=12)
    assert not torch.equal(a, b) and a.dtype == torch.float32


# ------------------------------------------------------------------ breadcrumbs
@pytest.mark.parametrize("shape, density, gamma", [((6, 9), 0.3, 0.05), ((200,), 0.1, 0.01), ((10, 10), 0.95, 0.1),
                                                   ((7, 3), 0.5, 0.0)])
def test_breadcrumbs_equals_its_definition(shape, density, gamma):
    taus = _rand(3, shape=shape, seed=6)
    w = [1.0, -0.5, 2.0]
    masked = [ref_breadcrumbs_mask(t, density, gamma) * x for t, x in zip(taus, _np(taus))]
    close(S.breadcrumbs(None, taus, weights=w, density=density, gamma=gamma, lambda_=0.7),
          ref_mix(masked, w, False, False, 0.7))
    close(S.breadcrumbs_ties(None, taus, weights=w, density=density, gamma=gamma),
          ref_mix(masked, w, True, False))
    close(S.breadcrumbs_ties(None, taus, weights=w, density=density, gamma=gamma, normalize=True),
          ref_mix(masked, w, True, True))
    # per-vector density and gamma
    ds, gs = [0.2, 0.5, 0.9], [0.1, 0.0, 0.05]
    masked = [ref_breadcrumbs_mask(t, d, x) * a for t, a, d, x in zip(taus, _np(taus), ds, gs)]
    close(S.breadcrumbs(None, taus, weights=w, density=ds, gamma=gs), ref_mix(masked, w, False, False))


def test_breadcrumbs_on_a_tensor_under_one_over_gamma_entries():
    # 50 entries, γ = 0.01: ⌊γN⌋ = 0 outliers to drop. mergekit's GitHub code keeps sorted[n_bot:-0] = nothing
    # and zeroes the tensor; the paper's mask (and ours) keeps the top ⌊ρN⌋ entries, i.e. magnitude pruning
    tau = _rand(1, shape=(50,), seed=1)[0]
    assert not ref_mergekit_main_breadcrumbs_mask(tau, 0.2, 0.01).any()
    got = S.breadcrumbs(None, [tau], density=0.2, gamma=0.01)
    assert int((got != 0).sum()) == 10
    torch.testing.assert_close(got, M.magnitude_prune(None, [tau], density=0.2))
    # and with γ ≥ 1/N the top outliers go: the largest entry is dropped, the next ten kept
    got = S.breadcrumbs(None, [tau], density=0.2, gamma=0.02)
    assert got[tau.abs().argmax()] == 0 and int((got != 0).sum()) == 10
    np.testing.assert_array_equal(ref_mergekit_main_breadcrumbs_mask(tau, 0.2, 0.02),
                                  ref_breadcrumbs_mask(tau, 0.2, 0.02))
    # a positive density keeps at least one entry; γ + ρ > 1 lowers the outlier cut (mergekit's rule)
    assert int((S.breadcrumbs(None, [tau], density=0.001, gamma=0.0) != 0).sum()) == 1
    np.testing.assert_array_equal((S.breadcrumbs(None, [tau], density=0.9, gamma=0.3) != 0).numpy(),
                                  ref_breadcrumbs_mask(tau, 0.9, 0.3) > 0)
    for g in (-0.1, 1.0):
        with pytest.raises(MergeConfigError, match=r"gamma .* must be in \[0, 1\)"):
            S.breadcrumbs(None, [tau], density=0.5, gamma=g)


# ------------------------------------------------------------------ consensus (TALL masks)
def test_consensus_equals_the_papers_definition():
    taus = _rand(4, shape=(8, 7), seed=8, shared=0.5)
    w, lam = [1.0, 0.7, -0.4, 1.3], [0.5, 1.0, 0.3, 0.8]
    for k in (0, 1, 2, 3, 4, 5):
        close(S.consensus(None, taus, weights=w, threshold=lam, k=k), ref_consensus(taus, w, lam, k))
    close(S.consensus(None, taus, k=2, lambda_=0.6), 0.6 * ref_consensus(taus, [1] * 4, [1.0] * 4, 2))
    # k = 0 is task arithmetic, k > T keeps nothing
    torch.testing.assert_close(S.consensus(None, taus, weights=w, k=0), M.task_arithmetic(None, taus, weights=w))
    assert not S.consensus(None, taus, k=5).any()
    # consensus TIES: the TALL masks of the untrimmed vectors against the TIES merge
    mtl = ref_ties(taus, [1.0] * 4, 0.3)
    close(S.consensus_ties(None, taus, density=0.3, threshold=0.4, k=2),
          ref_consensus(taus, [1] * 4, [0.4] * 4, 2, mtl))


def test_consensus_masks_compare_tau_not_the_base():
    # The paper: m_t = |θ_t − θ0| ≥ λ|θ_MTL − θ_t| = |τ_t| ≥ λ|τ_MTL − τ_t|: no θ0 in it. FusionBench's
    # tall_mask compares |θ0 − τ_t|, which changes with the base.
    taus = _rand(3, seed=10)
    bases = [torch.zeros(6, 9, dtype=D), 3.0 * torch.ones(6, 9, dtype=D)]
    outs = [S.consensus(b, taus, threshold=0.5, k=2) for b in bases]
    assert torch.equal(outs[0], outs[1])
    nu = np.stack(_np(taus))
    mtl = nu.sum(0)
    fb = [((np.abs(b.numpy() - nu) > 0.5 * np.abs(mtl - nu)).sum(0) >= 2) for b in bases]
    assert (fb[0] != fb[1]).any()
    close(outs[1], ref_consensus(taus, [1] * 3, [0.5] * 3, 2))


@pytest.mark.parametrize("call", [
    lambda t: S.della(None, [t], weights=[-1]),
    lambda t: S.della_linear(None, [t], weights=[-1]),
    lambda t: S.breadcrumbs(None, [t], weights=[-1]),
    lambda t: S.breadcrumbs_ties(None, [t], weights=[-1], normalize=True),
    lambda t: S.consensus(None, [t], weights=[-1], k=1),
    lambda t: S.consensus_ties(None, [t], weights=[-1], k=1, density=1.0),
], ids=["della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "consensus", "consensus_ties"])
def test_alpha_minus_one_negates(call):
    t = _rand(1)[0]
    torch.testing.assert_close(call(t), -t)


# ------------------------------------------------------------------ mergekit's own functions, where installed
def test_matches_mergekit_functions_when_installed():
    sp = pytest.importorskip("mergekit.sparsify")
    taus = _rand(3, dtype=torch.float32, seed=12)
    for n, d, g in ((50, 0.2, 0.01), (200, 0.3, 0.05), (54, 0.95, 0.1)):
        t = _rand(1, shape=(n,), dtype=torch.float32, seed=n)[0]
        ref = sp.magnitude_outliers(t, d, None, g)
        if ref.any():  # mergekit's GitHub version zeroes tensors under 1/γ entries (see the test above)
            torch.testing.assert_close(S.breadcrumbs(None, [t], density=d, gamma=g), ref)
    torch.manual_seed(5)  # mergekit draws from the global generator, ours from one seeded the same way
    pruned = torch.stack([sp.della_magprune(t, 0.5, 0.2, sp.RescaleNorm.l1) for t in taus])
    w = [1.0, 0.5, 2.0]
    want = ref_mix(list(pruned.double().numpy()), w, True, True)
    close(S.della(None, taus, weights=w, density=0.5, epsilon=0.2, seed=5, rescale="l1"), want, rtol=1e-5, atol=1e-6)
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    b = torch.randn(6, 9)
    t1, t2 = _rand(2, dtype=torch.float32, seed=13)
    if "dot_threshold" in inspect.signature(mk_slerp).parameters:  # mergekit ≥ 0.1.5: a leading batch axis
        want = mk_slerp(torch.tensor([0.3]), (b + t1)[None], (b + t2)[None])[0] - b
    else:
        want = mk_slerp(0.3, b + t1, b + t2) - b
    torch.testing.assert_close(S.slerp(b, [t1, t2], t=0.3), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ drivers: in memory, streaming, YAML
CASES = [
    ("model_stock", {}, 3), ("model_stock", {"filter_wise": True}, 3), ("slerp", {"t": 0.3}, 2),
    ("della", {"density": 0.5, "epsilon": 0.2, "seed": 3}, 3),
    ("della_linear", {"density": [0.6, 0.4, 0.5], "epsilon": 0.1, "seed": 1, "weights": [1.0, -0.5, 2.0]}, 3),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}, 3),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": [0.05, 0.1, 0.0], "normalize": True}, 3),
    ("consensus", {"threshold": [0.5, 0.3, 0.8], "k": 2}, 3), ("consensus_ties", {"density": 0.4}, 3),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse")
    base = tiny_gpt2(seed=0, **GPT2_MINI)
    base.save_pretrained(tmp / "base")
    g = torch.Generator().manual_seed(1)
    common = {n: torch.randn(p.shape, generator=g) for n, p in base.named_parameters()}
    taus = []
    for k in range(3):
        t = {n: 0.05 * (torch.randn(p.shape, generator=g) + common[n]) for n, p in base.named_parameters()}
        TaskVector(t, base_model="tiny", base_fingerprint=fingerprint(base)).save_pretrained(tmp / f"tv{k}")
        taus.append(t)
    return base, taus, tmp


@pytest.mark.parametrize("method, kw, n", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_in_memory_equals_streaming(folders, method, kw, n):
    base, taus, tmp = folders
    kw = dict(kw)
    weights = kw.pop("weights", None)
    want = merge(base, taus[:n], method, weights=weights, progress=False, **kw).state_dict()
    out = merge_streaming(str(tmp / "base"), [str(tmp / f"tv{k}") for k in range(n)], str(tmp / f"o-{method}"),
                          method, weights=weights, chunk_elements=37, progress=False, **kw)
    got = GPT2LMHeadModel.from_pretrained(out).state_dict()
    sd = base.state_dict()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    changed = [n_ for n_, p in base.named_parameters() if not torch.equal(want[n_], sd[n_])]
    assert changed  # the merge did something


def test_yaml_recipes(folders, tmp_path):
    base, taus, tmp = folders
    vec = [str(tmp / f"tv{k}") for k in range(3)]
    (tmp_path / "della.yaml").write_text(
        f"base_model: {tmp / 'base'}\nmerge_method: della\nmodels:\n"
        f"  - model: {vec[0]}\n    parameters: {{weight: 1.0, density: 0.6, epsilon: 0.1}}\n"
        f"  - model: {vec[1]}\n    parameters: {{weight: 0.5, density: 0.4}}\n"
        f"  - model: {vec[2]}\n    parameters: {{weight: 1.0}}\n"
        "parameters: {density: 0.5, epsilon: 0.2, lambda: 0.9, seed: 4, normalize: true}\n")
    got = GPT2LMHeadModel.from_pretrained(merge_from_config(str(tmp_path / "della.yaml"), str(tmp_path / "o1"),
                                                            progress=False)).state_dict()
    want = merge(base, taus, "della", weights=[1.0, 0.5, 1.0], density=[0.6, 0.4, 0.5], epsilon=[0.1, 0.2, 0.2],
                 lambda_=0.9, seed=4, progress=False).state_dict()
    assert all(torch.equal(got[n], want[n]) for n in want)
    (tmp_path / "slerp.yaml").write_text(f"base_model: {tmp / 'base'}\nmethod: slerp\nvectors: [{vec[0]}, {vec[1]}]\n"
                                         "parameters: {t: 0.25}\n")
    got = GPT2LMHeadModel.from_pretrained(merge_from_config(str(tmp_path / "slerp.yaml"), str(tmp_path / "o2"),
                                                            progress=False)).state_dict()
    want = merge(base, taus[:2], "slerp", t=0.25, progress=False).state_dict()
    assert all(torch.equal(got[n], want[n]) for n in want)
    # a shared-only parameter given per vector, and bad values, are refused by name; nothing written
    (tmp_path / "bad.yaml").write_text(f"base_model: {tmp / 'base'}\nmethod: consensus\n"
                                       f"vectors:\n  - path: {vec[0]}\n    k: 1\n  - {vec[1]}\n")
    with pytest.raises(MergeConfigError, match="takes one value for all vectors"):
        merge_from_config(str(tmp_path / "bad.yaml"), str(tmp_path / "o3"), progress=False)
    (tmp_path / "bad2.yaml").write_text(f"base_model: {tmp / 'base'}\nmethod: slerp\nvectors: [{vec[0]}, {vec[1]}]\n"
                                        "parameters: {t: 1.5}\n")
    with pytest.raises(MergeConfigError, match="t must be"):
        merge_from_config(str(tmp_path / "bad2.yaml"), str(tmp_path / "o3"), progress=False)
    assert not (tmp_path / "o3").exists()
