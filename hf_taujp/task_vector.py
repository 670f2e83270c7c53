"""Task vectors τ = θ_ft − θ0 (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, Eq. 1)
and their linearized counterpart (Ortiz-Jiménez et al., "Task Arithmetic in the Tangent Space", 2023):
a tangent τ applied as f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0)·τ.

Keys are the base model's parameter names (``named_parameters()``; tied weights once). A task vector is
a Hub artifact: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` with the folder layout of
docs/design.md (``config.json`` + ``task_vector*.safetensors`` + model card), never pickles.

Rules (documented choices):
- Arithmetic between vectors of different bases (fingerprint or base model id differ) raises
  ``BaseModelMismatchError``; use ``a.add(b, check_base=False)`` to override. Vectors of different
  kinds ("linear" vs "nonlinear") never combine: they live in different spaces (weights vs tangents).
- Keys present in only one operand count as zero there (union of keys); a shape mismatch on a shared
  key raises. The result dtype is ``torch.promote_types`` of the operands.
- ``apply_to`` computes θ0 + α·τ in float32 and casts back to each base parameter's dtype. Either
  reading applies to either kind (``linear=``; the vector's own by default, the other one warns);
  ``to_peft`` gives the tangent reading as a saveable LINEARIZED PEFT model.
- ``save_pretrained`` writes only the vector's own files into a folder (``hub.atomic_dir``).

Low-rank (factored) vectors: an entry may be a :class:`~hf_taujp.low_rank_tau.LowRankTau` (τ = s·B·A kept
as its factors; ``TaskVector.from_peft(..., factored=True)`` for LoRA and low-rank LINEARIZED adapters).
``tv[name]`` / ``tv.tensors`` give the exact full τ, materialised per tensor on each access (not cached),
so every consumer (both readings, dot / norm, merges) sees the full tensor and nothing is truncated;
``tv.entries`` gives what is stored. Arithmetic stays factored where it is exact: c·τ and −τ scale the
factors' scale, τ_1 + τ_2 of two factored entries concatenates the factors (the rank adds), factored + full
is full. Saved, the factors are ``<name>.lora_A`` (r × in) and ``<name>.lora_B`` (out × r) with the
config's ``low_rank`` table ({name: rank, scale, layout, shape}) and ``format_version`` 2 (full vectors
keep writing version 1, so older hf-taujp still reads them).
"""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import hub
from .errors import BaseModelMismatchError, CorruptFileError, HfTaujpError
from .fingerprints import fingerprint  # re-exported: hf_taujp.task_vector.fingerprint
from .low_rank_tau import FACTOR_KEYS, LowRankTau, factored_specs, factors_from, low_rank_sum
from .peft_conversion import tensors_from_peft

__all__ = ["TaskVector", "fingerprint", "cosine_matrix", "read_task_vector_config", "FORMAT", "FORMAT_VERSION", "PREFIX"]

