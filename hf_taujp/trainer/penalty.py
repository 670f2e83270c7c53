"""The τJp penalty math: R = mean ‖J_θ f(x'; θ0)·τ‖ (Yoshida et al., ICLR 2025, Eq. 10/11).

The tangent output of a jvp at θ0 in direction τ *is* J f(x'; θ0)·τ, so the penalty only needs that
tangent tensor: the norm is taken over its last (output) dimension, then averaged over examples,
and over valid tokens (attention mask) for token-level outputs of shape (B, L, D).
"""

from __future__ import annotations

import re

import torch

from ..hub import HfTaujpError

__all__ = ["taujp_penalty", "select_output"]


_INDEXED = re.compile(r"^([A-Za-z_]\w*)\[(-?\d+)\]$")


def select_output(outputs, name: str) -> torch.Tensor:
    """The tensor `name` of a model output (ModelOutput / dict / object with attributes).

    `name` may index a tuple output: "hidden_states[-1]" is the last layer's hidden states, (B, L, D)
    (the trainer then asks the model for `output_hidden_states=True`).
    """
    index = None
    m = _INDEXED.match(name)
    if m:
        name, index = m.group(1), int(m.group(2))
    value = None
    if isinstance(outputs, dict):
        value = outputs.get(name)
    if value is None:
        value = getattr(outputs, name, None)
    if value is None and isinstance(outputs, torch.Tensor) and name in ("logits", "output"):
        value = outputs
    if index is not None and isinstance(value, (tuple, list)):
        if not -len(value) <= index < len(value):
            raise HfTaujpError(f"taujp_output={name}[{index}]: the model returned {len(value)} {name}")
        value = value[index]
    if not isinstance(value, torch.Tensor):
        keys = list(outputs.keys()) if isinstance(outputs, dict) else type(outputs).__name__
        raise HfTaujpError(f"taujp_output={name!r} is not a tensor output of the model (outputs: {keys})")
    return value


def taujp_penalty(
    tangent: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    norm: str = "l2",
) -> torch.Tensor:
    """R = mean over examples (and valid tokens) of ‖tangent‖₂ over the last dim (or its square).

    Args:
        tangent: J f(x'; θ0)·τ, shape (B, D) or (B, L, D) (extra middle dims are averaged too).
        attention_mask: optional (B, L) 0/1 mask of valid tokens for a (B, L, D) tangent; ignored
            when its shape does not match the tangent's leading dims.
        norm: "l2" (unsquared, the official code) or "sq_l2".
    Returns:
        a scalar tensor (float32, or float64 for a float64 tangent) (differentiable w.r.t. τ).
    """
    # fp16/bf16 tangents are upcast (the sum of squares overflows / loses precision); float64 stays.
    t = tangent if tangent.dtype == torch.float64 else tangent.float()
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    sq = t.pow(2).sum(-1)
    if norm == "l2":
        # sqrt has an infinite derivative at 0, and τ = 0 at step 0 of non-linear fine-tuning: the tiny
        # epsilon gives a zero (sub)gradient there instead of NaN; its effect on the value is < 1e-12.
        per = torch.sqrt(sq + 1e-24)
    elif norm == "sq_l2":
        per = sq
    else:
        raise HfTaujpError(f"unknown taujp norm {norm!r} (expected 'l2' or 'sq_l2')")
    if per.dim() >= 2 and attention_mask is not None and tuple(attention_mask.shape) == tuple(per.shape[:2]):
        m = attention_mask.to(per.dtype)
        m = m.reshape(m.shape + (1,) * (per.dim() - 2)).expand_as(per)
        return (per * m).sum() / m.sum().clamp_min(1.0)
    return per.mean()
