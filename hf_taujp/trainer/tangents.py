"""τ of the model being trained, in the forms the penalties need (τJp's jvp tangents, KFAC's per-layer ΔW̃).

Four kinds of model are trained by `TauJpTrainer`, and τ = θ − θ0 lives in a different place in each:

* a plain linearized model (:class:`~hf_taujp.linearize.LinearizedModule`): ``model.tau`` by base parameter name;
* a PEFT model with ``LinearizedConfig``: full-rank τ in ``linearized_tau`` containers, or low-rank
  τ_W = s·B·A (:class:`~hf_taujp.low_rank.LowRankFactors`); ``modules_to_save`` heads: h − h0;
* a PEFT LoRA model: ΔW = s·B·A of each LoRA layer (``modules_to_save`` heads: h − h0);
* a plain (non-linear) model: θ − θ0 against the frozen copy θ0 the trainer keeps.

:func:`layer_deltas` gives, for each nn.Linear / transformers Conv1D layer, its change in the (out, in)
layout (Conv1D weights are (in, out) and are transposed here): the dense ΔW, the low-rank parts (B, A, s)
kept as factors (ΔW = s·B·A is never formed), and Δb; all differentiable w.r.t. the trained parameters.
Keys are the *base* model's module paths (``transformer.h.0.attn.c_attn``), as in the KFAC factors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import HfTaujpError, TauJpUnsupportedError
from ..linearize import LinearizedModule

__all__ = ["LayerDelta", "layer_deltas", "theta0_fingerprint"]


def linearized_jvp(model: torch.nn.Module) -> Callable | None:
    """The `.jvp` of a linearized model (LinearizedModule, or a PeftModel around a LinearizedModel)."""
    if callable(getattr(model, "jvp", None)):
        return model.jvp
    inner = getattr(model, "base_model", None)
    if inner is not None and inner is not model and callable(getattr(inner, "jvp", None)):
        return inner.jvp
    return None


def adapter_type(model: torch.nn.Module) -> str | None:
    """None for a plain model, "LINEARIZED" or "LORA" for the PEFT adapters the penalty supports.

    Raises `TauJpUnsupportedError` for other adapters (IA3, prompts, ...), LoRA variants (DoRA, ...)
    and LoRA with trained biases: θ − θ0 of their parameters is not the weight change the task vector
    holds, and the penalty of that change is not implemented for them.
    """
    if not is_peft(model):
        return None
    types = {str(getattr(c, "peft_type", "")).split(".")[-1].upper() for c in model.peft_config.values()}
    if types == {"LINEARIZED"}:
        return "LINEARIZED"
    if types == {"LORA"}:
        for a, c in model.peft_config.items():
            bad = [k for k in ("use_dora", "lora_bias") if getattr(c, k, False)]
            if bad:
                raise TauJpUnsupportedError(f"τJp with LoRA {bad} (adapter {a!r}) is not supported: only ΔW = s·B·A is penalised.")
        return "LORA"
    raise TauJpUnsupportedError(
        f"τJp with a {'/'.join(sorted(types))} adapter is not supported: the penalty needs the weight change ΔW its "
        "parameters stand for. Use LinearizedConfig (the paper's setting), LoRA, a plain model, or taujp_lambda=0."
    )


def lora_primals_tangents(model, theta0: Mapping[str, torch.Tensor]) -> tuple[dict, dict, list]:
    """θ0 and τ of a LoRA PeftModel as *weights*, evaluated with the adapters disabled (the model at θ0).

    Each LoRA Linear / Conv1D / Embedding layer's ΔW = s·B·A is a low-rank tangent
    (:class:`hf_taujp.low_rank.LowRankFactors` on its ``base_layer``, summed over the active adapters): the
    same forward-mode code path as a low-rank linearized adapter, no (out × in) ΔW is formed. Other LoRA
    layer types (Conv2d, ...) get PEFT's own ``get_delta_weight`` as a full-size tangent of
    ``base_layer.weight``. ``modules_to_save`` heads h0 → h − h0; other trainable parameters θ0 → θ − θ0.
    Returns ``(primals, tangents, low_rank factors)``; everything is differentiable in A and B."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    from ..low_rank import LowRankFactors, layer_kind

    params = dict(model.named_parameters())
    primals: dict[str, torch.Tensor] = {}
    tangents: dict[str, torch.Tensor] = {}
    factors: list = []
    active = model.active_adapters
    covered: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            key = f"{path}.base_layer.weight"
            try:
                kind = layer_kind(module.base_layer)
            except HfTaujpError:
                kind = None
            for a in active:
                if a in module.lora_A or a in getattr(module, "lora_embedding_A", {}):
                    if getattr(module, "lora_variant", {}).get(a) is not None:
                        raise TauJpUnsupportedError(f"τJp with a LoRA variant at {path!r} is not supported (only ΔW = s·B·A).")
                    # Views taken now, while the factors require grad: the jvp runs inside PEFT's disable_adapter,
                    # which switches requires_grad off on the leaves until the block ends (views keep the graph).
                    if kind == "embedding":
                        A, B = module.lora_embedding_A[a], module.lora_embedding_B[a]
                    elif kind is not None and a in module.lora_A:
                        A, B = module.lora_A[a].weight, module.lora_B[a].weight
                    if kind is not None:
                        factors.append(LowRankFactors(module.base_layer, A.view(A.shape), B.view(B.shape), module.scaling[a]))
                    else:
                        d = module.get_delta_weight(a)
                        tangents[key] = tangents[key] + d if key in tangents else d
                        primals[key] = params[key]
            covered.update(f"{path}.{n}" for n, _ in module.named_parameters() if "lora_" in n)
        elif isinstance(module, ModulesToSaveWrapper):
            for a in active:
                if a in module.modules_to_save:
                    h0 = dict(module.original_module.named_parameters())
                    for pname, h in module.modules_to_save[a].named_parameters():
                        key = f"{path}.original_module.{pname}"
                        primals[key] = h0[pname]
                        tangents[key] = h - h0[pname]
                        covered.add(f"{path}.modules_to_save.{a}.{pname}")
    for n, t0 in theta0.items():
        if n not in covered and n in params:
            primals[n] = t0
            tangents[n] = params[n] - t0
    tangents = {n: tangents[n].to(primals[n].dtype) for n in primals}
    return primals, tangents, factors


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)