FORMAT = "hf-taujp/task_vector"
# 2: factored (low-rank) entries, listed in config.json's ``low_rank``; a vector without any is written as 1.
FORMAT_VERSION = 2
PREFIX = "task_vector"
KINDS = ("nonlinear", "linear")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _few(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists tied weights once, under their first name (docs/design.md).
    return dict(model.named_parameters())


def _task_type_of(model: torch.nn.Module) -> str:
    """PEFT's task type implied by a transformers model class (``GPT2LMHeadModel`` → ``CAUSAL_LM``)."""
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and name.endswith(
        ("ForConditionalGeneration", "ForSeq2SeqLM")
    ):
        return "SEQ_2_SEQ_LM"
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


class _FullTensors(Mapping):
    """Read-only ``name -> full τ`` view of a vector holding factored entries: a :class:`LowRankTau` is
    materialised (``full()``) on every access and not kept, so a consumer that walks the tensors one at a
    time holds one full tensor at a time."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, Any]):
        self._entries = entries

    def __getitem__(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        return e.full() if isinstance(e, LowRankTau) else e

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"<full τ of {len(self)} entries, {sum(isinstance(e, LowRankTau) for e in self._entries.values())} factored>"


def _name_of(model) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


# --------------------------------------------------------------------------------------------
# TaskVector
# --------------------------------------------------------------------------------------------
class TaskVector:
    """τ keyed by base parameter name, with the metadata needed to apply and share it.

    ``kind="nonlinear"``: τ = θ_ft − θ0 applied as weights θ0 + α·τ (Ilharco et al. 2023, Eq. 1–2).
    ``kind="linear"``: τ is the tangent of a linearized model, applied as
    f(x; θ0) + α·J f(x; θ0)·τ (Ortiz-Jiménez et al. 2023, Eq. 4).

    ``tensors``: ``{base parameter name: τ}``, each a floating tensor or a :class:`LowRankTau` (a factored
    entry, see the module docstring); ``tv.tensors`` / ``tv[name]`` always give full tensors.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor | LowRankTau],
        *,
        base_model: str | None = None,
        base_model_revision: str | None = None,
        base_fingerprint: str | None = None,
        kind: str = "nonlinear",
        task: str | None = None,
        training: Mapping[str, Any] | None = None,
    ):
        if kind not in KINDS:
            raise HfTaujpError(f"kind must be one of {KINDS}, got {kind!r}.")
        if not isinstance(tensors, Mapping):
            raise HfTaujpError(f"tensors must be a mapping name -> tensor, got {type(tensors).__name__}.")
        out = {}
        for k, t in tensors.items():
            if isinstance(t, LowRankTau):
                out[k] = t  # validated by its constructor (2-D floating factors, finite scale)
                continue
            if not isinstance(t, torch.Tensor):
                raise HfTaujpError(f"Task vector entry {k!r} is a {type(t).__name__}, not a tensor (nor a LowRankTau).")
            if not t.is_floating_point():
                raise HfTaujpError(f"Task vector entry {k!r} has non-floating dtype {t.dtype}.")
            out[k] = t.detach()
        self._entries: dict[str, torch.Tensor | LowRankTau] = out
        self.base_model = base_model
        self.base_model_revision = base_model_revision
        self.base_fingerprint = base_fingerprint
        self.kind = kind
        self.task = task
        self.training: dict = dict(training or {})

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_state_dicts(
        cls,
        base_sd: Mapping[str, torch.Tensor],
        ft_sd: Mapping[str, torch.Tensor],
        *,
        keys: Iterable[str] | None = None,
        **meta,
    ) -> TaskVector:
        """τ[k] = ft_sd[k] − base_sd[k] for every floating key (or the given ``keys``), computed in the
        promoted dtype of the two. Keys in only one dict and shape mismatches raise ``HfTaujpError``."""
        names = list(keys) if keys is not None else [k for k, t in base_sd.items() if torch.is_tensor(t) and t.is_floating_point()]
        if keys is None:
            ft_float = {k for k, t in ft_sd.items() if torch.is_tensor(t) and t.is_floating_point()}
            extra = sorted(ft_float - set(names))
            if extra:
                raise HfTaujpError(f"Fine-tuned weights have {len(extra)} parameter(s) the base lacks: {_few(extra)}.")
        missing = [k for k in names if k not in ft_sd]
        if missing:
            raise HfTaujpError(f"Fine-tuned weights lack {len(missing)} base parameter(s): {_few(missing)}.")
        tensors = {}
        for k in names:
            b, f = base_sd[k], ft_sd[k]
            if tuple(b.shape) != tuple(f.shape):
                raise HfTaujpError(f"Shape mismatch for {k!r}: base {tuple(b.shape)} vs fine-tuned {tuple(f.shape)}.")
            dt = torch.promote_types(b.dtype, f.dtype)
            tensors[k] = f.detach().to(dt) - b.detach().to(device=f.device, dtype=dt)
        meta.setdefault("base_fingerprint", fingerprint(base_sd))
        return cls(tensors, **meta)

    @classmethod
    def from_models(cls, base: torch.nn.Module, finetuned: torch.nn.Module, **meta) -> TaskVector:
        """τ = θ_ft − θ0 over the base's ``named_parameters()`` (buffers are not part of τ)."""
        bp, fp = _params_of(base), dict(finetuned.named_parameters())
        meta.setdefault("base_model", _name_of(base))
        # transformers records the Hub commit a model was loaded from (None for local folders / random init).
        meta.setdefault("base_model_revision", getattr(getattr(base, "config", None), "_commit_hash", None))
        meta.setdefault("base_fingerprint", fingerprint(base))
        extra = sorted(set(fp) - set(bp))
        if extra:
            raise HfTaujpError(f"Fine-tuned model has {len(extra)} parameter(s) the base lacks: {_few(extra)}.")
        return cls.from_state_dicts(bp, fp, keys=list(bp), **meta)

    @classmethod
    def from_peft(cls, peft_model_or_adapter_dir, base: torch.nn.Module | None = None, *, adapter_name: str = "default",
                  factored: bool = False, **meta) -> TaskVector:
        """τ from a PEFT adapter (model in memory or saved folder / Hub repo).

        - peft_type ``"LINEARIZED"``: saved keys ``base_model.model.<module>.linearized_tau.<p>`` →
          ``<module>.<p>``, ``kind="linear"``. Low-rank (``LinearizedConfig(r=...)``): τ_weight = s·B·A
          (transposed for Conv1D / Embedding weights), rank ≤ r.
        - LoRA: the change ``merge_and_unload`` makes to each base weight (see ``hf_taujp.peft_conversion``):
          s·B·A with s = lora_alpha / r (``use_rslora``: lora_alpha / √r; Hu et al. 2021, Eq. 3;
          Kalajievic 2023), r / α per layer from ``rank_pattern`` / ``alpha_pattern``, laid out per layer
          (transposed for transformers' Conv1D, not for nn.Linear), embeddings, ``lora_bias``, trained
          biases and DoRA; key ``<module>.weight`` (and ``.bias``), ``kind="nonlinear"``.
        ``base``: the base model. Required for a saved LoRA adapter (the layer types decide the layout;
        a model built on the meta device is enough unless DoRA or trained biases need θ0's values); it
        also gives the fingerprint and checks names and shapes. A PEFT model in memory still holds θ0,
        so its layer types and fingerprint are taken from there when ``base`` is not given.
        A saved adapter is read with ``hub.resolve_pretrained_dir``: ``revision=``, ``token=`` and
        ``subfolder=`` (the adapter's folder inside the folder / repo, as PEFT's own) may be passed.

        ``factored=True`` (LoRA and low-rank LINEARIZED adapters): keep each low-rank weight as its factors,
        a :class:`LowRankTau` (A (r × in), B (out × r), s, layout) whose full tensor is bit for bit the
        ``factored=False`` one; saved and pushed as factors (size ∝ r). Entries that are not low-rank stay
        full tensors beside them: a modules_to_save head's h − h0, LoRA's ``lora_bias`` Δb = s·b_B and
        trained biases (``bias="all"`` / ``"lora_only"``).

        Raises ``HfTaujpError`` naming any LoRA variant or layer type it does not convert; with
        ``factored=True`` also for DoRA (W' − W is not low-rank) and a full-rank LINEARIZED adapter.
        """
        if not isinstance(factored, bool):
            raise HfTaujpError(f"factored must be True or False, got {factored!r}.")
        tensors, kind, meta = tensors_from_peft(peft_model_or_adapter_dir, base, adapter_name, meta, factored=factored)
        tv = cls(tensors, kind=kind, **meta)
        if base is not None:
            tv._check_against(_params_of(base), what="base model")
            if tv.base_fingerprint is None and not any(p.device.type == "meta" for p in base.parameters()):
                tv.base_fingerprint = fingerprint(base)  # a meta-device base has no values to fingerprint
        return tv

    # ---------------------------------------------------------------- mapping protocol
    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """``{name: full τ}``. Without factored entries this is the stored dict itself; with some, a read-only
        view that materialises each factored entry (``LowRankTau.full()``) on access, per tensor."""
        if any(isinstance(e, LowRankTau) for e in self._entries.values()):
            return _FullTensors(self._entries)
        return self._entries

    @property
    def entries(self) -> Mapping[str, torch.Tensor | LowRankTau]:
        """What the vector stores: ``{name: tensor or LowRankTau}`` (read-only)."""
        import types

        return types.MappingProxyType(self._entries)

    @property
    def factors(self) -> dict[str, LowRankTau]:
        """The factored entries ``{name: LowRankTau}`` (empty for a full vector)."""
        return {k: e for k, e in self._entries.items() if isinstance(e, LowRankTau)}

    @property
    def is_low_rank(self) -> bool:
        """True when at least one entry is stored as factors."""
        return any(isinstance(e, LowRankTau) for e in self._entries.values())

    @property
    def ranks(self) -> dict[str, int | None]:
        """``{name: r}`` of each entry: the factors' rank, None for an entry stored as a full tensor."""
        return {k: (e.rank if isinstance(e, LowRankTau) else None) for k, e in self._entries.items()}

    def to_dense(self) -> TaskVector:
        """The same τ with every entry a full tensor (``LowRankTau.full()``); a full vector is returned copied."""
        return self._with({k: (e.full() if isinstance(e, LowRankTau) else e.clone()) for k, e in self._entries.items()})

    def keys(self):
        return self.tensors.keys()

    def items(self):
        return self.tensors.items()

    def values(self):
        return self.tensors.values()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    @property
    def num_parameters(self) -> int:
        """Values stored: numel of full entries plus r·(in + out) per factored one (what the files hold)."""
        return sum(e.num_stored if isinstance(e, LowRankTau) else e.numel() for e in self._entries.values())

    @property
    def num_dense_parameters(self) -> int:
        """Entries of the full τ (Σ numel over every tensor, factored ones materialised or not)."""
        return sum(e.numel() for e in self._entries.values())

    @property
    def dtype(self) -> torch.dtype | None:
        dts = {t.dtype for t in self._entries.values()}
        return dts.pop() if len(dts) == 1 else (None if not dts else torch.float32)

    def metadata(self) -> dict:
        return {
            "base_model": self.base_model,
            "base_model_revision": self.base_model_revision,
            "base_fingerprint": self.base_fingerprint,
            "kind": self.kind,
            "task": self.task,
            "training": dict(self.training),
        }

    def _with(self, tensors, **changes) -> TaskVector:
        meta = self.metadata()
        meta.update(changes)
        return TaskVector(tensors, **meta)

    def to(self, *args, **kwargs) -> TaskVector:
        """Cast / move every tensor (same arguments as ``torch.Tensor.to``); factored entries cast their factors."""
        return self._with({k: t.to(*args, **kwargs) for k, t in self._entries.items()})

    def __repr__(self) -> str:
        lr = self.factors
        low = f", low_rank={len(lr)} (rank {_rank_text(lr)})" if lr else ""
        return (
            f"TaskVector(kind={self.kind!r}, task={self.task!r}, base_model={self.base_model!r}, "
            f"tensors={len(self)}, params={self.num_parameters}{low})"
        )

    # ---------------------------------------------------------------- compatibility
    def check_compatible(self, other) -> None:
        """Raise when ``other`` (TaskVector or model / state dict) cannot be combined with this vector.

        Kinds must be equal (``HfTaujpError``). Bases follow the one rule of :mod:`hf_taujp.compat`, the
        one merges use: fingerprints decide when both are known (``gpt2`` and ``/models/gpt2`` with the
        same weights agree), base model ids only when a fingerprint is missing
        (``BaseModelMismatchError``). For a model: its fingerprint must equal ``base_fingerprint``.
        """
        from .compat import check_same_base

        if isinstance(other, TaskVector):
            if self.kind != other.kind:
                raise HfTaujpError(
                    f"Cannot combine a {self.kind!r} task vector with a {other.kind!r} one: "
                    "weights and tangents of a linearized model live in different spaces."
                )
            check_same_base(self.metadata(), other.metadata(), hint=". Pass check_base=False to override.")
            return
        fp = fingerprint(other)
        if self.base_fingerprint and fp != self.base_fingerprint:
            raise BaseModelMismatchError(
                f"Task vector was made from base {self.base_model!r} (fingerprint {self.base_fingerprint}), "
                f"but the given model {_name_of(other) if isinstance(other, torch.nn.Module) else 'state dict'!r} "
                f"has fingerprint {fp}. Pass check_base=False to override."
            )

    def _check_against(self, params: Mapping[str, torch.Tensor], what: str) -> None:
        missing = [k for k in self._entries if k not in params]
        if missing:
            raise HfTaujpError(
                f"{len(missing)} task vector key(s) are not parameters of the {what}: {_few(missing)}."
            )
        for k, t in self._entries.items():  # shapes only: a factored entry is not materialised
            if tuple(params[k].shape) != tuple(t.shape):
                raise HfTaujpError(
                    f"Shape mismatch for {k!r}: task vector {tuple(t.shape)} vs {what} {tuple(params[k].shape)}."
                )

    # ---------------------------------------------------------------- arithmetic
    def _merged_meta(self, other: TaskVector) -> dict:
        return {
            "task": self.task if self.task == other.task else None,
            "training": self.training if self.training == other.training else {},
            "base_fingerprint": self.base_fingerprint or other.base_fingerprint,
            "base_model": self.base_model or other.base_model,
            "base_model_revision": self.base_model_revision or other.base_model_revision,
        }

    def add(self, other: TaskVector, *, check_base: bool = True) -> TaskVector:
        """τ_a + τ_b over the union of keys (a missing key counts as 0); ``check_base=False`` skips the
        base comparison (not the kind comparison)."""
        if not isinstance(other, TaskVector):
            raise HfTaujpError(f"Can only add a TaskVector, got {type(other).__name__}.")
        if check_base:
            self.check_compatible(other)
        elif self.kind != other.kind:
            raise HfTaujpError(f"Cannot combine a {self.kind!r} task vector with a {other.kind!r} one.")
        out = {}
        mine, theirs = self._entries, other._entries
        for k in list(mine) + [k for k in theirs if k not in mine]:
            a, b = mine.get(k), theirs.get(k)
            if a is None or b is None:
                out[k] = (a if b is None else b).clone()
                continue
            if tuple(a.shape) != tuple(b.shape):
                raise HfTaujpError(f"Shape mismatch for {k!r}: {tuple(a.shape)} vs {tuple(b.shape)}.")
            if isinstance(a, LowRankTau) and isinstance(b, LowRankTau):
                out[k] = low_rank_sum([(1.0, a), (1.0, b)])  # exact: factors concatenated, rank a.rank + b.rank
                continue
            a = a.full() if isinstance(a, LowRankTau) else a  # factored + full is full
            b = b.full() if isinstance(b, LowRankTau) else b
            dt = torch.promote_types(a.dtype, b.dtype)
            out[k] = a.to(dt) + b.to(device=a.device, dtype=dt)
        return self._with(out, **self._merged_meta(other))

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:
            return self._with({k: t.clone() for k, t in self._entries.items()})
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self.add(other)

    def __radd__(self, other):
        # sum([...]) starts from 0.
        return self.__add__(other)

    def __neg__(self) -> TaskVector:
        return self._with({k: -t for k, t in self._entries.items()})

    def __sub__(self, other):
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self.add(-other)

    def __mul__(self, scalar):
        if isinstance(scalar, torch.Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        # a factored entry scales its scalar s (exact); a full tensor is multiplied
        return self._with({k: (t.scaled(scalar) if isinstance(t, LowRankTau) else t * scalar) for k, t in self._entries.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return self * (1.0 / scalar)

    def dot(self, other: TaskVector) -> float:
        """⟨τ_a, τ_b⟩ = Σ_k Σ τ_a[k]·τ_b[k] over shared keys, accumulated in float64 (factored entries by
        the trace identities of :meth:`LowRankTau.dot`, without materialising them)."""
        self.check_compatible(other)
        s = 0.0
        for k, a in self._entries.items():
            b = other._entries.get(k)
            if b is not None:
                if tuple(a.shape) != tuple(b.shape):
                    raise HfTaujpError(f"Shape mismatch for {k!r}: {tuple(a.shape)} vs {tuple(b.shape)}.")
                if isinstance(a, LowRankTau):
                    s += a.dot(b)
                elif isinstance(b, LowRankTau):
                    s += b.dot(a)
                else:
                    s += float((a.double() * b.double().to(a.device)).sum())
        return s

    def norm(self) -> float:
        """‖τ‖₂ = sqrt(Σ_k ‖τ[k]‖²) over all tensors, accumulated in float64 (‖s·B·A‖² from the factors)."""
        return math.sqrt(sum(t.norm_sq() if isinstance(t, LowRankTau) else float(t.double().pow(2).sum())
                             for t in self._entries.values()))

    def cosine(self, other: TaskVector) -> float:
        """⟨τ_a, τ_b⟩ / (‖τ_a‖‖τ_b‖) (0 when either is zero)."""
        na, nb = self.norm(), other.norm()
        if na == 0 or nb == 0:
            return 0.0
        return self.dot(other) / (na * nb)

    # ---------------------------------------------------------------- application
    def apply_to(
        self,
        base: torch.nn.Module,
        alpha: float = 1.0,
        *,
        linear: bool | None = None,
        inplace: bool = False,
        check_base: bool = True,
    ) -> torch.nn.Module:
        """The model θ0 + α·τ under one of the two readings of τ.

        ``linear=False`` (the weight reading): a deep copy of ``base`` (``base`` itself when
        ``inplace=True``) whose parameters are θ0 + α·τ, computed in float32 and cast to each
        parameter's dtype. ``linear=True`` (the tangent reading): ``hf_taujp.linearize(copy,
        parameter_names=keys, tangents={k: α·τ[k]})``, i.e. f(x; θ0) + α·J f(x; θ0)·τ
        (Ortiz-Jiménez et al. 2023, Eq. 4). ``linear=None`` (default) takes the vector's own reading
        (``kind``). Either reading of either kind is allowed: the linear reading of a non-linear vector
        is Ortiz-Jiménez et al.'s diagnostic of how far fine-tuning left the tangent space, the weight
        reading of a linear vector is what ``merge_and_unload`` gives; a ``UserWarning`` says so when
        the reading differs from ``kind``. For a saveable linearized model use :meth:`to_peft`.
        The caller's ``base`` is never modified unless ``inplace=True``. A factored (low-rank) entry is
        applied as its full τ, materialised one tensor at a time. Raises on a different base
        (fingerprint), keys that are not base parameters, shape mismatches and NaN / inf entries.
        """
        if not isinstance(base, torch.nn.Module):
            raise HfTaujpError(f"apply_to expects a torch.nn.Module, got {type(base).__name__}.")
        linear = self._reading(linear, "apply_to")
        self._check_finite()
        if check_base:
            self.check_compatible(base)
        params = _params_of(base)
        self._check_against(params, what="base model")
        not_float = [k for k in self._entries if not params[k].is_floating_point()]
        if not_float:
            raise HfTaujpError(
                f"Base parameter(s) {_few(not_float)} have non-floating dtype {params[not_float[0]].dtype} "
                "(quantized or integer storage): θ0 + α·τ cannot be written into them; load the base in float."
            )
        model = base if inplace else copy.deepcopy(base)
        if linear:
            from .linearize import linearize

            tangents = {}
            mparams = _params_of(model)
            for k, t in self._full_items():
                p = mparams[k]
                tangents[k] = (alpha * t.to(device=p.device, dtype=torch.float32)).to(p.dtype)
            return linearize(model, parameter_names=list(self._entries), tangents=tangents)
        mparams = _params_of(model)
        with torch.no_grad():
            for k, t in self._full_items():
                p = mparams[k]
                new = p.detach().to(torch.float32) + alpha * t.to(device=p.device, dtype=torch.float32)
                p.copy_(new.to(p.dtype))
        return model

    def _check_finite(self) -> None:
        """``HfTaujpError`` naming the entries holding NaN / inf: full tensors and factors as stored (a
        factored entry is not materialised here; :meth:`_full_items` checks what it materialises)."""
        bad = [k for k, e in self._entries.items()
               if not (e.is_finite() if isinstance(e, LowRankTau) else bool(torch.isfinite(e).all()))]
        if bad:
            raise HfTaujpError(f"Task vector ({self.task or 'untitled'}) contain NaN or inf values in {len(bad)} "
                               f"tensor(s): {_few(bad)}.")

    def _full_items(self):
        """``(name, full τ)`` one at a time, a factored entry materialised just then (and checked finite: the
        float64 product of finite factors can still overflow the entry's dtype)."""
        for k, e in self._entries.items():
            if isinstance(e, LowRankTau):
                t = e.full()
                if not bool(torch.isfinite(t).all()):
                    raise HfTaujpError(f"Task vector entry {k!r}: s·B·A overflows {t.dtype} (inf after the cast).")
                yield k, t
            else:
                yield k, e

    def _reading(self, linear: bool | None, where: str) -> bool:
        if linear is None:
            return self.kind == "linear"
        if not isinstance(linear, bool):
            raise HfTaujpError(f"linear must be True, False or None (the vector's own reading), got {linear!r}.")
        if linear and self.kind != "linear":
            warnings.warn(
                f"{where}(linear=True) of a 'nonlinear' task vector (θ_ft − θ0): its tangent-space reading "
                "f(θ0) + J·ατ, the diagnostic of Ortiz-Jiménez et al. 2023, not the fine-tuned model θ0 + ατ.",
                UserWarning,
                stacklevel=3,
            )
        elif not linear and self.kind == "linear":
            warnings.warn(
                f"{where}(linear=False) of a 'linear' task vector (a tangent): its weight reading f(θ0 + ατ), "
                "as merge_and_unload gives, not the linearized model it was trained as.",
                UserWarning,
                stacklevel=3,
            )
        return linear

    def to_peft(
        self,
        base: torch.nn.Module,
        alpha: float = 1.0,
        *,
        task_type: str | None = None,
        adapter_name: str = "default",
        check_base: bool = True,
        low_rank: bool | None = None,
    ):
        """The tangent reading as a LINEARIZED PEFT model: f(x; θ0) + J f(x; θ0)·ατ, saveable.

        Returns ``peft.get_peft_model(copy of base, LinearizedConfig(...))`` with τ = α·(this vector):
        ``save_pretrained(dir)`` writes an ordinary adapter folder that
        ``peft.PeftModel.from_pretrained(base, dir)`` loads (after ``import hf_taujp``), and
        ``TaskVector.from_peft(dir)`` reads back as a ``"linear"`` vector. The linearized modules are the
        modules owning the vector's keys; their other parameters get τ = 0. ``task_type`` (PEFT's,
        e.g. ``"CAUSAL_LM"``, ``"SEQ_CLS"``) defaults to the one the base model's class implies. A
        ``"nonlinear"`` vector gives its linear reading, with a ``UserWarning`` as in :meth:`apply_to`.

        ``low_rank`` (default: whether the vector holds factored entries): ``True`` gives a low-rank adapter,
        ``LinearizedConfig(r=R)`` with R the largest rank of the entries, whose factors are set
        (``set_factors``) to the vector's: each entry's A and B padded with zero rows / columns up to R
        (exact), in the layer's layout (Conv1D / Embedding: the transposed one), the scale α·s carried by
        ``lora_alpha`` = |α·s|·R when every entry has the same |α·s| and that gives s back exactly (signs go
        into B), else folded into B with ``lora_alpha = R`` (s = 1; one float32 rounding of B). The adapter
        stores float32 factors. ``False``: a full-rank adapter holding the full τ (materialised per tensor).

        Raises like :meth:`apply_to` on another base, unknown keys, shapes and NaN / inf. With
        ``low_rank=True``, ``HfTaujpError`` (pointing at ``low_rank=False``) for entries stored as full
        tensors (a head's h − h0, biases), entries that are not a module's ``weight``, or a rank R above
        min(out, in) of a target (a sum of many factored vectors).
        """
        import peft

        from .tuners.linearized import LinearizedConfig

        if not isinstance(base, torch.nn.Module):
            raise HfTaujpError(f"to_peft expects a torch.nn.Module, got {type(base).__name__}.")
        if low_rank not in (None, True, False):
            raise HfTaujpError(f"low_rank must be True, False or None (whether the vector is factored), got {low_rank!r}.")
        self._reading(True, "to_peft")
        self._check_finite()
        if check_base:
            self.check_compatible(base)
        self._check_against(_params_of(base), what="base model")
        top = [k for k in self._entries if "." not in k]
        if top:
            raise HfTaujpError(f"Parameters {_few(top)} belong to the root module, which PEFT cannot target.")
        if self.is_low_rank if low_rank is None else low_rank:
            return self._to_low_rank_peft(base, alpha, task_type or _task_type_of(base), adapter_name)
        modules = sorted({k.rsplit(".", 1)[0] for k in self._entries})
        config = LinearizedConfig(
            task_type=task_type or _task_type_of(base),
            target_modules="(?:" + "|".join(re.escape(m) for m in modules) + ")",
        )
        pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name)
        names = pm.base_model.parameter_names(adapter_name)
        mparams = dict(pm.get_base_model().named_parameters())
        tangents = {}
        full = self.tensors
        for n in names:
            t = full.get(n)
            tangents[n] = torch.zeros_like(mparams[n]) if t is None else alpha * t.to(device=mparams[n].device, dtype=torch.float32)
        missing = [k for k in self._entries if k not in tangents]
        if missing:  # never drop a part of τ silently
            raise HfTaujpError(f"The LINEARIZED adapter would not cover {_few(missing)} (tied or shared parameters?).")
        with torch.no_grad():
            pm.base_model.set_tangents(tangents, adapter_name=adapter_name)
        return pm

    def to_lora(self, base: torch.nn.Module, r: int | None = None, *, energy: float | None = None,
                target_modules: str | list[str] | None = None, rest: str = "error", adapter_name: str = "default",
                task_type: str | None = "auto", allow_linear: bool = False, check_base: bool = True):
        """θ0 + τ as a PEFT LoRA adapter on (a deep copy of) ``base``: per 2-D target weight, ΔW = the best rank-k
        approximation of τ_W (truncated SVD, Eckart–Young), the analogue of ``mergekit-extract-lora``.

        Targets: the weights of ``base``'s ``nn.Linear``, transformers ``Conv1D`` (ΔW = (B·A)ᵀ, PEFT's
        fan_in_fan_out) and ``nn.Embedding`` (``lora_embedding_A`` / ``_B``) modules that τ holds (``target_modules``:
        PEFT's rule, a regex matched in full or a list of module-name suffixes). Factors A = √σ_k·V_kᵀ (k × in),
        B = U_k·√σ_k (out × k), lora_alpha = k per layer (s = 1), ``rank_pattern`` / ``alpha_pattern`` per layer.

        Rank rule, per tensor, one of: ``r`` (clamped to min(out, in): full rank, exact, recorded in
        ``rank_pattern``) or ``energy`` ∈ (0, 1] (the smallest k keeping that fraction of ‖τ_W‖_F²). Neither: a
        factored vector's stored factors become the adapter as they are. Full rank reproduces θ0 + τ.
        ``rest``: what to do with entries that are no LoRA factor (biases, norms, other layer types, tied weights):
        ``"error"`` (default: ``HfTaujpError`` naming each with its reason), ``"drop"``, or ``"save"`` (a LoRA layer's
        bias via PEFT's ``bias="lora_only"``, any other module whole in ``modules_to_save`` at θ0 + τ).
        ``task_type``: PEFT's; ``"auto"`` (default) the one the base class implies (as :meth:`to_peft`), ``None`` a
        plain ``PeftModel``. SEQ_CLS / TOKEN_CLS / QUESTION_ANS heads are saved whole by PEFT. A ``"linear"`` vector is refused unless ``allow_linear=True`` (a LoRA gives its weight
        reading f(θ0 + τ); :meth:`to_peft` gives the linearized model). hf_taujp/lora_extraction.py has the details.

        Returns a ``peft.PeftModel`` (``save_pretrained`` / ``PeftModel.from_pretrained(base, dir)``).
        Raises ``HfTaujpError`` for a bad rank rule, another base (``BaseModelMismatchError``), keys / shapes that
        are not the base's, NaN / inf, entries that are no LoRA factor (``rest="error"``), or no target at all.
        """
        from .lora_extraction import task_vector_to_lora

        return task_vector_to_lora(self, base, r, energy=energy, target_modules=target_modules, rest=rest,
                                   adapter_name=adapter_name,
                                   task_type=_task_type_of(base) if task_type == "auto" else task_type,
                                   allow_linear=allow_linear, check_base=check_base)

    def _to_low_rank_peft(self, base: torch.nn.Module, alpha: float, task_type: str, adapter_name: str):
        """:meth:`to_peft` with ``low_rank=True`` (see there)."""
        import peft

        from .tuners.linearized import LinearizedConfig

        hint = " Use to_peft(base, low_rank=False) for a full-rank LINEARIZED adapter holding the full τ."
        dense = [k for k, e in self._entries.items() if not isinstance(e, LowRankTau)]
        if dense:
            raise HfTaujpError(f"A low-rank LINEARIZED adapter holds factors only, but {_few(dense)} are stored as full "
                               f"tensors (a head's h − h0, biases).{hint}")
        factors = self.factors
        if not factors:
            raise HfTaujpError(f"to_peft(low_rank=True) of a vector without entries.{hint}")
        not_weight = [k for k in factors if not k.endswith(".weight")]
        if not_weight:
            raise HfTaujpError(f"Low-rank tangents sit on a module's weight; {_few(not_weight)} are not.{hint}")
        R = max(max(e.rank for e in factors.values()), 1)
        too_big = [k for k, e in factors.items() if R > min(e.shape)]
        if too_big:
            raise HfTaujpError(f"Rank {R} exceeds min(out, in) of {_few(too_big)} (shape "
                               f"{tuple(factors[too_big[0]].shape)}): a LinearizedConfig cannot have r above it.{hint}")
        coef = {k: float(alpha) * e.scale for k, e in factors.items()}
        mags = {abs(c) for c in coef.values()}
        c0 = mags.pop() if len(mags) == 1 else 0.0
        # s = lora_alpha / R: c0 when every |α·s| is that one positive number, else 1 with the scales in B
        modules = sorted(k[: -len(".weight")] for k in factors)
        config = LinearizedConfig(task_type=task_type, r=R, lora_alpha=c0 * R if c0 > 0 else float(R),
                                  target_modules="(?:" + "|".join(re.escape(m) for m in modules) + ")")
        pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name)
        have = pm.base_model.get_factors(adapter_name)
        if set(have) != set(factors):
            raise HfTaujpError(f"The low-rank adapter covers {_few(sorted(have))}, the vector {_few(sorted(factors))}.{hint}")
        # the adapter's own record of the weights stored (in, out) (Conv1D, Embedding): τ = (s·B·A)ᵀ there
        transposed = set(pm.peft_config[adapter_name].fan_in_fan_out_modules or [])
        new = {}
        for k, e in factors.items():
            A0, B0, s_ad = have[k]
            e = e.as_layout(k[: -len(".weight")] in transposed)
            A, B = torch.zeros_like(A0), torch.zeros_like(B0)
            A[: e.rank] = e.A.to(device=A.device, dtype=A.dtype)
            if abs(coef[k]) == s_ad:  # exact: the adapter's s is the entry's, the sign goes into B
                B[:, : e.rank] = (e.B if coef[k] > 0 else -e.B).to(device=B.device, dtype=B.dtype)
            else:  # one rounding of B: s_ad·B' = coef·B
                B[:, : e.rank] = (e.B.double() * (coef[k] / s_ad)).to(device=B.device, dtype=B.dtype)
            new[k] = (A, B)
        pm.base_model.set_factors(new, adapter_name=adapter_name)
        return pm

    # ---------------------------------------------------------------- Hub
    def _stored_tensors(self) -> dict[str, torch.Tensor]:
        """The safetensors content: full entries under their names, a factored entry ``<name>`` as
        ``<name>.lora_A`` (r × in) and ``<name>.lora_B`` (out × r). ``HfTaujpError`` when a full entry's name
        is also a factor key (the file could not tell them apart)."""
        out: dict[str, torch.Tensor] = {}
        for k, e in self._entries.items():
            if isinstance(e, LowRankTau):
                out[f"{k}.{FACTOR_KEYS[0]}"], out[f"{k}.{FACTOR_KEYS[1]}"] = e.A, e.B
        clash = [k for k, e in self._entries.items() if not isinstance(e, LowRankTau) and k in out]
        if clash:
            raise HfTaujpError(f"Entries {_few(clash)} have the names of another entry's saved factors; rename them.")
        out.update({k: e for k, e in self._entries.items() if not isinstance(e, LowRankTau)})
        return out

    def _config(self, stored: Mapping[str, torch.Tensor] | None = None) -> dict:
        stored = self._stored_tensors() if stored is None else stored
        dts = sorted({str(t.dtype).replace("torch.", "") for t in stored.values()})
        cfg = {
            "format": FORMAT,
            # version 1 for a full vector: an older hf-taujp reads it as before
            "format_version": FORMAT_VERSION if self.is_low_rank else 1,
            **self.metadata(),
            "dtype": dts[0] if len(dts) == 1 else dts,
            "num_parameters": self.num_parameters,
        }
        factors = self.factors
        if factors:
            cfg["num_dense_parameters"] = self.num_dense_parameters
            cfg["low_rank"] = {k: {"rank": e.rank, "scale": e.scale, "layout": e.layout, "shape": list(e.shape)}
                               for k, e in factors.items()}
        return cfg

    def model_card(self):
        """A ``huggingface_hub.ModelCard`` describing the vector (``hub.model_card``: base_model link, tags, summary)."""
        tags = ["task-vector", "task-arithmetic"]
        lam = self.training.get("taujp_lambda", self.training.get("lambda"))
        if isinstance(lam, (int, float)) and lam > 0:
            tags.append("taujp")
        if self.kind == "linear":
            tags.append("linearized")
        modules = sorted({k.rsplit(".", 1)[0] for k in self._entries})
        shown = ", ".join(f"`{m}`" for m in modules[:20]) + (f" and {len(modules) - 20} more" if len(modules) > 20 else "")
        training = "\n".join(f"- `{k}`: {v}" for k, v in sorted(self.training.items())) or "- (not recorded)"
        apply = "tv.apply_to(base, alpha=1.0, linear=True)" if self.kind == "linear" else "tv.apply_to(base, alpha=1.0)"
        base = f"`{self.base_model}`" if self.base_model else "a model without a Hub id"
        revision = f" (revision `{self.base_model_revision}`)" if self.base_model_revision else ""
        factors = self.factors
        if factors:
            storage = (f"- storage: low-rank, rank {_rank_text(factors)}: {len(factors)} of {len(self)} tensors kept as factors "
                       f"τ = s·B·A (`<name>.lora_A` r × in, `<name>.lora_B` out × r), {self.num_parameters:,} values "
                       "stored\n")
            tags.append("low-rank")
        else:
            storage = ""
        body = f"""A {"linearized (tangent-space)" if self.kind == "linear" else "weight-space"} task vector
τ for base model {base}{revision}, made with
hf-taujp (task arithmetic{", τJp-regularized" if "taujp" in tags else ""}).

- kind: `{self.kind}`
- norm ‖τ‖₂: {self.norm():.6g}
- parameters: {self.num_dense_parameters:,} in {len(self)} tensors
{storage}- base fingerprint: {f'`{self.base_fingerprint}`' if self.base_fingerprint else 'not recorded'}
- covered modules ({len(modules)}): {shown}

## Training settings
{training}

## Use
```python
from hf_taujp import TaskVector
tv = TaskVector.from_pretrained("<this repo>")
model = {apply}
```
"""
        return hub.model_card(f"Task vector{f': {self.task}' if self.task else ''}", body,
                              base_model=self.base_model, tags=tags)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> str:
        """Write config.json, task_vector[-0000i-of-0000n].safetensors (+ index) and README.md atomically.

        A factored entry ``<name>`` is written as its factors ``<name>.lora_A`` (r × in) and ``<name>.lora_B``
        (out × r), listed in config.json's ``low_rank`` (rank, scale, layout, shape; format_version 2), so the
        folder's size is ∝ r. Raises ``HfTaujpError`` for an empty vector, NaN / inf values (factors checked
        as stored) or a full entry named like another entry's factor."""
        self._check_finite()
        if not self._entries:
            raise HfTaujpError("Refusing to save an empty task vector.")
        import json

        stored = self._stored_tensors()
        save_directory = os.fspath(save_directory)
        with hub.atomic_dir(save_directory) as tmp:
            hub.save_safetensors_sharded(stored, tmp, PREFIX, max_shard_size=max_shard_size)
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(self._config(stored), f, indent=2, sort_keys=True)
            self.model_card().save(os.path.join(tmp, "README.md"))
        return save_directory

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        *,
        subfolder: str | None = None,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        device: str = "cpu",
    ) -> TaskVector:
        """Load a task vector from a folder or a Hub repo (only JSON / safetensors / card files are fetched).

        Args:
            repo_id_or_dir: a local folder or a Hub repo id.
            revision, token, cache_dir, local_files_only: as in huggingface_hub (Hub repos only).
            subfolder: the vector's folder inside the folder / repo, as transformers' ``subfolder=``: the
                recipes push one repo with ``<method>/<task>/`` folders, read back with
                ``subfolder="linear_ft/sst2"`` (``hf_taujp.hub.list_task_vectors`` lists them).
            device: where the tensors are loaded.

        Raises:
            ArtifactNotFoundError: no such folder / repo / revision / sub-folder, or the Hub unreachable
                (see ``hub.resolve_pretrained_dir``); a missing sub-folder's message lists the artifacts there.
            CorruptFileError: no ``config.json`` (the message lists the sub-folders holding task vectors
                when the root is not one but holds some, and points a PEFT adapter to :meth:`from_peft`),
                truncated / inconsistent files.
            HfTaujpError: a ``config.json`` of another format, a newer ``format_version``, NaN / inf entries.

        A factored vector (format_version 2, config.json ``low_rank``) loads as factors (``is_low_rank``),
        bit for bit as saved; a factor listed there but missing, or factors whose rank / shape / layout
        disagree with it, raise ``CorruptFileError``.
        """
        directory = hub.resolve_pretrained_dir(
            repo_id_or_dir, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
            subfolder=subfolder,
        )
        cfg = read_task_vector_config(directory, repo_id_or_dir, subfolder=subfolder, revision=revision, token=token)
        tensors = hub.load_safetensors(directory, PREFIX, device=device)
        n = sum(t.numel() for t in tensors.values())  # stored values: factors count r·(in + out)
        if cfg.get("num_parameters") is not None and int(cfg["num_parameters"]) != n:
            raise CorruptFileError(f"config.json says {cfg['num_parameters']} parameters, the files hold {n}.")
        declared = cfg.get("dtype")
        if declared is not None:
            declared = sorted([declared] if isinstance(declared, str) else declared)
            found = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
            if declared != found:
                raise CorruptFileError(f"config.json declares dtype {declared}, the safetensors files hold {found}.")
        where = hub._where(os.fspath(repo_id_or_dir), hub.normalize_subfolder(subfolder))
        hub.check_finite(tensors, what=f"Task vector loaded from {where}")
        entries = _entries_from_files(tensors, cfg, where)
        return cls(
            entries,
            base_model=cfg.get("base_model"),
            base_model_revision=cfg.get("base_model_revision"),
            base_fingerprint=cfg.get("base_fingerprint"),
            kind=cfg.get("kind", "nonlinear"),
            task=cfg.get("task"),
            training=cfg.get("training") or {},
        )

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload task vector with hf-taujp",
        revision: str | None = None,
        max_shard_size: int | str = "5GB",
        *,
        create_pr: bool = False,
        subfolder: str | None = None,
    ):
        """Save into a temporary folder and upload it in one commit (``hub.push_folder_to_hub``); returns the
        CommitInfo.

        ``revision``: the branch to push to; created from ``main`` when the repo lacks it, as transformers'
        ``push_to_hub`` does. ``create_pr``: open a pull request instead. ``subfolder``: the folder of the repo
        the vector goes to (``"linear_ft/sst2"``), next to what the repo already holds, read back with
        ``from_pretrained(repo_id, subfolder=...)``. Raises ``HfTaujpError`` for an empty or non-finite
        vector or a bad ``subfolder``; huggingface_hub's errors (authentication, permissions) propagate.
        """
        sub = hub.normalize_subfolder(subfolder)
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "task_vector")
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            return hub.push_folder_to_hub(
                folder, repo_id, private=private, token=token, commit_message=commit_message, revision=revision,
                create_pr=create_pr, subfolder=sub,
            )


