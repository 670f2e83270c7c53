"""PEFT adapters → task vectors: a LINEARIZED adapter's τ, and the weight change a LoRA adapter makes.

``TaskVector.from_peft`` is the public entry point; this module holds the conversion rules so that
``task_vector`` keeps the vector itself. Nothing here imports ``task_vector`` (it returns tensors, and
:class:`~hf_taujp.low_rank_tau.LowRankTau` factors for ``factored=True``).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import hub
from .errors import CorruptFileError, HfTaujpError
from .fingerprints import fingerprint
from .low_rank_tau import LowRankTau

__all__ = ["tensors_from_peft", "peft_state"]


def tensors_from_peft(peft_model_or_adapter_dir, base: torch.nn.Module | None, adapter_name: str,
                      meta: dict, factored: bool = False) -> tuple[dict[str, torch.Tensor | LowRankTau], str, dict]:
    """``(tensors, kind, meta)`` of ``TaskVector.from_peft`` (see there for the rules): the task vector's
    entries, ``"linear"`` (LINEARIZED) or ``"nonlinear"`` (LoRA), and ``meta`` completed with the
    base model's id / revision / fingerprint where the adapter records them. ``factored=True`` keeps
    each low-rank weight as a :class:`~hf_taujp.low_rank_tau.LowRankTau` (its factors) instead of the
    full tensor, which is exactly ``LowRankTau.full()`` of it. ``HfTaujpError`` for an unsupported
    adapter (and, with ``factored=True``, for a full-rank LINEARIZED adapter or DoRA), ``CorruptFileError``
    for an inconsistent one."""
    meta = dict(meta)
    obj = peft_model_or_adapter_dir
    live = None
    if isinstance(obj, (str, os.PathLike)):
        directory = hub.resolve_pretrained_dir(obj, revision=meta.pop("revision", None), token=meta.pop("token", None),
                                               subfolder=meta.pop("subfolder", None))
        config = hub.read_json(os.path.join(directory, "adapter_config.json"), what="adapter config")
        sd = hub.load_safetensors(directory, "adapter_model")
    elif isinstance(obj, torch.nn.Module) and hasattr(obj, "peft_config"):
        if adapter_name not in obj.peft_config:
            raise HfTaujpError(f"Adapter {adapter_name!r} not in the PEFT model (has {sorted(obj.peft_config)}).")
        live = obj
        pc = obj.peft_config[adapter_name]
        config = pc.to_dict() if hasattr(pc, "to_dict") else dict(vars(pc))
        sd = peft_state(obj, config, adapter_name)
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
        if factored and config.get("r") is None:
            raise HfTaujpError("factored=True needs a low-rank LINEARIZED adapter (LinearizedConfig(r=...)): this one "
                               "stores a full-size τ per parameter, which has no factors to keep.")
        tensors, kind = _linearized_from_state(sd, config, factored), "linear"
    elif peft_type == "LORA":
        tensors, kind = _lora_from_state(sd, config, base if base is not None else live, factored), "nonlinear"
    else:
        raise HfTaujpError(f"Unsupported PEFT type {peft_type!r}: from_peft handles LINEARIZED and LORA adapters.")
    if not tensors:
        raise HfTaujpError("The adapter holds no tensors to turn into a task vector.")
    return tensors, kind, meta


def peft_state(model, config: Mapping[str, Any], adapter_name: str) -> dict[str, torch.Tensor]:
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


def _linearized_from_state(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                           factored: bool = False) -> dict[str, torch.Tensor | LowRankTau]:
    """τ by base parameter name from a LINEARIZED adapter's state. Full-rank: the saved τ as it is. Low-rank
    (``r`` in the config): :func:`_low_rank_from_state`."""
    config = config or {}
    if config.get("r") is not None:
        return _low_rank_from_state(sd, config, factored)
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


def _low_rank_from_state(sd: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                         factored: bool = False) -> dict[str, torch.Tensor | LowRankTau]:
    """τ of a low-rank LINEARIZED adapter: τ_weight = s·B·A from ``<module>.linearized_tau.lora_A`` (r × in) /
    ``lora_B`` (out × r), transposed for the modules the config lists in ``fan_in_fan_out_modules`` (Conv1D,
    Embedding: weight stored (in, out)), s = lora_alpha / r (√r with ``use_rslora``; ``hf_taujp.low_rank``).
    Half-precision factors are upcast to float32 (lossless), so τ is float32 as the adapter's own
    ``get_tangents`` gives it. ``factored``: each weight's :class:`LowRankTau`; else its ``full()`` (s·B·A in
    float64, cast to the factors' dtype). A modules_to_save head's h − h0 stays a full tensor either way."""
    from .low_rank import low_rank_scaling

    r = int(config["r"])
    s = low_rank_scaling(r, float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False)))
    transposed = set(config.get("fan_in_fan_out_modules") or [])
    factors: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict[str, torch.Tensor] = {}
    other = []
    for k, t in sd.items():
        key = _strip(k)
        if f".{_SAVED_DELTA}." in key:  # a modules_to_save head's h − h0 (in-memory adapters only)
            module, pname = key.split(f".{_SAVED_DELTA}.", 1)
            deltas[f"{module}.{pname}"] = t.detach().clone()
            continue
        if ".linearized_tau." not in f".{key}":
            other.append(k)
            continue
        module, pname = key.split(".linearized_tau.", 1) if ".linearized_tau." in key else ("", key.split("linearized_tau.", 1)[1])
        if pname not in ("lora_A", "lora_B"):
            raise CorruptFileError(f"Low-rank LINEARIZED adapter (r={r}) holds {k!r}: expected lora_A / lora_B factors only.")
        factors.setdefault(module, {})[pname] = t
    if other:
        raise HfTaujpError(f"The low-rank LINEARIZED adapter also holds {other[:3]} (modules_to_save?): load it with "
                           "peft.PeftModel.from_pretrained(base, folder) and call TaskVector.from_peft on that model.")
    out = {}
    for module, f in factors.items():
        if set(f) != {"lora_A", "lora_B"}:
            raise CorruptFileError(f"Low-rank adapter: {module!r} has {sorted(f)}, not both lora_A and lora_B.")
        A, B = f["lora_A"], f["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise CorruptFileError(f"Low-rank adapter: {module!r} has A {tuple(A.shape)}, B {tuple(B.shape)}; expected "
                                   f"(r, in) and (out, r) with r = {r}.")
        # clone: a live adapter's factors keep training; the task vector must not move with them
        A, B = (t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach().clone() for t in (A, B))
        lr = LowRankTau(A, B, s, transposed=module in transposed)
        out[f"{module}.weight"] = lr if factored else lr.full()
    out.update(deltas)
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
    sd: Mapping[str, torch.Tensor], config: Mapping[str, Any], model: torch.nn.Module | None = None,
    factored: bool = False,
) -> dict[str, torch.Tensor | LowRankTau]:
    """τ of a LoRA adapter, as PEFT's ``merge_and_unload`` writes it into the base (PEFT 0.21 ``lora/layer.py``).

    Per layer, with s = α/r (``use_rslora``: α/√r; r and α from ``rank_pattern`` / ``alpha_pattern``):
    - ``nn.Linear``: ΔW = s·B·A, shape (out, in); transformers' ``Conv1D`` (GPT-2; weight (in, out)):
      (s·B·A)ᵀ. PEFT picks the orientation per layer from the layer type, so ``model`` is required.
    - ``nn.Embedding``: ΔW = s·(B_e·A_e)ᵀ, shape (num_embeddings, dim).
    - ``lora_bias=True``: Δb = s·b_B (the bias of lora_B).
    - DoRA (Liu et al. 2024, Eq. 5): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_c, the norm taken per output row of
      the (out, in) matrix (per embedding dimension for embeddings); τ = W' − W needs θ0 from ``model``.
    - ``bias="all"`` / ``"lora_only"``: the saved biases are full values; Δb = b_saved − b_0.
    ``factored=True``: each weight's ΔW kept as a :class:`LowRankTau` (A, B, s; layout transposed for Conv1D
    and Embedding) whose ``full()`` is the tensor above; ``lora_bias`` and trained biases stay full tensors
    beside the factors; DoRA is refused (W' − W is not low-rank).
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
        # B·A is (out, in) for Linear / Conv1D, (dim, num_embeddings) for Embedding: transposed to the stored
        # orientation of the weight for Conv1D and Embedding
        lr = LowRankTau(a.detach().clone(), b.detach().clone(), scale, transposed=kind in ("conv1d_t", "embedding"))
        w = layer.weight
        if tuple(lr.shape) != tuple(w.shape):
            raise HfTaujpError(f"LoRA module {module!r}: ΔW has shape {tuple(lr.shape)}, the base weight {tuple(w.shape)}.")
        if "lora_magnitude_vector" in p and factored:
            raise HfTaujpError(f"LoRA module {module!r} uses DoRA: its change W' − W (a column-normalised W + ΔW) is not "
                               "low-rank, so it has no factors; use from_peft(..., factored=False).")
        delta = lr if factored else lr.full(torch.float64)
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
        out[f"{module}.weight"] = delta if factored else delta.to(dt).contiguous()
        if "lora_B.bias" in p:
            out[f"{module}.bias"] = (p["lora_B.bias"].double() * scale).to(dt)
    if biases and hasattr(model, "get_base_model"):
        raise HfTaujpError(
            f"bias={config.get('bias')!r} trains the base model's own biases in place, so the PEFT model no longer "
            "holds their θ0 values: pass base= (the original base model)."
        )
    params = dict(model.named_parameters())  # tied weights once, as TaskVector keys them
    for name, saved in biases.items():
        base_b = params.get(name, params.get(name.rsplit(".", 1)[0] + ".base_layer.bias"))
        if base_b is None or base_b.device.type == "meta":
            raise HfTaujpError(f"Trained bias {name!r} (bias={config.get('bias')!r}) needs its θ0 value from base=.")
        if name in out:
            raise HfTaujpError(f"Bias {name!r} is trained both as lora_bias and as bias={config.get('bias')!r}.")
        out[name] = (saved.double() - base_b.detach().double().to(saved.device)).to(saved.dtype)
    return out