# --------------------------------------------------------------------------------------------- KFAC
@dataclass
class LayerDelta:
    """The change of one linear layer y = W·x + b in the (out, in) layout: ΔW = ``weight`` + Σ s·B·A over
    ``factors`` (B (out × r), A (r × in), s a float), Δb = ``bias`` (out,). Missing parts are zero."""

    out_features: int
    in_features: int
    weight: torch.Tensor | None = None
    factors: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)
    bias: torch.Tensor | None = None


def _strip_peft(path: str) -> str:
    """The base model's module path of a PEFT module path (``base_model.model.`` prefix, LoRA's ``.base_layer``,
    ``modules_to_save``' ``.original_module`` removed)."""
    if path.startswith("base_model.model."):
        path = path[len("base_model.model."):]
    return ".".join(p for p in path.split(".") if p not in ("base_layer", "original_module"))


def _sources(model, theta0: Mapping[str, torch.Tensor] | None, adapter: str | None):
    """(module root, {param name under root: τ in the parameter's layout}, [LowRankFactors], path renamer)."""
    same = lambda p: p  # noqa: E731
    if isinstance(model, LinearizedModule):
        return model.base_model, model._tangents(), [], same
    if adapter == "LINEARIZED":
        from peft.utils.other import ModulesToSaveWrapper

        lm = model.base_model
        active = lm._active()
        _, tangents = lm._primals_tangents(active)
        for path, module in lm.model.named_modules():  # heads trained as modules_to_save: h − h0
            if isinstance(module, ModulesToSaveWrapper):
                h0 = dict(module.original_module.named_parameters())
                for a in active:
                    if a in module.modules_to_save:
                        for pname, h in module.modules_to_save[a].named_parameters():
                            tangents[f"{path}.original_module.{pname}"] = h - h0[pname]
        return lm.model, tangents, lm._low_rank_factors(active), _strip_peft
    if adapter == "LORA":
        _, tangents, factors = lora_primals_tangents(model, theta0 or {})
        return model, tangents, factors, _strip_peft
    if theta0 is None:
        raise HfTaujpError("layer_deltas of a non-linear model needs θ0 (the frozen copy of the trainable parameters)")
    params = dict(model.named_parameters())
    return model, {n: params[n] - t0 for n, t0 in theta0.items() if n in params}, [], same


