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

from .errors import HfTaujpError, UnsupportedAttentionError

__all__ = ["linearized_sdpa", "UnsupportedAttentionError", "default_chunk_size"]

_ALL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.MATH]
# Tests set this to False to exercise the device-agnostic path (F.sdpa + recompute backward) on CPU.
_USE_CPU_FLASH = True


def default_chunk_size(batch_heads: int, q_len: int, k_len: int, head_dim: int) -> int:
    """Query rows per block: one (B·H, chunk, Lk) block holds about as many elements as Q itself
    (B·H·Lq·E), at least 2^18 elements, so the tangent's extra memory stays O(L) (a few Q-sized blocks)."""
    budget = max(batch_heads * q_len * head_dim, 1 << 18)
    return max(1, min(q_len, budget // max(1, batch_heads * k_len)))


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


# Blocks of query rows. With GQA (Hq = g·Hk) the query-side tensors of a block are regrouped by key head,
# (B, Hq, c, ·) → (B, Hk, g·c, ·), so every block is one batched matmul against the Hk key/value heads and
# K, V, tK, tV are never repeated (the CPU flash kernels take Hq ≠ Hk natively).
def _rows(x, i0, i1, hk):
    """Query-side rows i0:i1 of x (B, Hq, Lq, ·), grouped by key head: (B, Hk, g·(i1−i0), ·)."""
    return x.unflatten(1, (hk, -1))[..., i0:i1, :].flatten(2, 3)


def _join_rows(blocks, hk):
    """Inverse of `_rows` over consecutive blocks [(i1 − i0, (B, Hk, g·c, ·)), ...]: (B, Hq, Lq, ·).
    Concatenated rather than written in place, so that the op also runs under torch.func.vmap."""
    return torch.cat([b.unflatten(2, (-1, c)) for c, b in blocks], dim=3).flatten(1, 2)


def _block_mask(mask, is_causal, i0, i1, hk, lk, device):
    """Mask of query rows i0:i1, broadcastable to the grouped scores (B, Hk, g, c, n); bool or additive.

    Causal: a block only sees keys 0:i1 (n = i1: the keys after it are skipped, halving the work as the
    fused kernels do), and only its diagonal (c, c) part is masked: returned as the bool triangle."""
    if is_causal:  # upper-left aligned, as SDPA
        return torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=device).tril_()
    if mask is None:
        return None
    m = mask[..., i0:i1, :] if mask.shape[-2] != 1 else mask
    return m.unsqueeze(2) if m.shape[1] == 1 else m.unflatten(1, (hk, -1))


def _scores(q_c, k, scale, m_c, c, causal):
    """S = scale·q_c·kᵀ (+ mask) of a grouped block: (B, Hk, g·c, n)."""
    s = torch.matmul(q_c, k.transpose(-2, -1))
    s = s.mul_(scale) if not s.requires_grad else s * scale
    if m_c is None:
        return s
    s5 = s.unflatten(2, (-1, c))
    if causal:  # the last c keys are the block's own rows: mask their upper triangle in place
        s5[..., -c:].masked_fill_(~m_c, float("-inf"))
        return s
    s5 = s5.masked_fill(~m_c, float("-inf")) if m_c.dtype == torch.bool else s5 + m_c
    return s5.flatten(2, 3)


def _probs(s, lse_c):
    """P = exp(S − lse) of a block (rows that are fully masked give 0, as the fused kernels do)."""
    if lse_c is None:
        lse_c = torch.logsumexp(s, dim=-1, keepdim=True)
        lse_c = lse_c.masked_fill(torch.isinf(lse_c), 0.0)
    return torch.exp(s - lse_c) if s.requires_grad else s.sub_(lse_c).exp_()


def _tangent_block(q_c, k, v, o_c, lse_c, m_c, tq_c, tk, tv, tm_c, scale, c, causal, kk=None):
    """tO of one grouped block of query rows (differentiable ops; o_c / lse_c None: recomputed).

    k, v, tk, tv: the keys the block sees; kk: optionally cat([k, tk], -1), so that
    tQ·Kᵀ + Q·tKᵀ = cat([tQ, Q], -1)·kkᵀ is one matmul (worth its copy of K and tK when several blocks
    share it); without it, two matmuls."""
    p = _probs(_scores(q_c, k, scale, m_c, c, causal), lse_c)
    if o_c is None:
        o_c = torch.matmul(p, v)
    ts = None
    if tq_c is not None and tk is not None and kk is not None:
        ts = torch.matmul(torch.cat([tq_c, q_c], -1), kk.transpose(-2, -1))
    elif tq_c is not None and tk is not None:
        ts = torch.matmul(tq_c, k.transpose(-2, -1))
        ts = ts.add_(torch.matmul(q_c, tk.transpose(-2, -1))) if not ts.requires_grad else \
            ts + torch.matmul(q_c, tk.transpose(-2, -1))
    elif tq_c is not None:
        ts = torch.matmul(tq_c, k.transpose(-2, -1))
    elif tk is not None:
        ts = torch.matmul(q_c, tk.transpose(-2, -1))
    own = ts is not None  # ts is a fresh tensor (not a view of tM): may be reused in place
    if ts is not None:
        ts = ts.mul_(scale) if not ts.requires_grad else ts * scale
    if tm_c is not None:
        ts5 = tm_c.expand(p.unflatten(2, (-1, c)).shape) if ts is None else ts.unflatten(2, (-1, c)) + tm_c
        ts = ts5.flatten(2, 3)
    to = torch.matmul(p, tv) if tv is not None else None
    if ts is not None:
        a = ts.mul_(p) if own and not (p.requires_grad or ts.requires_grad) else p * ts
        part = torch.matmul(a, v) - a.sum(-1, keepdim=True) * o_c
        to = part if to is None else to + part
    return to


def _blocks(lq, chunk):
    return [(i, min(lq, i + chunk)) for i in range(0, lq, chunk)]


def _keys(x, n):
    return x if x is None or x.shape[-2] == n else x[..., :n, :]


def _tangent(q, k, v, mask, out, lse, tq, tk, tv, tm, is_causal, scale, chunk):
    """tO over query blocks, without autograd (the linear map applied to (tq, tk, tv, tm))."""
    lq, lk, hk = q.shape[-2], k.shape[-2], k.shape[1]
    if tq is None and tk is None and tv is None and tm is None:
        return torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    blocks = []
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):  # blocks in float32 (as the fused kernels accumulate): O(L) copies
        q, k, v, out, tq, tk, tv, tm = (None if t is None else t.float() if t.is_floating_point() else t
                                        for t in (q, k, v, out, tq, tk, tv, tm))
        mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    with torch.no_grad():
        blocks_ = _blocks(lq, chunk)
        # One (B, H, Lk, 2E) copy shared by the blocks; a single block (a decoding step) is cheaper without it.
        kk = torch.cat([k, tk], -1) if tq is not None and tk is not None and len(blocks_) > 1 else None
        # One block with as many query as key heads (a decoding step): the block is the whole tensor, no regrouping.
        whole = len(blocks_) == 1 and q.shape[1] == hk
        rows = (lambda x, i0, i1: x) if whole else (lambda x, i0, i1: _rows(x, i0, i1, hk))  # noqa: E731
        for i0, i1 in blocks_:
            n = i1 if is_causal else lk
            m_c = _block_mask(mask, is_causal, i0, i1, hk, lk, q.device)
            tm_c = None if tm is None else _block_mask(tm, False, i0, i1, hk, lk, q.device)
            lse_c = None if lse is None else rows(lse[..., None], i0, i1).to(q.dtype)
            to = _tangent_block(rows(q, i0, i1), _keys(k, n), _keys(v, n), rows(out, i0, i1), lse_c, m_c,
                                None if tq is None else rows(tq, i0, i1), _keys(tk, n), _keys(tv, n), tm_c,
                                scale, i1 - i0, is_causal, _keys(kk, n))
            blocks.append((i1 - i0, to))
        return (blocks[0][1] if whole else _join_rows(blocks, hk)).to(dtype)


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


