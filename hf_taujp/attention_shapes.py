"""The inputs of the linearized SDPA: SDPA's own input checks and its broadcasting onto the 4-D core shapes.

:func:`_check_inputs` raises one-line errors for what ``F.scaled_dot_product_attention`` itself refuses;
:func:`_as_batched` rebuilds SDPA's broadcasting (leading dims, head counts, GQA, the mask) with differentiable
views, into the shapes :func:`hf_taujp.attention_jvp.linearized_sdpa`'s core takes.
"""

from __future__ import annotations

import math

import torch

from .errors import HfTaujpError, UnsupportedAttentionError


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
