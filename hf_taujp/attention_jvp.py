"""Linearized scaled-dot-product attention: fused primal, blockwise closed-form tangent, O(L) memory.

PyTorch has no forward-mode AD rule for its fused SDPA kernels (pytorch#98164, #117629, #128971,
#165530), so a jvp through attention normally runs the math kernel and keeps (B, H, L, L) score
matrices for the primal, the tangent and their backward. :func:`linearized_sdpa` is a drop-in for
``torch.nn.functional.scaled_dot_product_attention`` (no dropout) that works inside
``torch.func.jvp`` / ``torch.autograd.forward_ad`` and under backward through the tangent:

* **primal** O = softmax(S)·V, S = s·Q·Kᵀ + M, by the fused kernel (the CPU flash kernel
  ``_scaled_dot_product_flash_attention_for_cpu``, which also returns the row log-sum-exp and wants one head
  size for Q, K and V: with Ev ≠ E the smaller side is zero-padded, which changes neither S nor the first Ev
  columns of P·V; elsewhere ``F.scaled_dot_product_attention`` with every backend allowed);
* **tangent** (sCM paper, Lu & Song, arXiv 2410.11081, App. F), with P = softmax(S):

      tS = s·(tQ·Kᵀ + Q·tKᵀ) + tM,      tO = P·tV + (P∘tS)·V − rowsum(P∘tS) ⊙ O,

  computed over blocks of ``chunk_size`` query rows (exact: every block holds complete softmax
  rows, P = exp(S − lse)); memory O(B·H·chunk·L) instead of O(B·H·L²);
* **backward through the tangent**: tO is linear in (tQ, tK, tV) with the attention Jacobian at
  (Q, K, V) as its matrix, so ∂⟨g, tO⟩/∂(tQ, tK, tV) is the ordinary attention backward at (Q, K, V)
  with dO := g — the fused SDPA backward (CPU flash backward with the saved log-sum-exp). This is
  the linearized fine-tuning case: the primal has no trainable input, τ reaches attention only
  through tangents. When the primal inputs (Q, K, V, a float mask) or the mask tangent require
  grad too, the second-order terms are needed: then each query block is recomputed with autograd
  and differentiated on its own (exact for every input, still O(chunk·L) memory, slower: one more
  block forward and an autograd backward per block; not measured). The primal's own backward
  (a loss on O) is the fused SDPA backward, or the same blockwise recomputation for a trainable mask.

Shapes (those of ``F.scaled_dot_product_attention``): query (N..., Hq, Lq, E), key (N..., Hk, Lk, E), value
(N..., Hk, Lk, Ev); the leading dims N... broadcast between the three (none: 2-D inputs; 3-D inputs: dim 0 plays the
heads, as in SDPA) and are flattened into one batch dim (a copy only where a dim really broadcasts); Ev may differ
from E (DeepSeek-V2/V3 attention: E = 192, Ev = 128). Heads: Hq = Hk; or Hq a multiple of Hk with
``enable_gqa=True`` (query head h uses key/value head h // (Hq/Hk), as transformers' ``repeat_kv``; nothing is repeated
in memory); without ``enable_gqa`` the heads broadcast as SDPA's batched matmul does (Hk = 1: one key/value head
for all, run as GQA). ``attn_mask`` bool (True = attend) or float (added to S, cast to the query dtype), broadcastable
to (N..., Hq, Lq, Lk); ``is_causal`` is upper-left aligned as in PyTorch (with Lq > Lk the rows i ≥ Lk see every key:
run as a causal (Lk × Lk) call and a full one). Output (N..., Hq, Lq, Ev).

Not covered (raise :class:`UnsupportedAttentionError`; the caller falls back to the math path):
dropout_p > 0 (one jvp must sample one dropout mask for primal and tangent), nested tensors, ``enable_gqa`` with
different key and value head counts. Inputs SDPA itself refuses (query/key head sizes or key/value lengths that
differ, head counts or batch dims that do not broadcast, attn_mask together with is_causal, an integer mask, mixed
dtypes) raise :class:`~hf_taujp.errors.HfTaujpError` naming the mismatch.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention_blocks import _blockwise_grads, _tangent, default_chunk_size
from .attention_shapes import _as_batched, _check_inputs
from .errors import HfTaujpError, UnsupportedAttentionError  # noqa: F401  (HfTaujpError: still importable from here)

__all__ = ["linearized_sdpa", "UnsupportedAttentionError", "default_chunk_size"]

_ALL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.MATH]
# Tests set this to False to exercise the device-agnostic path (F.sdpa + recompute backward) on CPU.
_USE_CPU_FLASH = True


def _cpu_flash(q: torch.Tensor) -> bool:
    return _USE_CPU_FLASH and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                                         torch.float16)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive form of a mask: bool True→0, False→−inf (the CPU flash kernel takes float masks only)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _same_head_size(q, k, v):
    """(q, k, v) zero-padded on the last dim to one head size max(E, Ev), for the CPU flash kernels, which refuse
    Ev ≠ E ("Q/K/V should have the same head size"; F.sdpa sends that shape to the math kernel).

    Exact, forward and backward: zero columns of Q and K add 0 to every score of S = s·Q·Kᵀ (the scale s is
    passed explicitly, from the unpadded E); zero columns of V give zero columns of O = P·V and of dV = Pᵀ·dO,
    and with dO zero-padded too, dP = dO·Vᵀ and rowsum(dO∘O) are unchanged. Costs one padded copy of the smaller
    side (O(L)). Inputs of equal head sizes are returned as they are."""
    e, ev = q.shape[-1], v.shape[-1]
    if e == ev:
        return q, k, v
    if ev < e:
        return q, k, torch.nn.functional.pad(v, (0, e - ev))
    return torch.nn.functional.pad(q, (0, ev - e)), torch.nn.functional.pad(k, (0, ev - e)), v


def _fused_forward(q, k, v, mask, is_causal, scale):
    """(O, lse or None) by a fused kernel; plain tensors (no duals) only."""
    if _cpu_flash(q):
        qp, kp, vp = _same_head_size(q, k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp, kp, vp, 0.0, is_causal, attn_mask=_float_mask(mask, q.dtype), scale=scale)
        if vp is not v:  # drop V's zero columns
            out = out[..., :v.shape[-1]].contiguous()
        return out, lse
    with sdpa_kernel(_ALL_BACKENDS):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                                scale=scale, enable_gqa=q.shape[1] != k.shape[1]), None


def _fused_backward(g, q, k, v, mask, out, lse, is_causal, scale):
    """The attention vjp at (q, k, v): (dQ, dK, dV) for dO = g (fused backward kernel)."""
    if lse is not None and _cpu_flash(q):
        qp, kp, vp = _same_head_size(q, k, v)
        if vp is not v:  # the forward's padded output and a zero-padded dO (see _same_head_size)
            pad = (0, vp.shape[-1] - v.shape[-1])
            g, out = torch.nn.functional.pad(g, pad), torch.nn.functional.pad(out, pad)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g.contiguous(), qp, kp, vp, out, lse, 0.0, is_causal, attn_mask=_float_mask(mask, q.dtype), scale=scale)
        if qp is not q or vp is not v:
            dq, dk, dv = dq[..., :q.shape[-1]], dk[..., :k.shape[-1]], dv[..., :v.shape[-1]]
        return dq, dk, dv
    with torch.enable_grad(), sdpa_kernel(_ALL_BACKENDS):
        qkv = [t.detach().requires_grad_() for t in (q, k, v)]
        o = torch.nn.functional.scaled_dot_product_attention(*qkv, attn_mask=mask, is_causal=is_causal, scale=scale,
                                                             enable_gqa=q.shape[1] != k.shape[1])
        return torch.autograd.grad(o, qkv, g)


class _AttentionTangent(torch.autograd.Function):
    """tO = J_attn(Q, K, V, M)·(tQ, tK, tV, tM); backward = the attention vjp at (Q, K, V) when only the
    tangents need grad, else a per-block recomputation with autograd (second-order terms included)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, out, lse, tq, tk, tv, tm, is_causal, scale, chunk):
        return _tangent(q, k, v, mask, out, lse, tq, tk, tv, tm, is_causal, scale, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, out, lse, tq, tk, tv, tm, is_causal, scale, chunk = inputs
        if not any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 9)):
            tq = tk = tv = tm = None  # the fused backward does not read them: do not keep them alive
        ctx.save_for_backward(q, k, v, mask, out, lse, tq, tk, tv, tm)
        ctx.is_causal, ctx.scale, ctx.chunk = is_causal, scale, chunk

    @staticmethod
    def backward(ctx, g):
        q, k, v, mask, out, lse, tq, tk, tv, tm = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = [None] * 13
        if not any(need[i] for i in (0, 1, 2, 3, 9)):
            # linear in the tangents: the attention vjp at the primal point (fused backward)
            dq, dk, dv = _fused_backward(g, q, k, v, mask, out, lse, ctx.is_causal, ctx.scale)
            grads[6], grads[7], grads[8] = (dq if need[6] else None), (dk if need[7] else None), (dv if need[8] else None)
            return tuple(grads)
        return _blockwise_grads(g, need, q, k, v, mask, tq, tk, tv, tm, ctx.is_causal, ctx.scale, ctx.chunk)


