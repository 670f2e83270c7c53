"""Linearized attention (fused primal, blockwise tangent, fused backward) against independent references:
PyTorch's math SDPA kernel under forward AD, and float64 central finite differences."""

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_taujp.attention as attention
import hf_taujp.attention_jvp as attention_jvp
from hf_taujp.attention import MathAttentionWarning, forward_ad_attention, jvp_sdpa_attention_forward
from hf_taujp.attention_jvp import UnsupportedAttentionError, linearized_sdpa
from hf_taujp.hub import HfTaujpError
from hf_taujp.linearize import linearize

B, HQ, HK, L, E = 2, 4, 2, 11, 8


def _mask(kind, dtype=torch.float64):
    """None (causal flag), a padding+causal bool mask without fully masked rows, or an additive float bias."""
    if kind == "causal":
        return None
    if kind == "padded":
        m = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
        m[1, ..., :3] = False  # left padding of the second sequence ...
        m[1, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # ... whose pad rows attend to themselves (no empty row)
        return m
    heads = HQ if kind == "head-bias" else 1  # one additive bias per query head (GQA: regrouped by key head)
    return torch.randn(B, heads, L, L, dtype=dtype, generator=torch.Generator().manual_seed(3))


def _inputs(dtype=torch.float64, hk=HK):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, L, E, dtype=dtype, generator=g) for h in (HQ, hk, hk))
    tq, tk, tv = (torch.randn(x.shape, dtype=dtype, generator=g).requires_grad_() for x in (q, k, v))
    return (q, k, v), (tq, tk, tv)


def _attn(fn, kind, **kw):
    mask = _mask(kind)

    def f(q, k, v):
        return fn(q, k, v, attn_mask=mask, is_causal=kind == "causal", enable_gqa=q.shape[1] != k.shape[1], **kw)

    return f


@pytest.fixture(params=[True, False], ids=["cpu-flash", "generic"])
def kernel(request, monkeypatch):
    """Both code paths of the op: the CPU flash kernel with its saved log-sum-exp, and the device-agnostic one
    (F.sdpa primal, log-sum-exp recomputed per block, backward by recomputation)."""
    monkeypatch.setattr(attention_jvp, "_USE_CPU_FLASH", request.param)
    return request.param


@pytest.mark.parametrize("kind", ["causal", "padded", "bias", "head-bias"])
@pytest.mark.parametrize("hk", [HK, HQ], ids=["gqa", "mha"])
def test_primal_tangent_and_tangent_gradient_match_math_path(kernel, kind, hk):
    primals, tangents = _inputs(hk=hk)
    p, t = torch.func.jvp(_attn(linearized_sdpa, kind, chunk_size=4), primals, tangents)  # 3 blocks, one ragged
    with sdpa_kernel([SDPBackend.MATH]):
        p_ref, t_ref = torch.func.jvp(_attn(F.scaled_dot_product_attention, kind), primals, tangents)
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(t, t_ref)
    w = torch.randn(t.shape, dtype=t.dtype)
    grads = torch.autograd.grad((t * w).sum(), tangents)
    grads_ref = torch.autograd.grad((t_ref * w).sum(), tangents)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("kind", ["causal", "padded", "bias", "head-bias"])
@pytest.mark.parametrize("hk", [HK, HQ], ids=["gqa", "mha"])
@pytest.mark.parametrize("chunk", [4, L], ids=["blocks", "one-block"])
def test_dual_inputs_without_grad_match_math_path_forward_ad(kernel, kind, hk, chunk):
    # Linearized generation: fwAD dual tensors, grad mode off (the op computes primal and tangent directly,
    # no autograd.Function). Reference: the math kernel's own forward-AD rule on the same duals.
    (q, k, v), (tq, tk, tv) = _inputs(hk=hk)
    f = _attn(linearized_sdpa, kind, chunk_size=chunk)
    with torch.no_grad(), fwAD.dual_level():
        duals = [fwAD.make_dual(x, t.detach()) for x, t in zip((q, k, v), (tq, tk, tv))]
        p, t = fwAD.unpack_dual(f(*duals))
        with sdpa_kernel([SDPBackend.MATH]):
            p_ref, t_ref = fwAD.unpack_dual(_attn(F.scaled_dot_product_attention, kind)(*duals))
        # one dual input (a plain query, as when only K/V projections are linearized)
        _, t_kv = fwAD.unpack_dual(f(q, *duals[1:]))
        with sdpa_kernel([SDPBackend.MATH]):
            _, t_kv_ref = fwAD.unpack_dual(_attn(F.scaled_dot_product_attention, kind)(q, *duals[1:]))
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(t_kv, t_kv_ref)


