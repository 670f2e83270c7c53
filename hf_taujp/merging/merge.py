"""`merge(base, vectors, method=..., **params)`: apply a registered method parameter by parameter."""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..hub import BaseModelMismatchError, HfTaujpError, read_json, resolve_pretrained_dir
from ..task_vector import TaskVector, fingerprint
from .methods import REQUIRES_STATISTICS, parameter_seed, MergeConfigError, MissingStatisticsError, get_merge_method

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise MergeConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _load_vector(v: Any) -> TaskVector:
    """A :class:`TaskVector` from a TaskVector, a plain dict name -> τ (no metadata), or a TaskVector
    folder / Hub repo id (``TaskVector.from_pretrained`` layout, tensor prefix ``task_vector``)."""
    if isinstance(v, TaskVector):
        return v
    if isinstance(v, Mapping):
        return TaskVector(v)
    if isinstance(v, (str, os.PathLike)):
        return TaskVector.from_pretrained(v)
    raise MergeConfigError(f"cannot use {type(v).__name__} as a task vector (need a TaskVector, a dict of "
                           "tensors, or a TaskVector folder / repo id)")


def check_vectors_compatible(metas: Sequence[Mapping[str, Any]], labels: Sequence[str] | None = None) -> None:
    """Raise ``BaseModelMismatchError`` when task vectors (their metadata: base_fingerprint, base_model,
    kind) come from different bases, and ``MergeConfigError`` for linear (tangent) vectors.

    Fingerprints decide when both are known (a Hub id and a local path of the same weights agree);
    otherwise differing ``base_model`` ids raise, as ``TaskVector.check_compatible`` does.
    """
    labels = list(labels) if labels is not None else [f"vector {i}" for i in range(len(metas))]
    for lab, m in zip(labels, metas):
        if m.get("kind") == "linear":
            raise MergeConfigError(f"{lab} is a linear (tangent) task vector: it lives in the tangent space of a "
                                   "linearized model and cannot be merged into the weights; merge tangents with "
                                   "TaskVector arithmetic and apply with apply_to(..., linear=True)")
    m0, l0 = metas[0], labels[0]
    for lab, m in zip(labels[1:], metas[1:]):
        f0, f1 = m0.get("base_fingerprint"), m.get("base_fingerprint")
        b0, b1 = m0.get("base_model"), m.get("base_model")
        if (f0 and f1 and f0 != f1) or (not (f0 and f1) and b0 and b1 and b0 != b1):
            raise BaseModelMismatchError(
                f"task vectors were made from different base models: {l0} from {b0!r} (fingerprint {f0}) vs "
                f"{lab} from {b1!r} (fingerprint {f1})")


def check_base(metas: Sequence[Mapping[str, Any]], fps: set[str], base_label: str,
               labels: Sequence[str] | None = None) -> None:
    """``BaseModelMismatchError`` when a vector's recorded base fingerprint is not one of ``fps``."""
    labels = list(labels) if labels is not None else [f"vector {i}" for i in range(len(metas))]
    for lab, m in zip(labels, metas):
        f = m.get("base_fingerprint")
        if f and f not in fps:
            raise BaseModelMismatchError(
                f"{lab} was made from base {m.get('base_model')!r} (fingerprint {f}), but the given base "
                f"{base_label} has fingerprint {sorted(fps)[0]}; merge it into the base it was made from")


