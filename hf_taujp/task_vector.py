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
"""

from __future__ import annotations

import copy
import hashlib
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

__all__ = ["TaskVector", "fingerprint", "cosine_matrix", "FORMAT", "FORMAT_VERSION", "PREFIX"]

FORMAT = "hf-taujp/task_vector"
FORMAT_VERSION = 1
PREFIX = "task_vector"
KINDS = ("nonlinear", "linear")
_SAMPLES_PER_TENSOR = 256


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------
def _state_of(model_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return dict(model_or_state_dict)
    raise HfTaujpError(f"Expected a torch.nn.Module or a state dict, got {type(model_or_state_dict).__name__}.")


def fingerprint(model_or_state_dict) -> str:
    """A short identifier of a set of base weights, equal for fp32 / bf16 / fp16 loads of them and for
    every way the same weights are listed (a model, its ``state_dict()``, ``named_parameters()``, a
    ``save_pretrained`` folder that dropped tied copies or buffers).

    For every floating tensor, the *signs* (x > 0) of up to 256 entries at deterministic evenly spaced
    flat positions are taken with its shape; the SHA-256 (first 32 hex digits, prefixed ``"tjp2-"``)
    is of the sorted set of these (shape, signs) keys. Signs survive rounding to any of these dtypes
    (only |x| < 3e-8 can flush to zero in fp16), whereas rounded values do not (double rounding
    fp32→fp16→bf16 differs from fp32→bf16 for about 1 value in 16). Names are not hashed and a repeated
    key counts once, so tied weights (GPT-2's lm_head / wte, T5's shared / embed_tokens, BERT's decoder /
    word embeddings) count once whichever name a source kept; tensors whose sampled signs are all
    equal (LayerNorm ones, zero biases, most buffers) and non-floating buffers carry no identity and
    are skipped. It tells different checkpoints apart (another pretraining, another seed, another
    architecture); it is not meant to tell θ0 from a slightly fine-tuned θ0.
    """
    state = _state_of(model_or_state_dict)
    keys: set[bytes] = set()
    for t in state.values():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and t.device.type != "meta"):
            continue
        flat = t.detach().reshape(-1)
        n = flat.numel()
        k = min(n, _SAMPLES_PER_TENSOR)
        idx = torch.div(torch.arange(k, dtype=torch.int64) * n, k, rounding_mode="floor").to(flat.device)
        signs = bytes((flat[idx] > 0).to("cpu", torch.uint8).tolist())
        if len(set(signs)) > 1:
            keys.add(repr(tuple(t.shape)).encode() + b"|" + signs)
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(len(key).to_bytes(4, "little"))
        h.update(key)
    return "tjp2-" + h.hexdigest()[:32]


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
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
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
            if not isinstance(t, torch.Tensor):
                raise HfTaujpError(f"Task vector entry {k!r} is a {type(t).__name__}, not a tensor.")
            if not t.is_floating_point():
                raise HfTaujpError(f"Task vector entry {k!r} has non-floating dtype {t.dtype}.")
            out[k] = t.detach()
        self.tensors: dict[str, torch.Tensor] = out
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
    def from_peft(cls, peft_model_or_adapter_dir, base: torch.nn.Module | None = None, *, adapter_name: str = "default", **meta) -> TaskVector:
        """τ from a PEFT adapter (model in memory or saved folder / Hub repo).

        - peft_type ``"LINEARIZED"``: saved keys ``base_model.model.<module>.linearized_tau.<p>`` →
          ``<module>.<p>``, ``kind="linear"``.
        - LoRA: the change ``merge_and_unload`` makes to each base weight (see ``_lora_from_state``):
          s·B·A with s = lora_alpha / r (``use_rslora``: lora_alpha / √r; Hu et al. 2021, Eq. 3;
          Kalajievic 2023), r / α per layer from ``rank_pattern`` / ``alpha_pattern``, laid out per layer
          (transposed for transformers' Conv1D, not for nn.Linear), embeddings, ``lora_bias``, trained
          biases and DoRA; key ``<module>.weight`` (and ``.bias``), ``kind="nonlinear"``.
        ``base``: the base model. Required for a saved LoRA adapter (the layer types decide the layout;
        a model built on the meta device is enough unless DoRA or trained biases need θ0's values); it
        also gives the fingerprint and checks names and shapes. A PEFT model in memory still holds θ0,
        so its layer types and fingerprint are taken from there when ``base`` is not given.
        Raises ``HfTaujpError`` naming any LoRA variant or layer type it does not convert.
        """
        from .hub import read_json

        obj = peft_model_or_adapter_dir
        live = None
        if isinstance(obj, (str, os.PathLike)):
            directory = hub.resolve_pretrained_dir(obj, revision=meta.pop("revision", None), token=meta.pop("token", None))
            config = read_json(os.path.join(directory, "adapter_config.json"), what="adapter config")
            sd = hub.load_safetensors(directory, "adapter_model")
        elif isinstance(obj, torch.nn.Module) and hasattr(obj, "peft_config"):
            if adapter_name not in obj.peft_config:
                raise HfTaujpError(f"Adapter {adapter_name!r} not in the PEFT model (has {sorted(obj.peft_config)}).")
            live = obj
            pc = obj.peft_config[adapter_name]
            config = pc.to_dict() if hasattr(pc, "to_dict") else dict(vars(pc))
            sd = cls._peft_state(obj, config, adapter_name)
            # bias="all" / "lora_only" train θ0's own biases in place: the live model no longer holds θ0.
            if base is None and "base_fingerprint" not in meta and config.get("bias", "none") == "none":
                base_sd = _peft_base_state(obj)
                if base_sd is not None:
                    meta["base_fingerprint"] = fingerprint(base_sd)
        else:
            raise HfTaujpError(f"from_peft expects a PeftModel or an adapter folder / repo id, got {type(obj).__name__}.")
        peft_type = str(config.get("peft_type", "")).split(".")[-1].upper()
        meta.setdefault("base_model", config.get("base_model_name_or_path"))
        meta.setdefault("base_model_revision", config.get("revision"))
        if peft_type == "LINEARIZED":
            tensors, kind = _linearized_from_state(sd), "linear"
        elif peft_type == "LORA":
            tensors, kind = _lora_from_state(sd, config, base if base is not None else live), "nonlinear"
        else:
            raise HfTaujpError(f"Unsupported PEFT type {peft_type!r}: from_peft handles LINEARIZED and LORA adapters.")
        if not tensors:
            raise HfTaujpError("The adapter holds no tensors to turn into a task vector.")
        tv = cls(tensors, kind=kind, **meta)
        if base is not None:
            tv._check_against(_params_of(base), what="base model")
            if tv.base_fingerprint is None and not any(p.device.type == "meta" for p in base.parameters()):
                tv.base_fingerprint = fingerprint(base)  # a meta-device base has no values to fingerprint
        return tv

    @staticmethod
    def _peft_state(model, config, adapter_name) -> dict[str, torch.Tensor]:
        # Reproduce the saved key format (adapter name stripped) from the live parameters, so that
        # the in-memory and the saved adapter follow one conversion path.
        peft_type = str(config.get("peft_type", "")).split(".")[-1].upper()
        marker = {"LINEARIZED": "linearized_tau", "LORA": None}.get(peft_type)
        out = {}
        if marker is None:
            from peft.utils import get_peft_model_state_dict

            return {k: v.detach() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()}
        for name, p in model.named_parameters():
            token = f".{marker}.{adapter_name}."
            if token in name:
                out[name.replace(token, f".{marker}.")] = p.detach()
        if peft_type == "LINEARIZED":
            # modules_to_save (e.g. a classification head) are trained normally: their task-vector entry is h − h0,
            # read off PEFT's wrapper, which keeps h0 as `original_module` and h as `modules_to_save[adapter]`.
            from peft.utils.other import ModulesToSaveWrapper

            for path, module in model.named_modules():
                if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                    h0 = dict(module.original_module.named_parameters())
                    for pname, h in module.modules_to_save[adapter_name].named_parameters():
                        out[f"{path}.{_SAVED_DELTA}.{pname}"] = (h - h0[pname]).detach()
        return out

    # ---------------------------------------------------------------- mapping protocol
    def keys(self):
        return self.tensors.keys()

    def items(self):
        return self.tensors.items()

    def values(self):
        return self.tensors.values()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def dtype(self) -> torch.dtype | None:
        dts = {t.dtype for t in self.tensors.values()}
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
        """Cast / move every tensor (same arguments as ``torch.Tensor.to``)."""
        return self._with({k: t.to(*args, **kwargs) for k, t in self.tensors.items()})

    def __repr__(self) -> str:
        return (
            f"TaskVector(kind={self.kind!r}, task={self.task!r}, base_model={self.base_model!r}, "
            f"tensors={len(self)}, params={self.num_parameters})"
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
        missing = [k for k in self.tensors if k not in params]
        if missing:
            raise HfTaujpError(
                f"{len(missing)} task vector key(s) are not parameters of the {what}: {_few(missing)}."
            )
        for k, t in self.tensors.items():
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
        for k in list(self.tensors) + [k for k in other.tensors if k not in self.tensors]:
            a, b = self.tensors.get(k), other.tensors.get(k)
            if a is None or b is None:
                out[k] = (a if b is None else b).clone()
                continue
            if a.shape != b.shape:
                raise HfTaujpError(f"Shape mismatch for {k!r}: {tuple(a.shape)} vs {tuple(b.shape)}.")
            dt = torch.promote_types(a.dtype, b.dtype)
            out[k] = a.to(dt) + b.to(device=a.device, dtype=dt)
        return self._with(out, **self._merged_meta(other))

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:
            return self._with({k: t.clone() for k, t in self.tensors.items()})
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self.add(other)

    def __radd__(self, other):
        # sum([...]) starts from 0.
        return self.__add__(other)

    def __neg__(self) -> TaskVector:
        return self._with({k: -t for k, t in self.tensors.items()})

    def __sub__(self, other):
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self.add(-other)

    def __mul__(self, scalar):
        if isinstance(scalar, torch.Tensor) and scalar.numel() == 1:
            scalar = scalar.item()
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return self._with({k: t * scalar for k, t in self.tensors.items()})

    __rmul__ = __mul__

    def __truediv__(self, scalar):
        return self * (1.0 / scalar)

    def dot(self, other: TaskVector) -> float:
        """⟨τ_a, τ_b⟩ = Σ_k Σ τ_a[k]·τ_b[k] over shared keys, accumulated in float64."""
        self.check_compatible(other)
        s = 0.0
        for k, a in self.tensors.items():
            b = other.tensors.get(k)
            if b is not None:
                if a.shape != b.shape:
                    raise HfTaujpError(f"Shape mismatch for {k!r}: {tuple(a.shape)} vs {tuple(b.shape)}.")
                s += float((a.double() * b.double().to(a.device)).sum())
        return s

    def norm(self) -> float:
        """‖τ‖₂ = sqrt(Σ_k ‖τ[k]‖²) over all tensors, accumulated in float64."""
        return math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.tensors.values()))

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
        The caller's ``base`` is never modified unless ``inplace=True``. Raises on a different base
        (fingerprint), keys that are not base parameters, shape mismatches and NaN / inf entries.
        """
        if not isinstance(base, torch.nn.Module):
            raise HfTaujpError(f"apply_to expects a torch.nn.Module, got {type(base).__name__}.")
        linear = self._reading(linear, "apply_to")
        hub.check_finite(self.tensors, what=f"Task vector ({self.task or 'untitled'})")
        if check_base:
            self.check_compatible(base)
        params = _params_of(base)
        self._check_against(params, what="base model")
        not_float = [k for k in self.tensors if not params[k].is_floating_point()]
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
            for k, t in self.tensors.items():
                p = mparams[k]
                tangents[k] = (alpha * t.to(device=p.device, dtype=torch.float32)).to(p.dtype)
            return linearize(model, parameter_names=list(self.tensors), tangents=tangents)
        mparams = _params_of(model)
        with torch.no_grad():
            for k, t in self.tensors.items():
                p = mparams[k]
                new = p.detach().to(torch.float32) + alpha * t.to(device=p.device, dtype=torch.float32)
                p.copy_(new.to(p.dtype))
        return model

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
    ):
        """The tangent reading as a LINEARIZED PEFT model: f(x; θ0) + J f(x; θ0)·ατ, saveable.

        Returns ``peft.get_peft_model(copy of base, LinearizedConfig(...))`` with τ = α·(this vector):
        ``save_pretrained(dir)`` writes an ordinary adapter folder that
        ``peft.PeftModel.from_pretrained(base, dir)`` loads (after ``import hf_taujp``), and
        ``TaskVector.from_peft(dir)`` reads back as a ``"linear"`` vector. The linearized modules are the
        modules owning the vector's keys; their other parameters get τ = 0. ``task_type`` (PEFT's,
        e.g. ``"CAUSAL_LM"``, ``"SEQ_CLS"``) defaults to the one the base model's class implies. A
        ``"nonlinear"`` vector gives its linear reading, with a ``UserWarning`` as in :meth:`apply_to`.
        Raises like :meth:`apply_to` on another base, unknown keys, shapes and NaN / inf.
        """
        import peft

        from .tuners.linearized import LinearizedConfig

        if not isinstance(base, torch.nn.Module):
            raise HfTaujpError(f"to_peft expects a torch.nn.Module, got {type(base).__name__}.")
        self._reading(True, "to_peft")
        hub.check_finite(self.tensors, what=f"Task vector ({self.task or 'untitled'})")
        if check_base:
            self.check_compatible(base)
        self._check_against(_params_of(base), what="base model")
        top = [k for k in self.tensors if "." not in k]
        if top:
            raise HfTaujpError(f"Parameters {_few(top)} belong to the root module, which PEFT cannot target.")
        modules = sorted({k.rsplit(".", 1)[0] for k in self.tensors})
        config = LinearizedConfig(
            task_type=task_type or _task_type_of(base),
            target_modules="(?:" + "|".join(re.escape(m) for m in modules) + ")",
        )
        pm = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name)
        names = pm.base_model.parameter_names(adapter_name)
        mparams = dict(pm.get_base_model().named_parameters())
        tangents = {}
        for n in names:
            t = self.tensors.get(n)
            tangents[n] = torch.zeros_like(mparams[n]) if t is None else alpha * t.to(device=mparams[n].device, dtype=torch.float32)
        missing = [k for k in self.tensors if k not in tangents]
        if missing:  # never drop a part of τ silently
            raise HfTaujpError(f"The LINEARIZED adapter would not cover {_few(missing)} (tied or shared parameters?).")
        with torch.no_grad():
            pm.base_model.set_tangents(tangents, adapter_name=adapter_name)
        return pm

    # ---------------------------------------------------------------- Hub
    def _config(self) -> dict:
        dts = sorted({str(t.dtype).replace("torch.", "") for t in self.tensors.values()})
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model,
            "base_model_revision": self.base_model_revision,
            "base_fingerprint": self.base_fingerprint,
            "kind": self.kind,
            "task": self.task,
            "training": self.training,
            "dtype": dts[0] if len(dts) == 1 else dts,
            "num_parameters": self.num_parameters,
        }

    def model_card(self):
        """A ``huggingface_hub.ModelCard`` describing the vector (``hub.model_card``: base_model link, tags, summary)."""
        tags = ["task-vector", "task-arithmetic"]
        lam = self.training.get("taujp_lambda", self.training.get("lambda"))
        if isinstance(lam, (int, float)) and lam > 0:
            tags.append("taujp")
        if self.kind == "linear":
            tags.append("linearized")
        modules = sorted({k.rsplit(".", 1)[0] for k in self.tensors})
        shown = ", ".join(f"`{m}`" for m in modules[:20]) + (f" and {len(modules) - 20} more" if len(modules) > 20 else "")
        training = "\n".join(f"- `{k}`: {v}" for k, v in sorted(self.training.items())) or "- (not recorded)"
        apply = "tv.apply_to(base, alpha=1.0, linear=True)" if self.kind == "linear" else "tv.apply_to(base, alpha=1.0)"
        base = f"`{self.base_model}`" if self.base_model else "a model without a Hub id"
        revision = f" (revision `{self.base_model_revision}`)" if self.base_model_revision else ""
        body = f"""A {"linearized (tangent-space)" if self.kind == "linear" else "weight-space"} task vector
τ for base model {base}{revision}, made with
hf-taujp (task arithmetic{", τJp-regularized" if "taujp" in tags else ""}).

- kind: `{self.kind}`
- norm ‖τ‖₂: {self.norm():.6g}
- parameters: {self.num_parameters:,} in {len(self)} tensors
- base fingerprint: {f'`{self.base_fingerprint}`' if self.base_fingerprint else 'not recorded'}
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
        """Write config.json, task_vector[-0000i-of-0000n].safetensors (+ index) and README.md atomically."""
        hub.check_finite(self.tensors, what=f"Task vector ({self.task or 'untitled'})")
        if not self.tensors:
            raise HfTaujpError("Refusing to save an empty task vector.")
        import json

        save_directory = os.fspath(save_directory)
        with hub.atomic_dir(save_directory) as tmp:
            hub.save_safetensors_sharded(self.tensors, tmp, PREFIX, max_shard_size=max_shard_size)
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(self._config(), f, indent=2, sort_keys=True)
            self.model_card().save(os.path.join(tmp, "README.md"))
        return save_directory

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_dir: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        *,
        cache_dir: str | None = None,
        local_files_only: bool = False,
        device: str = "cpu",
    ) -> TaskVector:
        """Load a task vector from a folder or a Hub repo (only JSON / safetensors / card files are fetched)."""
        directory = hub.resolve_pretrained_dir(
            repo_id_or_dir, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
        )
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_path):
            hub._refuse_pickles(directory, "Task vector")
            hint = (" It holds a PEFT adapter: use TaskVector.from_peft(dir, base=...)."
                    if os.path.isfile(os.path.join(directory, "adapter_config.json")) else "")
            raise CorruptFileError(f"{os.fspath(repo_id_or_dir)!r} has no config.json: not an hf-taujp task vector.{hint}")
        cfg = hub.read_json(cfg_path, what="task vector config")
        if cfg.get("format") != FORMAT:
            raise HfTaujpError(
                f"{cfg_path!r} declares format {cfg.get('format')!r}, expected {FORMAT!r}: not an hf-taujp task vector."
            )
        if int(cfg.get("format_version", 1)) > FORMAT_VERSION:
            raise HfTaujpError(f"Task vector format_version {cfg['format_version']} is newer than this hf-taujp ({FORMAT_VERSION}).")
        tensors = hub.load_safetensors(directory, PREFIX, device=device)
        n = sum(t.numel() for t in tensors.values())
        if cfg.get("num_parameters") is not None and int(cfg["num_parameters"]) != n:
            raise CorruptFileError(f"config.json says {cfg['num_parameters']} parameters, the files hold {n}.")
        declared = cfg.get("dtype")
        if declared is not None:
            declared = sorted([declared] if isinstance(declared, str) else declared)
            found = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
            if declared != found:
                raise CorruptFileError(f"config.json declares dtype {declared}, the safetensors files hold {found}.")
        hub.check_finite(tensors, what=f"Task vector loaded from {os.fspath(repo_id_or_dir)!r}")
        return cls(
            tensors,
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
    ):
        """Save into a temporary folder and upload it (``hub.push_folder_to_hub``); returns the CommitInfo."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "task_vector")
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            return hub.push_folder_to_hub(
                folder, repo_id, private=private, token=token, commit_message=commit_message, revision=revision
            )


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