@pytest.mark.parametrize("kind", ["causal", "padded", "bias"])
def test_tangent_and_its_gradient_match_float64_finite_differences(kernel, kind):
    (q, k, v), (tq, tk, tv) = _inputs()
    f = _attn(linearized_sdpa, kind, chunk_size=5)
    _, t = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
    eps = 1e-6
    with torch.no_grad():
        fd = (f(q + eps * tq, k + eps * tk, v + eps * tv) - f(q - eps * tq, k - eps * tk, v - eps * tv)) / (2 * eps)
    torch.testing.assert_close(t, fd, atol=1e-7, rtol=1e-6)
    # gradient of a loss on the tangent w.r.t. tK, by the tangent's linearity: ⟨w, tO(tK + e·δ)⟩ differences
    w = torch.randn(t.shape, dtype=t.dtype)
    (g_tk,) = torch.autograd.grad((t * w).sum(), tk)
    delta = torch.randn(tk.shape, dtype=tk.dtype)
    with torch.no_grad():
        fd_dir = ((f(q, k + eps * delta, v) - f(q, k - eps * delta, v)) / (2 * eps) * w).sum()
    torch.testing.assert_close((g_tk * delta).sum(), fd_dir, atol=1e-7, rtol=1e-6)


def test_second_order_terms_when_primal_inputs_and_bias_need_grad(kernel):
    """Q, K, V depend on a trainable W also through the primal, and a trainable additive bias: the
    gradient of a loss on the tangent needs ∂tO/∂(Q, K, V, M) — blockwise recomputation, vs the math path."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, E, dtype=torch.float64, generator=g)
    w0, tw, bias, tb = (torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_()
                        for s in ((3, E, E), (3, E, E), (B, 1, L, L), (B, 1, L, L)))

    def f(fn, **kw):
        def run(w, b):
            q, k, v = ((x @ w[i]).unsqueeze(1).expand(B, 2, L, E) for i in range(3))
            return fn(q, k, v, attn_mask=b, **kw)
        return run

    p, t = torch.func.jvp(f(linearized_sdpa, chunk_size=4), (w0, bias), (tw, tb))
    with sdpa_kernel([SDPBackend.MATH]):
        p_ref, t_ref = torch.func.jvp(f(F.scaled_dot_product_attention), (w0, bias), (tw, tb))
    torch.testing.assert_close(t, t_ref)
    c = torch.randn(t.shape, dtype=t.dtype)
    loss, loss_ref = ((t + p) * c).sum(), ((t_ref + p_ref) * c).sum()  # the primal's own backward too
    for a, b in zip(torch.autograd.grad(loss, (w0, tw, bias, tb)), torch.autograd.grad(loss_ref, (w0, tw, bias, tb))):
        torch.testing.assert_close(a, b)


def test_fully_masked_rows_give_zero_like_the_fused_kernels(kernel):
    (q, k, v), (tq, tk, tv) = _inputs(hk=HQ)
    m = torch.ones(B, 1, L, L, dtype=torch.bool)
    m[0, :, 2] = False  # query 2 of sequence 0 sees nothing
    p, t = torch.func.jvp(lambda q, k, v: linearized_sdpa(q, k, v, attn_mask=m), (q, k, v), (tq, tk, tv))
    assert p[0, :, 2].abs().max() == 0 and t[0, :, 2].abs().max() == 0
    assert torch.isfinite(torch.autograd.grad(t.sum(), tq)[0]).all()


# Shapes beyond transformers' (B, H, L, E) call: every case F.scaled_dot_product_attention takes. Each entry:
# (query, key, value) shapes and keyword arguments; masks are built by `_shape_case_mask`.
SHAPE_CASES = {
    # DeepSeek-V2/V3 attention: value head size ≠ query/key head size (the CPU flash kernel refuses it)
    "dv<e-causal": ((B, HQ, L, 12), (B, HQ, L, 12), (B, HQ, L, 8), dict(is_causal=True)),
    "dv<e-bias-gqa": ((B, 6, L, 12), (B, 2, L, 12), (B, 2, L, 8), dict(mask="bias", enable_gqa=True)),
    "dv>e-padded": ((B, HQ, L, 8), (B, HQ, L, 8), (B, HQ, L, 12), dict(mask="bool")),
    "dv<e-one-query": ((B, HQ, 1, 12), (B, HQ, L, 12), (B, HQ, L, 8), dict(mask="keys")),
    "gqa-ratio-3": ((B, 6, L, E), (B, 2, L, E), (B, 2, L, E), dict(is_causal=True, enable_gqa=True)),
    "mqa-without-enable_gqa": ((B, HQ, L, E), (B, 1, L, E), (B, 1, L, E), dict(is_causal=True)),
    "one-query-head-broadcast": ((B, 1, L, E), (B, HQ, L, E), (B, HQ, L, E), {}),
    "key-heads-broadcast-only": ((B, HQ, L, E), (B, 1, L, E), (B, HQ, L, E), {}),
    "3-D-no-head-dim": ((B, L, E), (B, L, E), (B, L, E), dict(is_causal=True)),
    "3-D-with-2-D-mask": ((B, L, E), (B, L, E), (B, L, E), dict(mask="2-D")),
    "2-D": ((L, E), (L, E), (L, E), dict(mask="1-D")),
    "5-D-broadcast-gqa": ((2, 1, 4, L, E), (1, 3, 2, L, E), (2, 3, 2, L, 6), dict(mask="5-D", enable_gqa=True)),
    "mixed-ndim": ((B, HQ, L, E), (HQ, L, E), (HQ, L, E), dict(is_causal=True)),
    "query-batch-1": ((1, HQ, L, E), (B, HQ, L, E), (B, HQ, L, E), dict(mask="bool")),
    "key-batch-1": ((B, HQ, L, E), (1, HQ, L, E), (1, HQ, L, E), dict(is_causal=True)),
    "scale": ((B, HQ, L, E), (B, HQ, L, E), (B, HQ, L, E), dict(scale=0.3, mask="bias")),
    "bool-mask-2-D": ((B, HQ, L, E), (B, HQ, L, E), (B, HQ, L, E), dict(mask="bool-2-D")),
    "float32-mask-float64-inputs": ((B, HQ, L, E), (B, HQ, L, E), (B, HQ, L, E), dict(mask="float32")),
    "mask-broadcast-over-keys": ((B, HQ, L, E), (B, HQ, L, E), (B, HQ, L, E), dict(mask="rows")),
    "causal-fewer-queries": ((B, HQ, 4, E), (B, HQ, L, E), (B, HQ, L, E), dict(is_causal=True)),
    "causal-more-queries": ((B, HQ, L, E), (B, HQ, 4, E), (B, HQ, 4, E), dict(is_causal=True)),
    "causal-one-query": ((B, HQ, 1, E), (B, HQ, L, E), (B, HQ, L, E), dict(is_causal=True)),
    "one-query": ((B, HQ, 1, E), (B, 2, L, E), (B, 2, L, E), dict(enable_gqa=True, mask="keys")),
    "one-key": ((B, HQ, L, E), (B, HQ, 1, E), (B, HQ, 1, E), {}),
    "non-contiguous": ((B, L, HQ, E), (B, L, HQ, E), (B, L, HQ, E), dict(is_causal=True, transpose=True)),
    "head-dim-5": ((B, HQ, L, 5), (B, HQ, L, 5), (B, HQ, L, 5), dict(is_causal=True)),
    "head-dim-12-gqa": ((B, HQ, L, 12), (B, HK, L, 12), (B, HK, L, 12), dict(mask="bias", enable_gqa=True)),
    "no-keys": ((B, HQ, L, E), (B, HQ, 0, E), (B, HQ, 0, E), {}),  # the CPU flash kernel dies of SIGFPE here
    "no-queries": ((B, HQ, 0, E), (B, HQ, L, E), (B, HQ, L, E), dict(mask="bias-0")),
}


def _shape_case_mask(kind, q_shape, k_shape, g):
    lq, lk = q_shape[-2], k_shape[-2]
    if kind is None:
        return None
    if kind == "bias":
        return torch.randn(B, q_shape[-3], lq, lk, dtype=torch.float64, generator=g)
    if kind == "bias-0":
        return torch.randn(B, 1, lq, lk, dtype=torch.float64, generator=g)
    if kind == "bool":  # left padding of the second sequence, every row keeps one key
        m = torch.ones(B, 1, lq, lk, dtype=torch.bool)
        m[1, ..., :3] = False
        m[1, ..., 3] = True
        return m
    if kind == "keys":  # (B, 1, 1, Lk): a padding mask over keys only
        m = torch.ones(B, 1, 1, lk, dtype=torch.bool)
        m[0, ..., :2] = False
        return m
    if kind == "2-D":
        return torch.randn(lq, lk, dtype=torch.float64, generator=g)
    if kind == "1-D":
        return torch.randn(lk, dtype=torch.float64, generator=g)
    if kind == "5-D":
        return torch.randn(3, 1, lq, lk, dtype=torch.float64, generator=g)
    if kind == "bool-2-D":
        return torch.ones(lq, lk, dtype=torch.bool).tril()
    if kind == "float32":
        return torch.randn(lq, lk, generator=g)
    if kind == "rows":  # (B, 1, Lq, 1): one bias per query row, broadcast over keys
        return torch.randn(B, 1, lq, 1, dtype=torch.float64, generator=g)
    raise AssertionError(kind)


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_every_sdpa_shape_matches_the_math_kernels_forward_ad_rule(kernel, case):
    """Primal, tangent and the gradient of a loss on the tangent w.r.t. (tQ, tK, tV), against
    F.scaled_dot_product_attention on the math kernel inside torch.func.jvp; and the same primal and tangent
    from forward-AD dual tensors without grad (linearized generation)."""
    q_shape, k_shape, v_shape, kw = SHAPE_CASES[case]
    kw = dict(kw)
    g = torch.Generator().manual_seed(11)
    mask = _shape_case_mask(kw.pop("mask", None), q_shape, k_shape, g)
    transpose = kw.pop("transpose", False)

    def view(x):
        return x.transpose(1, 2) if transpose else x  # (B, L, H, E) memory read as (B, H, L, E): not contiguous

    q, k, v = (view(torch.randn(s, dtype=torch.float64, generator=g)) for s in (q_shape, k_shape, v_shape))
    leaves = tuple(torch.randn(s, dtype=torch.float64, generator=g).requires_grad_()
                   for s in (q_shape, k_shape, v_shape))
    tangents = tuple(view(x) for x in leaves)
    assert q.is_contiguous() is not transpose

    def ours(a, b, c):
        return linearized_sdpa(a, b, c, attn_mask=mask, chunk_size=3, **kw)

    def ref(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, attn_mask=mask, **kw)

    p, t = torch.func.jvp(ours, (q, k, v), tangents)
    with sdpa_kernel([SDPBackend.MATH]):
        p_ref, t_ref = torch.func.jvp(ref, (q, k, v), tangents)
    assert p.shape == p_ref.shape
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(t, t_ref)
    w = torch.randn(t.shape, dtype=t.dtype, generator=g)
    grads = torch.autograd.grad((t * w).sum(), leaves)
    grads_ref = torch.autograd.grad((t_ref * w).sum(), leaves)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad(), fwAD.dual_level():
        duals = [fwAD.make_dual(x, dt.detach()) for x, dt in zip((q, k, v), tangents)]
        p_d, t_d = fwAD.unpack_dual(ours(*duals))
    torch.testing.assert_close(p_d, p_ref)
    torch.testing.assert_close(t_d, t_ref)


@pytest.mark.parametrize("ev", [E, 5], ids=["same-head-size", "value-head-size-5"])
def test_second_order_terms_with_a_different_value_head_size(kernel, ev):
    """Q, K, V are functions of a trainable W also through the primal, with Ev ≠ E (DeepSeek-shaped): the
    blockwise recomputation and the primal's own (padded) fused backward, against the math path."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(B, L, E, dtype=torch.float64, generator=g)
    wqk, twqk = (torch.randn(2, E, E, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))
    wv, twv = (torch.randn(E, ev, dtype=torch.float64, generator=g).requires_grad_() for _ in range(2))

    def f(fn, **kw):
        def run(wqk, wv):
            q, k = ((x @ wqk[i]).unsqueeze(1).expand(B, 2, L, E) for i in range(2))
            return fn(q, k, (x @ wv).unsqueeze(1).expand(B, 2, L, ev), is_causal=True, **kw)
        return run

    p, t = torch.func.jvp(f(linearized_sdpa, chunk_size=4), (wqk, wv), (twqk, twv))
    with sdpa_kernel([SDPBackend.MATH]):
        p_ref, t_ref = torch.func.jvp(f(F.scaled_dot_product_attention), (wqk, wv), (twqk, twv))
    torch.testing.assert_close(t, t_ref)
    c = torch.randn(t.shape, dtype=t.dtype, generator=g)
    loss, loss_ref = ((t + p) * c).sum(), ((t_ref + p_ref) * c).sum()
    inputs = (wqk, twqk, wv, twv)
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(loss_ref, inputs)):
        torch.testing.assert_close(a, b)