def _load_stat(s: Any, kind: str) -> tuple[dict[str, torch.Tensor] | None, float | None]:
    """(tensors, num_examples) of a Statistics object, a dict of tensors, or a statistics folder / repo id."""
    if s is None:
        return None, None
    if isinstance(s, Mapping):
        return dict(s), None
    if isinstance(s, (str, os.PathLike)):
        from .statistics import FisherStatistics, GramStatistics

        s = (FisherStatistics if kind == "fisher" else GramStatistics).from_pretrained(s)
    if hasattr(s, "tensors"):
        if getattr(s, "kind", kind) != kind:
            raise MergeConfigError(f"got {s.kind} statistics where {kind} statistics are needed")
        return dict(s.tensors), getattr(s, "num_examples", None)
    raise MergeConfigError(f"cannot use {type(s).__name__} as a statistic (need a dict of tensors, a Statistics or a folder)")


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
    grams: Sequence[Any] | None = None,
    base_fisher: Any = None,
    num_examples: Sequence[float] | None = None,
    return_task_vector: bool = False,
    dtype=None,
    check_base_model: bool = True,
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
        grams: per-task Gram statistics for ``regmean`` (GramStatistics from ``estimate_gram``, folders
            / repo ids, or dicts ``"<module>.weight" -> (in, in)``); weights without a Gram are averaged.
        fishers / base_fisher / num_examples: per-task diagonal Fisher (Statistics or dicts), the base
            model's Fisher and the dataset sizes s_t (taken from Statistics.num_examples when omitted).
        return_task_vector: return the merged Δ = θ − θ0 as a :class:`TaskVector` (kind "nonlinear",
            base_model / base_fingerprint from the vectors or the base, task ``"merge:<method>"``,
            ``training={"merge": {method, weights, params, sources}}``).
        check_base_model: compare each vector's recorded ``base_fingerprint`` with the base
            (``BaseModelMismatchError`` on a mismatch); vectors of different bases always raise.
        params: method parameters (``density``, ``majority_sign_method``, ``lambda_``, ``seed``, ...).

    DARE methods draw their masks from one generator per parameter, seeded with
    ``methods.parameter_seed(seed, name)`` (derived from the seed and the parameter *name*, not its
    position), so a given ``seed`` reproduces a whole merge, in memory and streaming alike, whatever
    order the tensors are read in (without ``seed`` the global torch RNG is used).

    Returns a merged deep copy of the base module (or a state dict if ``base`` was one).
    """
    if vectors is None or len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    fn = get_merge_method(method)
    out_dtype = _as_dtype(dtype)
    tvs = [_load_vector(v) for v in vectors]
    labels = [f"vector {i}" + (f" ({v!r})" if isinstance(v, (str, os.PathLike)) else "") for i, v in enumerate(vectors)]
    metas = [tv.metadata() for tv in tvs]
    check_vectors_compatible(metas, labels)
    base_sd, module = _base_state(base)
    if check_base_model and any(m.get("base_fingerprint") for m in metas):
        check_base(metas, {fingerprint(module if module is not None else base_sd)}, "model" if module is not None else "state dict", labels)
    loaded = [(tv.tensors, m) for tv, m in zip(tvs, metas)]

    needs = REQUIRES_STATISTICS.get(method)
    stats, stat_n, layouts = None, None, {}
    if needs:
        given, arg = (fishers, "fishers") if needs == "fisher" else (grams, "grams")
        if not given:
            raise MissingStatisticsError(f"method {method!r} needs one {needs} statistic per task vector ({arg}=...)")
        if len(given) != len(vectors):
            raise MissingStatisticsError(f"got {len(given)} {needs} statistics for {len(vectors)} task vectors")
        pairs = [_load_stat(f, needs) for f in given]
        for f in given:
            layouts.update((getattr(f, "extra", None) or {}).get("weight_layout") or {})
        stats = [p[0] for p in pairs]
        stat_n = [p[1] for p in pairs]
        if num_examples is None and all(n is not None for n in stat_n):
            num_examples = stat_n
        bf, bn = _load_stat(base_fisher, "fisher")
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
            kw["seed"] = parameter_seed(seed, name)  # by name: same masks in memory and streaming
        if stats is not None and needs == "gram":
            have = [name in st for st in stats]
            if any(have):
                if not all(have):
                    raise MissingStatisticsError(f"gram of task vector {have.index(False)} has no entry for {name} (others do)")
                kw["grams"] = [st[name] for st in stats]
                kw["layout"] = layouts.get(name, "out_in")
        elif stats is not None:
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
        known = [m for m in metas if m.get("base_fingerprint") or m.get("base_model")]
        m0 = known[0] if known else {}
        base_name = m0.get("base_model") or (getattr(getattr(module, "config", None), "_name_or_path", None) or None)
        recipe = {"method": method, "weights": weights if not torch.is_tensor(weights) else weights.tolist(),
                  "params": {k: v for k, v in {**params, "seed": seed}.items()
                             if v is not None and isinstance(v, (int, float, str, bool, list))},
                  "sources": [m.get("task") or lab for m, lab in zip(metas, labels)]}
        return TaskVector(tensors, base_model=base_name, base_model_revision=m0.get("base_model_revision"),
                          base_fingerprint=m0.get("base_fingerprint") or (fingerprint(module) if module is not None else None),
                          kind="nonlinear", task=f"merge:{method}", training={"merge": recipe})
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
