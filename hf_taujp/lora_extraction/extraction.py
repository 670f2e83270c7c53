"""A task vector as a PEFT LoRA adapter (``TaskVector.to_lora``, :func:`task_vector_to_lora`), the analogue
of ``mergekit-extract-lora``: the plan of :mod:`.targets`, the truncated factors of :mod:`.truncation`, the
PEFT model of :mod:`.peft_lora`, and θ0 + τ written into the saved modules and the LoRA layers' biases.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..errors import HfTaujpError
from ..low_rank_tau import LowRankTau
from ..tied import tied_groups
from .peft_lora import _as_peft_factors, _build_quietly, _install, _lora_config
from .targets import REST_MODES, _Plan, _plan
from .truncation import _check_rule, _few, truncated_factors


def _check_inputs(tv, base, check_base: bool) -> dict[str, torch.Tensor]:
    if not isinstance(base, torch.nn.Module):
        raise HfTaujpError(f"to_lora expects the base model (a torch.nn.Module), got {type(base).__name__}.")
    bad = [k for k, e in tv.entries.items()
           if not (e.is_finite() if isinstance(e, LowRankTau) else bool(torch.isfinite(e).all()))]
    if bad:
        raise HfTaujpError(f"Task vector contains NaN or inf values in {len(bad)} tensor(s): {_few(bad)}.")
    if check_base:
        tv.check_compatible(base)
    params = dict(base.named_parameters())
    missing = [k for k in tv.entries if k not in params]
    if missing:
        raise HfTaujpError(f"{len(missing)} task vector key(s) are not parameters of the base model: {_few(missing)}.")
    for k, e in tv.entries.items():
        if tuple(params[k].shape) != tuple(e.shape):
            raise HfTaujpError(f"Shape mismatch for {k!r}: task vector {tuple(e.shape)} vs base {tuple(params[k].shape)}.")
    meta = [k for k, p in params.items() if p.device.type == "meta"]
    if meta:
        raise HfTaujpError(f"to_lora builds the adapter on the base model, whose weights {_few(meta)} are on the meta "
                           "device: load the base with its weights.")
    return params


def task_vector_to_lora(tv, base: torch.nn.Module, r: int | None = None, *, energy: float | None = None,
                        target_modules: str | Sequence[str] | None = None, rest: str = "error",
                        adapter_name: str = "default", task_type: str | None = None, allow_linear: bool = False,
                        check_base: bool = True):
    """``TaskVector.to_lora``'s implementation (see there); ``task_type`` is used as given (None: a plain PeftModel)."""
    import peft

    if rest not in REST_MODES:
        raise HfTaujpError(f"rest must be one of {REST_MODES}, got {rest!r}.")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise HfTaujpError(f"adapter_name must be a non-empty string, got {adapter_name!r}.")
    if target_modules is not None and not isinstance(target_modules, str) and not (
            isinstance(target_modules, (list, tuple, set)) and all(isinstance(t, str) for t in target_modules)):
        raise HfTaujpError(f"target_modules must be a regex string or a list of module names, got {target_modules!r}.")
    _check_rule(r, energy, allow_neither=True)
    if tv.kind == "linear" and allow_linear is not True:
        raise HfTaujpError(
            "This is a 'linear' task vector (the tangent of a linearized model): a LoRA adapter changes weights, so "
            "its model would be f(x; θ0 + τ), the weight reading, not the linearized model f(θ0) + J·τ it was trained "
            "as. Use to_peft(base) for the linearized adapter, or pass allow_linear=True for the weight reading.")
    params = _check_inputs(tv, base, check_base)
    entries = tv.entries
    plan = _plan(entries, base, target_modules, rest, task_type)
    if r is None and energy is None:
        dense = [k for _, k in plan.targets.values() if not isinstance(entries[k], LowRankTau)]
        if dense:
            raise HfTaujpError(f"Give a rank rule (r= or energy=): {_few(dense)} are full tensors (only a factored "
                               "vector's stored factors can become the adapter as they are).")
    factors = {}
    zero = []
    for m, (kind, k) in plan.targets.items():
        transposed = kind != "linear"
        e = entries[k]
        try:
            lr = e.as_layout(transposed) if r is None and energy is None else truncated_factors(
                e, r, energy=energy, transposed=transposed)
        except HfTaujpError as exc:
            raise HfTaujpError(f"Entry {k!r}: {exc}") from None
        if lr.rank == 0 or lr.scale == 0:
            if f"{m}.bias" not in plan.biases:
                zero.append(m)
                continue
            lr = LowRankTau(torch.zeros(1, lr.A.shape[1], dtype=lr.dtype), torch.zeros(lr.B.shape[0], 1, dtype=lr.dtype),
                            1.0, transposed)  # a rank-1 zero ΔW: the layer exists for its bias
        A, B, rk, alpha = _as_peft_factors(lr, transposed)
        factors[m] = (kind, A, B, rk, alpha)
    if not factors:
        why = f" (τ is zero on {_few(zero)})" if zero else ""
        raise HfTaujpError(f"No LoRA layer to build{why}: the task vector has no non-zero weight of an nn.Linear, "
                           "Conv1D or nn.Embedding module that target_modules selects.")
    config = _lora_config({m: (f[0], f[3], f[4]) for m, f in factors.items()}, plan.saved, bool(plan.biases), task_type)
    pm = _build_quietly(lambda: peft.get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name))
    _install(pm, adapter_name, factors, plan.saved)
    _write_full_values(pm, adapter_name, entries, params, plan, base)
    return pm


def _write_full_values(pm, adapter_name, entries, params, plan: _Plan, base) -> None:
    """θ0 + τ (float64, cast to the parameter's dtype) into the saved modules' copies and the LoRA layers' biases."""
    inner = pm.get_base_model()
    alias = {n: g for g in tied_groups(base) for n in g}
    full = {}

    def value(name):
        key = next((n for n in alias.get(name, (name,)) if n in entries), None)
        if key is None:
            return None
        if key not in full:
            e = entries[key]
            full[key] = e.full(torch.float64) if isinstance(e, LowRankTau) else e.double()
        p0 = params.get(name, params.get(key))
        return (p0.detach().double() + full[key].to(p0.device)).to(p0.dtype)

    with torch.no_grad():
        for k, m in plan.biases.items():
            b = inner.get_submodule(m).get_base_layer().bias
            b.copy_(value(k).to(b.device))
        for s in plan.saved:
            copy_ = inner.get_submodule(s).modules_to_save[adapter_name]
            for q, p in copy_.named_parameters(remove_duplicate=False):
                v = value(f"{s}.{q}")
                if v is not None:
                    p.copy_(v.to(p.device))
