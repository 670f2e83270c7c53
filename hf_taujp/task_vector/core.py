"""The :class:`TaskVector` class: construction (from state dicts, models, PEFT adapters), the mapping
protocol over its entries (full or factored), metadata, and the base-compatibility rule.

Its other methods come from mixins, one concept each: arithmetic (:mod:`.arithmetic`), application to a
base model (:mod:`.application`), PEFT adapters (:mod:`.peft_adapters`), the Hub artifact
(:mod:`.serialization`). The rules of the whole class are in the docstring of :mod:`hf_taujp.task_vector`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..errors import BaseModelMismatchError, HfTaujpError
from ..fingerprints import fingerprint
from ..low_rank_tau import LowRankTau
from ..peft_conversion import tensors_from_peft
from .application import TaskVectorApplication
from .arithmetic import TaskVectorArithmetic
from .entries import _FullTensors, _few, _name_of, _params_of, _rank_text
from .peft_adapters import TaskVectorPeftAdapters
from .serialization import TaskVectorSerialization

KINDS = ("nonlinear", "linear")


# --------------------------------------------------------------------------------------------
# TaskVector
# --------------------------------------------------------------------------------------------
class TaskVector(TaskVectorArithmetic, TaskVectorApplication, TaskVectorPeftAdapters, TaskVectorSerialization):
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
        from ..compat import check_same_base

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
