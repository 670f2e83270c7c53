"""Where τ lives: a ``linearized_tau`` container attached to the module that owns each base parameter.

τ of base parameter ``<module path>.<pname>`` is ``<module>.linearized_tau[<adapter>][<pname>]``, so
its state-dict key is ``<module path>.linearized_tau.<adapter>.<pname>`` and PEFT saves it as
``base_model.model.<module path>.linearized_tau.<pname>`` (adapter name stripped). The module is
not replaced and its forward is untouched: the linearization happens once for the whole model in
:class:`~hf_taujp.tuners.linearized.model.LinearizedModel`, so base parameter names stay exactly
``base.named_parameters()`` names (the contract of docs/modules.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ...errors import HfTaujpError

TAU_ATTR = "linearized_tau"
_TAU_NAME = re.compile(rf"(^|\.){TAU_ATTR}\.")


class LinearizedTau(nn.ModuleDict, BaseTunerLayer):
    """The method's tuner layer: ``{adapter name: ParameterDict{param name: τ}}`` for the direct
    parameters of one module.

    A ``BaseTunerLayer`` so that PEFT's status / requires-grad helpers find the adapters; it holds τ
    and wraps no computation (the owning module's forward is unchanged; the linearized forward is
    one pass of the whole model). Why this layout meets PEFT's contract: :mod:`hf_taujp.peft_registration`.
    """

    adapter_layer_names = ("adapters",)

    @property
    def adapters(self) -> "LinearizedTau":
        return self

    def forward(self, *args, **kwargs):
        raise HfTaujpError("LinearizedTau holds τ only; the linearized forward is LinearizedModel.forward.")

    def add_adapter(self, adapter_name: str, params: dict[str, nn.Parameter], device: str | torch.device | None = None) -> None:
        tau = nn.ParameterDict()
        for pname, p in params.items():
            # τ has the shape, dtype and device of θ0 (see LinearizedModel._cast_adapter_dtype for upcasting).
            tau[pname] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype, device=device or p.device))
        self[adapter_name] = tau


LOW_RANK_KEYS = ("lora_A", "lora_B")


def attach_low_rank(model: nn.Module, adapter_name: str, module_paths: list[str], r: int, init: bool | str = True,
                    device: str | torch.device | None = None) -> None:
    """Create the factors A (r × in) and B (out × r) of a low-rank tangent in each module of ``module_paths``.

    PEFT LoRA's initialisation (``LoraLayer.reset_lora_parameters``): A Kaiming-uniform with a = √5 and B = 0
    (``init=True``), or A ~ N(0, 1/r) (``"gaussian"``); for nn.Embedding A = 0 and B ~ N(0, 1) (PEFT's
    ``lora_embedding_A`` / ``_B``). Either way τ = s·B·A = 0 at creation. Factors are float32 for a
    half-precision base (the optimiser's dtype), else the weight's dtype.
    """
    import math

    from ...low_rank import layer_kind, weight_layout

    for path in module_paths:
        module = model.get_submodule(path)
        kind = layer_kind(module)
        out_f, in_f = weight_layout(module)
        w = module.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        dev = device or w.device
        A = torch.empty(r, in_f, dtype=dtype, device=dev)
        B = torch.empty(out_f, r, dtype=dtype, device=dev)
        if str(dev) != "meta":
            if kind == "embedding":
                nn.init.zeros_(A)
                nn.init.normal_(B)
            elif init == "gaussian":
                nn.init.normal_(A, std=1 / r)
                nn.init.zeros_(B)
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.zeros_(B)
        container = _container(model, path)
        tau = nn.ParameterDict()
        tau["lora_A"] = nn.Parameter(A)
        tau["lora_B"] = nn.Parameter(B)
        container[adapter_name] = tau


def is_low_rank(tau: nn.ParameterDict) -> bool:
    """True for a container entry that holds low-rank factors (``lora_A`` / ``lora_B``) rather than τ itself."""
    return set(tau.keys()) == set(LOW_RANK_KEYS)


def factors_of(model: nn.Module, module_path: str, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
    """``(A, B)`` of the low-rank tangent of ``module_path`` for ``adapter_name``."""
    tau = getattr(model.get_submodule(module_path), TAU_ATTR)[adapter_name]
    return tau["lora_A"], tau["lora_B"]


def _container(model: nn.Module, mod: str) -> "LinearizedTau":
    module = model.get_submodule(mod)
    container = getattr(module, TAU_ATTR, None)
    if container is None:
        if hasattr(module, TAU_ATTR):
            raise HfTaujpError(f"Module {mod or type(model).__name__!r} already has an attribute {TAU_ATTR!r}.")
        container = LinearizedTau()
        module.add_module(TAU_ATTR, container)
    elif not isinstance(container, LinearizedTau):
        raise HfTaujpError(f"Module {mod!r} has a {TAU_ATTR!r} attribute that is not a LinearizedTau.")
    return container


def is_tau_name(name: str) -> bool:
    """True for a parameter / state-dict key that belongs to a τ container (not to the base model)."""
    return _TAU_NAME.search(name) is not None


def split_param_name(name: str) -> tuple[str, str]:
    """``"a.b.weight"`` → ``("a.b", "weight")``; a root parameter → ``("", name)``."""
    return tuple(name.rsplit(".", 1)) if "." in name else ("", name)  # type: ignore[return-value]


def attach(model: nn.Module, adapter_name: str, names: list[str], device: str | torch.device | None = None) -> None:
    """Create zero τ for the base parameters ``names`` of ``model`` under ``adapter_name``."""
    by_module: dict[str, dict[str, nn.Parameter]] = {}
    for n in names:
        mod, pname = split_param_name(n)
        by_module.setdefault(mod, {})[pname] = model.get_parameter(n)
    for mod, params in by_module.items():
        _container(model, mod).add_adapter(adapter_name, params, device=device)


def tau_of(model: nn.Module, name: str, adapter_name: str) -> nn.Parameter:
    """τ of base parameter ``name`` for ``adapter_name``."""
    mod, pname = split_param_name(name)
    return getattr(model.get_submodule(mod), TAU_ATTR)[adapter_name][pname]


def containers(model: nn.Module) -> Iterator[tuple[str, nn.Module, LinearizedTau]]:
    """``(module path, owning module, container)`` for every τ container in ``model``."""
    for path, module in list(model.named_modules()):
        c = module._modules.get(TAU_ATTR)
        if isinstance(c, LinearizedTau):
            yield path, module, c


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete τ of ``adapter_name`` everywhere; drop containers left empty."""
    for _, module, c in containers(model):
        if adapter_name in c:
            del c[adapter_name]
        if len(c) == 0:
            delattr(module, TAU_ATTR)
