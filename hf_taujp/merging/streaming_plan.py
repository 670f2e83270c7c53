"""The plan of an out-of-core merge (:func:`hf_taujp.merging.merge_streaming`): everything decided before
the first tensor is read — the arguments and folders checked (bases, kinds, shapes, statistics), the
tied parameters' canonical and stored names per reader, the weight layouts and the output cut into
jobs (slices of elementwise merges, whole tensors otherwise). :mod:`.streaming` runs the plan.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .. import hub
from ..task_vector import fingerprint, read_task_vector_config
from ..tied import TiedWeightsError, tied_groups_of_folder
from .layouts import WeightLayouts, architecture_layouts
from .merge import (BASE_PATTERNS, _as_dtype, check_base, check_method_arguments, check_vectors_compatible,
                    statistics_sizes)
from .methods import MergeConfigError, MethodSpec, get_method_spec, require_statistics
from ..safetensors_io import SafetensorsReader
from ..low_rank_tau import task_vector_reader


def _aliases(reader: SafetensorsReader, groups, canon_of: dict, label: str) -> dict[str, str]:
    """{canonical name: the name ``reader`` stores it under} for tied groups (rule of ``hf_taujp.tied``):
    several stored members must be equal, else ``TiedWeightsError``."""
    out = {}
    for g in groups:
        present = [n for n in g if n in reader]
        if not present:
            continue
        out[canon_of[g[0]]] = present[0]
        if len(present) == 1:
            continue  # nothing to compare: reading it here would read the embedding twice per vector
        first = reader.get(present[0])
        for n in present[1:]:
            t = reader.get(n)
            if tuple(t.shape) != tuple(first.shape) or not torch.equal(t.to(first.dtype), first):
                raise TiedWeightsError(
                    f"{label} has different values for {present[0]!r} and {n!r}, which the base model ties "
                    "(one tensor): the fine-tune untied them, and a model that ties them cannot hold both")
    return out


def _model_prefix(d: str) -> str:
    for p in ("model", "pytorch_model"):
        if os.path.exists(os.path.join(d, p + ".safetensors")) or os.path.exists(os.path.join(d, p + ".safetensors.index.json")):
            return p
    hub._refuse_pickles(d, "Base model")
    raise hub.CorruptFileError(f"no model.safetensors (or index) in base folder {d!r}")


def _folder_fingerprint(reader: SafetensorsReader) -> str:
    """``fingerprint`` of the base folder's weights, from ~256 entries per tensor read through memory maps."""
    state, maps = reader.sampled_state()
    try:
        return fingerprint(state)
    finally:
        del state
        for mm in maps:
            try:
                mm.close()
            except BufferError:  # a view is still alive somewhere: leave the map to the GC
                pass


def _stat_reader(folder: str, label: str) -> tuple[SafetensorsReader, dict]:
    d = hub.resolve_pretrained_dir(folder)
    cfg = hub.read_json(os.path.join(d, "config.json"), "statistics config")
    fmt = str(cfg.get("format", ""))
    if fmt not in ("hf-taujp/fisher", "hf-taujp/gram"):
        raise hub.HfTaujpError(f"{label} {folder!r} is not an hf-taujp statistics folder (format {fmt!r})")
    return SafetensorsReader(d, fmt.split("/")[1]), cfg


