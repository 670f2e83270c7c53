"""The SVD family (TSV-M, Iso-C, Iso-CTS, WUDI) against references written from the papers' definitions
(numpy, float64, random matrices), their invariants, the (out, in) side of Conv1D weights, in-memory ==
streaming merges, and the bad inputs of issue 22."""
import functools
import json
import os
import warnings

import numpy as np
import pytest
import torch

from hf_taujp import hub
from hf_taujp.errors import MergeConfigError
from hf_taujp.low_rank_tau import LowRankTau
from hf_taujp.merging import merge, merge_streaming
from hf_taujp.merging import methods as M
from hf_taujp.merging import svd_methods as S
from hf_taujp.task_vector import TaskVector
from tests.tiny_models import GPT2_MINI, tiny_gpt2

D = torch.float64
SHAPES = [(12, 7, 3), (7, 12, 3), (9, 9, 4), (10, 9, 2), (9, 30, 8)]  # (m, n, T): tall, wide, square, T ∤ k


def _taus(m, n, T, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=g, dtype=D) * (scale or (1.0 + t)) for t in range(T)]


# ------------------------------------------------------------- references, from the definitions (numpy)
def _polar(x):
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def ref_tsv(xs):
    m, n = xs[0].shape
    p = min(m, n) // len(xs)
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vh = np.linalg.svd(x, full_matrices=False)
        us.append(u[:, :p]), ss.append(s[:p]), vs.append(vh[:p].T)
    return _polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ _polar(np.hstack(vs)).T


def ref_iso_c(xs):
    u, s, vh = np.linalg.svd(sum(xs), full_matrices=False)
    return s.mean() * u @ vh


def ref_iso_cts(xs, f):
    m, n = xs[0].shape
    r, T = min(m, n), len(xs)
    k0 = int(f * r)
    s = round((r - k0) / T)
    k = r - s * T
    u, sig, vh = np.linalg.svd(sum(xs), full_matrices=False)
    uc = u[:, :k]
    us, ss, vs = [], [], []
    for x in xs:
        ur, sr, vrh = np.linalg.svd(x - uc @ uc.T @ x, full_matrices=False)
        us.append(ur[:, :s]), ss.append(sr[:s]), vs.append(vrh[:s].T)
    us.append(uc), ss.append(sig[:k]), vs.append(vh[:k].T)
    return np.concatenate(ss).mean() * _polar(np.hstack(us)) @ _polar(np.hstack(vs)).T


def wudi_loss(d, xs):
    return sum(np.sum(((d - x) @ x.T) ** 2) / np.sum(x ** 2) for x in xs)


def ref_wudi_gd(xs, tol=1e-13, max_iter=400_000):
    """Plain gradient descent on Σ_t ‖(Δ − x_t) x_tᵀ‖² / ‖x_t‖², from Σ_t x_t, step 1/L."""
    d = sum(xs)
    L = 2 * max(np.linalg.eigvalsh(sum(x.T @ x / np.sum(x ** 2) for x in xs)))
    for _ in range(max_iter):
        g = sum(2 * (d - x) @ x.T @ x / np.sum(x ** 2) for x in xs)
        if np.abs(g).max() < tol:
            break
        d = d - g / L
    return d


def _np(xs):
    return [x.numpy() for x in xs]


# ------------------------------------------------------------- against the references
@pytest.mark.parametrize("m, n, T", SHAPES)
def test_tsv_iso_c_against_definitions(m, n, T):
    xs = _taus(m, n, T)
    np.testing.assert_allclose(S.tsv(None, xs).numpy(), ref_tsv(_np(xs)), atol=1e-10)
    np.testing.assert_allclose(S.iso_c(None, xs).numpy(), ref_iso_c(_np(xs)), atol=1e-10)
    # weights pre-scale the vectors (a negative one merges −τ), λ scales the result
    w = [0.5, -2.0] + [1.0] * (T - 2)
    want = 0.7 * ref_tsv([a * x for a, x in zip(w, _np(xs))])
    np.testing.assert_allclose(S.tsv(None, xs, weights=w, lambda_=0.7).numpy(), want, atol=1e-10)


@pytest.mark.parametrize("m, n, T", SHAPES)
@pytest.mark.parametrize("f", [0.8, 0.5, 0.3])
def test_iso_cts_against_definition(m, n, T, f):
    xs = _taus(m, n, T)
    np.testing.assert_allclose(S.iso_cts(None, xs, common_space_fraction=f).numpy(), ref_iso_cts(_np(xs), f),
                               atol=1e-10)


