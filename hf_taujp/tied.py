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
share storage, offset, shape and strides) or, for a folder, from :func:`find_tied_groups`: what the
folder's ``config.json`` and checkpoint say, read against a table of well-known families
(:data:`TIED_FAMILIES`, each entry checked against the meta-device build in the tests), or else the
architecture built on the ``meta`` device (:func:`tied_groups_by_meta_build`, which imports the
modeling code: ~3-4 s for GPT-2, the slow path).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch

from .errors import HfTaujpError, TiedWeightsError

__all__ = ["TiedWeightsError", "TiedGroups", "TIED_FAMILIES", "tied_groups", "find_tied_groups", "tied_groups_of_folder",
           "tied_groups_by_meta_build", "canonical_tensors", "model_class_for", "meta_model"]

logger = logging.getLogger(__name__)


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


class TiedGroups(NamedTuple):
    """The tied groups of a model folder and the rule of :func:`find_tied_groups` that decided them.

    ``rule``: ``"no-config"``, ``"not-transformers"``, ``"declared"`` (config + checkpoint + table)
    or ``"meta-build"`` (the architecture built on the meta device); ``reason``: one sentence saying
    why that rule applied (why the fast one did not, for ``"meta-build"``)."""

    groups: list[tuple[str, ...]]
    rule: str
    reason: str


class _Family(NamedTuple):
    """One model_type of :data:`TIED_FAMILIES`: the config class's ``tie_word_embeddings`` default
    (None: the config has no such field), the value its config class forces whatever config.json
    says (None: not forced), the class ``AutoModel`` builds when config.json names no architecture,
    and per architecture the groups tied when ``tie_word_embeddings`` is true (none when it is false)."""

    default_tie: bool | None
    forced_tie: bool | None
    base: str
    classes: dict[str, tuple[tuple[str, ...], ...]]


def _decoder_only(prefix: str, default_tie: bool, heads: Sequence[str]) -> _Family:
    """A Llama-layout family: ``lm_head.weight`` tied to ``model.embed_tokens.weight`` in ``*ForCausalLM``."""
    classes = {f"{prefix}Model": (), f"{prefix}ForCausalLM": (("model.embed_tokens.weight", "lm_head.weight"),)}
    classes.update({f"{prefix}{h}": () for h in heads})
    return _Family(default_tie, None, f"{prefix}Model", classes)


def _masked_lm(embeddings: str, head: str) -> tuple[tuple[str, ...], ...]:
    """BERT-layout LM heads: the decoder weight is the word embedding, its bias the head's ``bias``."""
    return ((embeddings, f"{head}.decoder.weight"), (f"{head}.bias", f"{head}.decoder.bias"))


_HEADS3 = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")
_GPT2_LM = (("transformer.wte.weight", "lm_head.weight"),)
_BERT_LM = _masked_lm("bert.embeddings.word_embeddings.weight", "cls.predictions")
_ROBERTA_LM = _masked_lm("roberta.embeddings.word_embeddings.weight", "lm_head")
_T5_ENC = ("shared.weight", "encoder.embed_tokens.weight")
_T5_ENC_DEC = _T5_ENC + ("decoder.embed_tokens.weight",)

# The tied groups that transformers 5.x's classes declare (``_tied_weights_keys``, gated by
# ``config.tie_word_embeddings``), written out so that the common path neither imports transformers
# (~1.7 s) nor its modeling code (~2 s more) nor builds the model. Members are in
# ``named_parameters()`` order (the source first), as the meta-device build lists them. Every entry,
# for both values of the flag, is compared with that build in tests/test_tied_rules.py; a family or
# architecture missing here is decided by the meta-device build. Read from transformers 5.24.
TIED_FAMILIES: dict[str, _Family] = {
    "gpt2": _Family(True, None, "GPT2Model", {
        "GPT2Model": (), "GPT2LMHeadModel": _GPT2_LM, "GPT2DoubleHeadsModel": _GPT2_LM,
        **{f"GPT2{h}": () for h in _HEADS3}}),
    "llama": _decoder_only("Llama", False, _HEADS3),
    "mistral": _decoder_only("Mistral", False, _HEADS3),
    "qwen2": _decoder_only("Qwen2", False, _HEADS3),
    "qwen3": _decoder_only("Qwen3", False, _HEADS3),
    "gemma": _decoder_only("Gemma", True, _HEADS3[:2]),
    "gemma2": _decoder_only("Gemma2", True, _HEADS3[:2]),
    # T5Config (transformers 5) sets tie_word_embeddings = True whatever config.json says (the saved
    # False of T5 v1.1 / flan-t5 only turns off the decoder's output scaling), so lm_head is tied too
    "t5": _Family(True, True, "T5Model", {
        "T5Model": (_T5_ENC_DEC,), "T5ForConditionalGeneration": (_T5_ENC_DEC + ("lm_head.weight",),),
        "T5EncoderModel": (_T5_ENC,), "T5ForQuestionAnswering": (_T5_ENC_DEC,),
        "T5ForSequenceClassification": (tuple(f"transformer.{n}" for n in _T5_ENC_DEC),),
        "T5ForTokenClassification": (tuple(f"transformer.{n}" for n in _T5_ENC),)}),
    "bert": _Family(True, None, "BertModel", {
        "BertModel": (), "BertForMaskedLM": _BERT_LM, "BertForPreTraining": _BERT_LM, "BertLMHeadModel": _BERT_LM,
        **{f"Bert{h}": () for h in ("ForNextSentencePrediction", "ForMultipleChoice", *_HEADS3)}}),
    "roberta": _Family(True, None, "RobertaModel", {
        "RobertaModel": (), "RobertaForMaskedLM": _ROBERTA_LM, "RobertaForCausalLM": _ROBERTA_LM,
        **{f"Roberta{h}": () for h in ("ForMultipleChoice", *_HEADS3)}}),
    "clip": _Family(None, None, "CLIPModel", {"CLIPModel": (), "CLIPForImageClassification": ()}),
    "clip_text_model": _Family(None, None, "CLIPTextModel", {"CLIPTextModel": (), "CLIPTextModelWithProjection": ()}),
    "clip_vision_model": _Family(None, None, "CLIPVisionModel",
                                 {"CLIPVisionModel": (), "CLIPVisionModelWithProjection": ()}),
}
# the transformers versions TIED_FAMILIES describes (pyproject's range; the tests check the installed one)
_TABLE_VERSIONS = ((5, 24), (6, 0))


