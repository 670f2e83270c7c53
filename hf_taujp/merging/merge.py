"""`merge(base, vectors, method=..., **params)`: apply a registered method parameter by parameter."""
from __future__ import annotations

import copy
import os
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..compat import check_same_base, describe_base, same_base
from ..errors import BaseModelMismatchError, HfTaujpError
from ..hub import read_json, resolve_pretrained_dir
from ..low_rank_tau import LowRankTau, low_rank_sum
from ..task_vector import TaskVector, fingerprint
from ..tied import canonical_tensors, model_class_for, tied_groups
from .layouts import WeightLayouts, check_weight_layout, module_layouts
from .layouts import weight_layout as _gram_layout  # merge() has an argument named weight_layout
from .methods import (MergeConfigError, MissingStatisticsError, MethodSpec, _per_vector, check_finite, get_method_spec,
                      parameter_seed, require_statistics)

# files fetched from a Hub base: weights, configs, tokenizer files, chat template and custom code (never pickles)
BASE_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model", "*.jinja", "*.py", "*.tiktoken"]
# The output dtypes a merge may be asked for by name (a user-facing choice, not a file format: the
# safetensors dtype codes live with the safetensors I/O).
_OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _OUTPUT_DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise MergeConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_OUTPUT_DTYPES)}") from None


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


def check_vectors_compatible(metas: Sequence[Mapping[str, Any]], labels: Sequence[str] | None = None,
                             method: str | None = None) -> str:
    """Check that task vectors (their metadata: base_fingerprint, base_model, kind) can be merged together
    and return their kind ("nonlinear" or "linear").

    ``MergeConfigError`` for mixed kinds (weights and tangents live in different spaces) and for linear
    vectors given to a method registered with ``linear_ok=False`` (RegMean); ``BaseModelMismatchError``
    for different bases under the one rule of :mod:`hf_taujp.compat` (fingerprints decide when both
    are known, else differing ``base_model`` ids raise).
    """
    labels = list(labels) if labels is not None else [f"vector {i}" for i in range(len(metas))]
    kinds = [m.get("kind") or "nonlinear" for m in metas]
    if len(set(kinds)) > 1:
        lin = kinds.index("linear")
        other = next(i for i, k in enumerate(kinds) if k != "linear")
        raise MergeConfigError(f"cannot merge a linear (tangent) task vector ({labels[lin]}) with a {kinds[other]!r} "
                               f"one ({labels[other]}): weights and tangents of a linearized model live in "
                               "different spaces")
    if kinds[0] == "linear" and method is not None and not get_method_spec(method).linear_ok:
        raise MergeConfigError(f"merge method {method!r} is defined on the weights themselves and cannot merge linear "
                               "(tangent) task vectors; use an elementwise method (task_arithmetic, ties, dare_linear, "
                               "dare_ties, magnitude_prune, fisher_average, gradient_matching)")
    for i in range(len(metas)):
        for j in range(i + 1, len(metas)):
            check_same_base(metas[i], metas[j], labels[i], labels[j])
    return kinds[0]


def check_base(metas: Sequence[Mapping[str, Any]], fps: set[str], base_label: str,
               labels: Sequence[str] | None = None) -> None:
    """``BaseModelMismatchError`` when a vector's recorded base fingerprint is not one of ``fps`` (the
    base's fingerprint; same rule as :func:`hf_taujp.compat.same_base`, the base having no recorded id)."""
    labels = list(labels) if labels is not None else [f"vector {i}" for i in range(len(metas))]
    for lab, m in zip(labels, metas):
        if not any(same_base(m, {"base_fingerprint": f}) for f in fps):
            raise BaseModelMismatchError(
                f"{lab} was made from base {describe_base(m)}, but the given base {base_label} has fingerprint "
                f"{sorted(fps)[0]}; merge it into the base it was made from")