class _LinearizedSDPA(torch.autograd.Function):
    """O = attention(Q, K, V, M) by a fused kernel, with a forward-AD (jvp) rule and an ordinary backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, is_causal, scale, chunk):
        out, lse = _fused_forward(q, k, v, mask, is_causal, scale)
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, is_causal, scale, chunk = inputs
        out, lse = output
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        ctx.save_for_forward(q, k, v, mask, out, lse)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.is_causal, ctx.scale, ctx.chunk = is_causal, scale, chunk

    @staticmethod
    def jvp(ctx, tq, tk, tv, tm, *_):
        q, k, v, mask, out, lse = ctx.saved_tensors
        if tm is not None and mask is not None and mask.dtype == torch.bool:
            tm = None
        to = _AttentionTangent.apply(q, k, v, mask, out, lse, tq, tk, tv, tm, ctx.is_causal, ctx.scale, ctx.chunk)
        return to, None

    @staticmethod
    def backward(ctx, g, _g_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        need = ctx.needs_input_grad
        if need[3]:  # a trainable additive bias (e.g. relative positions): dM = dS, block by block
            grads = _blockwise_grads(g, tuple(need[:4]) + (False,) * 9, q, k, v, mask, None, None, None, None,
                                     ctx.is_causal, ctx.scale, ctx.chunk, primal=True)
            return grads[:4] + (None, None, None)
        dq, dk, dv = _fused_backward(g, q, k, v, mask, out, lse, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def linearized_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with a forward-AD rule: fused primal, blockwise tangent.

    Args:
        query, key, value, attn_mask, is_causal, scale, enable_gqa: as in
            ``torch.nn.functional.scaled_dot_product_attention`` (shapes in the module docstring).
        dropout_p: must be 0.
        chunk_size: query rows per tangent block (default :func:`default_chunk_size`).

    Returns:
        (N..., Hq, Lq, Ev), equal to SDPA's output up to rounding; inside ``torch.func.jvp`` its tangent is
        the closed form above, and gradients flow through the tangent to (tQ, tK, tV).

    Raises:
        UnsupportedAttentionError: dropout_p > 0, nested tensors, ``enable_gqa`` with different key and value
            head counts (the caller may run the math kernel instead).
        HfTaujpError: inputs SDPA refuses too (listed in the module docstring), named in the message.
    """
    if dropout_p:
        raise UnsupportedAttentionError(f"linearized_sdpa has no dropout (dropout_p={dropout_p}); use the math path")
    if query.is_nested or key.is_nested or value.is_nested:
        raise UnsupportedAttentionError("linearized_sdpa: nested tensors are not supported")
    _check_inputs(query, key, value, attn_mask, is_causal)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    q, k, v, mask, shape = _as_batched(query, key, value, attn_mask, enable_gqa)
    out = _attention(q, k, v, mask, bool(is_causal), scale, chunk_size)
    return out if shape is None else out.reshape(shape)


