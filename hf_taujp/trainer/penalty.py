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

__all__ = ["taujp_penalty", "select_output", "penalty_terms", "per_position", "output_mask", "prepare_reg_batch",
           "TAUJP_NORMS", "NEEDS_PRIMAL"]


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


# The per-position forms of the penalty (``taujp_norm``). t = J f(x'; θ0)·τ and f = f(x'; θ0) over the output
# dimension D (the last one); each maps (t, f) to one number per position.
TAUJP_NORMS = ("l2", "sq_l2", "rms", "relative", "kl")
# forms whose value depends on the base output f (the jvp's primal), not on the tangent alone
NEEDS_PRIMAL = frozenset({"relative", "kl"})


def per_position(tangent: torch.Tensor, norm: str = "l2", primal: torch.Tensor | None = None) -> torch.Tensor:
    """One penalty value per position (shape ``tangent.shape[:-1]``) for a tangent t and base output f.

    Forms (``taujp_norm``), over the last dimension (size D):

    * ``"l2"``  ‖t‖₂ — unsquared, the authors' code (Yoshida et al. 2025, Eq. 10/11). Its size grows like
      √D and with the scale of the output, so a λ chosen for one model / vocabulary does not carry over.
    * ``"sq_l2"``  ‖t‖₂².
    * ``"rms"``  ‖t‖₂ / √D — the per-dimension root mean square: "l2" without its dependence on D.
    * ``"relative"``  ‖t‖₂ / ‖f‖₂ — the change relative to the base output on the same input (scale-free
      in the output's units; f is a constant, never differentiated).
    * ``"kl"``  ½·(Σ_j p_j t_j² − (Σ_j p_j t_j)²),  p = softmax(f) — the second-order Taylor expansion of
      KL(softmax(f) ‖ softmax(f + t)) = ½ tᵀ(diag p − p pᵀ) t + O(‖t‖³), i.e. half the squared length of t
      in the Fisher metric of the output distribution (Amari; the output-space Fisher of Pascanu & Bengio
      2014). For logits only: shift-invariant (softmax ignores the logits' mean), independent of D, in
      nats, the unit of the cross-entropy task loss it is added to — so λ reads as "nats of drift on the
      other tasks per nat of task loss".

    Args:
        tangent: t, shape (..., D) (a 1-D tangent is one output per example: D = 1).
        norm: one of :data:`TAUJP_NORMS`.
        primal: f, the base output, same shape as ``tangent``; needed by "relative" and "kl".
    Raises:
        HfTaujpError: unknown norm; a form that needs the base output without it, or of another shape.
    """
    if norm not in TAUJP_NORMS:
        raise HfTaujpError(f"unknown taujp norm {norm!r} (expected one of {TAUJP_NORMS})")
    # fp16/bf16 tangents are upcast (the sum of squares overflows / loses precision); float64 stays.
    dt = torch.float64 if tangent.dtype == torch.float64 else torch.float32
    t = tangent.to(dt)
    if t.dim() == 1:
        t = t.unsqueeze(-1)
    if norm in NEEDS_PRIMAL:
        if primal is None:
            raise HfTaujpError(f"taujp_norm={norm!r} needs the base output f(x'; θ0) beside the tangent (primal=...)")
        if tuple(primal.shape) != tuple(tangent.shape):
            raise HfTaujpError(f"the base output has shape {tuple(primal.shape)} but the tangent {tuple(tangent.shape)}")
        f = primal.detach().to(dt)
        if f.dim() == 1:
            f = f.unsqueeze(-1)
    if norm == "kl":
        p = torch.softmax(f, dim=-1)
        mean = (p * t).sum(-1)
        # Var_p(t) = E_p[(t − E_p t)²]: the centred form is ≥ 0 by construction (no cancellation below 0)
        return 0.5 * (p * (t - mean.unsqueeze(-1)).pow(2)).sum(-1)
    sq = t.pow(2).sum(-1)
    if norm == "sq_l2":
        return sq
    # sqrt has an infinite derivative at 0, and τ = 0 at step 0 of non-linear fine-tuning: the tiny
    # epsilon gives a zero (sub)gradient there instead of NaN; its effect on the value is < 1e-12.
    l2 = torch.sqrt(sq + 1e-24)
    if norm == "l2":
        return l2
    if norm == "rms":
        return l2 / t.shape[-1] ** 0.5
    return l2 / f.pow(2).sum(-1).sqrt().clamp_min(torch.finfo(dt).tiny)  # relative


def penalty_terms(
    tangent: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    norm: str = "l2",
    primal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ of per-position penalties, number of positions) of a tangent: the one reduction of the penalty.

    ``taujp_penalty`` is their ratio for one batch; ``hf_taujp.evaluation.taujp_matrix`` sums both over
    batches (a mean over all examples / valid tokens of a dataset).

    Args:
        tangent: J f(x'; θ0)·τ, shape (B,), (B, D) or (B, L, D) (extra middle dims are averaged too).
        attention_mask: (B, L) 0/1 mask of the valid positions of a (B, L, ...) tangent, or None.
        norm: the per-position form, one of :data:`TAUJP_NORMS` (see :func:`per_position`); "l2"
            (unsquared ‖·‖₂ over the last dim) is the official code's.
        primal: the base output f(x'; θ0) (the jvp's primal), same shape; needed by "relative" / "kl".
    Raises:
        HfTaujpError: unknown norm; a form needing ``primal`` without it; a mask whose shape is not the
            tangent's (B, L) (it is never dropped silently: padding would be averaged in).
    """
    per = per_position(tangent, norm, primal)
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
    primal: torch.Tensor | None = None,
) -> torch.Tensor:
    """R = mean over examples (and valid tokens) of the per-position penalty (default ‖tangent‖₂ over the last dim).

    Args:
        tangent: J f(x'; θ0)·τ, shape (B, D) or (B, L, D) (extra middle dims are averaged too).
        attention_mask: optional (B, L) 0/1 mask of valid tokens for a (B, L, D) tangent (see
            :func:`output_mask` for the one that belongs to an output).
        norm: one of :data:`TAUJP_NORMS` (see :func:`per_position`): "l2" (unsquared, the official code),
            "sq_l2", "rms", "relative", "kl".
        primal: the base output f(x'; θ0), same shape as ``tangent`` ("relative" / "kl" need it).
    Returns:
        a scalar tensor (float32, or float64 for a float64 tangent) (differentiable w.r.t. τ).
    Raises:
        HfTaujpError: unknown norm, a missing base output, or a mask that does not fit (see :func:`penalty_terms`).
    """
    total, count = penalty_terms(tangent, attention_mask, norm, primal)
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
