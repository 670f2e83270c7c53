"""The τJp penalty math: R = mean ‖J_θ f(x'; θ0)·τ‖ (Yoshida et al., ICLR 2025, Eq. 10/11).

The tangent output of a jvp at θ0 in direction τ *is* J f(x'; θ0)·τ, so the penalty only needs that
tangent tensor: the norm is taken over its last (output) dimension, then averaged over examples,
and over valid tokens for token-level outputs of shape (B, L, D), with the mask that belongs to that
output (:func:`output_mask`). One reduction (:func:`penalty_terms`) serves the trainer and
``hf_taujp.evaluation.taujp_matrix``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import HfTaujpError

__all__ = ["taujp_penalty", "select_output", "penalty_terms", "output_mask", "prepare_reg_batch"]


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


def penalty_terms(
    tangent: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    norm: str = "l2",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ of per-position norms, number of positions) of a tangent: the one reduction of the penalty.

    ``taujp_penalty`` is their ratio for one batch; ``hf_taujp.evaluation.taujp_matrix`` sums both over
    batches (a mean over all examples / valid tokens of a dataset).

    Args:
        tangent: J f(x'; θ0)·τ, shape (B,), (B, D) or (B, L, D) (extra middle dims are averaged too).
        attention_mask: (B, L) 0/1 mask of the valid positions of a (B, L, ...) tangent, or None.
        norm: "l2" (unsquared ‖·‖₂ over the last dim, the official code) or "sq_l2" (‖·‖₂²).
    Raises:
        HfTaujpError: unknown norm; a mask whose shape is not the tangent's (B, L) (it is never
            dropped silently: padding would be averaged in).
    """
    if norm not in ("l2", "sq_l2"):
        raise HfTaujpError(f"unknown taujp norm {norm!r} (expected 'l2' or 'sq_l2')")
    # fp16/bf16 tangents are upcast (the sum of squares overflows / loses precision); float64 stays.
    t = tangent if tangent.dtype == torch.float64 else tangent.float()
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    sq = t.pow(2).sum(-1)
    if norm == "l2":
        # sqrt has an infinite derivative at 0, and τ = 0 at step 0 of non-linear fine-tuning: the tiny
        # epsilon gives a zero (sub)gradient there instead of NaN; its effect on the value is < 1e-12.
        per = torch.sqrt(sq + 1e-24)
    else:
        per = sq
    if attention_mask is None:
        return per.sum(), torch.tensor(float(per.numel()), dtype=per.dtype, device=per.device)
    if per.dim() < 2 or tuple(attention_mask.shape) != tuple(per.shape[:2]):
        raise HfTaujpError(
            f"the attention mask has shape {tuple(attention_mask.shape)} but the penalised output has per-position "
            f"shape {tuple(per.shape)}: no mask belongs to this output (a mask is never dropped silently). Pass the "
            "mask of the output's own sequence (e.g. decoder_attention_mask for decoder logits), or none."
        )
    m = attention_mask.to(device=per.device, dtype=per.dtype)
    m = m.reshape(m.shape + (1,) * (per.dim() - 2)).expand_as(per)
    return (per * m).sum(), m.sum()


def taujp_penalty(
    tangent: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    norm: str = "l2",
) -> torch.Tensor:
    """R = mean over examples (and valid tokens) of ‖tangent‖₂ over the last dim (or its square).

    Args:
        tangent: J f(x'; θ0)·τ, shape (B, D) or (B, L, D) (extra middle dims are averaged too).
        attention_mask: optional (B, L) 0/1 mask of valid tokens for a (B, L, D) tangent (see
            :func:`output_mask` for the one that belongs to an output).
        norm: "l2" (unsquared, the official code) or "sq_l2".
    Returns:
        a scalar tensor (float32, or float64 for a float64 tangent) (differentiable w.r.t. τ).
    Raises:
        HfTaujpError: unknown norm, or a mask that does not fit the tangent (see :func:`penalty_terms`).
    """
    total, count = penalty_terms(tangent, attention_mask, norm)
    return total / count.clamp_min(1.0)


def prepare_reg_batch(model, batch: Mapping) -> dict:
    """A regularization batch as the model's inputs: loss inputs removed (labels are ignored, the
    penalty needs no targets), and for encoder-decoder models the decoder inputs the labels stood for
    (``decoder_input_ids`` by the model's own shift, ``decoder_attention_mask`` = labels ≠ −100) when
    the batch has none."""
    from ..linearize import LOSS_KEYS, _decoder_inputs_from_labels

    out = {k: v for k, v in batch.items() if k not in LOSS_KEYS}
    labels = batch.get("labels")
    config = getattr(model, "config", None)
    if (isinstance(labels, torch.Tensor) and getattr(config, "is_encoder_decoder", False)
            and out.get("decoder_input_ids") is None and out.get("decoder_inputs_embeds") is None):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "base_model", model)
        out["decoder_input_ids"] = _decoder_inputs_from_labels(inner, labels)
        if out.get("decoder_attention_mask") is None:
            out["decoder_attention_mask"] = (labels != -100).long()
    return out


def output_mask(model, batch: Mapping, tangent: torch.Tensor, output: str | None = None) -> torch.Tensor | None:
    """The valid-position mask that belongs to the penalised output, or None for a per-example output.

    Token-level outputs (B, L, ...) of encoder-decoder models: decoder outputs (``logits``,
    ``decoder_hidden_states``, ``last_hidden_state``, …) take ``decoder_attention_mask``; outputs named
    ``encoder_*`` take ``attention_mask``. Other models: ``attention_mask``. ``output=None`` (a custom
    output function) picks the mask whose shape fits, and refuses to guess between two.

    Raises:
        HfTaujpError: a padded batch has no mask for this output (e.g. decoder inputs without
            ``decoder_attention_mask``), or the choice is ambiguous.
    """
    if tangent.dim() < 3:
        return None
    shape = tuple(tangent.shape[:2])
    enc_mask, dec_mask = batch.get("attention_mask"), batch.get("decoder_attention_mask")
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return enc_mask
    has_decoder = any(batch.get(k) is not None for k in ("decoder_input_ids", "decoder_inputs_embeds"))
    if output is None:
        fits = [m for m in (enc_mask, dec_mask) if m is not None and tuple(m.shape) == shape]
        if len(fits) == 2 and not torch.equal(fits[0], fits[1]):
            raise HfTaujpError("the penalised output fits both the encoder and the decoder mask; name the output "
                               "(taujp_output) instead of a custom function, or make the function's output per-example.")
        if fits:
            return fits[0]
        if enc_mask is None and dec_mask is None:
            return None
        raise HfTaujpError(f"no mask of the batch fits the penalised output's (B, L) = {shape}.")
    if output.startswith("encoder_"):
        return enc_mask
    if dec_mask is None and has_decoder:
        raise HfTaujpError(
            f"the penalised output {output!r} is on the decoder side but the batch has no decoder_attention_mask "
            "(give it, or give labels so that it is derived as labels != -100); the encoder's attention_mask does not "
            "belong to decoder positions."
        )
    return dec_mask