def test_uncovered_calls_raise_the_error_that_routes_to_the_math_path():
    (q, k, v), _ = _inputs()
    with pytest.raises(UnsupportedAttentionError, match="dropout"):
        linearized_sdpa(q, k, v, dropout_p=0.1)
    with pytest.raises(UnsupportedAttentionError, match="2 key heads vs 1 value heads"):
        linearized_sdpa(q, k, v[:, :1], enable_gqa=True)
    with pytest.raises(HfTaujpError, match="choose one of"):
        with forward_ad_attention(attention="flash"):
            pass


_BAD_INPUTS = {  # inputs SDPA refuses too: (q, k, v shapes, kwargs, the words of our message)
    "heads-do-not-broadcast": ((B, HQ, L, E), (B, HK, L, E), (B, HK, L, E), {}, "head counts"),
    "gqa-not-a-multiple": ((B, HQ, L, E), (B, 3, L, E), (B, 3, L, E), dict(enable_gqa=True), "not a multiple of 3"),
    "more-key-than-query-heads": ((B, 2, L, E), (B, HQ, L, E), (B, HQ, L, E), dict(enable_gqa=True), "not a multiple"),
    "query-key-head-sizes": ((B, HQ, L, E), (B, HQ, L, 6), (B, HQ, L, E), {}, "query head size 8 vs key head size 6"),
    "key-value-lengths": ((B, HQ, L, E), (B, HQ, L, E), (B, HQ, 5, E), {}, "11 keys vs 5 values"),
    "batch-dims": ((2, HQ, L, E), (3, HQ, L, E), (3, HQ, L, E), {}, "batch dims"),
    "mask-heads": ((B, HQ, L, E), (B, HQ, L, E), (B, HQ, L, E),
                   dict(attn_mask=torch.zeros(B, 3, L, L, dtype=torch.float64)), "does not broadcast"),
    "mask-more-dims": ((B, HQ, L, E), (B, HQ, L, E), (B, HQ, L, E),
                       dict(attn_mask=torch.zeros(3, 1, 1, L, L, dtype=torch.float64)), "attn_mask has 5 dims"),
    "integer-mask": ((B, HQ, L, E), (B, HQ, L, E), (B, HQ, L, E), dict(attn_mask=torch.ones(L, L, dtype=torch.long)),
                     "bool .True = attend. or float"),
    "mask-and-causal": ((B, HQ, L, E), (B, HQ, L, E), (B, HQ, L, E),
                        dict(attn_mask=torch.ones(L, L, dtype=torch.bool), is_causal=True), "is_causal and attn_mask"),
}


