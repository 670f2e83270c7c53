"""The state a forward-mode pass needs: :func:`jvp_ready` and the output layer's input layout.

:func:`jvp_ready` puts a model in that state for one pass and restores it afterwards (eval-mode
linearization point, activation checkpointing off, the ``enable_input_require_grads`` hooks detached,
a contiguous input for the output layer, :func:`contiguous_head_input`), and :data:`LINEARIZATION_MODES`
names the modes it takes. The one implementation of that switch: the linearized forward
(:mod:`hf_taujp.linearize`), linearized generation (:mod:`hf_taujp.generation`) and the τJp trainer
use it; it imports neither of them (re-exported by :mod:`hf_taujp.linearize`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import HfTaujpError

__all__ = ["jvp_ready", "contiguous_head_input", "LINEARIZATION_MODES"]

LINEARIZATION_MODES = ("eval", "train")


# --------------------------------------------------------------------------------------------
# The output layer's input layout
# --------------------------------------------------------------------------------------------
def _contiguous_input(module: nn.Module, args: tuple):
    """Forward pre-hook: the first positional input made contiguous (same values, other layout)."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_head_input(model: nn.Module):
    """Give the model's output layer (``model.get_output_embeddings()``, e.g. ``lm_head``) a contiguous input.

    transformers' causal LMs slice the hidden states before the head (``hidden_states[:, -k:, :]`` for
    ``logits_to_keep=k``, ``logits_to_keep=1`` at a batched generation's first step): a (B, k, H) view that is
    not contiguous for B > 1. ``F.linear`` on such a 3-D view cannot fold it into one matrix product and takes
    a batched path that runs the (vocab × H) weight once per batch row: on CPU (hidden 576, vocab 49152,
    32 × 2 kept positions) 0.55 s against 0.046 s for the contiguous copy, and 2.9 s against 0.19 s under
    ``torch.func.jvp`` (``benchmarks/bench_linearized_step.py --keep``). A forward pre-hook copies the slice
    (B·k·H values) first; outputs are unchanged up to float rounding.

    Every forward-mode pass of the package gets it (:func:`jvp_ready` installs it for the pass); call it
    directly to keep it on a model for its ordinary forwards too (the recipes do).

    Returns:
        The hook's ``RemovableHandle`` (``.remove()`` takes it off), or None when the model has no output
        layer or the hook is already on it.
    """
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):  # models without an output-embedding accessor
        head = None
    if not isinstance(head, nn.Module):
        return None
    if any(h is _contiguous_input for h in head._forward_pre_hooks.values()):
        return None
    return head.register_forward_pre_hook(_contiguous_input)


# Forward hooks that call ``output.requires_grad_(True)`` on the input embeddings, registered by
# transformers' `enable_input_require_grads` (called by `gradient_checkpointing_enable` and PEFT)
# and by PEFT's own fallback. Inside a functorch transform that call raises.
_REQUIRE_GRADS_HOOKS = ("make_inputs_require_grads", "make_inputs_require_grad")


@contextlib.contextmanager
def jvp_ready(module: nn.Module, mode: str = "eval"):
    """Put ``module`` in the state a forward-mode pass needs, and restore it afterwards.

    - ``mode="eval"`` (default, the authors' linearization point: ``init_model.eval()``): every
      submodule in train mode is switched to eval for the block, so no dropout (and BatchNorm's
      running statistics) inside f(x; θ0) and J. ``mode="train"`` leaves the modes alone (dropout
      active in train mode, one mask shared by primal and tangent).
    - Activation checkpointing off (``gradient_checkpointing`` flags), and the embedding hooks of
      ``enable_input_require_grads`` detached: both break jvp (checkpoint recomputation does not
      replay dual tensors; the hook calls ``requires_grad_`` inside a functorch transform). Neither is
      needed inside the jvp: the penalty / linearized forward keeps its activations anyway.
    - The output layer takes a contiguous input (:func:`contiguous_head_input`): the ``logits_to_keep``
      slice otherwise sends ``F.linear`` to a slow batched path, 15× under ``torch.func.jvp``.

    One walk over the modules per call; everything changed is put back, also when the call raises.
    """
    if mode not in LINEARIZATION_MODES:
        raise HfTaujpError(f"Unknown linearization mode {mode!r} (expected one of {LINEARIZATION_MODES}).")
    to_eval, flagged, hooked = [], [], []
    for m in module.modules():
        if mode == "eval" and m.training:
            to_eval.append(m)
        if getattr(m, "gradient_checkpointing", False) is True:
            flagged.append(m)
        if m._forward_hooks and any(getattr(h, "__name__", "") in _REQUIRE_GRADS_HOOKS for h in m._forward_hooks.values()):
            hooked.append((m, dict(m._forward_hooks)))
    for m in to_eval:
        m.training = False
    for m in flagged:
        m.gradient_checkpointing = False
    head_hook = contiguous_head_input(module)
    for m, hooks in hooked:
        for k, h in hooks.items():
            if getattr(h, "__name__", "") in _REQUIRE_GRADS_HOOKS:
                del m._forward_hooks[k]
    try:
        yield
    finally:
        if head_hook is not None:
            head_hook.remove()
        for m in to_eval:
            m.training = True
        for m in flagged:
            m.gradient_checkpointing = True
        for m, hooks in hooked:  # same hooks, same order
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)