def _rank_text(factors: Mapping[str, LowRankTau]) -> str:
    """``"16"`` or ``"8–32"``: the rank(s) of factored entries, for cards and reprs."""
    ranks = sorted({e.rank for e in factors.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"


def _entries_from_files(tensors: dict[str, torch.Tensor], cfg: Mapping[str, Any], where: str) -> dict:
    """The vector's entries from its loaded safetensors: the factors config.json's ``low_rank`` lists
    folded into :class:`LowRankTau` entries (``CorruptFileError`` when one is missing or disagrees)."""
    specs = factored_specs(dict(cfg))
    if not specs:
        return tensors
    if int(cfg.get("format_version", 1)) < 2:
        raise CorruptFileError(f"{where}: config.json lists low-rank factors but declares format_version "
                               f"{cfg.get('format_version', 1)} (factors need 2).")
    owner = {f"{n}.{k}": n for n in specs for k in FACTOR_KEYS}
    for name in specs:
        missing = [k for k in (f"{name}.{f}" for f in FACTOR_KEYS) if k not in tensors]
        if missing:
            raise CorruptFileError(f"{where}: config.json lists {name!r} as factored but the files lack {missing}.")
        if name in tensors:
            raise CorruptFileError(f"{where}: {name!r} is stored both as a full tensor and as factors.")
    out = {}
    for k, t in tensors.items():  # in the files' order, a factored entry where its first factor is
        name = owner.get(k)
        if name is None:
            out[k] = t
        elif name not in out:
            out[name] = factors_from(name, specs[name], tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"])
    return out


def read_task_vector_config(
    directory: str,
    source: str | os.PathLike | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    label: str | None = None,
) -> dict:
    """The ``config.json`` of the task vector in ``directory`` (a resolved local folder), checked.

    ``source`` (the folder or repo id the user gave, ``directory`` by default), ``subfolder`` and
    ``revision`` only word the errors: when ``directory`` is not a task vector, the sub-folders of
    ``source`` (below ``subfolder``) that hold task vectors are listed. ``label`` (``"vector 0"``) prefixes
    the message.

    Raises:
        UnsafeFileError: no config.json but pickle-based weights.
        CorruptFileError: no / unreadable config.json (with the sub-folder listing, or the hint to use
            :meth:`TaskVector.from_peft` for a PEFT adapter folder).
        HfTaujpError: a config.json of another format (a model's config, a Fisher's) or a ``format_version``
            newer than this hf-taujp.
    """
    source = directory if source is None else source
    sub = hub.normalize_subfolder(subfolder)
    where = (f"{label} " if label else "") + hub._where(os.fspath(source), sub, revision)
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        if os.path.isdir(directory):
            hub._refuse_pickles(directory, "Task vector")
        if os.path.isfile(os.path.join(directory, "adapter_config.json")):
            hint = " It holds a PEFT adapter: use TaskVector.from_peft(dir, base=...)."
        else:
            hint = hub.artifact_folders_hint(source, revision=revision, token=token, under=sub, kind="task vector")
        raise CorruptFileError(f"{where} has no config.json: not an hf-taujp task vector.{hint}")
    cfg = hub.read_json(cfg_path, what="task vector config")
    if cfg.get("format") != FORMAT:
        hint = hub.artifact_folders_hint(source, revision=revision, token=token, under=sub, kind="task vector")
        raise HfTaujpError(
            f"{where}: {cfg_path!r} declares format {cfg.get('format')!r}, expected {FORMAT!r}: not an hf-taujp "
            f"task vector.{hint}"
        )
    if int(cfg.get("format_version", 1)) > FORMAT_VERSION:
        raise HfTaujpError(f"Task vector format_version {cfg['format_version']} is newer than this hf-taujp ({FORMAT_VERSION}).")
    return cfg


def cosine_matrix(vectors: Iterable[TaskVector]) -> torch.Tensor:
    """C[i, j] = cos(τ_i, τ_j), a float64 T×T tensor (ones on the diagonal for nonzero vectors)."""
    vs = list(vectors)
    n = len(vs)
    norms = [v.norm() for v in vs]
    c = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            d = vs[i].dot(vs[j]) if i != j else norms[i] ** 2
            val = d / (norms[i] * norms[j]) if norms[i] and norms[j] else 0.0
            c[i, j] = c[j, i] = val
    return c