@pytest.mark.parametrize("m, n, T", [(6, 5, 3), (10, 4, 3), (4, 10, 2), (5, 5, 1)])
def test_wudi_closed_form_is_the_minimiser(m, n, T):
    # (4, 10, 2): Σ_t rank x_t = 8 < 10 inputs, the Gram sum is singular: the minimum-norm minimiser
    xs = _taus(m, n, T)
    w = [1.0, -0.5, 2.0][:T]
    xw = [a * x for a, x in zip(w, _np(xs))]
    got = S.wudi(None, xs, weights=w).numpy()
    np.testing.assert_allclose(got, ref_wudi_gd(xw), atol=1e-9)
    d = torch.tensor(got, requires_grad=True)
    loss = sum(((d - x) @ x.T).pow(2).sum() / x.pow(2).sum() for x in map(torch.tensor, xw))
    loss.backward()
    assert d.grad.abs().max() < 1e-11  # a stationary point of the convex objective: the minimum
    # perturbations do not lower the objective
    g = np.random.default_rng(0)
    assert all(wudi_loss(got + 1e-3 * g.standard_normal(got.shape), xw) >= wudi_loss(got, xw) for _ in range(5))


def test_wudi_singular_gram_gives_the_minimum_norm_solution():
    xs = _taus(4, 10, 2)
    got = S.wudi(None, xs).numpy()
    # the least-squares form ‖Δ·Aᵀ − Y‖ with A = [x_t/‖x_t‖], Y = [x_t x_tᵀ/‖x_t‖]: pinv = min-norm solution
    A = np.vstack([x / np.linalg.norm(x) for x in _np(xs)])
    Y = np.hstack([x @ x.T / np.linalg.norm(x) for x in _np(xs)])
    np.testing.assert_allclose(got, (np.linalg.pinv(A) @ Y.T).T, atol=1e-10)
    rows = np.vstack(_np(xs))  # Δ's rows lie in the span of the tasks' rows (no component no input reaches)
    proj = np.linalg.pinv(rows) @ rows
    np.testing.assert_allclose(got @ proj, got, atol=1e-10)


def test_wudi_adam_solver_is_torch_adam_on_the_paper_loss():
    xs = _taus(6, 5, 3)
    p = torch.nn.Parameter(sum(xs).clone())
    opt = torch.optim.Adam([p], lr=1e-3)
    for _ in range(25):
        opt.zero_grad()
        sum(((p - x) @ x.T).pow(2).sum() / x.pow(2).sum() for x in xs).backward()
        opt.step()
    torch.testing.assert_close(S.wudi(None, xs, solver="adam", steps=25, lr=1e-3), p.detach(), atol=1e-12, rtol=0)
    # the authors' 300 steps at 1e-5 stay near task arithmetic; the exact solve reaches a lower objective
    adam = S.wudi(None, xs, solver="adam").numpy()
    assert np.abs(adam - sum(_np(xs))).max() < 300 * 1e-5 * 1.01
    assert wudi_loss(S.wudi(None, xs).numpy(), _np(xs)) < wudi_loss(adam, _np(xs))


# ------------------------------------------------------------- invariants
def test_one_vector_full_rank():
    x = _taus(7, 5, 1)[0]
    torch.testing.assert_close(S.tsv(None, [x]), x)
    torch.testing.assert_close(S.tsv(None, [x], weights=[-1.0]), -x)
    torch.testing.assert_close(S.wudi(None, [x]), x)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(S.iso_c(None, [x]), s.mean() * u @ vh)
    torch.testing.assert_close(S.iso_cts(None, [x]), S.iso_c(None, [x]))


@pytest.mark.parametrize("m, n, T", SHAPES)
def test_spectra(m, n, T):
    xs = _taus(m, n, T)
    # TSV: U⊥ and V⊥ orthonormal, so the result's singular values are exactly the concatenated ones
    p = min(m, n) // T
    kept = torch.cat([torch.linalg.svdvals(x)[:p] for x in xs])
    got = torch.linalg.svdvals(S.tsv(None, xs))[: p * T]
    torch.testing.assert_close(got, kept.sort(descending=True).values)
    # Iso-C: every singular value is the mean of Σ τ's
    mean = torch.linalg.svdvals(sum(xs)).mean()
    torch.testing.assert_close(torch.linalg.svdvals(S.iso_c(None, xs)), mean.expand(min(m, n)))
    # Iso-CTS: a flat spectrum of min(m, n) values (the combined U, V orthonormal); f = 1 is Iso-C
    sv = torch.linalg.svdvals(S.iso_cts(None, xs))
    torch.testing.assert_close(sv, sv[0].expand(min(m, n)))
    torch.testing.assert_close(S.iso_cts(None, xs, common_space_fraction=1.0), S.iso_c(None, xs))