def _transformers_version() -> tuple[int, int] | None:
    """(major, minor) of the installed transformers, from its metadata (importing it costs ~1.7 s)."""
    from importlib import metadata

    try:
        parts = metadata.version("transformers").split(".")
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (metadata.PackageNotFoundError, ValueError, IndexError):
        return None


def _stored_names(d: str) -> set[str] | None:
    """The tensor names the folder's model checkpoint stores (index or headers only), None if it has none."""
    from .hub import SafetensorsReader, read_json

    for prefix in ("model", "pytorch_model"):
        index = os.path.join(d, f"{prefix}.safetensors.index.json")
        if os.path.isfile(index):
            return set((read_json(index, "safetensors index").get("weight_map") or {}))
        if os.path.isfile(os.path.join(d, f"{prefix}.safetensors")):
            with SafetensorsReader(d, prefix) as r:
                return set(r.keys())
    return None


def _declared(raw: Mapping, stored: set[str] | None) -> TiedGroups | str:
    """The ``declared`` rule, or why it cannot decide (a string: the meta-device build will)."""
    mt = raw.get("model_type")
    fam = TIED_FAMILIES.get(mt) if isinstance(mt, str) else None
    if fam is None:
        return f"model_type {mt!r} is not in hf_taujp.tied.TIED_FAMILIES"
    version = _transformers_version()
    if version is None or not _TABLE_VERSIONS[0] <= version < _TABLE_VERSIONS[1]:
        return f"the installed transformers {version} is outside the versions TIED_FAMILIES describes"
    archs = raw.get("architectures") or [fam.base]  # none named: AutoModel builds the family's base class
    arch = archs[0] if isinstance(archs, list) else None
    if arch not in fam.classes:
        return f"architecture {arch!r} is not in TIED_FAMILIES[{mt!r}]"
    if raw.get("tie_encoder_decoder"):
        return "config.json sets tie_encoder_decoder, which TIED_FAMILIES does not describe"
    declared = [tuple(g) for g in fam.classes[arch]]
    if not declared:
        return TiedGroups([], "declared", f"{arch} declares no tied parameters")
    flag = raw.get("tie_word_embeddings", fam.default_tie)
    if fam.forced_tie is not None:
        flag, how = fam.forced_tie, f"forced to {fam.forced_tie} by {mt}'s config class"
    elif "tie_word_embeddings" in raw:
        how = f"{flag} in config.json"
    else:
        how = f"{flag} ({mt}'s default)"
    if not isinstance(flag, bool):
        return f"config.json's tie_word_embeddings is {flag!r}, not a boolean"
    if flag:
        seen = "" if stored is None else "; the checkpoint stores " + ", ".join(
            f"{sum(n in stored for n in g)} of {len(g)} names" for g in declared)
        return TiedGroups(declared, "declared", f"{arch} ties {len(declared)} group(s), tie_word_embeddings {how}{seen}")
    # untied: a checkpoint that stores some names of a would-be group but not the others looks like a
    # tied save, so the config and the checkpoint disagree
    partial = [g for g in declared if stored is not None and 0 < sum(n in stored for n in g) < len(g)]
    if partial:
        return (f"tie_word_embeddings is {how} but the checkpoint stores only "
                f"{[n for n in partial[0] if n in stored]} of {list(partial[0])} (as a tied save does)")
    return TiedGroups([], "declared", f"{arch} ties nothing: tie_word_embeddings {how}")