def _attention(q, k, v, mask, is_causal, scale, chunk_size):
    """The op on core shapes (see `_as_batched`)."""
    lq, lk = q.shape[-2], k.shape[-2]
    if is_causal and lq > lk:
        # Upper-left alignment: query rows 0..Lk−1 see keys 0..i (a square causal call), rows Lk.. see every key.
        # Two exact calls; a (Lq, Lk) bool mask instead would cost O(L²) memory.
        return torch.cat([_attention(q[..., :lk, :], k, v, None, True, scale, chunk_size),
                          _attention(q[..., lk:, :], k, v, None, False, scale, chunk_size)], dim=-2)
    if q.shape[0] * q.shape[1] * lq * lk == 0:
        # No score at all (the CPU flash kernels die of SIGFPE on Lq = 0, Lk = 0 or no heads): O = S·V with an empty
        # S is SDPA's zero output, as differentiable ops connected to q, k, v (zero tangent, zero gradients).
        g = q.shape[1] // k.shape[1] if k.shape[1] else 1
        k, v = (x.repeat_interleave(g, dim=1) if g > 1 else x for x in (k, v))
        return torch.matmul(torch.matmul(q, k.transpose(-2, -1)) * scale, v)
    chunk = int(chunk_size or default_chunk_size(q.shape[0] * q.shape[1], lq, lk, q.shape[-1]))
    if not torch.is_grad_enabled():
        out = _dual_no_grad(q, k, v, mask, is_causal, scale, chunk)
        if out is not None:
            return out
    out, _ = _LinearizedSDPA.apply(q, k, v, mask, is_causal, scale, chunk)
    return out


