"""LoRA adapters merged into one LoRA adapter (:func:`merge_lora_adapters`), with the semantics of PEFT's
``LoraModel.add_weighted_adapter``: ``"cat"`` concatenates the factors (exact), ``"svd"`` truncates the
weighted sum (``LORA_COMBINATIONS``); from a ``PeftModel`` or from factored task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import HfTaujpError, MergeConfigError
from ..low_rank_tau import LowRankTau, low_rank_sum
from ..peft_conversion import tensors_from_peft
from .peft_lora import _as_peft_factors, _build_quietly, _install, _lora_config
from .targets import _module_kind
from .truncation import _check_rule, _few, truncated_factors

# PEFT add_weighted_adapter's combination types this module implements (the others combine A and B themselves,
# not ΔW, or prune: for TIES / DARE on task vectors use hf_taujp.merge)
LORA_COMBINATIONS = ("cat", "svd")


# --------------------------------------------------------------------------------------------
# Merging LoRA adapters (PEFT add_weighted_adapter: "cat", "svd")
# --------------------------------------------------------------------------------------------
def _check_weights(weights, n: int) -> list[float]:
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = [weights] * n
    try:
        ws = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise MergeConfigError(f"weights must be numbers, got {weights!r}.") from None
    if len(ws) != n:
        raise MergeConfigError(f"{len(ws)} weights for {n} adapters.")
    if any(isinstance(w, bool) for w in weights) or not all(math.isfinite(w) for w in ws):
        raise MergeConfigError(f"weights must be finite numbers, got {list(weights)!r}.")
    return ws


def _combine(per_adapter: Sequence[Mapping[str, Any]], ws: Sequence[float], combination_type: str,
             r: int | None, energy: float | None) -> dict[str, Any]:
    """Σ_t w_t·τ_t per key (a missing key counts as 0). Entries factored in every operand that has them: ``cat``
    concatenates the factors (:func:`~hf_taujp.low_rank_tau.low_rank_sum`, rank Σ k_t, exact), ``svd`` truncates
    that sum from its factors (:func:`truncated_factors`). Other entries: the exact full sum (``svd``: a 2-D sum of
    which some operand is factored is truncated too)."""
    keys = list(dict.fromkeys(k for d in per_adapter for k in d))
    out = {}
    for key in keys:
        terms = [(w, d[key]) for w, d in zip(ws, per_adapter) if key in d]
        factored = [isinstance(e, LowRankTau) for _, e in terms]
        if all(factored):
            s = low_rank_sum(terms)
            out[key] = s if combination_type == "cat" else truncated_factors(s, r, energy=energy,
                                                                             transposed=s.transposed)
            continue
        dt = terms[0][1].dtype
        for _, e in terms[1:]:
            dt = torch.promote_types(dt, e.dtype)
        total = sum(w * (e.full(torch.float64) if isinstance(e, LowRankTau) else e.double().to(terms[0][1].device))
                    for w, e in terms)
        if combination_type == "svd" and any(factored) and total.dim() == 2:
            lay = next(e for _, e in terms if isinstance(e, LowRankTau)).transposed
            out[key] = truncated_factors(total.to(dt), r, energy=energy, transposed=False).as_layout(lay)
        else:
            out[key] = total.to(dt)
    return out


def _max_rank(per_adapter) -> int:
    ranks = [e.rank for d in per_adapter for e in d.values() if isinstance(e, LowRankTau)]
    if not ranks:
        raise MergeConfigError("The adapters hold no LoRA factors to merge.")
    return max(ranks)


def merge_lora_adapters(adapters, weights, combination_type: str = "svd", *, r: int | None = None,
                        energy: float | None = None, adapter_names: Sequence[str] | None = None,
                        adapter_name: str | None = None, base: torch.nn.Module | None = None, **to_lora_kwargs):
    """LoRA adapters merged into one LoRA adapter: ΔW = Σ_t w_t·s_t·B_t·A_t per layer (PEFT's
    ``LoraModel.add_weighted_adapter`` semantics, peft 0.21 ``tuners/lora/model.py``).

    ``combination_type``:
    - ``"cat"`` (exact): A = [w_1 s_1 A_1; …; w_T s_T A_T], B = [B_1, …, B_T] — PEFT folds w_t·s_t into A, we into B
      (:func:`~hf_taujp.low_rank_tau.low_rank_sum`; none when the |w_t s_t| are equal); rank Σ_t k_t of the
      adapters that have the layer (PEFT pads every adapter to its largest rank first; the product is the same).
      ``r`` / ``energy`` are refused: cat keeps everything.
    - ``"svd"``: the weighted sum truncated per layer to its best rank-k approximation (Eckart–Young; computed from
      the concatenated factors by QR, never the full matrix; factors split as √σ on both sides, PEFT puts σ in B):
      k = min(r, out, in) with ``r`` defaulting to the largest rank of the adapters (PEFT's ``svd_rank=None``), or
      the ``energy`` rule of ``to_lora``.
    PEFT's other combination types combine A and B themselves (not ΔW) or prune; for TIES / DARE / … of the full
    ΔW use ``hf_taujp.merge`` on task vectors.

    Args:
        adapters: a ``peft.PeftModel`` holding the LoRA adapters (``adapter_names``: which, in order; default all),
            or a sequence of ``TaskVector``s whose LoRA weights are factored (``TaskVector.from_peft(pm,
            factored=True)``, ``to_lora``'s factors via :func:`low_rank_approximation`).
        weights: one finite number per adapter (or one number for all); negative weights subtract.
        adapter_name: the merged adapter's name: default ``"merged"`` for a PeftModel, ``"default"`` with ``base``.
        base: with task vectors, build the adapter on ``base`` (``TaskVector.to_lora(base, **to_lora_kwargs)`` of the
            merged, factored vector) instead of returning the vector.

    Returns:
        - PeftModel input: the same model with the merged adapter added (in place, not activated: PEFT's
          ``add_weighted_adapter`` contract; ``pm.set_adapter(name)``, ``pm.save_pretrained(dir,
          selected_adapters=[name])``). Its config: ``r`` = the largest rank, ``rank_pattern`` / ``alpha_pattern``
          per layer, ``use_rslora=False``, the first adapter's ``task_type``.
        - Task vectors: the merged factored ``TaskVector`` (full entries, e.g. ``lora_bias`` Δb, summed exactly), or
          with ``base`` the PeftModel of ``to_lora``.

    Raises:
        MergeConfigError: an unknown ``combination_type`` (PEFT's others named), weights of the wrong number or not
            finite, ``r`` / ``energy`` with ``"cat"``, a bad rank rule, an unknown or existing adapter name, no
            LoRA factors at all.
        HfTaujpError: adapters that are not LoRA (or, from a PeftModel, whose change is not only factors: DoRA,
            ``lora_bias``, trained biases, modules_to_save — named), vectors of different kinds or bases.
    """
    if combination_type not in LORA_COMBINATIONS:
        raise MergeConfigError(
            f"combination_type must be one of {LORA_COMBINATIONS}, got {combination_type!r}. PEFT's 'linear', 'ties', "
            "'dare_*' and 'magnitude_prune*' combine the A and B factors themselves (Σ w·B_t · Σ w·A_t is not "
            "Σ w·B_t·A_t) or prune them; for TIES / DARE on ΔW merge task vectors with hf_taujp.merge.")
    if combination_type == "cat" and (r is not None or energy is not None):
        raise MergeConfigError("combination_type='cat' is exact (rank Σ k_t): r / energy apply to 'svd' only.")
    _check_rule(r, energy, allow_neither=True, err=MergeConfigError)
    if isinstance(adapters, torch.nn.Module):
        if not hasattr(adapters, "peft_config"):
            raise HfTaujpError(f"merge_lora_adapters expects a peft.PeftModel or task vectors, got {type(adapters).__name__}.")
        if to_lora_kwargs or base is not None:
            raise MergeConfigError(f"base= and to_lora options apply to task vectors, not to a PeftModel "
                                   f"(got {sorted(to_lora_kwargs) + (['base'] if base is not None else [])}).")
        return _merge_in_peft_model(adapters, weights, combination_type, r, energy, adapter_names,
                                    adapter_name or "merged")
    if adapter_names is not None:
        raise MergeConfigError("adapter_names selects adapters of a PeftModel; got task vectors.")
    vectors = list(adapters)
    if not vectors:
        raise MergeConfigError("merge_lora_adapters needs at least one adapter.")
    if not all(hasattr(v, "entries") and hasattr(v, "check_compatible") for v in vectors):
        raise HfTaujpError("merge_lora_adapters expects a PeftModel or a sequence of TaskVectors, got "
                           f"{[type(v).__name__ for v in vectors]}.")
    for v in vectors[1:]:
        vectors[0].check_compatible(v)
    ws = _check_weights(weights, len(vectors))
    per = [dict(v.entries) for v in vectors]
    if combination_type == "svd" and r is None and energy is None:
        r = _max_rank(per)
    else:
        _max_rank(per)
    meta = vectors[0].metadata()
    meta.update(task=meta["task"] if all(v.task == meta["task"] for v in vectors) else None,
                training=meta["training"] if all(v.training == meta["training"] for v in vectors) else {})
    for field in ("base_fingerprint", "base_model", "base_model_revision"):
        meta[field] = next((getattr(v, field) for v in vectors if getattr(v, field)), None)
    merged = type(vectors[0])(_combine(per, ws, combination_type, r, energy), **meta)
    if base is None:
        return merged
    return merged.to_lora(base, adapter_name=adapter_name or "default", **to_lora_kwargs)


def _merge_in_peft_model(pm, weights, combination_type, r, energy, adapter_names, adapter_name):
    names = list(adapter_names) if adapter_names is not None else list(pm.peft_config)
    unknown = [n for n in names if n not in pm.peft_config]
    if unknown or not names:
        raise MergeConfigError(f"Adapters {unknown or names} are not in the PEFT model (has {sorted(pm.peft_config)}).")
    if adapter_name in pm.peft_config:
        raise MergeConfigError(f"The PEFT model already has an adapter named {adapter_name!r}; choose another "
                               "adapter_name (PEFT's add_weighted_adapter silently keeps the old one).")
    ws = _check_weights(weights, len(names))
    per = []
    for n in names:
        peft_type = str(getattr(pm.peft_config[n], "peft_type", "")).split(".")[-1].upper()
        if peft_type != "LORA":
            raise HfTaujpError(f"Adapter {n!r} is a {peft_type} adapter: merge_lora_adapters merges LoRA adapters.")
        tensors, _, _ = tensors_from_peft(pm, None, n, {}, factored=True)
        full = [k for k, e in tensors.items() if not isinstance(e, LowRankTau)]
        if full:
            raise HfTaujpError(f"Adapter {n!r} changes {_few(full)} by more than LoRA factors (lora_bias or trained "
                               "biases): a merged LoRA adapter of a PeftModel holds factors only. Merge "
                               "TaskVector.from_peft(pm, adapter_name=..., factored=True) vectors instead and build "
                               "the adapter with to_lora(base, rest='save').")
        per.append(tensors)
    if combination_type == "svd" and r is None and energy is None:
        r = _max_rank(per)
    else:
        _max_rank(per)
    merged = _combine(per, ws, combination_type, r, energy)
    inner = pm.get_base_model()
    factors = {}
    for key, lr in merged.items():
        m = key[: -len(".weight")]
        layer = inner.get_submodule(m)
        kind = _module_kind(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)
        if lr.rank == 0 or lr.scale == 0:
            continue
        A, B, k, alpha = _as_peft_factors(lr, kind != "linear")
        factors[m] = (kind, A, B, k, alpha)
    if not factors:
        raise MergeConfigError("The weighted sum of the adapters is zero on every layer: no adapter to build.")
    first = pm.peft_config[names[0]]
    config = _lora_config({m: (f[0], f[3], f[4]) for m, f in factors.items()}, (), False,
                          getattr(first, "task_type", None))
    _build_quietly(lambda: pm.add_adapter(adapter_name, config))
    _install(pm, adapter_name, factors, ())
    return pm
