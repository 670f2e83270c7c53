"""Linearized models: f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0)·τ.

Ortiz-Jiménez et al., "Task arithmetic in the tangent space" (NeurIPS 2023), Eq. (2), and the τJp
paper (Yoshida et al., ICLR 2025) which trains τ of this model. One forward-mode pass
(``torch.func.jvp``) gives the primal f(x; θ0) and the tangent J·τ together, at ≈ 5/3 the matmul FLOPs
of an ordinary training step when every parameter is linearized. Measured (GPT-2 small, CPU, one
thread, benchmarks/bench_linearized_step.py): ≈ 1.8–1.9× the CPU time and ≈ 1.4× the activation memory
of an ordinary step; the part above 5/3 is forward-AD's extra element-wise kernels (LayerNorm's tangent
rule alone is ~15 kernels). The wrapper itself costs nothing measurable over a bare ``torch.func.jvp``.

Parameters are always keyed by the base model's own names (``base.named_parameters()``, tied
weights once, under their first name): see docs/modules.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from .attention import forward_ad_attention
from .errors import HfTaujpError
from .generation import linearized_generate
from .low_rank import LowRankFactors, low_rank_hook

# Split out by concept, re-exported here (every `from hf_taujp.linearize import ...` keeps working):
# the inputs a forward accepts / that trigger a loss, the state of a forward-mode pass, and the
# outputs' arithmetic and task losses.
from .forward_inputs import (  # noqa: F401
    _RENAMED_LABEL_KEYS,
    _SIGNATURES,
    _UNSUPPORTED_LOSS_KEYS,
    LOSS_KEYS,
    _accepts,
    _explicit_params,
)
from .jvp_context import (  # noqa: F401
    _REQUIRE_GRADS_HOOKS,
    LINEARIZATION_MODES,
    _contiguous_input,
    contiguous_head_input,
    jvp_ready,
)
from .linearized_outputs import (  # noqa: F401
    _decoder_inputs_from_labels,
    add_outputs,
    linearized_loss,
    prepare_linearized_inputs,
    with_loss,
)

__all__ = [
    "linearized_forward",
    "linearize",
    "LinearizedModule",
    "linearized_loss",
    "add_outputs",
    "match_parameter_names",
    "contiguous_head_input",
]


# --------------------------------------------------------------------------------------------
# The one jvp
# --------------------------------------------------------------------------------------------
def linearized_forward(
    module: nn.Module,
    primals: Mapping[str, torch.Tensor],
    tangents: Mapping[str, torch.Tensor],
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
    method: str | Callable | None = None,
    mode: str = "eval",
    low_rank: Sequence[LowRankFactors] = (),
) -> tuple[Any, Any]:
    """One forward-mode pass: ``(f(x; θ0), J_θ f(x; θ0)·τ)``.

    Args:
        module: the base model; its parameters named in ``primals`` are replaced by ``primals``
            for the call (others keep their values).
        primals: ``{param name: θ0 tensor}`` (any subset of ``module.named_parameters()``).
        tangents: ``{param name: τ tensor}``, same keys and shapes as ``primals``; cast to the primal
            dtype/device (PEFT keeps adapters in fp32 on bf16 models).
        args, kwargs: the model inputs; ``use_cache=False`` is added when the called forward declares
            ``use_cache`` (a cache is not a tensor output forward AD can carry).
        method: another bound method to linearize instead of ``forward`` (name or callable taking
            the same arguments), e.g. ``"get_image_features"`` on CLIP.
        mode: ``"eval"`` (default): linearize around the model in eval mode, no dropout inside
            f(x; θ0) and J, as the authors (Ortiz-Jiménez et al. 2023; Yoshida et al. 2025) do;
            ``"train"``: keep the module's own mode (dropout active when training; one mask shared
            by primal and tangent). See :func:`jvp_ready`.
        low_rank: low-rank tangents τ_W = s·B·A (:class:`~hf_taujp.low_rank.LowRankFactors`), added inside
            their layers as s·B·(A·x0) (:mod:`hf_taujp.low_rank`); they add to the full-size ``tangents``.

    Returns:
        ``(primal_out, tangent_out)`` with the structure of the model output (ModelOutput / tuple /
        tensor). Gradients flow from ``tangent_out`` to ``tangents`` (and, through ordinary autograd,
        to trainable parameters that are not linearized, e.g. a head in ``modules_to_save``).

    Raises:
        HfTaujpError: tangents and primals differ in names or shapes; a name that is not a parameter of
            ``module`` (it would be ignored and f returned for f_lin); a sharded (FSDP / DTensor) model;
            unknown ``mode``.

    Implementation: ``torch.func.jvp`` over a reparametrised call (functional_call semantics, tied
    weights followed). We prefer it to ``torch.autograd.forward_ad`` dual tensors because it handles
    pytrees of outputs (ModelOutput is a registered pytree) and leaves no dual state on the module
    if the call fails.
    """
    kwargs = dict(kwargs or {})
    if isinstance(method, str):
        fn = getattr(module, method)
    elif method is None:
        fn = module  # through __call__, so hooks registered on the model run as in an ordinary forward
    else:
        fn = method
    if _accepts(fn, "use_cache"):
        kwargs["use_cache"] = False
    missing = [k for k in primals if k not in tangents]
    extra = [k for k in tangents if k not in primals]
    if missing or extra:
        raise HfTaujpError(f"Tangents do not match primals: missing {missing[:5]}, unexpected {extra[:5]}.")
    # One walk over the parameters serves both checks of every pass.
    own = dict(module.named_parameters(remove_duplicate=False))
    unknown = [k for k in primals if k not in own]
    if unknown:
        raise HfTaujpError(f"Tangent name(s) {unknown[:5]} are not parameters of {type(module).__name__}: they "
                           "would be ignored and the pass would return f, not f_lin.")
    refuse_sharded(module, own.items())
    # Same key order on both sides: jvp matches the two pytrees leaf by leaf.
    names = list(primals)
    p = {k: primals[k] for k in names}
    t = {}
    for k in names:
        pk, tk = p[k], tangents[k]
        if tuple(tk.shape) != tuple(pk.shape):
            raise HfTaujpError(f"Tangent {k!r} has shape {tuple(tk.shape)}, parameter has {tuple(pk.shape)}.")
        t[k] = tk.to(dtype=pk.dtype, device=pk.device)

    if not low_rank:
        def f(params):
            with _reparametrize_module(module, params, tie_weights=True, strict=False):
                return fn(*args, **kwargs)

        with jvp_ready(module, mode), forward_ad_attention(module):
            return torch.func.jvp(f, (p,), (t,))

    # Low-rank tangents: B is the tangent of a zero (out × r) primal Z read by a hook in its layer.
    dtypes = [_layer_dtype(fac.module) for fac in low_rank]
    zs = tuple(torch.zeros(tuple(fac.B.shape), dtype=dt, device=fac.B.device) for fac, dt in zip(low_rank, dtypes))
    bs = tuple(fac.B.to(dtype=dt) for fac, dt in zip(low_rank, dtypes))
    current: list = [None]
    handles = [fac.module.register_forward_hook(low_rank_hook(fac, lambda i=i: current[0][i]))
               for i, fac in enumerate(low_rank)]

    def g(params, z):
        current[0] = z
        try:
            with _reparametrize_module(module, params, tie_weights=True, strict=False):
                return fn(*args, **kwargs)
        finally:
            current[0] = None

    try:
        with jvp_ready(module, mode), forward_ad_attention(module):
            return torch.func.jvp(g, (p, zs), (t, bs))
    finally:
        for h in handles:
            h.remove()


def _layer_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer computes in (its weight's): the low-rank tangent is carried in the base dtype."""
    w = getattr(module, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) else torch.get_default_dtype()