def check_method_arguments(spec: MethodSpec, params: Mapping[str, Any], *, weights=None, fishers=None, grams=None,
                           base_fisher=None, num_examples=None, weight_layout=None) -> None:
    """Every argument must mean something to the method: unknown parameters, statistics the method does
    not use and a ``weight_layout`` for a method whose result does not depend on it raise
    ``MergeConfigError`` naming the method (its declared parameters listed)."""
    given = dict(params)
    if weights is not None:
        given["weights"] = weights
    if num_examples is not None:
        given["num_examples"] = num_examples
    spec.check_params(given)
    for arg, value, kind in (("fishers", fishers, "fisher"), ("grams", grams, "gram"), ("base_fisher", base_fisher, "fisher")):
        if value is not None and spec.needs != kind:
            raise MergeConfigError(f"merge method {spec.name!r} takes no {arg} "
                                   + (f"(it uses {spec.needs} statistics)" if spec.needs else "(it uses no statistics)"))
    if base_fisher is not None and "base_fisher" not in spec.driver_args:
        raise MergeConfigError(f"merge method {spec.name!r} takes no base_fisher")
    if weight_layout is not None:
        if "layout" not in spec.driver_args:
            raise MergeConfigError(f"merge method {spec.name!r} takes no weight_layout: its result does not depend on "
                                   "which side of a weight is the output")
        check_weight_layout(weight_layout)


def statistics_sizes(spec: MethodSpec, stat_n: Sequence[float | None], base_n: float | None, has_base: bool,
                     params: dict, labels: Sequence[str]) -> None:
    """Fill ``num_examples`` / ``base_num_examples`` from the statistics for methods that take them (the
    dataset sizes s_t of gradient matching). Sizes known for some statistics and not for others are an
    error (they would silently become 1 — means mixed with sums); given explicitly, they win."""
    if spec.parameters is not None and "num_examples" not in spec.parameters:
        return
    if params.get("num_examples") is None:
        known = [n is not None for n in stat_n]
        if all(known):
            params["num_examples"] = list(stat_n)
        elif any(known):
            raise MissingStatisticsError(
                f"num_examples is known for {labels[known.index(True)]}'s statistics but not for "
                f"{labels[known.index(False)]}'s (a plain dict?): pass num_examples=[...] (the dataset sizes s_t)")
    if has_base and params.get("base_num_examples") is None:
        if base_n is not None:
            params["base_num_examples"] = base_n
        elif params.get("num_examples") is not None and any(n is not None for n in stat_n):
            raise MissingStatisticsError("the base Fisher has no num_examples while the task Fishers have: pass "
                                         "base_num_examples=... (s0)")


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


def load_base_model(base: str | os.PathLike, *, trust_remote_code: bool = False) -> torch.nn.Module:
    """The transformers model in folder / repo id ``base``: its ``architectures[0]`` class, or for custom
    code (``auto_map``) the matching Auto class, which runs the folder's code only with
    ``trust_remote_code=True`` (an error otherwise — never transformers' interactive prompt)."""
    d = resolve_pretrained_dir(base, allow_patterns=BASE_PATTERNS)
    cfg = read_json(os.path.join(d, "config.json"), "model config")
    cls = model_class_for(cfg, trust_remote_code=trust_remote_code)
    return cls.from_pretrained(d)


# Methods whose Δ for a tensor is Σ_t c_t·τ_t (linear in τ): a sum of factored τ_t stays factored, exactly
# (factors concatenated, rank Σ r_t). Every other method sees each tensor materialised.
FACTORED_METHODS = frozenset({"task_arithmetic"})


def merge_entries(tv: TaskVector, groups, label: str) -> dict[str, torch.Tensor | LowRankTau]:
    """``tv``'s stored entries with tied groups folded (:func:`hf_taujp.tied.canonical_tensors`): factored
    entries stay factors (materialised one tensor at a time, as the merge reaches them), except the members
    of a tied group, which are compared as full tensors."""
    tied = {n for g in groups for n in g}
    entries = {k: (e.full() if isinstance(e, LowRankTau) and k in tied else e) for k, e in tv.entries.items()}
    return canonical_tensors(entries, groups, label=label)


def _base_state(base: Any, trust_remote_code: bool):
    """(state dict, module or None) of the base model."""
    if isinstance(base, torch.nn.Module):
        return base.state_dict(), base
    if isinstance(base, Mapping):
        return dict(base), None
    if isinstance(base, (str, os.PathLike)):
        model = load_base_model(base, trust_remote_code=trust_remote_code)
        return model.state_dict(), model
    raise MergeConfigError(f"cannot use {type(base).__name__} as a base model")