def _blockwise_grads(g, need, q, k, v, mask, tq, tk, tv, tm, is_causal, scale, chunk, primal=False):
    """Gradients of ⟨g, tO⟩ (or ⟨g, O⟩ with ``primal=True``) for every input that needs one, query block by
    query block with autograd on the recomputed block (O(chunk·L) memory; input indices as in
    `_AttentionTangent.forward`)."""
    idx = {0: q, 1: k, 2: v, 3: mask, 6: tq, 7: tk, 8: tv, 9: tm}
    wanted = [i for i, t in idx.items() if need[i] and t is not None]
    grads: list = [None] * 13
    for i in wanted:
        grads[i] = torch.zeros_like(idx[i])
    lq, lk, hk = q.shape[-2], k.shape[-2], k.shape[1]
    for i0, i1 in _blocks(lq, chunk):
        with torch.enable_grad():
            leaves = {i: idx[i].detach().requires_grad_() for i in wanted}
            get = lambda i: leaves.get(i, idx[i])  # noqa: E731
            qq, tqq, mm, tmm, c = get(0), get(6), get(3), get(9), i1 - i0
            n = i1 if is_causal else lk
            m_c = _block_mask(mm, is_causal, i0, i1, hk, lk, q.device)
            q_c = _rows(qq, i0, i1, hk)
            if primal:
                to = torch.matmul(_probs(_scores(q_c, _keys(get(1), n), scale, m_c, c, is_causal), None),
                                  _keys(get(2), n))
            else:
                tm_c = None if tmm is None else _block_mask(tmm, False, i0, i1, hk, lk, q.device)
                to = _tangent_block(q_c, _keys(get(1), n), _keys(get(2), n), None, None, m_c,
                                    None if tqq is None else _rows(tqq, i0, i1, hk), _keys(get(7), n),
                                    _keys(get(8), n), tm_c, scale, c, is_causal)
            ins = [leaves[i] for i in wanted]
            gs = torch.autograd.grad(to, ins, _rows(g, i0, i1, hk), allow_unused=True)
        for i, gi in zip(wanted, gs):
            if gi is not None:
                grads[i] += gi
    return tuple(grads)


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