def _dual_no_grad(q, k, v, mask, is_causal, scale, chunk):
    """The same primal and tangent for ``torch.autograd.forward_ad`` dual inputs when no graph is recorded
    (grad mode off: linearized generation), computed directly; None for other inputs.

    Without a backward to provide, the two ``autograd.Function`` layers (``apply``'s argument binding, context
    saving, the forward-AD bookkeeping of their inputs) are pure overhead: ≈ 0.2 ms per call, against the
    ≈ 10 µs of a one-token decoding step's attention (benchmarks/bench_generation.py). functorch-wrapped
    inputs (``torch.func.jvp``) keep the Function path: their tangents live at the transform's own level.
    The ops below act on plain tensors (the duals' parts) with torch-function handling off: an enclosing
    torch-function mode (generation's ``FastForwardAD``) would otherwise inspect each of them (≈ 1–3 µs an op).
    Duals are taken apart and built with the ATen ops at the current level (``fwAD.unpack_dual`` /
    ``make_dual`` add ≈ 2 µs of Python bookkeeping a call).
    """
    level = fwAD._current_level
    if level < 0:
        return None
    with torch._C.DisableTorchFunction():
        parts = []
        for x in (q, k, v, mask):
            if x is None:
                parts.append((None, None))
                continue
            if torch._C._functorch.is_functorch_wrapped_tensor(x):
                return None
            parts.append(torch._unpack_dual(x, level))
        (pq, tq), (pk, tk), (pv, tv), (pm, tm) = parts
        if tq is None and tk is None and tv is None and tm is None:
            return None  # no tangent at all: the Function path (plain SDPA semantics)
        if tm is not None and pm.dtype == torch.bool:
            tm = None
        out, lse = _fused_forward(pq, pk, pv, pm, is_causal, scale)
        to = _tangent(pq, pk, pv, pm, out, lse, tq, tk, tv, tm, is_causal, scale, chunk)
        return torch._make_dual(out, to, level=level)
