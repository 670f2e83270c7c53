"""The blockwise closed-form tangent of attention, and the blockwise gradients through it.

With P = softmax(S), S = s·Q·Kᵀ + M (sCM paper, Lu & Song, arXiv 2410.11081, App. F):

    tS = s·(tQ·Kᵀ + Q·tKᵀ) + tM,      tO = P·tV + (P∘tS)·V − rowsum(P∘tS) ⊙ O,

computed over blocks of query rows (:func:`default_chunk_size` rows each; exact: every block holds complete
softmax rows, P = exp(S − lse)), so memory is O(B·H·chunk·L) instead of O(B·H·L²) (:func:`_tangent`), and
the gradients of ⟨g, tO⟩ (or ⟨g, O⟩) by recomputing each block with autograd (:func:`_blockwise_grads`).
Plain tensor ops on the 4-D core shapes; the op that runs them is :func:`hf_taujp.attention_jvp.linearized_sdpa`.
"""

from __future__ import annotations

import torch

__all__ = ["default_chunk_size"]


def default_chunk_size(batch_heads: int, q_len: int, k_len: int, head_dim: int) -> int:
    """Query rows per block: one (B·H, chunk, Lk) block holds about as many elements as Q itself
    (B·H·Lq·E), at least 2^18 elements, so the tangent's extra memory stays O(L) (a few Q-sized blocks)."""
    budget = max(batch_heads * q_len * head_dim, 1 << 18)
    return max(1, min(q_len, budget // max(1, batch_heads * k_len)))


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