@pytest.mark.parametrize("case", sorted(_BAD_INPUTS))
def test_inputs_sdpa_refuses_are_named_errors_not_a_math_path_fallback(case):
    """The math kernel refuses each of these too (the reference), so routing them to it would only fail later
    with a kernel message: a one-line HfTaujpError naming the mismatch, not UnsupportedAttentionError."""
    q_shape, k_shape, v_shape, kw, words = _BAD_INPUTS[case]
    q, k, v = (torch.randn(s, dtype=torch.float64) for s in (q_shape, k_shape, v_shape))
    with sdpa_kernel([SDPBackend.MATH]), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, **kw)
    with pytest.raises(HfTaujpError, match=words) as info:
        linearized_sdpa(q, k, v, **kw)
    assert not isinstance(info.value, UnsupportedAttentionError) and "\n" not in str(info.value)


def tiny_llama(attn="sdpa"):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).double()


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "right-padded"])
def test_llama_attention_tau_through_the_whole_model_matches_math_path(padded):
    """τ on q/k/v/o of a GQA Llama: logits (primal + tangent) and ∂loss/∂τ equal the math path's."""
    model = tiny_llama()
    names = [n for n, _ in model.named_parameters() if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                                   "o_proj.weight"))]
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 64, (2, 13), generator=g)
    am = torch.ones_like(x)
    if padded:  # right padding: with left padding the pad rows see no key and the math path's τ-gradient is NaN
        am[1, -4:] = 0
    tau0 = {n: 0.05 * torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in model.named_parameters() if n in names}
    results = {}
    for path in ("fused", "math"):
        lin = linearize(model, tangents=tau0)  # τ on q/k/v/o only (the tangents' keys)
        calls = []
        spy = _Spy(calls)
        with forward_ad_attention(attention=path), spy:
            out = lin(input_ids=x, attention_mask=am, labels=x)
        assert bool(calls) == (path == "fused")  # the fused path really ran (and the math one did not)
        trainable = [p for p in lin.parameters() if p.requires_grad]
        results[path] = (out.logits.detach(), out.loss.detach(), torch.autograd.grad(out.loss, trainable))
    (lf, ll, gf), (lm, lm_loss, gm) = results["fused"], results["math"]
    valid = am.bool()[..., None]
    torch.testing.assert_close(lf * valid, lm * valid)
    torch.testing.assert_close(ll, lm_loss)
    for a, b in zip(gf, gm):
        torch.testing.assert_close(a, b)
    assert model.config._attn_implementation == "sdpa"
    assert AttentionInterface._global_mapping["sdpa"] is not jvp_sdpa_attention_forward  # restored


