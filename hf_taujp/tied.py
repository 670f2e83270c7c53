"""Tied parameters: one tensor under several names (GPT-2's ``lm_head.weight`` / ``transformer.wte.weight``,
T5's ``shared`` / ``encoder.embed_tokens``, BERT's decoder / word embeddings).

The rule, for ``TaskVector.apply_to``, ``merge()`` and streaming merges alike:

1. A group of names tied in the *base* is ONE parameter, called by its canonical name: the first of
   the group in the base's ``named_parameters()`` order (for a checkpoint folder: the first that
   the folder stores).
2. A task vector (or a statistic) may carry that parameter under any of the group's names, once or
   several times. Several entries must be equal (a checkpoint that kept the tied copy); they count
   once, under the canonical name.
3. Different entries mean the fine-tune untied the group (e.g. a head trained apart from the
   embedding): a model that ties them cannot hold both, so that is a :class:`TiedWeightsError`
   naming the two names — never one of them silently written into the other.
4. The result is written to every name of the group the output holds (for a module, the one shared
   tensor).

Groups come from the base module (parameters that are the same object), a state dict (tensors that
share storage, offset, shape and strides) or, for a folder, from its architecture built on the
``meta`` device (:func:`tied_groups_of_folder`).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import torch

from .errors import HfTaujpError, TiedWeightsError

__all__ = ["TiedWeightsError", "tied_groups", "tied_groups_of_folder", "canonical_tensors", "model_class_for"]


def tied_groups(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> list[tuple[str, ...]]:
    """Groups (≥ 2 names, in the source's order) of names that are one tensor.

    Module: ``named_parameters(remove_duplicate=False)`` entries that are the same Parameter.
    State dict: tensors sharing storage, offset, shape and strides (``state_dict()`` of a tied model;
    tensors on ``meta`` have no storage and form no groups)."""
    groups: dict[Any, list[str]] = {}
    if isinstance(model_or_state, torch.nn.Module):
        for n, p in model_or_state.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(n)
    else:
        for n, t in model_or_state.items():
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
                continue
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            groups.setdefault(key, []).append(n)
    return [tuple(v) for v in groups.values() if len(v) > 1]


def tied_groups_of_folder(directory: str | os.PathLike, *, trust_remote_code: bool = False) -> list[tuple[str, ...]]:
    """Tied groups of the model saved in ``directory`` (its ``config.json``), from the architecture built
    on the ``meta`` device (no weights read, no memory). A folder without ``config.json``, or whose
    config is not a transformers one (no ``model_type`` / ``architectures`` / ``auto_map``), declares no
    ties: []. Raises ``HfTaujpError`` when a transformers architecture cannot be built (custom code
    without ``trust_remote_code=True``, unknown architecture)."""
    import transformers

    d = os.fspath(directory)
    from .hub import read_json

    path = os.path.join(d, "config.json")
    if not os.path.isfile(path):
        return []  # no architecture declared: every stored tensor is its own parameter
    raw = read_json(path, "model config")
    if not any(k in raw for k in ("model_type", "architectures", "auto_map")):
        return []  # not a transformers config (nothing there declares tied weights)
    cls = model_class_for(raw, trust_remote_code=trust_remote_code)
    try:
        cfg = transformers.AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            auto = isinstance(cls, _RemoteAuto) or cls.__name__.startswith("Auto")
            model = cls.from_config(cfg) if auto else cls(cfg)
    except (ValueError, OSError, ImportError, KeyError, AttributeError, TypeError) as e:
        raise HfTaujpError(f"cannot build the architecture of {d!r} to find its tied parameters ({e}); "
                           "pass trust_remote_code=True for a base with custom code") from e
    return tied_groups(model)


def model_class_for(config, *, trust_remote_code: bool = False):
    """The transformers class for ``config``: ``config.architectures[0]`` when transformers defines it
    (even if the config also has an ``auto_map``), else (custom code) the ``auto_map`` entry of the most specific Auto class, which needs
    ``trust_remote_code=True`` (refused otherwise, with that advice — never transformers' interactive
    prompt)."""
    import transformers

    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    archs = get("architectures", None) or []
    auto_map = get("auto_map", None) or {}
    if archs and hasattr(transformers, archs[0]):
        return getattr(transformers, archs[0])
    if auto_map:
        if not trust_remote_code:
            raise HfTaujpError(f"the base model uses custom code ({auto_map}); pass trust_remote_code=True to run it")
        keys = [k for k in auto_map if k.startswith("AutoModel")]
        order = ["AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForSequenceClassification",
                 "AutoModelForMaskedLM", "AutoModelForTokenClassification", "AutoModelForQuestionAnswering"]
        pick = next((k for k in order if k in keys), keys[0] if keys else None)
        if pick is None:
            raise HfTaujpError(f"the base's auto_map {auto_map} names no AutoModel class")
        return _RemoteAuto(getattr(transformers, pick))
    if archs:
        raise HfTaujpError(f"transformers has no architecture {archs[0]!r} (and the config has no auto_map)")
    return transformers.AutoModel


class _RemoteAuto:
    """An Auto class bound to ``trust_remote_code=True`` (the caller passed it explicitly)."""

    def __init__(self, auto):
        self.auto = auto

    def from_config(self, cfg, **kw):
        return self.auto.from_config(cfg, **{**kw, "trust_remote_code": True})

    def from_pretrained(self, d, **kw):
        return self.auto.from_pretrained(d, **{**kw, "trust_remote_code": True})


def canonical_tensors(tensors: Mapping[str, torch.Tensor], groups: Sequence[Sequence[str]], *,
                      label: str = "task vector", prefer: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """``tensors`` with every tied group's entries folded onto its canonical name (the module docstring's
    rule): the first name of the group, or the first one in ``prefer`` (the names a folder stores).
    Raises :class:`TiedWeightsError` when two entries of one group differ."""
    prefer = set(prefer) if prefer is not None else None
    out = dict(tensors)
    for g in groups:
        present = [n for n in g if n in out]
        if not present:
            continue
        canon = next((n for n in g if prefer is None or n in prefer), g[0])
        first = out[present[0]]
        for n in present[1:]:
            t = out[n]
            same = tuple(t.shape) == tuple(first.shape) and (
                t.device.type == "meta" or first.device.type == "meta" or torch.equal(t.to(first.device, first.dtype), first))
            if not same:
                raise TiedWeightsError(
                    f"{label} has different values for {present[0]!r} and {n!r}, which the base model ties "
                    "(one tensor): the fine-tune untied them, and a model that ties them cannot hold both. "
                    "Untie them in the base (config tie_word_embeddings=False) and make the vector from that "
                    "base, or drop one of the two entries from the vector")
        for n in present:
            del out[n]
        out[canon] = first
    return out
