"""`merge(base, vectors, method=..., **params)`: apply a registered method parameter by parameter."""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..hub import BaseModelMismatchError, HfTaujpError, load_safetensors, read_json, resolve_pretrained_dir
from .methods import REQUIRES_STATISTICS, MergeConfigError, MissingStatisticsError, get_merge_method

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise MergeConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _load_vector(v: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a TaskVector, a plain dict of tensors, or a TaskVector folder / repo id."""
    if isinstance(v, Mapping):
        return dict(v), {}
    if hasattr(v, "tensors"):
        meta = {k: getattr(v, k, None) for k in ("base_model", "base_fingerprint", "kind")}
        return dict(v.tensors), meta
    if isinstance(v, (str, os.PathLike)):
        d = resolve_pretrained_dir(v)
        cfg = read_json(os.path.join(d, "config.json"), "task vector config")
        if cfg.get("format") != "hf-taujp/task_vector":
            raise HfTaujpError(f"{v!r} is not a task vector folder (config format {cfg.get('format')!r})")
        return load_safetensors(d, "task_vector"), cfg
    raise MergeConfigError(f"cannot use {type(v).__name__} as a task vector")


def _load_stat(s: Any) -> tuple[dict[str, torch.Tensor], float | None]:
    if s is None:
        return None, None
    if isinstance(s, Mapping):
        return dict(s), None
    if hasattr(s, "tensors"):
        return dict(s.tensors), getattr(s, "num_examples", None)
    raise MergeConfigError(f"cannot use {type(s).__name__} as a statistic (need a dict of tensors or a Statistics)")


def _base_state(base: Any):
    """(state dict, module or None) of the base model."""
    if isinstance(base, torch.nn.Module):
        return base.state_dict(), base
    if isinstance(base, Mapping):
        return dict(base), None
    if isinstance(base, (str, os.PathLike)):
        import transformers

        d = resolve_pretrained_dir(base)
        cfg = read_json(os.path.join(d, "config.json"), "model config")
        arch = (cfg.get("architectures") or ["AutoModel"])[0]
        cls = getattr(transformers, arch, transformers.AutoModel)
        model = cls.from_pretrained(d)
        return model.state_dict(), model
    raise MergeConfigError(f"cannot use {type(base).__name__} as a base model")


def merge(
    base: Any,
    vectors: Sequence[Any],
    method: str = "task_arithmetic",
    *,
    weights=None,
    fishers: Sequence[Any] | None = None,
    base_fisher: Any = None,
    num_examples: Sequence[float] | None = None,
    return_task_vector: bool = False,
    dtype=None,
    progress: bool = True,
    **params,
):
    """Merge task vectors into ``base`` with a registered method (see ``methods.MERGE_METHODS``).

    For every base parameter name p present in the vectors: Δ_p = method(θ0_p, [τ_t,p], **params),
    computed in float32 (float64 if the inputs are), and θ_p = θ0_p + Δ_p cast to ``dtype``
    (default: the base parameter's dtype). Parameters absent from every vector are kept.

    Args:
        base: ``nn.Module``, state dict, or a local folder / repo id of a transformers model.
        vectors: TaskVector objects, dicts name -> τ, or TaskVector folders / repo ids.
        method: registry name (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
            ``magnitude_prune``, ``fisher_average``, ``gradient_matching``).
        weights: one α per vector (or one shared); negative α negates.
        fishers / base_fisher / num_examples: per-task diagonal Fisher (Statistics or dicts), the base
            model's Fisher and the dataset sizes s_t (taken from Statistics.num_examples when omitted).
        return_task_vector: return the merged Δ as a TaskVector (dict if TaskVector is unavailable).
        params: method parameters (``density``, ``majority_sign_method``, ``lambda_``, ``seed``, ...).

    Returns a merged deep copy of the base module (or a state dict if ``base`` was one).
    """
    if vectors is None or len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    fn = get_merge_method(method)
    out_dtype = _as_dtype(dtype)
    loaded = [_load_vector(v) for v in vectors]
    fps = {m.get("base_fingerprint") for _, m in loaded if m.get("base_fingerprint")}
    if len(fps) > 1:
        bases = [m.get("base_model") or m.get("base_fingerprint") for _, m in loaded]
        raise BaseModelMismatchError(f"task vectors were made from different base models: {bases}")
    kinds = {m.get("kind") for _, m in loaded if m.get("kind")}
    if "linear" in kinds:
        raise MergeConfigError("linear (tangent) task vectors cannot be merged into the weights; merge them in the linearized model")
    base_sd, module = _base_state(base)
    if fps and module is not None:
        try:
            from ..task_vector import fingerprint
        except ImportError:  # TaskVector module not available: skip the check
            fingerprint = None
        if fingerprint is not None and fingerprint(module) not in fps:
            raise BaseModelMismatchError(f"task vectors were made from base fingerprint {fps.pop()}, not from the given base")

    needs = REQUIRES_STATISTICS.get(method)
    stats, stat_n = None, None
    if needs:
        if not fishers:
            raise MissingStatisticsError(f"method {method!r} needs one {needs} statistic per task vector (fishers=...)")
        if len(fishers) != len(vectors):
            raise MissingStatisticsError(f"got {len(fishers)} {needs} statistics for {len(vectors)} task vectors")
        pairs = [_load_stat(f) for f in fishers]
        stats = [p[0] for p in pairs]
        stat_n = [p[1] for p in pairs]
        if num_examples is None and all(n is not None for n in stat_n):
            num_examples = stat_n
        bf, bn = _load_stat(base_fisher)
        if bf is not None:
            params.setdefault("base_num_examples", bn if bn is not None else 1.0)
        params["base_fisher_dict"] = bf
    if num_examples is not None:
        params["num_examples"] = list(num_examples)

    names = [n for n in base_sd if any(n in t for t, _ in loaded)]
    for t, _ in loaded:
        extra = set(t) - set(base_sd)
        if extra:
            raise BaseModelMismatchError(f"task vector has parameters missing from the base: {sorted(extra)[:5]}")
    seed = params.pop("seed", None)
    bfd = params.pop("base_fisher_dict", None)
    merged: dict[str, torch.Tensor] = {}
    for i, name in enumerate(tqdm(names, desc=f"merge ({method})", disable=not progress)):
        b = base_sd[name]
        taus = []
        for k, (t, _) in enumerate(loaded):
            tau = t.get(name)
            if tau is None:
                tau = torch.zeros_like(b)
            if tuple(tau.shape) != tuple(b.shape):
                raise BaseModelMismatchError(f"{name}: task vector {k} has shape {tuple(tau.shape)}, base {tuple(b.shape)}")
            taus.append(tau.float() if tau.dtype != torch.float64 else tau)
        kw = dict(params)
        if seed is not None:
            kw["seed"] = int(seed) + i  # one stream per parameter, reproducible in streaming order
        if stats is not None:
            fs = []
            for k, s in enumerate(stats):
                if name not in s:
                    raise MissingStatisticsError(f"{needs} of task vector {k} has no entry for {name}")
                fs.append(s[name])
            kw["fishers"] = fs
            if bfd is not None:
                if name not in bfd:
                    raise MissingStatisticsError(f"base fisher has no entry for {name}")
                kw["base_fisher"] = bfd[name]
        delta = fn(b, taus, weights=weights, name=name, **kw)
        merged[name] = delta
    target = {n: (out_dtype or base_sd[n].dtype) for n in merged}
    if return_task_vector:
        tensors = {n: d.to(target[n]) for n, d in merged.items()}
        try:
            from ..task_vector import TaskVector
        except ImportError:
            return tensors
        meta = loaded[0][1]
        return TaskVector(tensors, base_model=meta.get("base_model"), base_fingerprint=meta.get("base_fingerprint"),
                          kind="nonlinear", task=f"merge:{method}")
    new_sd = {}
    for n, b in base_sd.items():
        if n in merged:
            new_sd[n] = (b.to(merged[n].dtype) + merged[n]).to(target[n])
        else:
            new_sd[n] = b if out_dtype is None or not b.is_floating_point() else b.to(out_dtype)
    if module is None:
        return new_sd
    out = copy.deepcopy(module)
    if out_dtype is not None:
        out.to(out_dtype)
    # load only merged names: tied weights (GPT-2 lm_head = wte) would otherwise be overwritten by the base copy
    missing = out.load_state_dict({n: new_sd[n] for n in merged}, strict=False)
    if missing.unexpected_keys:
        raise HfTaujpError(f"unexpected keys while loading the merged weights: {missing.unexpected_keys[:5]}")
    return out