def _load_statistics(spec: MethodSpec, method: str, fishers, grams, base_fisher, num_examples, weight_layout,
                     module, groups, labels: Sequence[str], params: dict):
    """merge()'s statistics step: (per-vector statistics by canonical name or None, Gram layouts, base Fisher
    by canonical name or None) for a method that needs statistics; fills ``params``' dataset sizes."""
    needs = spec.needs
    stats, layouts, bfd = None, {}, None
    if needs:
        given = fishers if needs == "fisher" else grams
        require_statistics(method, spec, given, len(labels), base_fisher)
        pairs = [_load_stat(f, needs) for f in given]
        for f in given:
            layouts.update((getattr(f, "extra", None) or {}).get("weight_layout") or {})
        if needs == "gram" and module is not None:  # the module itself says which layers are Conv1D
            layouts.update(module_layouts(module))
        if isinstance(weight_layout, Mapping):  # the caller's word wins
            canon = {n: g[0] for g in groups for n in g}
            layouts.update({canon.get(n, n): lay for n, lay in weight_layout.items()})
        stats = [canonical_tensors(p[0], groups, label=f"{needs} of {lab}") for p, lab in zip(pairs, labels)]
        bf, bn = _load_stat(base_fisher, "fisher")
        if bf is not None:
            bfd = canonical_tensors(bf, groups, label="base fisher")
        if num_examples is not None:
            params["num_examples"] = list(num_examples)
        statistics_sizes(spec, [p[1] for p in pairs], bn, bf is not None, params, labels)
    return stats, layouts, bfd


def _tensor_layouts(spec: MethodSpec, method: str, tvs, module, weight_layout, groups, base_sd, names) -> dict:
    """merge()'s layout step: name -> "out_in" / "in_out" of each merged 2-D tensor, for the methods whose
    result depends on it (RegMean's come from its Grams)."""
    layout_of = {}  # name -> layout of each 2-D tensor, for the methods whose result depends on it
    if "layout" in spec.driver_args and spec.needs != "gram":
        direct = [k for tv in tvs for k, e in tv.entries.items() if isinstance(e, LowRankTau) and not e.transposed]
        table = WeightLayouts.build(modules=None if module is None else module_layouts(module), given=weight_layout,
                                    direct=direct, canon={n: g[0] for g in groups for n in g},
                                    why="the base is a state dict, whose tensors do not say which are Conv1D weights")
        layout_of = {n: table.of(n, base_sd[n].shape, method) for n in names if base_sd[n].dim() == 2}
    return layout_of


def _factored_delta(name: str, entries, weights, params: dict, device) -> LowRankTau:
    """Δ = λ Σ_t α_t τ_t of factored τ_t, again factored (exact); see merge()'s docstring."""
    alphas = _per_vector(1.0 if weights is None else weights, len(entries), "weights")
    lam = float(params.get("lambda_", 1.0))
    delta = low_rank_sum([(lam * a, e) for a, e in zip(alphas, entries) if e is not None]).to(device=device)
    if not delta.is_finite():
        raise HfTaujpError(f"merge produced NaN/inf in {name}")
    return delta


def _dense_taus(entries, b: torch.Tensor) -> list[torch.Tensor]:
    """Each vector's full τ for one parameter (zeros where a vector lacks it), on ``b``'s device, float32 / float64."""
    taus = []
    for tau in entries:
        if tau is None:
            tau = torch.zeros_like(b)
        elif isinstance(tau, LowRankTau):
            tau = tau.full()  # the full tensor, now that this parameter is merged (never truncated)
        taus.append(tau.to(device=b.device, dtype=torch.float64 if tau.dtype == torch.float64 else torch.float32))
    return taus


def _method_kwargs(spec: MethodSpec, name: str, b: torch.Tensor, params: dict, seed, stats, bfd, layouts: dict,
                   layout_of: dict, weight_layout) -> dict:
    """The keywords of the method's call for parameter ``name``: its parameters, the per-parameter seed, the
    statistics (``MissingStatisticsError`` for one missing at ``name``), the layout and the name."""
    needs = spec.needs
    kw = dict(params)
    if seed is not None:
        kw["seed"] = parameter_seed(seed, name)  # by name: same masks in memory and streaming
    if stats is not None and needs == "gram":
        have = [name in st for st in stats]
        if any(have):
            if not all(have):
                raise MissingStatisticsError(f"gram of task vector {have.index(False)} has no entry for {name} (others do)")
            kw["grams"] = [st[name] for st in stats]
            kw["layout"] = _gram_layout(name, layouts, b.shape, kw["grams"][0].shape,
                                        weight_layout if isinstance(weight_layout, str) else None)
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
    if name in layout_of:
        kw["layout"] = layout_of[name]
    if "name" in spec.driver_args:
        kw["name"] = name
    return kw


