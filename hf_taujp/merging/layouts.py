"""Which side of each 2-D weight is its output, for the merge methods whose result depends on it
(``iso_cts``, ``wudi``; RegMean's Grams): one rule for ``merge`` and ``merge_streaming``."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from ..errors import HfTaujpError
from ..tied import meta_model
from .methods import MergeConfigError, MissingStatisticsError
from .svd_methods import LAYOUTS

__all__ = ["weight_layout", "check_weight_layout", "module_layouts", "architecture_layouts", "WeightLayouts"]


def weight_layout(name: str, layouts: Mapping[str, str], shape: Sequence[int], gram_shape: Sequence[int],
                  default: str | None = None) -> str:
    """Layout of the 2-D weight ``name`` for RegMean: "out_in" (nn.Linear, (out, in)) or "in_out"
    (Conv1D, (in, out)) — as recorded by ``estimate_gram`` (``weight_layout``), the base's modules or the
    caller's ``weight_layout={name: ...}`` (in ``layouts``), else the only one the Gram's size (in, in)
    fits. A square weight with no recorded layout is ambiguous: ``default`` (the caller's
    ``weight_layout="out_in"`` / ``"in_out"``), else an error, not a guess (a Gram made by hand needs
    ``extra={"weight_layout": {...}}``)."""
    if name in layouts:
        return layouts[name]
    if len(shape) != 2 or len(gram_shape) != 2:
        return "out_in"  # regmean() raises its own shape error
    fits = [lay for lay, d_in in (("out_in", shape[1]), ("in_out", shape[0])) if d_in == gram_shape[0]]
    if len(fits) == 1:
        return fits[0]
    if default in fits:
        return default
    raise MissingStatisticsError(
        f"the Gram of {name} does not say whether the weight {tuple(shape)} is (out, in) (nn.Linear) or (in, out) "
        "(Conv1D): give GramStatistics from estimate_gram, or extra={'weight_layout': {name: 'out_in' | 'in_out'}}")



# ------------------------------------------------------------------------------ weight layouts
def check_weight_layout(given) -> None:
    """``MergeConfigError`` unless ``given`` is "out_in" / "in_out" or a mapping name -> one of them."""
    if isinstance(given, str) and given in LAYOUTS:
        return
    if isinstance(given, Mapping) and all(isinstance(k, str) and v in LAYOUTS for k, v in given.items()):
        return
    raise MergeConfigError(f'weight_layout must be "out_in", "in_out" or {{name: "out_in" | "in_out"}}, got {given!r}')


def module_layouts(module: torch.nn.Module) -> dict[str, str]:
    """{"<module>.weight": layout} of the model's nn.Linear ("out_in") and transformers Conv1D ("in_out") layers."""
    from .regmean import linear_layers

    return {f"{n}.weight": lay for n, (_, lay) in linear_layers(module).items()}


def architecture_layouts(directory: str, *, trust_remote_code: bool = False) -> tuple[dict[str, str] | None, str]:
    """(:func:`module_layouts` of the model saved in ``directory``, built on the meta device from its
    config.json (``hf_taujp.tied.meta_model``) — no weights read —, or None and the reason it cannot be built)."""
    try:
        model = meta_model(directory, trust_remote_code=trust_remote_code)
    except HfTaujpError as e:
        return None, str(e)
    if model is None:
        if not os.path.isfile(os.path.join(directory, "config.json")):
            return None, f"the base folder {directory!r} has no config.json"
        return None, f"the config.json of {directory!r} declares no transformers architecture"
    return module_layouts(model), ""


class WeightLayouts:
    """Which side of each 2-D tensor is its output, for the merge methods whose result depends on it (they
    declare the driver argument ``layout``: ``iso_cts``, ``wudi``); the one rule of ``merge`` and
    ``merge_streaming`` (RegMean reads its Grams' recorded layouts instead, :func:`weight_layout`).

    The rule: a 2-D tensor is read as stored, rows = outputs ("out_in"), except the weights of
    transformers' ``Conv1D`` layers (GPT-2 family), stored (in, out) ("in_out"), which the method sees
    transposed. Embeddings (and the LM heads tied to them), positional tables and bare 2-D parameters
    count as stored, as the reference codes treat every 2-D tensor. What says which tensors are Conv1D
    weights, strongest first:

    1. the caller's ``weight_layout={name: "out_in" | "in_out"}`` (any name of a tied group);
    2. the base's modules: an ``nn.Module`` base, a folder ``merge`` loads, or for ``merge_streaming``
       the folder's architecture built on the meta device from its config.json (no weights read; custom
       code needs ``trust_remote_code=True``); a tensor of no Linear / Conv1D layer counts as stored;
    3. a factored (LoRA) entry stored "direct" (s·B·A: (out, in)).

    A base whose modules are unknown (a state dict; a folder without a transformers config) says nothing
    about its other 2-D tensors: a layout-dependent method then raises ``MergeConfigError`` naming the
    first such tensor — GPT-2's (in, out) weights look exactly like (out, in) ones there, so there is no
    guess — unless ``weight_layout="out_in"`` or ``"in_out"`` gives the layout of every 2-D tensor the
    modules do not cover. Errors come before any tensor is merged or written.
    """

    def __init__(self, known: Mapping[str, str], fallback: str | None, why: str = ""):
        self.known, self.fallback, self.why = dict(known), fallback, why

    @classmethod
    def build(cls, *, modules: Mapping[str, str] | None, given=None, direct: Sequence[str] = (),
              canon: Mapping[str, str] | None = None, why: str = "") -> WeightLayouts:
        """``modules``: :func:`module_layouts` (None: unknown); ``given``: the caller's ``weight_layout``;
        ``direct``: names of factored entries stored (out, in); ``canon``: tied name -> canonical name."""
        canon = canon or {}
        known = {canon.get(n, n): "out_in" for n in direct}
        if modules is not None:
            known.update(modules)
        fallback = None if modules is None else "out_in"
        if given is not None:
            check_weight_layout(given)
            if isinstance(given, str):
                fallback = given
            else:
                known.update({canon.get(n, n): lay for n, lay in given.items()})
        return cls(known, fallback, why)

    def of(self, name: str, shape: Sequence[int], method: str) -> str:
        """"out_in" or "in_out" for the 2-D tensor ``name``; ``MergeConfigError`` when nothing says it."""
        if name in self.known:
            return self.known[name]
        if self.fallback is not None:
            return self.fallback
        raise MergeConfigError(
            f"merge method {method!r} depends on which side of a 2-D weight is its output, and nothing says it for "
            f"{name} {tuple(shape)}: {self.why}. Give the base as a model (an nn.Module, or a model folder), or "
            "weight_layout='out_in' (every such 2-D tensor stored (out, in), as nn.Linear; not true of GPT-2's "
            f"Conv1D weights), or weight_layout={{{name!r}: 'out_in' | 'in_out', ...}}")