def test_sides_of_a_weight():
    xs = _taus(9, 5, 3)
    xt = [x.T.contiguous() for x in xs]
    for fn in (S.tsv, S.iso_c):  # commute with transposition: no layout needed
        torch.testing.assert_close(fn(None, xt), fn(None, xs).T)
    # a Conv1D weight (in, out) is merged as its (out, in) transpose (f = 0.5: a task-specific share)
    for fn in (functools.partial(S.iso_cts, common_space_fraction=0.5), S.wudi):
        torch.testing.assert_close(fn(None, xt, layout="in_out"), fn(None, xs).T)
        assert not torch.allclose(fn(None, xt), fn(None, xs).T, atol=1e-6)  # the side matters


def test_rank_deficient_inputs_do_not_depend_on_null_bases():
    x = _taus(8, 6, 1)[0]
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    # TSV of the same vector twice: the concatenated U repeats columns; over its numerical rank the polar
    # factor gives the best rank-3 approximation of x (the reference adds arbitrary null-space directions)
    torch.testing.assert_close(S.tsv(None, [x, x]), (u[:, :3] * s[:3]) @ vh[:3])
    # a rank-2 sum: Iso-C flattens its 2 singular values only
    lo = [torch.outer(u[:, 0], vh[0]) * 3.0, torch.outer(u[:, 1], vh[1])]
    torch.testing.assert_close(S.iso_c(None, lo), 2.0 * (torch.outer(u[:, 0], vh[0]) + torch.outer(u[:, 1], vh[1])))
    # a zero vector (a tensor absent from one task) has no direction: no effect on WUDI
    torch.testing.assert_close(S.wudi(None, [x, torch.zeros_like(x)]), x)


def test_rank_below_the_number_of_vectors():
    xs = _taus(2, 6, 3)  # a 2-row head merged from 3 tasks: ⌊2/3⌋ = 0 components per task
    with pytest.warns(UserWarning, match="head.*Δ is 0"):
        out = S.tsv(None, xs, name="head")
    assert torch.equal(out, torch.zeros(2, 6, dtype=D))
    torch.testing.assert_close(S.iso_cts(None, xs), S.iso_c(None, xs))  # no task-specific share: Iso-C
    # r = 5, f = 0.1: round(5/3)·3 = 6 > 5 task directions (the reference's common size would be −1): s = ⌊5/3⌋
    sv = torch.linalg.svdvals(S.iso_cts(None, _taus(5, 5, 3), common_space_fraction=0.1))
    torch.testing.assert_close(sv, sv[0].expand(5))


def test_non_matrix_tensors_are_averaged():
    bs = [torch.randn(4, dtype=D) for _ in range(3)]
    for fn in (S.tsv, S.iso_c, S.iso_cts, S.wudi):
        torch.testing.assert_close(fn(None, bs, weights=[1.0, 2.0, -1.0], lambda_=2.0),
                                   2.0 * (bs[0] + 2 * bs[1] - bs[2]) / 3)
    conv = [torch.randn(2, 3, 2, 2, dtype=D) for _ in range(2)]
    torch.testing.assert_close(S.tsv(None, conv), (conv[0] + conv[1]) / 2)


def test_registry_and_meta_device():
    for name, params in [("tsv", {"weights", "lambda_"}), ("iso_c", {"weights", "lambda_"}),
                         ("iso_cts", {"weights", "lambda_", "common_space_fraction"}),
                         ("wudi", {"weights", "lambda_", "solver", "steps", "lr", "rtol"})]:
        spec = M.get_method_spec(name)
        assert set(spec.parameters) == params and spec.linear_ok and not spec.elementwise
        assert ("layout" in spec.driver_args) == (name in ("iso_cts", "wudi"))
        meta = [torch.empty(5, 4, device="meta") for _ in range(2)]
        out = spec.fn(None, meta, weights=[0.5, -1.0])
        assert out.device.type == "meta" and tuple(out.shape) == (5, 4)


