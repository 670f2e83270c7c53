"""Output arithmetic and task losses of the linearized outputs.

:func:`add_outputs` (primal + α·tangent leaf by leaf), :func:`linearized_loss` (transformers' task loss
evaluated on f_lin's outputs, not the linearization of the loss), and the two steps around the jvp of a
linearized forward: :func:`prepare_linearized_inputs` (loss inputs kept away from the jvp) and
:func:`with_loss` (the loss attached to the outputs). Re-exported by :mod:`hf_taujp.linearize`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import HfTaujpError
from .forward_inputs import _RENAMED_LABEL_KEYS, _UNSUPPORTED_LOSS_KEYS, LOSS_KEYS

__all__ = ["add_outputs", "linearized_loss", "prepare_linearized_inputs", "with_loss"]


# --------------------------------------------------------------------------------------------
# Output arithmetic and task losses of the linearized outputs
# --------------------------------------------------------------------------------------------
def add_outputs(primal: Any, tangent: Any, alpha: float = 1.0) -> Any:
    """``primal + alpha·tangent`` leaf by leaf, keeping the output class (ModelOutput, tuple, tensor)."""
    if isinstance(primal, torch.Tensor):
        if not primal.is_floating_point() and not primal.is_complex():
            return primal
        return primal + alpha * tangent if alpha != 1.0 else primal + tangent
    if isinstance(primal, Mapping):
        fields = {k: add_outputs(v, tangent[k], alpha) for k, v in primal.items()}
        return type(primal)(**fields)
    if isinstance(primal, (tuple, list)):
        return type(primal)(add_outputs(p, t, alpha) for p, t in zip(primal, tangent))
    return primal


def linearized_loss(model: nn.Module, outputs: Any, labels: torch.Tensor | None = None, *, return_loss: bool = False,
                    num_items_in_batch: Any = None, start_positions: torch.Tensor | None = None,
                    end_positions: torch.Tensor | None = None) -> torch.Tensor:
    """The task loss evaluated on linearized outputs (not the linearization of the loss).

    The loss functions are transformers' own, applied to the f_lin outputs:

    - question answering (``start_positions`` and ``end_positions``): ``ForQuestionAnsweringLoss``
      on ``start_logits`` / ``end_logits`` (mean of the two cross-entropies, positions outside the
      sequence ignored), as ``*ForQuestionAnswering`` models compute it.
    - CLIP-like (``return_loss`` and ``logits_per_text``): contrastive ``clip_loss`` (Radford et al. 2021).
    - encoder-decoder (T5, BART): token cross-entropy over the decoder logits, ``ignore_index=-100``.
    - otherwise ``model.loss_function`` (causal LM: shifted CE; sequence classification: MSE / CE /
      BCE by ``problem_type``; token classification; masked LM).

    Raises:
        HfTaujpError: no labels (and no CLIP ``return_loss``), only one of the two QA positions,
            outputs without the fields the loss needs.
    """
    if start_positions is not None or end_positions is not None:
        if start_positions is None or end_positions is None:
            raise HfTaujpError("Question answering needs both start_positions and end_positions.")
        if not (isinstance(outputs, Mapping) and "start_logits" in outputs and "end_logits" in outputs):
            raise HfTaujpError("start_positions / end_positions given, but the model returns no start_logits / end_logits.")
        from transformers.loss.loss_utils import ForQuestionAnsweringLoss

        return ForQuestionAnsweringLoss(outputs["start_logits"], outputs["end_logits"], start_positions, end_positions)
    if return_loss and isinstance(outputs, Mapping) and "logits_per_text" in outputs:
        # CLIP's symmetric InfoNCE (the helper's import path moved between transformers versions).
        lt = outputs["logits_per_text"]
        target = torch.arange(lt.shape[0], device=lt.device)
        return (nn.functional.cross_entropy(lt, target) + nn.functional.cross_entropy(lt.t(), target)) / 2
    if labels is None:
        raise HfTaujpError("linearized_loss needs labels, start_positions / end_positions, or return_loss=True for a "
                           "CLIP-like model.")
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), labels.to(logits.device).reshape(-1), ignore_index=-100,
            reduction="sum" if num_items_in_batch is not None else "mean",
        )
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
        return loss
    if not hasattr(model, "loss_function"):
        raise HfTaujpError(f"{type(model).__name__} has no `loss_function`; compute the loss from the outputs yourself.")
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and config is not None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    return model.loss_function(
        logits=logits, labels=labels, pooled_logits=logits, vocab_size=vocab, config=config,
        num_items_in_batch=num_items_in_batch,
    )


def _decoder_inputs_from_labels(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return model.prepare_decoder_input_ids_from_labels(labels=labels)
    if hasattr(model, "_shift_right"):
        return model._shift_right(labels)
    raise HfTaujpError(f"{type(model).__name__} is encoder-decoder but cannot build decoder_input_ids from labels.")


def prepare_linearized_inputs(model: nn.Module, kwargs: dict) -> tuple[dict, dict]:
    """Split ``kwargs`` into model inputs and loss arguments (every key of :data:`LOSS_KEYS`).

    The loss-triggering inputs never reach the jvp: inside it the model would return the
    linearization of its loss, L(θ0) + ∇L·τ, which has no lower bound. For encoder-decoder models
    ``decoder_input_ids`` are built from ``labels`` (the model's own shift) when not given.

    Raises:
        HfTaujpError: a loss input the linearized model cannot compute on its outputs
            (``next_sentence_label``, ``mc_labels``, ``sentence_order_label``), or ``label`` /
            ``label_ids`` (models name it ``labels``; the Trainer's collator renames it).
    """
    kwargs = dict(kwargs)
    popped = {k: kwargs.pop(k) for k in LOSS_KEYS if k in kwargs}
    bad = [k for k in _UNSUPPORTED_LOSS_KEYS if popped.get(k) is not None]
    if bad:
        raise HfTaujpError(f"{bad} trigger(s) a loss the linearized model cannot take of its outputs (supported: labels, "
                           "start_positions / end_positions, return_loss); compute that loss from the outputs yourself.")
    renamed = [k for k in _RENAMED_LABEL_KEYS if popped.get(k) is not None]
    if renamed:
        raise HfTaujpError(f"Pass the targets as `labels`, not {renamed} (the Trainer's data collator renames them).")
    loss_args = {
        "labels": popped.get("labels"),
        "start_positions": popped.get("start_positions"),
        "end_positions": popped.get("end_positions"),
        "return_loss": bool(popped.get("return_loss") or False),
        "num_items_in_batch": popped.get("num_items_in_batch"),
    }
    config = getattr(model, "config", None)
    labels = loss_args["labels"]
    if (labels is not None and config is not None and getattr(config, "is_encoder_decoder", False)
            and kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None):
        kwargs["decoder_input_ids"] = _decoder_inputs_from_labels(model, labels)
    return kwargs, loss_args


def with_loss(model: nn.Module, outputs: Any, loss_args: dict) -> Any:
    """Attach the linearized task loss to ``outputs`` (ModelOutput) when a loss input was given."""
    if all(loss_args.get(k) is None for k in ("labels", "start_positions", "end_positions")) and not loss_args["return_loss"]:
        return outputs
    loss = linearized_loss(model, outputs, loss_args["labels"], return_loss=loss_args["return_loss"],
                           num_items_in_batch=loss_args["num_items_in_batch"],
                           start_positions=loss_args.get("start_positions"), end_positions=loss_args.get("end_positions"))
    if isinstance(outputs, Mapping):
        fields = dict(outputs)
        fields.pop("loss", None)
        return type(outputs)(loss=loss, **fields)
    if isinstance(outputs, tuple):
        return (loss, *outputs)
    return (loss, outputs)