def test_llama_left_padding_gives_finite_tau_gradients():
    """Left padding makes query rows that see no key; their output is 0 (as the fused kernels give) and
    the τ-gradient stays finite (PyTorch's math kernel under forward AD returns NaN there)."""
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    am = torch.ones_like(x)
    am[1, :3] = 0
    lin = linearize(model, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    loss = lin(input_ids=x, attention_mask=am, labels=x.masked_fill(am == 0, -100)).loss
    grads = torch.autograd.grad(loss, [p for p in lin.parameters() if p.requires_grad])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.fixture
def said(monkeypatch):
    """A fresh record of the math-path reasons already said (they are said once per process), and every
    MathAttentionWarning raised in the test, whatever the warning filters (``always``: the once is ours)."""
    monkeypatch.setattr(attention, "_SAID", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [str(w.message) for w in caught if issubclass(w.category, MathAttentionWarning)]


def test_gpt2_train_mode_dropout_falls_back_to_math_path_and_says_so_once(said):
    """Attention dropout > 0 in train mode is not covered by the fused tangent: that call runs the math path
    (one dropout mask for primal and tangent), the linearized forward still works, and the fallback is said
    once (two layers, two forwards: one warning) with its reason and memory cost."""
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, attn_pdrop=0.1)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()
    calls = []
    lin = linearize(model, mode="train")  # dropout inside the jvp (the default linearizes the eval-mode model)
    with _Spy(calls):
        for _ in range(2):
            out = lin(input_ids=torch.randint(0, 50, (2, 9)), labels=torch.randint(0, 50, (2, 9)))
    assert calls == [] and torch.isfinite(out.loss)
    (message,) = said()
    assert "attention dropout > 0" in message and "math path: O(L²) memory" in message
    with _Spy(calls):  # default: eval-mode linearization point, no dropout, so the fused op serves
        out = linearize(model)(input_ids=torch.randint(0, 50, (2, 9)), labels=torch.randint(0, 50, (2, 9)))
    assert calls and torch.isfinite(out.loss)
    assert len(said()) == 1  # nothing new said on the fused path


def test_fused_path_and_chosen_math_path_say_nothing(said):
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 7))
    lin = linearize(model, target_modules=["q_proj", "v_proj"])
    lin(input_ids=x, labels=x).loss.backward()
    with forward_ad_attention(attention="math"):  # the user's choice: not a fallback
        lin(input_ids=x, labels=x)
    assert said() == []