# ------------------------------------------------------------- bad input
def test_bad_parameters():
    xs = _taus(5, 4, 2)
    for kw, match in [({"common_space_fraction": 0.0}, r"\(0, 1\]"), ({"common_space_fraction": 1.5}, r"\(0, 1\]"),
                      ({"common_space_fraction": "0.8"}, "finite number"), ({"lambda_": None}, "finite number"),
                      ({"lambda_": float("nan")}, "finite number"), ({"common_space_fraction": True}, "finite")]:
        with pytest.raises(MergeConfigError, match=match):
            S.iso_cts(None, xs, **kw)
    for kw, match in [({"solver": "sgd"}, "solver"), ({"steps": 2.5}, "steps"), ({"steps": 0}, "steps"),
                      ({"lr": 0.0}, "lr"), ({"rtol": 2.0}, "rtol"), ({"layout": "rows"}, "layout")]:
        with pytest.raises(MergeConfigError, match=match):
            S.wudi(None, xs, **kw)
    for fn in (S.tsv, S.iso_c, S.iso_cts, S.wudi):
        with pytest.raises(MergeConfigError, match="empty"):
            fn(None, [])
        with pytest.raises(MergeConfigError, match="different shapes"):
            fn(None, [xs[0], xs[0].T])
        for bad in (float("nan"), float("inf")):
            y = xs[1].clone()
            y[0, 0] = bad
            with pytest.raises(MergeConfigError, match="task vector 1 has NaN/inf entries in w"):
                fn(None, [xs[0], y], name="w")
    base = {"w": torch.zeros(5, 4)}
    with pytest.raises(MergeConfigError, match="common_space_fraction, lambda_, weights"):  # the registry
        merge(base, [{"w": xs[0].float()}], "iso_cts", density=0.5, weight_layout="out_in", progress=False)


def _gpt2_vectors(T=3, seed=1):
    m = tiny_gpt2(**GPT2_MINI)
    g = torch.Generator().manual_seed(seed)
    return m, [{n: 0.1 * torch.randn(p.shape, generator=g) for n, p in m.named_parameters()} for _ in range(T)]


CONV1D = [f"transformer.h.0.{k}.weight" for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def test_layout_from_the_model_and_for_a_state_dict():
    m, vecs = _gpt2_vectors()
    for method in ("iso_cts", "wudi"):
        got = merge(m, vecs, method, return_task_vector=True, progress=False)
        fn = M.get_merge_method(method)
        for n in CONV1D:  # Conv1D weights are (in, out): merged as their (out, in) transposes
            torch.testing.assert_close(got[n], fn(None, [v[n].T for v in vecs]).T, rtol=1e-5, atol=1e-6)
        n = "transformer.wte.weight"  # an embedding (tied to the LM head) counts as stored
        torch.testing.assert_close(got[n], fn(None, [v[n] for v in vecs]), rtol=1e-5, atol=1e-6)
        # a state dict does not say which weights are Conv1D: an error naming one, unless told
        with pytest.raises(MergeConfigError, match=r"nothing says it for transformer\..*weight_layout"):
            merge(m.state_dict(), vecs, method, return_task_vector=True, progress=False)
        told = {n: ("in_out" if n in CONV1D else "out_in") for n, p in m.named_parameters() if p.dim() == 2}
        again = merge(m.state_dict(), vecs, method, return_task_vector=True, weight_layout=told, progress=False)
        assert all(torch.equal(again[n], got[n]) for n in got)
        stored = merge(m.state_dict(), vecs, method, return_task_vector=True, weight_layout="out_in", progress=False)
        assert not torch.allclose(stored[CONV1D[0]], got[CONV1D[0]])
    for bad in ("rows", {"transformer.wte.weight": "cols"}):
        with pytest.raises(MergeConfigError, match="weight_layout must be"):
            merge(m, vecs, "iso_cts", weight_layout=bad, progress=False)
    with pytest.raises(MergeConfigError, match="'tsv' takes no weight_layout"):
        merge(m, vecs, "tsv", weight_layout="out_in", progress=False)


def test_factored_entries_say_their_layout_and_linear_vectors():
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(6, 5), "b": torch.zeros(5)}
    tvs = [TaskVector({"w": LowRankTau(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)),
                       "b": torch.randn(5, generator=g)}) for _ in range(2)]
    got = merge(base, tvs, "iso_cts", return_task_vector=True, progress=False)  # "direct" factors: (out, in)
    torch.testing.assert_close(got["w"], S.iso_cts(None, [tv["w"] for tv in tvs]))
    flipped = [TaskVector({"w": LowRankTau(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g),
                                           transposed=True)}) for _ in range(2)]
    with pytest.raises(MergeConfigError, match="nothing says it for w"):  # Conv1D or embedding: unknown
        merge(base, flipped, "wudi", return_task_vector=True, progress=False)
    lin = [TaskVector({"w": torch.randn(6, 5, generator=g)}, kind="linear") for _ in range(2)]
    out = merge(base, lin, "tsv", return_task_vector=True, progress=False)  # acts on τ alone: tangents too
    assert out.kind == "linear"
    torch.testing.assert_close(out["w"], S.tsv(None, [tv["w"] for tv in lin]))