def refuse_sharded(module: nn.Module, parameters: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
    """Raise when ``module`` is sharded by FSDP (FSDP2 ``fully_shard`` / DTensor parameters, or FSDP1).

    Forward-mode AD cannot run over sharded parameters today: ``torch.func.jvp`` over DTensors fails
    (pytorch #182641, ``aten._has_same_storage_numel`` has no sharding strategy), and when the tangent is
    injected layer by layer FSDP2's pre-backward hooks never see the tangent path, so the gathered weights
    are freed before the backward needs them, or (``reshard_after_forward=False``) stay gathered with
    gradients left unreduced. See docs/scaling.md. The check runs before every pass, so no step is ever taken
    on unreduced gradients. ``parameters``: ``module.named_parameters()`` when the caller has them already.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    fsdp_cls = []
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        fsdp_cls = [FSDPModule, FullyShardedDataParallel]
    except ImportError:  # pragma: no cover
        pass
    for name, m in module.named_modules():
        if fsdp_cls and isinstance(m, tuple(fsdp_cls)):
            raise HfTaujpError(
                f"{type(m).__name__} at {name or 'the root'!r}: FSDP-sharded models are not supported by the linearized "
                "forward-mode pass (forward AD over sharded parameters fails, pytorch #182641, and FSDP's backward hooks "
                "do not see the tangent path, so gradients would not be reduce-scattered). Use DDP with a low-rank "
                "tangent (LinearizedConfig(r=...)) instead; see docs/scaling.md."
            )
    for name, prm in (module.named_parameters() if parameters is None else parameters):
        if hasattr(prm, "ds_status") or hasattr(prm, "ds_id"):  # DeepSpeed ZeRO-3 partitions parameters in place
            raise HfTaujpError(f"Parameter {name!r} is partitioned by DeepSpeed ZeRO-3: the linearized forward-mode pass "
                               "needs full local parameters (torch.func over ZeRO-3 is unsupported upstream, DeepSpeed "
                               "PR #8026). Use DDP with a low-rank tangent; see docs/scaling.md.")
        if DTensor and isinstance(prm, DTensor):
            raise HfTaujpError(f"Parameter {name!r} is a DTensor (sharded): the linearized forward-mode pass needs full "
                               "local parameters (FSDP / tensor parallelism are not supported; see docs/scaling.md).")


# --------------------------------------------------------------------------------------------
# Choosing parameters
# --------------------------------------------------------------------------------------------
def _module_matches(module_name: str, target: str | Iterable[str]) -> bool:
    """PEFT matching: a string is a regex full-matched on the module name; a list matches a module
    whose name equals an entry or ends with ``"." + entry``."""
    if isinstance(target, str):
        return re.fullmatch(target, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in target)


def match_parameter_names(
    module: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] | None = None,
) -> list[str]:
    """Names (``module.named_parameters()`` order, tied weights once) of the parameters to linearize.

    ``target_modules`` None or ``"all"`` → every parameter; otherwise PEFT-style matching on the
    owning module's path (``transformer.h.0.attn.c_attn.weight`` belongs to ``transformer.h.0.attn.c_attn``).
    """
    if isinstance(target_modules, (list, tuple, set)) and not target_modules:
        raise HfTaujpError("target_modules is empty: nothing would be linearized.")
    out = []
    for name, _ in module.named_parameters():
        mod = name.rsplit(".", 1)[0] if "." in name else ""
        if target_modules is not None and target_modules != "all" and not _module_matches(mod, target_modules):
            continue
        if exclude_modules is not None and _module_matches(mod, exclude_modules):
            continue
        out.append(name)
    if not out:
        raise HfTaujpError(f"target_modules={target_modules!r} matches no parameter of {type(module).__name__}.")
    return out


# --------------------------------------------------------------------------------------------
# Plain-PyTorch linearized model
# --------------------------------------------------------------------------------------------
class LinearizedModule(nn.Module):
    """A frozen base model θ0 plus trainable tangents τ: f_lin(x) = f(x; θ0) + J f(x; θ0)·τ.

    The base parameters stay where they are (no second copy); τ starts at zero unless given. Use
    :func:`linearize` to build one. ``mode`` chooses the linearization point's mode: ``"eval"``
    (default, the authors': no dropout inside f(x; θ0) and J even while training) or ``"train"``
    (dropout active in train mode); see :func:`linearized_forward`.
    """

    def __init__(self, base: nn.Module, parameter_names: Iterable[str], tangents: Mapping[str, torch.Tensor] | None = None,
                 mode: str = "eval"):
        super().__init__()
        if mode not in LINEARIZATION_MODES:
            raise HfTaujpError(f"Unknown linearization mode {mode!r} (expected one of {LINEARIZATION_MODES}).")
        self.mode = mode
        self.base_model = base
        params = dict(base.named_parameters())
        names = list(dict.fromkeys(parameter_names))
        unknown = [n for n in names if n not in params]
        if unknown:
            raise HfTaujpError(f"{type(base).__name__} has no parameter(s) {unknown[:5]} (tied weights are listed once, under their first name).")
        if not names:
            raise HfTaujpError("No parameter to linearize.")
        for p in base.parameters():
            p.requires_grad_(False)
        self._names = names
        # ParameterDict keys may not contain '.', so τ lives in a list aligned with _names. τ of a half-precision
        # parameter is float32, as PEFT keeps adapters (the optimiser's updates would round away in bf16);
        # linearized_forward casts it to the primal dtype for the pass.
        self.tau = nn.ParameterList([
            nn.Parameter(torch.zeros_like(params[n], dtype=torch.float32 if params[n].dtype in (torch.float16, torch.bfloat16)
                                          else params[n].dtype)) for n in names])
        if tangents is not None:
            self.set_tangents(tangents, strict=True)

    # -- access ---------------------------------------------------------------------------------
    @property
    def parameter_names(self) -> list[str]:
        return list(self._names)

    @property
    def config(self):
        return getattr(self.base_model, "config", None)

    def _primals(self) -> dict[str, torch.Tensor]:
        params = dict(self.base_model.named_parameters())
        return {n: params[n] for n in self._names}

    def _tangents(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in zip(self._names, self.tau)}

    def get_tangents(self) -> dict[str, torch.Tensor]:
        """``{base param name: τ}`` (detached copies)."""
        return {n: t.detach().clone() for n, t in zip(self._names, self.tau)}

    def set_tangents(self, tangents: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy ``tangents`` into τ. ``strict`` requires exactly the linearized names; otherwise
        missing names keep their value and unknown names are an error still."""
        _set_tangents(self._names, list(self.tau), tangents, strict)

    # -- forward --------------------------------------------------------------------------------
    def jvp(self, *args, method: str | Callable | None = None, **kwargs) -> tuple[Any, Any]:
        """``(f(x; θ0), J f(x; θ0)·τ)`` for the given inputs (see :func:`linearized_forward`)."""
        return linearized_forward(self.base_model, self._primals(), self._tangents(), args, kwargs, method=method,
                                  mode=self.mode)

    def forward(self, *args, **kwargs):
        """f_lin(x) = f(x; θ0) + J f(x; θ0)·τ, same output class as the base model; with ``labels``
        (``start_positions`` / ``end_positions``, CLIP's ``return_loss``) ``loss`` is the task loss of these
        linearized outputs (see :func:`prepare_linearized_inputs`)."""
        kwargs, loss_args = prepare_linearized_inputs(self.base_model, kwargs)
        primal, tangent = self.jvp(*args, **kwargs)
        return with_loss(self.base_model, add_outputs(primal, tangent), loss_args)

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` decoding from f_lin, with a KV cache carrying primal and tangent
        keys/values; takes every argument the base model's ``generate`` takes (see
        :func:`hf_taujp.generation.linearized_generate`)."""
        return _generate(self.base_model, self._primals(), self._tangents(), args, kwargs)

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """The ordinary model with weights θ0 + τ (base modified in place and returned).

        Note: that is the *non-linear* reading of a linearized task vector, f(x; θ0 + τ), which
        differs from f_lin(x; θ0 + τ) at second order in τ.
        """
        params = dict(self.base_model.named_parameters())
        for n, t in zip(self._names, self.tau):
            params[n].add_(t.to(params[n].dtype))
        return self.base_model


def _set_tangents(names: list[str], slots: list[torch.Tensor], tangents: Mapping[str, torch.Tensor], strict: bool) -> None:
    index = {n: i for i, n in enumerate(names)}
    extra = [k for k in tangents if k not in index]
    missing = [n for n in names if n not in tangents]
    if extra:
        raise HfTaujpError(f"Unexpected tangent key(s) {extra[:5]}{' ...' if len(extra) > 5 else ''}: not linearized parameters.")
    if strict and missing:
        raise HfTaujpError(f"Missing tangent key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} (pass strict=False to keep them).")
    for k, v in tangents.items():
        slot = slots[index[k]]
        if not isinstance(v, torch.Tensor):
            raise HfTaujpError(f"Tangent {k!r} is a {type(v).__name__}, not a tensor.")
        if tuple(v.shape) != tuple(slot.shape):
            raise HfTaujpError(f"Tangent {k!r} has shape {tuple(v.shape)}, parameter has {tuple(slot.shape)}.")
    with torch.no_grad():
        for k, v in tangents.items():
            slots[index[k]].copy_(v.to(dtype=slots[index[k]].dtype, device=slots[index[k]].device))


def _generate(base: nn.Module, primals: Mapping[str, torch.Tensor], tangents: Mapping[str, torch.Tensor],
              args: tuple, kwargs: Mapping[str, Any]):
    """Decoding from f_lin: see :func:`hf_taujp.generation.linearized_generate`."""
    return linearized_generate(base, primals, tangents, *args, **kwargs)


def linearize(
    module: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    *,
    parameter_names: Iterable[str] | None = None,
    tangents: Mapping[str, torch.Tensor] | None = None,
    mode: str = "eval",
) -> LinearizedModule:
    """Wrap ``module`` as f_lin(x; θ0 + τ) = f(x; θ0) + J f(x; θ0)·τ with τ trainable (zero by default).

    Args:
        target_modules: PEFT-style choice of linearized parameters: None/"all" (every parameter),
            a list of module-name suffixes, or a regex full-matched on module names.
        parameter_names: exact base parameter names instead of ``target_modules``.
        tangents: initial τ ``{name: tensor}`` (e.g. α·task vector); its keys must be the linearized names.
        mode: ``"eval"`` (default): linearize around the model in eval mode (no dropout inside f(x; θ0)
            and J, the authors' choice) whatever ``.train()`` says; ``"train"``: dropout active in train mode.
    The base parameters are frozen in place (``requires_grad=False``); non-linearized ones stay at θ0.
    """
    if parameter_names is not None and target_modules is not None:
        raise HfTaujpError("Give either target_modules or parameter_names, not both.")
    if parameter_names is None:
        if target_modules is None and tangents is not None:
            parameter_names = list(tangents)
        else:
            parameter_names = match_parameter_names(module, target_modules)
    return LinearizedModule(module, parameter_names, tangents=tangents, mode=mode)