def test_an_uncovered_call_runs_the_math_path_and_says_its_reason_once(said, monkeypatch):
    """UnsupportedAttentionError from the op (here forced, for a case the op does not cover) sends that call to
    transformers' SDPA on the math kernel: same values and τ-gradients as attention="math", said once."""
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(8))
    tau0 = {n: 0.05 * torch.randn(p.shape, dtype=p.dtype) for n, p in model.named_parameters() if "proj" in n}
    with forward_ad_attention(attention="math"):
        lin = linearize(model, tangents=tau0)
        ref = lin(input_ids=x, labels=x)
        ref_grads = torch.autograd.grad(ref.loss, [p for p in lin.parameters() if p.requires_grad])

    def uncovered(*a, **k):
        raise UnsupportedAttentionError("linearized_sdpa: a case the test says is not covered")

    monkeypatch.setattr(attention_jvp, "linearized_sdpa", uncovered)
    lin = linearize(model, tangents=tau0)
    for _ in range(2):
        out = lin(input_ids=x, labels=x)
    grads = torch.autograd.grad(out.loss, [p for p in lin.parameters() if p.requires_grad])
    torch.testing.assert_close(out.logits, ref.logits)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    (message,) = said()  # 2 layers × 2 forwards, one warning
    assert "a case the test says is not covered" in message and "O(L²)" in message