# ------------------------------------------------------------- streaming
@pytest.fixture()
def folders(tmp_path):
    m, vecs = _gpt2_vectors()
    m.save_pretrained(tmp_path / "base")
    dirs = []
    for k, v in enumerate(vecs):
        TaskVector(v).save_pretrained(tmp_path / f"tv{k}")
        dirs.append(str(tmp_path / f"tv{k}"))
    return m, vecs, dirs, tmp_path


@pytest.mark.parametrize("method, params", [("tsv", {"lambda_": 0.8}), ("iso_c", {}),
                                            ("iso_cts", {"common_space_fraction": 0.5}), ("wudi", {})])
def test_streaming_equals_in_memory(folders, method, params):
    m, vecs, dirs, tmp_path = folders
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = merge(m, vecs, method, weights=[1.0, -0.5, 2.0], progress=False, **params).state_dict()
        out = merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / method), method, weights=[1.0, -0.5, 2.0],
                              max_shard_size="10KB", progress=False, **params)
    got = type(m).from_pretrained(out).state_dict()
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, rtol=1e-6, atol=1e-7, msg=n)


def test_streaming_failures_write_nothing(folders):
    from safetensors.torch import save_file

    m, vecs, dirs, tmp_path = folders
    bare = tmp_path / "bare"  # weights without a config.json: no architecture to read the layouts from
    bare.mkdir()
    save_file({n: p.detach().contiguous() for n, p in m.state_dict().items() if n != "lm_head.weight"},
              str(bare / "model.safetensors"))
    with pytest.raises(MergeConfigError, match="no config.json"):
        merge_streaming(str(bare), dirs, str(tmp_path / "o1"), "iso_cts", progress=False)
    bad = dict(vecs[1])
    bad["transformer.h.0.mlp.c_proj.weight"] = bad["transformer.h.0.mlp.c_proj.weight"].clone()
    bad["transformer.h.0.mlp.c_proj.weight"][0, 0] = float("nan")
    with hub.atomic_dir(tmp_path / "nan") as tmp:  # written by hand: save_pretrained refuses NaN
        hub.save_safetensors_sharded(bad, tmp, prefix="task_vector")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format": "hf-taujp/task_vector", "format_version": 1, "kind": "nonlinear"}, f)
    with pytest.raises(MergeConfigError, match="NaN/inf entries in transformer.h.0.mlp.c_proj.weight"):
        merge_streaming(str(tmp_path / "base"), [dirs[0], str(tmp_path / "nan")], str(tmp_path / "o2"), "tsv",
                        progress=False)
    with pytest.raises(MergeConfigError, match=r"\(0, 1\]"):
        merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "o3"), "iso_cts", common_space_fraction=0,
                        progress=False)
    assert not any(os.path.exists(tmp_path / o) for o in ("o1", "o2", "o3"))
    # told the layout, the bare folder merges (every 2-D tensor there is then read as stored)
    out = merge_streaming(str(bare), dirs, str(tmp_path / "o4"), "iso_cts", weight_layout="out_in",
                          output_kind="task_vector", progress=False)
    assert os.path.isdir(out)


def test_recipe_yaml(folders):
    from hf_taujp.merging import merge_from_config

    m, vecs, dirs, tmp_path = folders
    rec = {"base_model": str(tmp_path / "base"), "merge_method": "iso_cts",
           "parameters": {"common_space_fraction": 0.5, "lambda": 0.9}, "vectors": dirs}
    out = merge_from_config(rec, str(tmp_path / "rec"), progress=False)
    want = merge(m, vecs, "iso_cts", common_space_fraction=0.5, lambda_=0.9, progress=False).state_dict()
    got = type(m).from_pretrained(out).state_dict()
    torch.testing.assert_close(got[CONV1D[2]], want[CONV1D[2]], rtol=1e-6, atol=1e-7)
