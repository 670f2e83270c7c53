"""Inputs of a model's forward: which keywords it accepts, which ones trigger a loss.

:func:`_accepts` (a keyword the forward declares explicitly) and :data:`LOSS_KEYS` (the inputs that make
a transformers model compute a loss), used by the linearized forward, the τJp trainer, merging statistics
and evaluation (re-exported by :mod:`hf_taujp.linearize`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

__all__ = ["LOSS_KEYS"]


# --------------------------------------------------------------------------------------------
# Inputs: which keywords a forward accepts, which ones trigger a loss
# --------------------------------------------------------------------------------------------
# Inputs that make a transformers model compute a loss (or are a loss's arguments). The one list of
# the package: the linearized forward pops them before the jvp (the loss must be taken of the
# linearized outputs, not linearized itself), the τJp trainer and `taujp_matrix` strip them from
# regularization batches, and evaluation reads gold labels from the first three.
LOSS_KEYS = (
    "labels", "label", "label_ids",          # label names ("label"/"label_ids": before the collator renames them)
    "start_positions", "end_positions",      # extractive question answering
    "next_sentence_label", "mc_labels", "sentence_order_label",  # pre-training heads (not supported linearized)
    "return_loss",                           # CLIP-style contrastive loss
    "num_items_in_batch",                    # the Trainer's loss normaliser
)
_UNSUPPORTED_LOSS_KEYS = ("next_sentence_label", "mc_labels", "sentence_order_label")
_RENAMED_LABEL_KEYS = ("label", "label_ids")


def _explicit_params(fn: Callable) -> frozenset[str]:
    """Names of the parameters ``fn`` declares (``**kwargs`` excluded); cached per underlying function."""
    target = fn.forward if isinstance(fn, nn.Module) else fn
    key = getattr(target, "__func__", target)
    try:
        return _SIGNATURES[key]
    except (KeyError, TypeError):
        pass
    try:
        params = inspect.signature(target).parameters
        names = frozenset(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    except (TypeError, ValueError):
        names = frozenset()
    try:
        _SIGNATURES[key] = names
    except TypeError:  # unhashable callable
        pass
    return names


_SIGNATURES: dict = {}


def _accepts(fn: Callable, name: str) -> bool:
    """True when ``fn`` (a callable, or a module: its ``forward``) declares the keyword ``name``.

    Only an explicit parameter counts: a ``**kwargs`` catch-all does not prove the keyword is
    understood (a strict inner forward behind it would raise), so such a keyword is not passed.
    """
    return name in _explicit_params(fn)