# --------------------------------------------------------------------------------------------
# The plan: which tensors, which statistics, the output layout (decided before the first read)
# --------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything a streaming merge decides before reading its first tensor.

    Readers: ``base_r`` (the base's weights), ``vec_r`` (one per vector), ``stat_readers`` (one
    statistics folder per vector, or None) and ``bfr`` (the base Fisher, or None). Tied parameters:
    ``canon_of`` maps each member of a tied group to its canonical name (the first the base folder
    stores) and ``alias[id(reader)]`` maps canonical names to the name that reader stores. Output:
    ``names`` (in the base's order), cut into ``jobs`` — ``("slice", name, start, n)`` for a range of
    an elementwise merge, ``("full", name, 0, numel)`` for a tensor copied or merged whole. Layouts:
    ``layouts`` / ``layout_default`` for RegMean's Grams, ``layout_of`` (canonical name -> "out_in" /
    "in_out" of each merged 2-D tensor) for the other methods that declare ``layout``.
    """

    spec: MethodSpec
    method: str
    params: dict
    weights: Any
    seed: Any
    labels: list[str]
    cfgs: list[dict]
    vec_kind: str
    output_kind: str
    out_dtype: torch.dtype | None
    base_dir: str
    base_r: SafetensorsReader
    vec_r: list[SafetensorsReader]
    stat_readers: list[SafetensorsReader] | None
    stat_paths: Sequence[str] | None
    bfr: SafetensorsReader | None
    base_fisher: str | None
    canon_of: dict[str, str]
    alias: dict[int, dict[str, str]]
    layouts: dict
    layout_default: str | None
    layout_of: dict[str, str]
    in_vec: set[str]
    names: list[str]
    jobs: list[tuple[str, str, int, int]]
    chunk: int
    prefix: str

    def stored(self, r: SafetensorsReader, n: str) -> str | None:
        """The name reader ``r`` holds output name ``n`` under, or None."""
        if r is self.base_r:
            return n if n in r else None
        c = self.canon_of.get(n)
        if c is not None and c in self.alias.get(id(r), {}):
            return self.alias[id(r)][c]
        return n if n in r and c is None else None

    def merged_here(self, n: str) -> bool:
        return n in self.in_vec and self.base_r.torch_dtype(n).is_floating_point

    def out_dt(self, n: str) -> torch.dtype:
        bd = self.base_r.torch_dtype(n)
        return (self.out_dtype or bd) if bd.is_floating_point else bd


def _plan(base, vectors, method, readers: list, *, weights, fishers, grams, base_fisher, dtype, output_kind,
          check_base_model, trust_remote_code, chunk_elements, params, weight_layout=None) -> _Plan:
    """Check the arguments and the folders (bases, kinds, shapes, statistics) and lay out the output;
    every reader opened is appended to ``readers`` (the caller closes them). Raises before anything is
    written: ``MergeConfigError``, ``MissingStatisticsError``, ``BaseModelMismatchError``, ``TiedWeightsError``."""
    if not vectors:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    if output_kind not in (None, "model", "task_vector"):
        raise MergeConfigError(f'output_kind must be "model" or "task_vector", got {output_kind!r}')
    spec = get_method_spec(method)
    check_method_arguments(spec, params, weights=weights, fishers=fishers, grams=grams, base_fisher=base_fisher,
                           weight_layout=weight_layout)
    out_dtype = _as_dtype(dtype)
    # a Hub base: its weights plus every file copied into the output (tokenizer models, chat template, code)
    base_dir = hub.resolve_pretrained_dir(base, allow_patterns=BASE_PATTERNS)
    vdirs = [hub.resolve_pretrained_dir(v) for v in vectors]
    labels = [f"vector {i} ({v!r})" for i, v in enumerate(vectors)]
    # a root that is no task vector but holds some in sub-folders is named, with them listed
    cfgs = [read_task_vector_config(d, v, label=f"vector {i}") for i, (d, v) in enumerate(zip(vdirs, vectors))]
    vec_kind = check_vectors_compatible(cfgs, labels, method)
    if output_kind is None:
        output_kind = "task_vector" if vec_kind == "linear" else "model"
    if vec_kind == "linear" and output_kind == "model":
        raise MergeConfigError("merging linear (tangent) task vectors gives a tangent, which model weights cannot hold: "
                               "use output_kind='task_vector' (the default for linear vectors) and apply the result "
                               "with TaskVector.apply_to(base, linear=True)")
    needs = spec.needs
    stat_paths = {"fisher": fishers, "gram": grams}.get(needs) if needs else None
    require_statistics(method, spec, stat_paths, len(vectors), base_fisher, noun="folder")
    base_r = SafetensorsReader(base_dir, _model_prefix(base_dir))
    readers.append(base_r)
    # tied parameters of the base (hf_taujp.tied.find_tied_groups: config + checkpoint names against
    # the table of known families, else the architecture built on the meta device; the rule is logged)
    groups = tied_groups_of_folder(base_dir, trust_remote_code=trust_remote_code, stored=base_r.keys())
    if check_base_model and any(c.get("base_fingerprint") for c in cfgs):
        check_base(cfgs, {_folder_fingerprint(base_r)}, f"{base!r}", labels)
    base_keys = base_r.keys()
    base_set = set(base_keys)
    # canonical name of each tied group: the first member the base folder stores
    groups = [g for g in groups if any(n in base_set for n in g)]
    canon_of = {}
    for g in groups:
        c = next(n for n in g if n in base_set)
        canon_of.update({n: c for n in g})
    # a factored (low-rank) vector folder is read as its full τ, materialised tensor by tensor / slice by slice
    vec_r = [task_vector_reader(d, c) for d, c in zip(vdirs, cfgs)]
    readers += vec_r
    stat_readers, bfr, stat_cfgs = None, None, []
    if needs:
        pairs = [_stat_reader(f, f"{needs} of {lab}") for f, lab in zip(stat_paths, labels)]
        stat_readers = [r for r, _ in pairs]
        stat_cfgs = [c for _, c in pairs]
        readers += stat_readers
        bcfg = None
        if base_fisher is not None:
            bfr, bcfg = _stat_reader(base_fisher, "base fisher")
            readers.append(bfr)
        statistics_sizes(spec, [c.get("num_examples") for c in stat_cfgs],
                         None if bcfg is None else bcfg.get("num_examples"), bfr is not None, params, labels)
    # per reader: {canonical name: stored name} for tied groups
    alias = {id(r): _aliases(r, groups, canon_of, lab) for r, lab in zip(vec_r, labels)}
    for k, r in enumerate(stat_readers or []):
        alias[id(r)] = _aliases(r, groups, canon_of, f"{needs} of {labels[k]}")
    if bfr is not None:
        alias[id(bfr)] = _aliases(bfr, groups, canon_of, "base fisher")

    for lab, r in zip(labels, vec_r):
        extra = [k for k in r.keys() if k not in base_set and k not in canon_of]
        if extra:
            raise hub.BaseModelMismatchError(f"{lab} has parameters missing from the base: {sorted(extra)[:5]}")
        for k in r.keys():
            bk = canon_of.get(k, k)
            if r.shape(k) != base_r.shape(bk):
                raise hub.BaseModelMismatchError(f"{k}: {lab} has shape {r.shape(k)}, base {base_r.shape(bk)}")
    layouts = {}
    for c in stat_cfgs:
        layouts.update(c.get("weight_layout") or {})
    if isinstance(weight_layout, dict):  # the caller's word wins
        layouts.update({canon_of.get(n, n): lay for n, lay in weight_layout.items()})
    params = dict(params)
    seed = params.pop("seed", None)
    plan = _Plan(spec=spec, method=method, params=params, weights=weights, seed=seed, labels=labels, cfgs=cfgs,
                 vec_kind=vec_kind, output_kind=output_kind, out_dtype=out_dtype, base_dir=base_dir, base_r=base_r,
                 vec_r=vec_r, stat_readers=stat_readers, stat_paths=stat_paths, bfr=bfr, base_fisher=base_fisher,
                 canon_of=canon_of, alias=alias, layouts=layouts,
                 layout_default=weight_layout if isinstance(weight_layout, str) else None, layout_of={},
                 in_vec=set(), names=[], jobs=[],
                 chunk=int(chunk_elements), prefix="model" if output_kind == "model" else "task_vector")
    plan.in_vec = {n for n in base_keys if any(plan.stored(r, n) is not None for r in vec_r)}
    plan.names = [n for n in base_keys if output_kind == "model" or (n in plan.in_vec and canon_of.get(n, n) == n)]
    if "layout" in spec.driver_args and needs != "gram":
        # which 2-D tensors are Conv1D weights: the architecture (meta device), factored entries, the caller
        modules, why = architecture_layouts(base_dir, trust_remote_code=trust_remote_code)
        direct = [k for c in cfgs for k, e in (c.get("low_rank") or {}).items() if e.get("layout") == "direct"]
        table = WeightLayouts.build(modules=modules, given=weight_layout, direct=direct, canon=canon_of, why=why)
        for n_ in plan.names:
            c = canon_of.get(n_, n_)
            if plan.merged_here(n_) and len(base_r.shape(n_)) == 2 and c not in plan.layout_of:
                plan.layout_of[c] = table.of(c, base_r.shape(n_), method)
    sliced = spec.elementwise and plan.chunk > 0
    # Jobs in output order: ("slice", name, start, n) — a range of an elementwise merge, read into
    # reused buffers — or ("full", name, 0, numel) — a whole tensor (copied or merged whole).
    for n_ in plan.names:
        total = math.prod(base_r.shape(n_))
        if sliced and plan.merged_here(n_) and total > 0:
            plan.jobs += [("slice", n_, st, min(plan.chunk, total - st)) for st in range(0, total, plan.chunk)]
        else:
            plan.jobs.append(("full", n_, 0, total))
    return plan