def _check_inputs(q, k, v, mask, is_causal) -> None:
    """One-line errors for what SDPA itself refuses, before any kernel runs (the CPU flash kernel's own
    messages name neither the argument nor the fix)."""
    if min(q.dim(), k.dim(), v.dim()) < 2:
        raise HfTaujpError(f"linearized_sdpa: query, key and value need at least (L, E) dims, got {q.dim()}, "
                           f"{k.dim()}, {v.dim()}-D")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise HfTaujpError(f"linearized_sdpa: query, key and value must share one floating dtype, got {q.dtype}, "
                           f"{k.dtype}, {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise HfTaujpError(f"linearized_sdpa: query head size {q.shape[-1]} vs key head size {k.shape[-1]} "
                           "(they must agree; the value's may differ)")
    if k.shape[-2] != v.shape[-2]:
        raise HfTaujpError(f"linearized_sdpa: {k.shape[-2]} keys vs {v.shape[-2]} values")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise HfTaujpError(f"linearized_sdpa: attn_mask must be bool (True = attend) or float (added to the "
                               f"scores), got {mask.dtype}")
        if is_causal:
            raise HfTaujpError("linearized_sdpa: is_causal and attn_mask together (SDPA's math kernel refuses them "
                               "too): put the causal pattern into attn_mask")


