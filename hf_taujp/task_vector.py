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
from .peft_conversion import tensors_from_peft

__all__ = ["TaskVector", "fingerprint", "cosine_matrix", "FORMAT", "FORMAT_VERSION", "PREFIX"]

FORMAT = "hf-taujp/task_vector"
FORMAT_VERSION = 1
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
        - LoRA: the change ``merge_and_unload`` makes to each base weight (see ``hf_taujp.peft_conversion``):
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
        tensors, kind, meta = tensors_from_peft(peft_model_or_adapter_dir, base, adapter_name, meta)
        tv = cls(tensors, kind=kind, **meta)
        if base is not None:
            tv._check_against(_params_of(base), what="base model")
            if tv.base_fingerprint is None and not any(p.device.type == "meta" for p in base.parameters()):
                tv.base_fingerprint = fingerprint(base)  # a meta-device base has no values to fingerprint
        return tv

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
            **self.metadata(),
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