def find_tied_groups(directory: str | os.PathLike, stored: Iterable[str] | None = None, *,
                     trust_remote_code: bool = False) -> TiedGroups:
    """Tied groups of the model saved in ``directory`` and the rule that decided them.

    Rules, first that applies:

    1. ``no-config``: no ``config.json``: [] (no architecture declares ties).
    2. ``not-transformers``: a config without ``model_type`` / ``architectures`` / ``auto_map``: [].
    3. ``meta-build`` for custom code (an ``auto_map``): its modeling code may tie anything, so the
       architecture is built on the meta device; needs ``trust_remote_code=True``.
    4. ``declared``: ``model_type`` and the architecture (``architectures[0]``, else the family's
       ``AutoModel`` class) are in :data:`TIED_FAMILIES` and transformers is a version it describes:
       the class's groups if ``tie_word_embeddings`` (config.json's boolean, else the config class's
       default, or the value the config class forces) is true, else []. Nothing is imported but the
       checkpoint's index / headers. ``stored`` (default: read from the folder's ``model`` /
       ``pytorch_model`` safetensors) is checked against it: an untied config whose checkpoint stores
       some but not all names of a group (a tied save) is a contradiction, left to rule 5.
    5. ``meta-build``: anything else (a family or class outside the table, ``tie_encoder_decoder``,
       a non-boolean flag, the contradiction above): :func:`tied_groups_by_meta_build`.

    The decision is logged (logger ``hf_taujp.tied``, INFO). Raises ``HfTaujpError`` when rule 3 or 5
    cannot build the architecture (custom code without ``trust_remote_code=True``, unknown class),
    ``CorruptFileError`` for an unreadable config.json."""
    from .hub import read_json

    d = os.fspath(directory)
    path = os.path.join(d, "config.json")
    if not os.path.isfile(path):
        found = TiedGroups([], "no-config", "no config.json: every stored tensor is its own parameter")
    else:
        raw = read_json(path, "model config")
        if not any(k in raw for k in ("model_type", "architectures", "auto_map")):
            found = TiedGroups([], "not-transformers", "config.json is not a transformers config (no model_type, "
                               "architectures or auto_map): nothing declares tied parameters")
        elif raw.get("auto_map"):
            found = TiedGroups(tied_groups_by_meta_build(d, trust_remote_code=trust_remote_code), "meta-build",
                               "custom code (auto_map) may tie any parameters")
        else:
            names = set(stored) if stored is not None else _stored_names(d)
            decided = _declared(raw, names)
            if isinstance(decided, str):
                decided = TiedGroups(tied_groups_by_meta_build(d, trust_remote_code=trust_remote_code),
                                     "meta-build", decided)
            found = decided
    logger.info("tied parameters of %s: %s [rule %s: %s]", d, found.groups, found.rule, found.reason)
    return found


def tied_groups_of_folder(directory: str | os.PathLike, *, trust_remote_code: bool = False,
                          stored: Iterable[str] | None = None) -> list[tuple[str, ...]]:
    """The groups of :func:`find_tied_groups` (its rules and errors), without the rule."""
    return find_tied_groups(directory, stored, trust_remote_code=trust_remote_code).groups


def meta_model(directory: str | os.PathLike, *, trust_remote_code: bool = False) -> torch.nn.Module | None:
    """The architecture of the model saved in ``directory`` (its ``config.json``) built on the ``meta``
    device (no weights read, no memory; imports the modeling code), or None for a folder without
    ``config.json`` or whose config is not a transformers one (no ``model_type`` / ``architectures`` /
    ``auto_map``). Raises ``HfTaujpError`` when a transformers architecture cannot be built (custom code
    without ``trust_remote_code=True``, unknown architecture). The one meta build of the package."""
    import transformers

    d = os.fspath(directory)
    from .hub import read_json

    path = os.path.join(d, "config.json")
    if not os.path.isfile(path):
        return None
    raw = read_json(path, "model config")
    if not any(k in raw for k in ("model_type", "architectures", "auto_map")):
        return None
    cls = model_class_for(raw, trust_remote_code=trust_remote_code)
    try:
        cfg = transformers.AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            auto = isinstance(cls, _RemoteAuto) or cls.__name__.startswith("Auto")
            return cls.from_config(cfg) if auto else cls(cfg)
    except (ValueError, OSError, ImportError, KeyError, AttributeError, TypeError) as e:
        raise HfTaujpError(f"cannot build the architecture of {d!r} on the meta device ({e}); "
                           "pass trust_remote_code=True for a base with custom code") from e


def tied_groups_by_meta_build(directory: str | os.PathLike, *, trust_remote_code: bool = False) -> list[tuple[str, ...]]:
    """Tied groups of the model saved in ``directory``, from :func:`meta_model`. A folder that declares no
    transformers architecture declares no ties: [] (every stored tensor is its own parameter). Raises
    ``HfTaujpError`` when a transformers architecture cannot be built."""
    model = meta_model(directory, trust_remote_code=trust_remote_code)
    return [] if model is None else tied_groups(model)


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