def test_a_flash_model_without_sdpa_support_runs_eager_and_says_so_once(said):
    """A model class without SDPA support loaded with flash_attention_2 (no forward-AD rule) runs eager inside the
    jvp: the math path, said once with the class and the implementation it replaced."""
    cls = type("GPT2NoSdpa", (GPT2LMHeadModel,), {"_supports_sdpa": False})
    model = cls._from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16),
                             attn_implementation="eager").eval()
    model.config._attn_implementation_internal = "flash_attention_2"  # as if loaded with it on a GPU
    lin = linearize(model)
    for _ in range(2):
        lin(input_ids=torch.randint(0, 50, (1, 5)))
    (message,) = said()
    assert "GPT2NoSdpa does not support SDPA" in message and "'flash_attention_2'" in message and "O(L²)" in message


def test_deepseek_attention_with_a_smaller_value_head_runs_the_fused_path():
    """DeepSeek-V3 attention (q/k head 12 = 8 + 4 rope, v head 8; dense layers: its MoE's grouped matmul has no
    forward-AD rule): logits and τ-gradients of the fused path equal the math path's, and the fused op ran."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                           num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=2,
                           max_position_embeddings=64, attention_dropout=0.0)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM._from_config(cfg, attn_implementation="sdpa").double()
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 64, (2, 10), generator=g)
    am = torch.ones_like(x)
    am[1, -3:] = 0  # right padding (left padding: the math kernel's rule gives NaN τ-gradients, see below)
    labels = x.masked_fill(am == 0, -100)
    tau0 = {n: 0.05 * torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in model.named_parameters()
            if n.endswith(("q_proj.weight", "kv_b_proj.weight", "o_proj.weight"))}
    results = {}
    for path in ("fused", "math"):
        lin = linearize(model, tangents=tau0)
        calls = []
        with forward_ad_attention(attention=path), _Spy(calls):
            out = lin(input_ids=x, attention_mask=am, labels=labels)
        assert bool(calls) == (path == "fused")
        results[path] = (out.logits, torch.autograd.grad(out.loss, [p for p in lin.parameters() if p.requires_grad]))
    valid = am.bool()[..., None]
    torch.testing.assert_close(results["fused"][0] * valid, results["math"][0] * valid)
    for a, b in zip(results["fused"][1], results["math"][1]):
        torch.testing.assert_close(a, b)


class _Spy:
    """Record calls of linearized_sdpa (the op behind the routed "sdpa" attention function)."""

    def __init__(self, calls):
        self.calls, self.mp = calls, pytest.MonkeyPatch()

    def __enter__(self):
        real = attention_jvp.linearized_sdpa

        def spy(*a, **k):
            self.calls.append(1)
            return real(*a, **k)

        self.mp.setattr(attention_jvp, "linearized_sdpa", spy)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


def test_t5_learned_position_bias_through_the_mask_matches_math_path():
    """T5 adds a *trainable* relative-position bias to the scores (passed as position_bias, merged into a float
    mask): its tangent and the gradient for it go through the mask input of the op."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").double()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(1, 40, (2, 7), generator=g), torch.randint(1, 40, (2, 5), generator=g)
    am = torch.ones_like(x)
    am[1, -2:] = 0
    tau0 = {n: 0.05 * torch.randn(p.shape, dtype=p.dtype, generator=g) for n, p in model.named_parameters()}
    results = {}
    for path in ("fused", "math"):
        lin = linearize(model, tangents=tau0)
        calls = []
        with forward_ad_attention(attention=path), _Spy(calls):
            out = lin(input_ids=x, attention_mask=am, labels=y)
        assert bool(calls) == (path == "fused")
        results[path] = (out.logits.detach(), torch.autograd.grad(out.loss, [p for p in lin.parameters() if p.requires_grad]))
    torch.testing.assert_close(results["fused"][0], results["math"][0])
    for a, b in zip(results["fused"][1], results["math"][1]):
        torch.testing.assert_close(a, b)