def _merged_task_vector(merged: dict, target: dict, metas, labels, module, method: str, weights, params: dict, seed,
                        kind: str) -> TaskVector:
    """merge()'s TaskVector output: Δ in the target dtypes, with the vectors' base and the merge recipe."""
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
                      kind=kind, task=f"merge:{method}", training={"merge": recipe})


def _merged_model(merged: dict, target: dict, groups, base_sd, module, out_dtype):
    """merge()'s weight output: θ0 + Δ as a state dict (a state-dict base) or a merged deep copy of the module."""
    # the merged value of a tied group lands in every name the output holds (rule 4 of hf_taujp.tied)
    for g in groups:
        canon = next((n for n in g if n in merged), None)
        if canon is not None:
            for n in g:
                if n != canon and n in base_sd:
                    merged[n] = merged[canon]
                    target[n] = target[canon]
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
    missing = out.load_state_dict({n: new_sd[n] for n in merged}, strict=False)
    if missing.unexpected_keys:
        raise HfTaujpError(f"unexpected keys while loading the merged weights: {missing.unexpected_keys[:5]}")
    return out


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
    trust_remote_code: bool = False,
    weight_layout: str | Mapping[str, str] | None = None,
    progress: bool = True,
    **params,
):
    """Merge task vectors into ``base`` with a registered method (see ``methods.MERGE_METHODS``).

    For every base parameter name p present in the vectors: Δ_p = method(θ0_p, [τ_t,p], **params),
    computed in float32 (float64 if the inputs are) on the base parameter's device, and
    θ_p = θ0_p + Δ_p cast to ``dtype`` (default: the base parameter's dtype). Parameters absent from
    every vector are kept. A non-finite Δ raises ``HfTaujpError``.

    Args:
        base: ``nn.Module``, state dict, or a local folder / repo id of a transformers model (custom code
            runs only with ``trust_remote_code=True``).
        vectors: TaskVector objects, dicts name -> τ, or TaskVector folders / repo ids; all of one kind.
            Linear (tangent) vectors merge into a tangent: the result is that linear TaskVector
            (``return_task_vector=True``) or ``base`` linearized around θ0 with it as tangent
            (``TaskVector.apply_to(base, linear=True)``). RegMean refuses them (it needs weights).
        method: registry name (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
            ``magnitude_prune``, ``fisher_average``, ``gradient_matching``, ``regmean``, the SVD family
            ``tsv``, ``iso_c``, ``iso_cts``, ``wudi``, ...).
        weights: one α per vector (or one shared); a negative α_t merges −τ_t with weight |α_t|.
        grams: per-task Gram statistics for ``regmean`` (GramStatistics from ``estimate_gram``, folders
            / repo ids, or dicts ``"<module>.weight" -> (in, in)``); weights without a Gram are averaged.
        fishers / base_fisher / num_examples: per-task diagonal Fisher (Statistics or dicts), the base
            model's Fisher (required by ``gradient_matching``) and the dataset sizes s_t (taken from
            ``Statistics.num_examples`` when omitted; known for some statistics only is an error).
        return_task_vector: return the merged Δ = θ − θ0 as a :class:`TaskVector` (the vectors' kind,
            base_model / base_fingerprint from the vectors or the base, task ``"merge:<method>"``,
            ``training={"merge": {method, weights, params, sources}}``).
        check_base_model: compare each vector's recorded ``base_fingerprint`` with the base
            (``BaseModelMismatchError`` on a mismatch); vectors of different bases always raise.
        weight_layout: for methods whose result depends on which side of a 2-D weight is its output
            (``iso_cts``, ``wudi``; ``regmean`` for a square weight whose Gram does not say): "out_in" /
            "in_out" for every 2-D tensor the base's modules do not cover, or {name: layout}. Needed only
            for a state-dict base (see :class:`WeightLayouts` for the rule); other methods refuse it.
        params: the method's declared parameters (``density``, ``majority_sign_method``, ``lambda_``,
            ``seed``, ...); any other name raises ``MergeConfigError`` listing the valid ones.

    Tied parameters follow :mod:`hf_taujp.tied` (one parameter per tied group; a vector whose tied
    entries differ raises ``TiedWeightsError``; the merged value lands in every name of the group).

    Low-rank (factored) vectors (``TaskVector.from_peft(..., factored=True)``): every method gets each
    tensor's full τ, materialised as that tensor is merged (never a truncated one), so the result equals the
    merge of ``tv.to_dense()``. One exception keeps factors: ``task_arithmetic`` (Δ = λ Σ α_t τ_t, linear in
    τ) returning a TaskVector (``return_task_vector=True``, or linear vectors) gives, for a tensor that is
    factored in every vector holding it, the exact factored sum (factors concatenated, rank Σ r_t; see
    :func:`hf_taujp.low_rank_tau.low_rank_sum`), equal to the full merge up to float rounding.

    DARE methods draw their masks from one generator per parameter, seeded with
    ``methods.parameter_seed(seed, name)`` (derived from the seed and the parameter *name*, not its
    position), so a given ``seed`` reproduces a whole merge, in memory and streaming alike, whatever
    order the tensors are read in (without ``seed`` the global torch RNG is used).

    Returns a merged deep copy of the base module (or a state dict if ``base`` was one).
    """
    if vectors is None or len(vectors) == 0:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    spec = get_method_spec(method)
    fn = spec.fn
    check_method_arguments(spec, params, weights=weights, fishers=fishers, grams=grams, base_fisher=base_fisher,
                           num_examples=num_examples, weight_layout=weight_layout)
    out_dtype = _as_dtype(dtype)
    tvs = [_load_vector(v) for v in vectors]
    labels = [f"vector {i}" + (f" ({v!r})" if isinstance(v, (str, os.PathLike)) else "") for i, v in enumerate(vectors)]
    metas = [tv.metadata() for tv in tvs]
    kind = check_vectors_compatible(metas, labels, method)
    base_sd, module = _base_state(base, trust_remote_code)
    if kind == "linear" and module is None and not return_task_vector:
        raise MergeConfigError("merging linear (tangent) task vectors gives a tangent, which a state dict cannot hold: "
                               "pass the base as a module, or return_task_vector=True")
    if check_base_model and any(m.get("base_fingerprint") for m in metas):
        check_base(metas, {fingerprint(module if module is not None else base_sd)}, "model" if module is not None else "state dict", labels)
    groups = tied_groups(module if module is not None else base_sd)
    loaded = [merge_entries(tv, groups, lab) for tv, lab in zip(tvs, labels)]

    stats, layouts, bfd = _load_statistics(spec, method, fishers, grams, base_fisher, num_examples, weight_layout,
                                           module, groups, labels, params)

    for t, lab in zip(loaded, labels):
        extra = set(t) - set(base_sd)
        if extra:
            raise BaseModelMismatchError(f"{lab} has parameters missing from the base: {sorted(extra)[:5]}")
    names = [n for n in base_sd if any(n in t for t in loaded)]
    layout_of = _tensor_layouts(spec, method, tvs, module, weight_layout, groups, base_sd, names)
    seed = params.pop("seed", None)
    keep_factors = method in FACTORED_METHODS and (return_task_vector or kind == "linear")
    merged: dict[str, torch.Tensor | LowRankTau] = {}
    for name in tqdm(names, desc=f"merge ({method})", disable=not progress):
        b = base_sd[name]
        entries = [t.get(name) for t in loaded]
        for k, tau in enumerate(entries):
            if tau is not None and tuple(tau.shape) != tuple(b.shape):
                raise BaseModelMismatchError(f"{name}: task vector {k} has shape {tuple(tau.shape)}, base {tuple(b.shape)}")
        if keep_factors and all(e is None or isinstance(e, LowRankTau) for e in entries):
            # Δ = λ Σ_t α_t τ_t of factored τ_t is again factored (exact); see the docstring
            merged[name] = _factored_delta(name, entries, weights, params, b.device)
            continue
        taus = _dense_taus(entries, b)
        kw = _method_kwargs(spec, name, b, params, seed, stats, bfd, layouts, layout_of, weight_layout)
        delta = fn(b, taus, weights=weights, **kw)
        check_finite(delta, name)
        merged[name] = delta
    target = {n: (out_dtype or base_sd[n].dtype) for n in merged}
    if return_task_vector or kind == "linear":
        tv = _merged_task_vector(merged, target, metas, labels, module, method, weights, params, seed, kind)
        if return_task_vector:
            return tv
        # a tangent is applied in the tangent space: f(x; θ0) + J f(x; θ0)·Δ
        return tv.apply_to(module, 1.0, linear=True, check_base=False)
    return _merged_model(merged, target, groups, base_sd, module, out_dtype)
