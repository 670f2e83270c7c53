"""``LinearizedModel``: the PEFT tuner that evaluates f_lin(x; θ0 + τ) = f(x; θ0) + J f(x; θ0)·τ.

Unlike LoRA-style tuners nothing is computed layer by layer: the forward is one forward-mode pass
of the whole model (:func:`hf_taujp.linearize.linearized_forward`) with θ0 as primal and τ as
tangent. τ is stored beside each base parameter (see ``layer.py``); PEFT's key-based machinery
(save / load, trainable parameters, adapter switching) is implemented here for that layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ...errors import HfTaujpError
from ...linearize import (
    _accepts,
    _generate,
    _set_tangents,
    add_outputs,
    linearized_forward,
    match_parameter_names,
    prepare_linearized_inputs,
    refuse_sharded,
    with_loss,
)
from ...low_rank import LowRankFactors, layer_kind, low_rank_scaling, weight_layout
from ...low_rank_tau import LowRankTau
from . import layer
from .config import LinearizedConfig
from .layer import TAU_ATTR

_TASK_TYPES = "CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS or FEATURE_EXTRACTION"


class LinearizedModel(BaseTuner):
    """PEFT tuner for :class:`LinearizedConfig`: f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0)·τ.

    Build it through ``peft.get_peft_model(model, LinearizedConfig(task_type=...))``. θ0 is frozen;
    τ (zero at creation, so the model starts equal to the base model) is the adapter. The forward
    returns the base model's output class with every floating output replaced by primal + tangent;
    with ``labels`` (or CLIP's ``return_loss``) ``loss`` is the task loss *of the linearized
    outputs*. Cost: ≈ 5/3 the matmul FLOPs of an ordinary training step when everything is linearized
    (measured ≈ 1.8–1.9× CPU time on GPT-2 small; see :mod:`hf_taujp.linearize`).

    Keys of :meth:`get_tangents` / :meth:`set_tangents` are base parameter names
    (``base.named_parameters()``, tied weights once under their first name).

    The linearization point is the model in eval mode (``linearization_mode="eval"``, the authors'
    choice: no dropout inside f(x; θ0) and J, also while training); ``"train"`` keeps dropout.
    ``modules_to_save`` (the head, by default, for SEQ_CLS / TOKEN_CLS / QUESTION_ANS) are not
    linearized but trained normally through PEFT's ``ModulesToSaveWrapper``.
    """

    prefix: str = TAU_ATTR
    # PEFT's layer class of this method (its default status / trainable / delete helpers look for it;
    # this tuner overrides them, finding τ containers by name). See hf_taujp.peft_registration.
    tuner_layer_cls = layer.LinearizedTau
    target_module_mapping: dict = {}
    # The linearization lives on this tuner, not in the model's modules: refusing shared-state tuners
    # is how PEFT's `inject_adapter_in_model` (used by transformers' `model.load_adapter`) avoids
    # returning a model that would silently run the plain, non-linearized forward.
    uses_shared_state: bool = True

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None, **kwargs) -> None:
        self._linearized_names: dict[str, list[str]] = {}
        # Low-rank adapters (LinearizedConfig.r): {adapter: {module path: layer kind}}.
        self._low_rank: dict[str, dict[str, str]] = {}
        self._linearized_disabled = False
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict, **kwargs)

    # ------------------------------------------------------------------ injection
    def _create_and_replace(self, *args, **kwargs):
        # Abstract in BaseTuner, called only by BaseTuner.inject_adapter, which this tuner overrides:
        # nothing is replaced (τ sits beside θ0; hf_taujp.peft_registration explains the layout).
        raise NotImplementedError("LinearizedModel does not replace modules.")

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        config = self.peft_config[adapter_name]
        if not isinstance(config, LinearizedConfig):
            raise HfTaujpError(f"LinearizedModel needs a LinearizedConfig, got {type(config).__name__}.")
        if config.task_type is None:
            raise HfTaujpError(
                "LinearizedConfig needs a task_type (" + _TASK_TYPES + "): with task_type=None PEFT's generic "
                "PeftModel.forward calls the base model directly and the linearization would be silently skipped."
            )
        if adapter_name in self._linearized_names:
            raise HfTaujpError(f"Adapter {adapter_name!r} already exists.")
        refuse_sharded(model)  # before any τ is created: FSDP / DTensor models cannot run the forward-mode pass
        if config.modules_to_save:
            config.modules_to_save = list(dict.fromkeys(config.modules_to_save))
        device = "meta" if low_cpu_mem_usage else None
        if config.r is not None:
            kinds = _low_rank_targets(model, config)
            layer.attach_low_rank(model, adapter_name, list(kinds), config.r, config.init_lora_weights, device=device)
            config.fan_in_fan_out_modules = sorted(m for m, k in kinds.items() if k != "linear")
            self._low_rank[adapter_name] = kinds
            names = [f"{m}.weight" for m in kinds]
        else:
            names = [n for n in match_parameter_names(model, config.target_modules, config.exclude_modules)
                     if not layer.is_tau_name(n) and not _in_modules_to_save(n, config.modules_to_save)]
            if not names:
                raise HfTaujpError(f"target_modules={config.target_modules!r} matches no base parameter "
                                   f"(outside modules_to_save={config.modules_to_save!r}).")
            layer.attach(model, adapter_name, names, device=device)
        self._linearized_names[adapter_name] = names
        self.targeted_parameter_names.extend(n for n in names if n not in self.targeted_parameter_names)
        self.targeted_module_names.extend(
            m for m in dict.fromkeys(layer.split_param_name(n)[0] for n in names) if m not in self.targeted_module_names
        )
        self._mark_only_adapters_as_trainable(model)
        if config.inference_mode:
            for _, _, c in layer.containers(model):
                if adapter_name in c:
                    for p in c[adapter_name].values():
                        p.requires_grad_(False)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            # PEFT's ModulesToSaveWrapper copies are trained normally; PEFT sets their flags itself.
            if not layer.is_tau_name(n) and ".modules_to_save." not in f".{n}":
                p.requires_grad_(False)
        active = set(self.active_adapters)
        for _, _, c in layer.containers(model):
            for adapter, tau in c.items():
                for p in tau.values():
                    p.requires_grad_(adapter in active and not self.peft_config[adapter].inference_mode)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Like PEFT: keep fp16 / bf16 adapters in fp32 for the optimiser; linearized_forward casts τ
        # to the primal dtype for the jvp.
        if not autocast_adapter_dtype:
            return
        for _, _, c in layer.containers(self.model):
            if adapter_name in c:
                for p in c[adapter_name].values():
                    if p.dtype in (torch.float16, torch.bfloat16):
                        p.data = p.data.float()

    # ------------------------------------------------------------------ adapters
    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self._linearized_names]

    def _resolve(self, adapter_name: str | None) -> str:
        if adapter_name is None:
            active = self._active()
            if len(active) != 1:
                raise HfTaujpError(f"Give adapter_name: {len(active)} active adapters ({active}).")
            return active[0]
        if adapter_name not in self._linearized_names:
            raise HfTaujpError(f"Unknown adapter {adapter_name!r} (have {sorted(self._linearized_names)}).")
        return adapter_name

    def parameter_names(self, adapter_name: str | None = None) -> list[str]:
        """Base parameter names linearized by ``adapter_name`` (the active one by default)."""
        return list(self._linearized_names[self._resolve(adapter_name)])

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for a in names:
            self._resolve(a)
        self.active_adapter = adapter_name
        for _, _, c in layer.containers(self.model):
            c._active_adapter = adapter_name
            for a, tau in c.items():
                for p in tau.values():
                    p.requires_grad_(a in names and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        self._resolve(adapter_name)
        del self.peft_config[adapter_name]
        del self._linearized_names[adapter_name]
        self._low_rank.pop(adapter_name, None)
        layer.remove_adapter(self.model, adapter_name)
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self._linearized_names:
            remaining = [next(iter(self._linearized_names))]
        self.active_adapter = remaining[0] if len(remaining) == 1 else remaining

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._linearized_disabled = not enabled
        for _, _, c in layer.containers(self.model):  # per-layer flags only feed PEFT's get_model_status
            c._disable_adapters = not enabled

    def disable_adapter_layers(self) -> None:
        """Forward = the plain base model f(x; θ0) until :meth:`enable_adapter_layers`."""
        self._enable_adapter_layers(False)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    def merge_adapter(self, *args, **kwargs):
        raise HfTaujpError(
            "merge_adapter is not supported by the linearized method: writing τ into θ0 would move the "
            "linearization point. Use merge_and_unload() (the non-linear reading f(x; θ0 + τ))."
        )

    def unmerge_adapter(self):
        raise HfTaujpError("The linearized method never merges adapters in place; nothing to unmerge.")

    # ------------------------------------------------------------------ τ access
    def _scaling(self, adapter_name: str) -> float:
        c = self.peft_config[adapter_name]
        return low_rank_scaling(c.r, c.lora_alpha, c.use_rslora)

    def _low_rank_factors(self, adapters: list[str]) -> list[LowRankFactors]:
        """The low-rank tangents of the low-rank adapters among ``adapters`` (one per targeted module each)."""
        out = []
        for a in adapters:
            if a not in self._low_rank:
                continue
            s, c = self._scaling(a), self.peft_config[a]
            for path in self._low_rank[a]:
                A, B = layer.factors_of(self.model, path, a)
                out.append(LowRankFactors(self.model.get_submodule(path), A, B, s, dropout=c.lora_dropout,
                                          training=self.model.training))
        return out

    def _tau(self, name: str, adapter_name: str) -> torch.Tensor:
        """τ of base parameter ``name``: the stored tensor, or s·B·A in the weight's layout for a low-rank adapter."""
        kinds = self._low_rank.get(adapter_name)
        if kinds is None:
            return layer.tau_of(self.model, name, adapter_name)
        path = name.rsplit(".", 1)[0]
        A, B = layer.factors_of(self.model, path, adapter_name)
        return LowRankTau(A, B, self._scaling(adapter_name), transposed=kinds[path] != "linear").full()

    def is_low_rank(self, adapter_name: str | None = None) -> bool:
        """True when ``adapter_name`` (default: the active adapter) stores τ as low-rank factors (``r`` set)."""
        return self._resolve(adapter_name) in self._low_rank

    def get_factors(self, adapter_name: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{base param name (the module's weight): (A, B, s)}`` (detached copies) of a low-rank adapter,
        A (r × in), B (out × r), τ_W = s·B·A in the (out, in) layout (Conv1D / Embedding weights: τ = (s·B·A)ᵀ).

        Raises:
            HfTaujpError: a full-rank adapter (no factors).
        """
        a = self._resolve(adapter_name)
        if a not in self._low_rank:
            raise HfTaujpError(f"Adapter {a!r} is full-rank (LinearizedConfig.r is None): it has no factors; use get_tangents().")
        s = self._scaling(a)
        return {f"{m}.weight": tuple(t.detach().clone() for t in layer.factors_of(self.model, m, a)) + (s,)
                for m in self._low_rank[a]}

    def _primals_tangents(self, adapters: list[str], full: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        # Full-size τ of the full-rank adapters (and, with ``full``, the low-rank ones materialised as s·B·A).
        primals: dict[str, torch.Tensor] = {}
        tangents: dict[str, torch.Tensor] = {}
        for a in adapters:
            if a in self._low_rank and not full:
                continue
            for n in self._linearized_names[a]:
                t = self._tau(n, a)
                if n in tangents:  # several active adapters: their τ add (task addition in the tangent space)
                    tangents[n] = tangents[n] + t
                else:
                    primals[n] = self.model.get_parameter(n)
                    tangents[n] = t
        return primals, tangents

    def get_tangents(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """``{base param name: τ}`` (detached copies) of ``adapter_name`` (default: the active adapter)."""
        a = self._resolve(adapter_name)
        with torch.no_grad():
            return {n: self._tau(n, a).detach().clone() for n in self._linearized_names[a]}

    def set_tangents(self, tangents: Mapping[str, torch.Tensor], adapter_name: str | None = None, strict: bool = True) -> None:
        """Copy ``tangents`` (``{base param name: tensor}``, e.g. α·task vector) into τ of ``adapter_name``.

        ``strict`` requires exactly the linearized names; unknown names are always an error.
        """
        a = self._resolve(adapter_name)
        if a in self._low_rank:
            raise HfTaujpError(f"Adapter {a!r} is low-rank: it stores the factors A, B of τ = s·B·A, and a full tensor "
                               "cannot be written into them exactly. Use set_factors(), or a full-rank adapter (r=None).")
        names = self._linearized_names[a]
        _set_tangents(names, [layer.tau_of(self.model, n, a) for n in names], tangents, strict)

    def set_factors(self, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], adapter_name: str | None = None) -> None:
        """Copy ``{base weight name: (A, B)}`` into a low-rank adapter (every targeted weight, exact shapes).

        Raises:
            HfTaujpError: a full-rank adapter; missing or unknown names; shapes other than (r, in) / (out, r).
        """
        a = self._resolve(adapter_name)
        if a not in self._low_rank:
            raise HfTaujpError(f"Adapter {a!r} is full-rank: use set_tangents().")
        names = self._linearized_names[a]
        extra = [k for k in factors if k not in names]
        missing = [n for n in names if n not in factors]
        if extra or missing:
            raise HfTaujpError(f"set_factors needs exactly the adapter's weights: unknown {extra[:5]}, missing {missing[:5]}.")
        with torch.no_grad():
            for n, (A_new, B_new) in factors.items():
                A, B = layer.factors_of(self.model, n.rsplit(".", 1)[0], a)
                if tuple(A_new.shape) != tuple(A.shape) or tuple(B_new.shape) != tuple(B.shape):
                    raise HfTaujpError(f"Factors of {n!r}: got A {tuple(A_new.shape)}, B {tuple(B_new.shape)}; the adapter "
                                       f"has A {tuple(A.shape)}, B {tuple(B.shape)}.")
                A.copy_(A_new.to(A.dtype))
                B.copy_(B_new.to(B.dtype))

    # ------------------------------------------------------------------ forward
    def jvp(self, *args, method: str | Callable | None = None, **kwargs) -> tuple[Any, Any]:
        """``(f(x; θ0), J_θ f(x; θ0)·τ)`` with τ = sum of the active adapters' tangents.

        ``method``: another method of the base model to linearize, e.g. ``"get_image_features"`` on
        CLIP (image embedding, shape (batch, projection_dim)). Gradients flow from the tangent to τ.
        """
        adapters = self._active()
        if not adapters:
            raise HfTaujpError("No active linearized adapter.")
        primals, tangents = self._primals_tangents(adapters)
        fn = getattr(self.model, method) if isinstance(method, str) else (method or self.model.forward)
        modes = {self.peft_config[a].linearization_mode for a in adapters}
        if len(modes) != 1:
            raise HfTaujpError(f"The active adapters {adapters} have different linearization_mode values {sorted(modes)}.")
        return linearized_forward(self.model, primals, tangents, args, _drop_unknown_none(fn, kwargs), method=method,
                                  mode=modes.pop(), low_rank=self._low_rank_factors(adapters))

    def forward(self, *args, **kwargs):
        """f_lin(x) = f(x; θ0) + J f(x; θ0)·τ (base output class); plain f(x; θ0) when adapters are disabled.

        Loss inputs (``labels``, ``start_positions`` / ``end_positions``, ``return_loss``) are kept out of
        the jvp and the loss is taken of the linearized outputs (:func:`~hf_taujp.linearize.linearized_loss`).
        """
        if self._linearized_disabled or not self._active():
            return self.model(*args, **kwargs)
        kwargs, loss_args = prepare_linearized_inputs(self.model, kwargs)
        primal, tangent = self.jvp(*args, **kwargs)
        return with_loss(self.model, add_outputs(primal, tangent), loss_args)

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` decoding from f_lin (τ = sum of the active adapters), with a KV cache
        carrying primal and tangent keys/values; every argument of the base model's ``generate`` is
        accepted (see :func:`hf_taujp.generation.linearized_generate`). With adapters disabled this is
        the base model's ``generate``."""
        if self._linearized_disabled or not self._active():
            return self.model.generate(*args, **kwargs)
        # Decoding runs without gradients: a low-rank τ is materialised (s·B·A) for the cached generation path.
        with torch.no_grad():
            primals, tangents = self._primals_tangents(self._active(), full=True)
        return _generate(self.model, primals, tangents, args, kwargs)

    # ------------------------------------------------------------------ unloading
    @torch.no_grad()
    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """The ordinary base model with weights θ0 + Σ τ (active adapters, or ``adapter_names``); τ removed.

        This is the *non-linear* reading f(x; θ0 + τ) of the learned τ; it differs from f_lin(x; θ0 + τ)
        at second order in τ (Ortiz-Jiménez et al. 2023 evaluate linearized task vectors with f_lin).
        """
        adapters = adapter_names if adapter_names is not None else self._active()
        _, tangents = self._primals_tangents([self._resolve(a) for a in adapters], full=True)
        for n, t in tangents.items():
            p = self.model.get_parameter(n)
            if safe_merge and not torch.isfinite(t).all():
                raise HfTaujpError(f"τ of {n!r} has non-finite values; not merged.")
            p.add_(t.to(dtype=p.dtype, device=p.device))
        return self.unload()

    def unload(self) -> nn.Module:
        """The base model with θ0 unchanged and every τ container removed."""
        for a in list(self._linearized_names):
            layer.remove_adapter(self.model, a)
        self._linearized_names.clear()
        self._low_rank.clear()
        return self.model

    # ------------------------------------------------------------------ PEFT state-dict hooks
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        # τ keys are found by their container name (no BaseTunerLayer holds them).
        token = f"{TAU_ATTR}.{adapter_name}."
        return {k: v for k, v in state_dict.items() if k.startswith(token) or f".{token}" in k}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return re.sub(rf"(^|\.){TAU_ATTR}\.{re.escape(adapter_name)}\.", rf"\g<1>{TAU_ATTR}.", key, count=1)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        token = f"{TAU_ATTR}.{adapter_name}."
        model_keys = [k for k in model.state_dict() if k.startswith(token) or f".{token}" in k]
        to_model = {}
        for mk in model_keys:
            ck = cls._remove_adapter_name_from_key(mk, adapter_name)
            to_model[ck] = mk
            if not ck.startswith("base_model.model."):
                to_model["base_model.model." + ck] = mk
        out = {}
        unexpected = []
        for k, v in state_dict.items():
            if k in to_model:
                out[to_model[k]] = v
            elif layer.is_tau_name(k):
                unexpected.append(k)
            else:
                out[k] = v
        missing = sorted(set(to_model.values()) - set(out))
        if unexpected or missing:
            raise HfTaujpError(
                f"The LINEARIZED adapter does not fit this model: {len(unexpected)} saved τ without a matching "
                f"parameter (e.g. {unexpected[:3]}), {len(missing)} linearized parameters without a saved τ "
                f"(e.g. {missing[:3]}). Was it trained on another base model or with other target_modules?"
            )
        return out


def _drop_unknown_none(fn: Callable, kwargs: dict) -> dict:
    """Drop ``None`` keyword arguments the callable does not declare (PEFT's task wrappers pass e.g.
    ``inputs_embeds=None`` to every model, and CLIP's forward has no such argument)."""
    return {k: v for k, v in kwargs.items() if v is not None or _accepts(fn, k)}


def _in_modules_to_save(param_name: str, modules_to_save: list[str] | None) -> bool:
    """True when the parameter belongs to a module kept out of the linearization: a module PEFT's
    ``_set_trainable`` would wrap (its path ends with an entry, PEFT's rule), or a wrapper's copy."""
    parts = param_name.split(".")[:-1]
    if "modules_to_save" in parts or "original_module" in parts:
        return True
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p.endswith(key) for p in prefixes for key in (modules_to_save or []))


def _low_rank_targets(model: nn.Module, config: LinearizedConfig) -> dict[str, str]:
    """``{module path: layer kind}`` of the modules a low-rank LinearizedConfig targets (PEFT matching).

    ``target_modules="all-linear"``: every nn.Linear / Conv1D except the output layer (PEFT's rule).
    Raises:
        HfTaujpError: nothing matched; a matched module that is not nn.Linear / Conv1D / nn.Embedding; a target
            whose weight is tied to another module's (a tangent on one use only would not be θ0 + τ's reading);
            ``r`` above min(out, in) of a target.
    """
    from ...linearize import _module_matches

    head = None
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        head = None
    owners: dict[int, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        for pname, prm in m.named_parameters(recurse=False):
            owners.setdefault(id(prm), []).append(f"{path}.{pname}" if path else pname)
    out: dict[str, str] = {}
    for path, m in model.named_modules():
        if not path or layer.is_tau_name(path + ".x") or path.endswith(layer.TAU_ATTR):
            continue
        if config.target_modules == "all-linear":
            if m is head:
                continue
            try:
                kind = layer_kind(m)
            except HfTaujpError:
                continue
            if kind == "embedding":
                continue
        else:
            if not _module_matches(path, config.target_modules):
                continue
            kind = layer_kind(m)  # raises, naming the type, for a module that cannot take a low-rank tangent
        if config.exclude_modules is not None and _module_matches(path, config.exclude_modules):
            continue
        if _in_modules_to_save(f"{path}.weight", config.modules_to_save):
            continue
        users = owners.get(id(m.weight), [])
        if len(users) > 1:
            raise HfTaujpError(f"{path}.weight is tied to {[u for u in users if u != path + '.weight'][:3]}: a low-rank "
                               "tangent in one of its layers would not equal the reading θ0 + τ of the shared weight. "
                               "Leave tied weights out of target_modules (or untie them).")
        out_f, in_f = weight_layout(m)
        if config.r > min(out_f, in_f):
            raise HfTaujpError(f"r={config.r} exceeds min(out, in) = {min(out_f, in_f)} of {path} ({out_f} × {in_f}): "
                               "τ = s·B·A cannot have rank above that, and the extra factor rows would only add "
                               f"parameters. Use r ≤ {min(out_f, in_f)} or leave this module out.")
        out[path] = kind
    if not out:
        raise HfTaujpError(f"target_modules={config.target_modules!r} matches no nn.Linear / Conv1D / nn.Embedding "
                           f"(outside modules_to_save={config.modules_to_save!r}).")
    return out