def test_runs_under_vmap_of_jvp():
    """torch.func.vmap over a jvp (per-example tangents) gives the per-example math-path tangents."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(3, 1, HQ, 6, E, dtype=torch.float64, generator=g)
    kv = torch.randn(3, 1, HK, 6, E, dtype=torch.float64, generator=g)

    def tangent(fn, kw):
        return lambda q, kv: torch.func.jvp(lambda a, b: fn(a, b, b, is_causal=True, enable_gqa=True, **kw),
                                            (q, kv), (torch.ones_like(q), kv))[1]

    got = torch.func.vmap(tangent(linearized_sdpa, {"chunk_size": 4}))(q, kv)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = torch.stack([tangent(F.scaled_dot_product_attention, {})(a, b) for a, b in zip(q, kv)])
    torch.testing.assert_close(got, ref)


def test_math_block_nested_in_a_fused_one_runs_math_and_everything_is_restored():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny_llama()
    x = torch.randint(0, 64, (1, 6))
    lin = linearize(model, target_modules=["q_proj"])
    calls = []
    with forward_ad_attention(attention="fused"), _Spy(calls):
        with forward_ad_attention(attention="math"):
            lin(input_ids=x)  # its own forward_ad_attention() inherits "math"
        assert calls == []
        lin(input_ids=x)
        assert calls
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward


def test_a_user_registered_sdpa_is_kept_and_the_math_path_is_said(said):
    """An "sdpa" the user registered may compute something else: it is not replaced (math kernel instead), and
    that is said once."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def custom(*a, **k):
        seen.append(1)
        return sdpa_attention_forward(*a, **k)

    AttentionInterface.register("sdpa", custom)
    try:
        lin = linearize(tiny_llama(), target_modules=["q_proj"])
        out = lin(input_ids=torch.randint(0, 64, (1, 5)))
        lin(input_ids=torch.randint(0, 64, (1, 5)))
        assert seen and torch.isfinite(out.logits).all()
        assert AttentionInterface._global_mapping["sdpa"] is custom
        (message,) = said()
        assert "custom" in message and "is not transformers' own" in message and "O(L²)" in message
    finally:
        AttentionInterface.register("sdpa", sdpa_attention_forward)


def test_bfloat16_tangent_is_as_accurate_as_the_math_path():
    """Low-precision inputs: blocks run in float32, so the bf16 tangent's error against float64 is no larger
    than that of the math kernel's bf16 tangent (up to one bf16 rounding)."""
    primals, tangents = _inputs()
    f = _attn(linearized_sdpa, "causal")
    _, ref = torch.func.jvp(f, primals, tangents)
    low = lambda xs: tuple(x.detach().to(torch.bfloat16) for x in xs)  # noqa: E731
    _, ours = torch.func.jvp(f, low(primals), low(tangents))
    with sdpa_kernel([SDPBackend.MATH]):
        _, math_ = torch.func.jvp(_attn(F.scaled_dot_product_attention, "causal"), low(primals), low(tangents))
    err, err_math = ((t.double() - ref).abs().max().item() for t in (ours, math_))
    assert ours.dtype == torch.bfloat16 and err <= err_math + 2**-7 * ref.abs().max().item()


def test_dual_tensors_of_torch_autograd_forward_ad():
    import torch.autograd.forward_ad as fwAD

    (q, k, v), (tq, tk, tv) = _inputs()

    def tangent(fn):
        with fwAD.dual_level():
            out = fn(*(fwAD.make_dual(a, b) for a, b in ((q, tq), (k, tk), (v, tv))), is_causal=True, enable_gqa=True)
            return fwAD.unpack_dual(out).tangent

    t = tangent(linearized_sdpa)
    with sdpa_kernel([SDPBackend.MATH]):
        t_ref = tangent(F.scaled_dot_product_attention)
    torch.testing.assert_close(t, t_ref)
    torch.testing.assert_close(torch.autograd.grad(t.sum(), tk)[0], torch.autograd.grad(t_ref.sum(), tk)[0])


def test_causal_with_fewer_queries_than_keys_is_upper_left_aligned_like_sdpa(kernel):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, HQ, 5, E, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, HK, 9, E, dtype=torch.float64, generator=g) for _ in range(2))
    tangents = tuple(torch.randn(x.shape, dtype=torch.float64, generator=g) for x in (q, k, v))
    _, t = torch.func.jvp(lambda *x: linearized_sdpa(*x, is_causal=True, enable_gqa=True, chunk_size=2), (q, k, v), tangents)
    with sdpa_kernel([SDPBackend.MATH]):
        _, t_ref = torch.func.jvp(lambda *x: F.scaled_dot_product_attention(*x, is_causal=True, enable_gqa=True),
                                  (q, k, v), tangents)
    torch.testing.assert_close(t, t_ref)