def _as_batched(q, k, v, mask, enable_gqa):
    """(q, k, v, mask, shape): the inputs as the 4-D core takes them, and the output shape to give back
    (None: the core's own).

    Core shapes: q (N, Hq, Lq, E), k (N, Hk, Lk, E), v (N, Hk, Lk, Ev) with Hq a multiple of Hk, mask
    (N | 1, Hq | 1, Lq | 1, Lk | 1) in the query dtype. SDPA's broadcasting (its math kernel's batched matmuls)
    is rebuilt with differentiable views before the op: singleton dims are prepended up to 4-D, broadcast dims
    expanded, leading dims flattened. A view of an expanded dim is free; flattening it copies (O(L) for q, k, v;
    a mask is expanded only where its own leading dims are not all 1). Autograd and forward AD see only these
    views, so gradients and tangents of a broadcast input are summed over its copies as SDPA's are. The common
    call (4-D, one batch size, Hq = Hk or GQA, a 4-D mask) takes none of these ops: linearized generation
    calls this once per layer and token.
    """
    hq, hk, hv = (x.shape[-3] if x.dim() > 2 else 1 for x in (q, k, v))
    if enable_gqa and not hq == hk == hv:
        if hk != hv:
            raise UnsupportedAttentionError(f"linearized_sdpa: enable_gqa with {hk} key heads vs {hv} value heads "
                                            "is not covered")
        if hk == 0 or hq % hk:
            raise HfTaujpError(f"linearized_sdpa: {hq} query heads are not a multiple of {hk} key/value heads "
                               "(enable_gqa=True)")
        h, gqa = hq, True
    else:
        h = _broadcast((hq, hk, hv), "query, key and value head counts (enable_gqa=True for grouped-query attention)")
        gqa = hk == hv == 1 and h > 1  # one key/value head for every query head: the GQA path, K and V not copied
    lq, lk, ev = q.shape[-2], k.shape[-2], v.shape[-1]
    if (q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == k.shape[0] == v.shape[0] and hq == h
            and (gqa or hk == hv == h) and (mask is None or mask.dim() == 4 and mask.dtype in (torch.bool, q.dtype))):
        _check_mask(mask, (q.shape[0], h, lq, lk))
        return q, k, v, mask, None  # the common call: nothing to do
    out_nd = max(q.dim(), k.dim(), v.dim())
    nd = max(4, out_nd)
    q, k, v = (_lift(x, nd) for x in (q, k, v))
    if hq != h:  # one query head for several key/value heads
        q = q.expand(q.shape[:-3] + (h,) + q.shape[-2:])
    if not gqa:
        k, v = (x if x.shape[-3] == h else x.expand(x.shape[:-3] + (h,) + x.shape[-2:]) for x in (k, v))
    lead = _broadcast_shapes((q.shape[:-3], k.shape[:-3], v.shape[:-3]), "query, key and value batch dims")
    n = math.prod(lead)

    def flat(x):
        return x.expand(lead + x.shape[-3:]).reshape((n,) + x.shape[-3:])

    q, k, v = flat(q), flat(k), flat(v)
    if mask is not None:
        if mask.dim() > out_nd:
            raise HfTaujpError(f"linearized_sdpa: attn_mask has {mask.dim()} dims, the inputs {out_nd}")
        mask = _lift(mask, nd)
        _check_mask(mask, lead + (h, lq, lk))
        if mask.is_floating_point() and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # the scores' dtype: the flash kernel takes no other
        mask = mask.reshape((1,) + mask.shape[-3:]) if all(d == 1 for d in mask.shape[:-3]) else flat(mask)
    shape = (lead + (h, lq, ev))[nd - out_nd:]
    return q, k, v, mask, None if shape == (n, h, lq, ev) else shape


def _lift(x, nd):
    """x with singleton dims prepended up to nd dims (a view)."""
    return x if x.dim() == nd else x.reshape((1,) * (nd - x.dim()) + tuple(x.shape))


def _broadcast(sizes, what):
    return _broadcast_shapes(tuple((s,) for s in sizes), what)[0]


def _broadcast_shapes(shapes, what):
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise HfTaujpError(f"linearized_sdpa: {what} do not broadcast: {', '.join(str(tuple(s)) for s in shapes)}") \
            from None


def _check_mask(mask, scores):
    """HfTaujpError unless ``mask`` broadcasts to the scores' shape without enlarging it (as SDPA requires)."""
    if mask is not None and (mask.dim() > len(scores)
                             or any(m not in (1, e) for m, e in zip(reversed(mask.shape), reversed(scores)))):
        raise HfTaujpError(f"linearized_sdpa: attn_mask of shape {tuple(mask.shape)} does not broadcast to the "
                           f"scores {tuple(scores)}")


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