def layer_deltas(model: torch.nn.Module, theta0: Mapping[str, torch.Tensor] | None = None,
                 adapter: str | None = None) -> tuple[dict[str, LayerDelta], list[str]]:
    """``({base module path: LayerDelta}, [names of trained tensors that are not on a Linear / Conv1D layer])``.

    A weight tied between modules counts for each Linear / Conv1D layer that holds it (GPT-2's ``wte`` τ is the
    ``lm_head`` ΔW); its use by another module (the embedding lookup) is listed as not covered.

    Args:
        model: the (unwrapped) model being trained: a LinearizedModule, a PEFT LINEARIZED or LoRA model, or a
            plain model (then ``theta0`` is required).
        theta0: ``{parameter name: θ0}`` of the trainable parameters (non-linear and LoRA models).
        adapter: ``adapter_type(model)``: None, "LINEARIZED" or "LORA".
    Raises:
        HfTaujpError: a plain model without ``theta0``.
    """
    from ..low_rank import layer_kind

    nested = [(p, m) for p, m in model.named_modules() if p and isinstance(m, LinearizedModule)]
    if nested and adapter is None and not isinstance(model, LinearizedModule):
        return _nested_deltas(model, nested)
    root, tangents, factors, rename = _sources(model, theta0, adapter)
    paths = {id(m): p for p, m in root.named_modules()}
    # every (module path, attribute) holding each parameter: a tied weight (GPT-2's wte / lm_head) has two
    owners: dict[int, list[tuple[str, str, torch.nn.Module]]] = {}
    for path, module in root.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((path, pname, module))
    params = dict(root.named_parameters())
    deltas: dict[str, LayerDelta] = {}
    other: list[str] = []

    def kind_of(module):
        try:
            k = layer_kind(module)
        except HfTaujpError:
            return None
        return k if k in ("linear", "conv1d") else None

    def slot(path, module, kind):
        w = module.weight
        out, inn = (w.shape[0], w.shape[1]) if kind == "linear" else (w.shape[1], w.shape[0])
        return deltas.setdefault(rename(path), LayerDelta(int(out), int(inn)))

    for name, t in tangents.items():
        path, pname = name.rsplit(".", 1) if "." in name else ("", name)
        held = owners.get(id(params[name]), []) if name in params else []
        held = held or [(path, pname, root.get_submodule(path))]
        for path, pname, module in held:
            kind = kind_of(module)
            if kind is None or pname not in ("weight", "bias"):
                other.append(rename(path) + "." + pname if path else pname)
                continue
            d = slot(path, module, kind)
            if pname == "bias":
                d.bias = t if d.bias is None else d.bias + t
            else:
                w = t if kind == "linear" else t.T
                d.weight = w if d.weight is None else d.weight + w
    for f in factors:
        kind = kind_of(f.module)
        path = paths[id(f.module)]
        if kind is None:
            other.append(rename(path) + ".weight")
            continue
        slot(path, f.module, kind).factors.append((f.B, f.A, float(f.scaling)))
    return deltas, other


def _nested_deltas(model, nested) -> tuple[dict[str, LayerDelta], list[str]]:
    """layer_deltas of a model holding linearized submodules (CLIP's classifier around a linearized image
    encoder): each one's deltas under its path (its wrapped base's module paths, as the plain model names
    them). A trainable parameter outside them is an error (its change would go unpenalised)."""
    deltas: dict[str, LayerDelta] = {}
    other: list[str] = []
    for path, module in nested:
        d, o = layer_deltas(module)
        deltas.update({f"{path}.{k}": v for k, v in d.items()})
        other += [f"{path}.{k}" for k in o]
    inside = {id(p) for _, m in nested for p in m.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        raise HfTaujpError(f"the model trains parameters outside its linearized submodules ({outside[:5]}): the "
                           "KFAC penalty covers one kind of τ per model; linearize the whole trained part")
    return deltas, other


def theta0_fingerprint(model: torch.nn.Module, adapter: str | None = None) -> str | None:
    """:func:`hf_taujp.fingerprint` of the base weights θ0 of the model being trained (call it before training):
    the wrapped base of a LinearizedModule, the base state inside a PEFT model (None when PEFT's layout hides
    it, e.g. ``modules_to_save`` copies), the model itself otherwise."""
    from ..fingerprints import fingerprint

    if adapter is not None:
        from ..peft_conversion import _peft_base_state

        state = _peft_base_state(model)
        return fingerprint(state) if state is not None else None
    return fingerprint(model.base_model if isinstance(model, LinearizedModule) else model)