# --------------------------------------------------------------------------------------------
# PEFT conversion
# --------------------------------------------------------------------------------------------
_PEFT_PREFIX = "base_model.model."


def _strip(key: str) -> str:
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def _peft_base_state(peft_model) -> dict[str, torch.Tensor] | None:
    """θ0 as the plain base model's state dict, read from inside a PEFT model (LoRA wraps layers as
    ``<m>.base_layer``; linearized τ sits in ``<m>.linearized_tau``). None when the layout is not
    recognised (e.g. ``modules_to_save`` copies), so no wrong fingerprint is ever recorded."""
    inner = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    out = {}
    for k, v in inner.state_dict().items():
        if ".linearized_tau." in k or re.search(r"(^|\.)lora_[A-Za-z_]+\.", k):
            continue
        if "modules_to_save" in k or "original_module" in k:
            return None
        out[k.replace(".base_layer.", ".")] = v
    return out


_SAVED_DELTA = "modules_to_save_delta"  # in-memory marker of h − h0 for a LINEARIZED adapter's modules_to_save


def _linearized_from_state(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    full = []
    for k, t in sd.items():
        marker = ".linearized_tau." if ".linearized_tau." in k else f".{_SAVED_DELTA}." if f".{_SAVED_DELTA}." in k else None
        if marker is None:
            full.append(k)
            continue
        module, pname = _strip(k).split(marker, 1)
        out[f"{module}.{pname}" if module else pname] = t.detach().clone()
    if full:
        raise HfTaujpError(
            f"The LINEARIZED adapter holds full weights {full[:3]} (its modules_to_save, e.g. a classification head), "
            "not deltas: a task vector needs h − h0. Load the adapter (peft.PeftModel.from_pretrained(base, folder)) "
            "and call TaskVector.from_peft on that model, which reads h0 from the base."
        )
    return out


def _pattern_value(module: str, patterns: Mapping[str, Any] | None, default):
    # PEFT's get_pattern_key: a pattern matches a module path by full regex match on a suffix.
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return val
    return default


# LoraConfig fields that change what merge_and_unload computes beyond W + s·B·A (+ the bias / DoRA
# rules below), or that move θ0 itself at initialisation: refused by name, never silently ignored.
_LORA_UNSUPPORTED = {
    "use_qalora": "QALoRA", "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow", "use_bdlora": "BD-LoRA",
    "kasa_config": "KaSA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)", "modules_to_save": "modules_to_save",
    "megatron_config": "Megatron layers", "loftq_config": "LoftQ (θ0 is replaced at initialisation)",
    "corda_config": "CorDA (θ0 is replaced at initialisation)", "lora_ga_config": "LoRA-GA (θ0 is replaced at initialisation)",
}


def _layer_kind(module: torch.nn.Module) -> str:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d_t"  # weight stored (in, out): PEFT sets fan_in_fan_out=True for it whatever the config says
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return type(module).__name__


def _lora_layers(model: torch.nn.Module, modules: Iterable[str]) -> dict[str, tuple[str, torch.nn.Module]]:
    """``{module path: (kind, base layer)}`` from a plain base model or a live PEFT model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for m in modules:
        try:
            mod = inner.get_submodule(m)
        except AttributeError:
            raise HfTaujpError(f"LoRA module {m!r} is not a module of the given base model.") from None
        if hasattr(mod, "get_base_layer"):
            mod = mod.get_base_layer()
        out[m] = (_layer_kind(mod), mod)
    return out


def _lora_from_state(
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], model: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """τ of a LoRA adapter, as PEFT's ``merge_and_unload`` writes it into the base (PEFT 0.21 ``lora/layer.py``).

    Per layer, with s = α/r (``use_rslora``: α/√r; r and α from ``rank_pattern`` / ``alpha_pattern``):
    - ``nn.Linear``: ΔW = s·B·A, shape (out, in); transformers' ``Conv1D`` (GPT-2; weight (in, out)):
      (s·B·A)ᵀ. PEFT picks the orientation per layer from the layer type, so ``model`` is required.
    - ``nn.Embedding``: ΔW = s·(B_e·A_e)ᵀ, shape (num_embeddings, dim).
    - ``lora_bias=True``: Δb = s·b_B (the bias of lora_B).
    - DoRA (Liu et al. 2024, Eq. 5): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_c, the norm taken per output row of
      the (out, in) matrix (per embedding dimension for embeddings); τ = W' − W needs θ0 from ``model``.
    - ``bias="all"`` / ``"lora_only"``: the saved biases are full values; Δb = b_saved − b_0.
    ``model``: the base model or a live PEFT model (layer types, and θ0 for DoRA / biases). Convolution,
    MultiheadAttention and parameter-targeting LoRA layers, and the variants in ``_LORA_UNSUPPORTED``,
    are refused by name.
    """
    for key, name in _LORA_UNSUPPORTED.items():
        if config.get(key):
            raise HfTaujpError(f"LoRA adapters using {name} ({key}={config[key]!r}) are not supported by from_peft.")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise HfTaujpError(
            f"init_lora_weights={init!r} replaces θ0 at initialisation; the adapter is not a delta of the original "
            "base. Convert it with PEFT's path_initial_model_for_weight_conversion first."
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        stripped = _strip(k)
        m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B|"
                         r"lora_magnitude_vector(?:\.weight)?)", stripped)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2).replace(".weight", "") if "magnitude" in m.group(2) else m.group(2)] = t
        elif stripped.endswith(".bias") and config.get("bias", "none") != "none" and "lora_" not in stripped:
            biases[stripped.replace(".base_layer.", ".")] = t
        else:
            raise HfTaujpError(
                f"LoRA adapter key {k!r} is neither a LoRA factor nor a trained bias: not supported by from_peft."
            )
    if model is None:
        raise HfTaujpError(
            "A LoRA adapter needs base= (the base model; one built on the meta device from its config suffices "
            "unless the adapter uses DoRA or trains biases): PEFT transposes ΔW for transformers' Conv1D layers "
            "(GPT-2) and not for nn.Linear, per layer, and the saved adapter does not record which layer is which."
        )
    layers = _lora_layers(model, parts)
    out: dict[str, torch.Tensor] = {}
    for module, p in parts.items():
        kind, layer = layers[module]
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        a, b = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if emb else (p.get("lora_A.weight"), p.get("lora_B.weight"))
        if a is None or b is None:
            raise CorruptFileError(f"LoRA module {module!r} lacks its A or B factor (has {sorted(p)}).")
        if kind not in ("linear", "conv1d_t", "embedding") or (kind == "embedding") != emb or a.dim() != 2:
            raise HfTaujpError(
                f"LoRA module {module!r} wraps a {kind} layer: from_peft supports LoRA on nn.Linear, transformers' "
                "Conv1D and nn.Embedding (convolution / MultiheadAttention LoRA layers are not supported)."
            )
        r = _pattern_value(module, config.get("rank_pattern"), config.get("r"))
        alpha = _pattern_value(module, config.get("alpha_pattern"), config.get("lora_alpha"))
        if r != a.shape[0]:
            raise CorruptFileError(f"LoRA module {module!r}: config rank {r} but A has shape {tuple(a.shape)}.")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        dt = torch.promote_types(a.dtype, b.dtype)
        delta_oi = (b.double() @ a.double()) * scale  # (out, in) for Linear / Conv1D; (dim, num_embeddings) for Embedding
        delta = delta_oi.T if kind in ("conv1d_t", "embedding") else delta_oi  # stored orientation of the weight
        w = layer.weight
        if tuple(delta.shape) != tuple(w.shape):
            raise HfTaujpError(f"LoRA module {module!r}: ΔW has shape {tuple(delta.shape)}, the base weight {tuple(w.shape)}.")
        if "lora_magnitude_vector" in p:
            if w.device.type == "meta":
                raise HfTaujpError(f"DoRA module {module!r} needs the base weights (base= is on the meta device).")
            w0 = w.detach().double().to(delta.device)
            mag = p["lora_magnitude_vector"].double().to(delta.device)
            full = w0 + delta
            if kind == "linear":
                new = (mag / full.norm(dim=1)).view(-1, 1) * full
            else:  # Conv1D (in, out) and Embedding (num, dim): one norm per column of the stored weight
                new = (mag / full.norm(dim=0)).view(1, -1) * full
            delta = new - w0
        out[f"{module}.weight"] = delta.to(dt).contiguous()
        if "lora_B.bias" in p:
            out[f"{module}.bias"] = (p["lora_B.bias"].double() * scale).to(dt)
    if biases and hasattr(model, "get_base_model"):
        raise HfTaujpError(
            f"bias={config.get('bias')!r} trains the base model's own biases in place, so the PEFT model no longer "
            "holds their θ0 values: pass base= (the original base model)."
        )
    params = _params_of(model)
    for name, saved in biases.items():
        base_b = params.get(name, params.get(name.rsplit(".", 1)[0] + ".base_layer.bias"))
        if base_b is None or base_b.device.type == "meta":
            raise HfTaujpError(f"Trained bias {name!r} (bias={config.get('bias')!r}) needs its θ0 value from base=.")
        if name in out:
            raise HfTaujpError(f"Bias {name!r} is trained both as lora_bias and as bias={config.get('bias')!r}.")
        out[name] = (saved.double() - base_b.detach().double().to(saved.device)).to(saved.dtype)
    return out
