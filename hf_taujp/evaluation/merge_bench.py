"""Compare merge methods on the same task vectors: :func:`compare_merges` → :class:`MergeComparison`.

Protocol (task arithmetic's, Ilharco et al. 2023, applied to every method): merge θ = merge(θ0, {τ_t}, method,
**setting) for every setting of the method's grid and score it on the *validation* split; choose the setting by the
mean validation score only (:func:`~hf_taujp.merging.search.select_coefficient`'s rule); merge that setting again
and score it on the *test* split. How a model is scored is the caller's (FusionBench's "task pool"):
``evaluate(model, split) -> {task: score}``, the one thing a recipe supplies.

Default methods (:data:`DEFAULT_METHODS`): the data-free methods with published 8-task ViT-B/32 numbers: task
arithmetic, TIES, TSV-M, Iso-C, Iso-CTS, WUDI. DARE / DELLA (random masks: one seed is one draw), model_stock, slerp
(two vectors), breadcrumbs, consensus and the methods that need statistics (fisher_average, gradient_matching,
regmean) run when named. Default grids: :data:`DEFAULT_GRIDS` (each line says why; the first key is the *main knob*,
the plot's x axis); other methods λ ∈ 0.1…1.0 if they declare ``lambda_``, else one setting (their defaults). A
``grids=`` entry replaces the method's grid whole (parameters it leaves out keep the method's defaults, e.g. TIES'
density 1.0). Methods declaring ``seed`` (DARE, DELLA) get ``seed=0`` unless the grid sets it, so the test merge
redraws the validated masks. Ties (to 1e-9) go, knob by knob in grid order, to the value nearest the method's
default (λ = 1, the one-shot merge, as ``select_coefficient``; equally far: the smaller).

Measured per merge (the :func:`~hf_taujp.merging.merge` call only; base and vectors are loaded once before,
evaluation is timed apart): ``merge_seconds``, wall time (CUDA synchronised; the table: median over the grid);
``peak_mib``, memory added at the merge's peak, the merged copy it returns included (the table: the largest over the
grid). CUDA base: ``torch.cuda.max_memory_allocated`` growth (torch's allocator; library workspaces not counted).
CPU base: peak resident set minus the one before (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after
``gc.collect(1)`` and glibc ``malloc_trim``; ``tracemalloc`` does not see torch's allocator); None where unavailable.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import io
import itertools
import math
import os
import statistics as _stats
import time
import dataclasses
from numbers import Real
from typing import Any, Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import HfTaujpError, MergeConfigError, MissingStatisticsError
from ..hub import atomic_dir, atomic_write_text
from ..merging.merge import _load_vector, check_weight_layout, load_base_model, merge
from ..merging.methods import MethodSpec, get_method_spec, require_statistics
from ..merging.search import TIE_DECIMALS, select_coefficient
from .output import format_table, save_json

__all__ = ["compare_merges", "MergeComparison", "DEFAULT_METHODS", "DEFAULT_GRIDS", "default_grid"]

DEFAULT_METHODS = ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "wudi")
SUM_LAMBDAS = tuple(round(0.1 * i, 2) for i in range(1, 11))  # Δ = λ Σ τ_t
MEAN_LAMBDAS = (0.8, 1.0, 1.2, 1.5)  # Δ = λ · (disjoint) mean
SVD_LAMBDAS = tuple(round(0.25 * i, 2) for i in range(1, 13))
DEFAULT_GRIDS: dict[str, dict[str, tuple]] = {
    "task_arithmetic": {"lambda_": SUM_LAMBDAS},  # the protocol's [0, 1] at step 0.1, without λ = 0 (the base)
    # TIES paper: k ∈ {10, 20, 30} %, λ from 0.8 (a disjoint *mean*: λ ≈ 1 where a sum needs λ ≈ 1/T)
    "ties": {"density": (0.1, 0.2, 0.3), "lambda_": MEAN_LAMBDAS},
    "dare_ties": {"density": (0.1, 0.2, 0.3), "lambda_": MEAN_LAMBDAS},
    "della": {"density": (0.2, 0.3, 0.5), "lambda_": MEAN_LAMBDAS},  # its ε = 0.15 needs density ≥ 0.15
    "consensus_ties": {"lambda_": MEAN_LAMBDAS},
    "tsv": {"lambda_": SVD_LAMBDAS},  # the TSV-M / Iso references search linspace(0, 3, 31)[1:]
    "iso_c": {"lambda_": SVD_LAMBDAS},
    "iso_cts": {"lambda_": SVD_LAMBDAS},
    "wudi": {"lambda_": tuple(round(0.25 * i, 2) for i in range(1, 7))},  # the authors' 0…1.5
    "slerp": {"t": tuple(round(0.1 * i, 1) for i in range(1, 10))},
}
_STAT_KEYS = ("fisher", "gram", "base_fisher")


def default_grid(method: str) -> dict[str, tuple]:
    """The grid :func:`compare_merges` sweeps for ``method`` when ``grids`` does not name it (module
    docstring): {parameter: values}, first key = main knob; ``{}`` = one setting at the defaults."""
    if method in DEFAULT_GRIDS:
        return dict(DEFAULT_GRIDS[method])
    return {"lambda_": SUM_LAMBDAS} if "lambda_" in (get_method_spec(method).parameters or {}) else {}


# ------------------------------------------------------------------------------ argument checks
def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _grid_of(spec: MethodSpec, given: Any) -> dict[str, list]:
    """``given`` {parameter: [values]} checked: parameters known to the registry, lists non-empty, of scalars."""
    if not isinstance(given, Mapping):
        raise MergeConfigError(f"grids[{spec.name!r}] must be a mapping {{parameter: [values]}}, got {given!r}")
    spec.check_params(given, where=" (compare_merges grids)")
    for k, vs in given.items():
        if isinstance(vs, (str, bytes)) or not isinstance(vs, Sequence):
            raise MergeConfigError(f"grid {spec.name}.{k} must be a list of values, got {vs!r}")
        if not vs:
            raise MergeConfigError(f"empty grid for {spec.name}.{k}: give at least one value")
        for v in (v for v in vs if not isinstance(v, (Real, str, bool)) or (isinstance(v, float) and math.isnan(v))):
            raise MergeConfigError(f"grid {spec.name}.{k} holds {v!r}: values are numbers, strings or booleans "
                                   "(one per setting; a per-vector parameter's value is shared by all vectors)")
    return {k: list(vs) for k, vs in given.items()}


def _statistics_kwargs(spec: MethodSpec, statistics: Mapping, tasks: Sequence[str]) -> dict:
    """merge()'s statistics arguments for ``spec``: fishers / grams (task order) and base_fisher, only those
    the method uses; ``MissingStatisticsError`` naming the method when one is missing."""
    kw, given = {}, None
    if spec.needs:
        raw = statistics.get(spec.needs)
        if raw is not None and (not isinstance(raw, Mapping) or set(raw) != set(tasks)):
            got = sorted(raw) if isinstance(raw, Mapping) else raw
            raise MissingStatisticsError(f"statistics[{spec.needs!r}] must be {{task: statistic}} for exactly the "
                                         f"tasks {list(tasks)}, got {got!r}")
        given = None if raw is None else [raw[t] for t in tasks]
        kw["fishers" if spec.needs == "fisher" else "grams"] = given
    bf = statistics.get("base_fisher") if "base_fisher" in spec.driver_args else None
    try:
        require_statistics(spec.name, spec, given, len(tasks), bf)
    except MissingStatisticsError as e:
        raise MissingStatisticsError(f"{e}; compare_merges takes them as statistics={{'fisher' | 'gram': "
                                     "{task: ...}, 'base_fisher': ...}") from None
    if bf is not None:
        kw["base_fisher"] = bf
    return kw


def _normalizers(normalize_by: Any, tasks: Sequence[str]) -> dict[str, dict[str, float]] | None:
    """{"test": {task: s}} from {task: s}, or {"val": ..., "test": ...} as given (the recipes' ``single``)."""
    if normalize_by is None:
        return None
    split_form = isinstance(normalize_by, Mapping) and bool(normalize_by) and set(normalize_by) <= {"val", "test"} \
        and all(isinstance(v, Mapping) for v in normalize_by.values())
    out = dict(normalize_by) if split_form else {"test": normalize_by}
    for split, scores in out.items():
        if not isinstance(scores, Mapping) or set(scores) != set(tasks) or not all(
                _is_number(v) and math.isfinite(v) for v in scores.values()):
            raise MergeConfigError(f"normalize_by{'' if not split_form else f'[{split!r}]'} must be {{task: finite "
                                   f"single-task score}} for exactly the tasks {list(tasks)}, got {scores!r}")
    if "test" not in out:
        raise MergeConfigError('normalize_by={"val": ..., "test": ...} needs the "test" scores')
    return {split: {t: float(out[split][t]) for t in tasks} for split in out}


def _plan(methods, grids, statistics, tasks, weight_layout) -> dict[str, dict]:
    """{method: {"spec", "grid", "fixed", "merge_kw"}}, every check done before any merge."""
    names = list(DEFAULT_METHODS if methods is None else ([methods] if isinstance(methods, str) else methods))
    if not names or len(set(names)) != len(names):
        raise MergeConfigError(f"methods must name at least one merge method, each once; got {names}")
    grids, statistics = dict(grids or {}), dict(statistics or {})
    if set(grids) - set(names):
        raise MergeConfigError(f"grids given for {sorted(set(grids) - set(names))}, which are not among the methods "
                               f"compared {names}")
    if set(statistics) - set(_STAT_KEYS):
        raise MergeConfigError(f"unknown statistics keys {sorted(set(statistics) - set(_STAT_KEYS))}; known: "
                               f"{list(_STAT_KEYS)}")
    if weight_layout is not None:
        check_weight_layout(weight_layout)
    plan = {}
    for name in names:
        spec = get_method_spec(name)
        grid = _grid_of(spec, grids[name] if name in grids else default_grid(name))
        fixed = {"seed": 0} if spec.parameters and "seed" in spec.parameters and "seed" not in grid else {}
        kw = _statistics_kwargs(spec, statistics, tasks)
        if weight_layout is not None and "layout" in spec.driver_args:
            kw["weight_layout"] = weight_layout
        plan[name] = {"spec": spec, "grid": grid, "fixed": fixed, "merge_kw": kw}
    return plan


# ------------------------------------------------------------------------------ measuring one merge
def _status_kib(key: str) -> int | None:
    """``key`` (VmRSS, VmHWM) of /proc/self/status in KiB; None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), None)
    except OSError:
        return None


def _reset_rss_peak() -> int | None:
    """Resident set (KiB) after freeing glibc's spare heap and resetting the peak (Linux ``clear_refs`` 5)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def _measured(run: Callable[[], Any], device: torch.device) -> tuple[Any, float, float | None]:
    """(run(), wall seconds, peak MiB added) — see the module docstring for what is measured."""
    gc.collect(1)  # the young generations, where the last merge's garbage is (a full pass costs ~0.2 s)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else _reset_rss_peak()
    t0 = time.perf_counter()
    out = run()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if cuda:
        return out, seconds, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    hwm = _status_kib("VmHWM")
    return out, seconds, None if before is None or hwm is None else max(0, hwm - before) / 1024


# ------------------------------------------------------------------------------ scores
def _scores(got: Any, tasks: Sequence[str], split: str) -> dict[str, float | None]:
    """``evaluate``'s answer checked: exactly the tasks, each a real number (None / NaN = undefined)."""
    if not isinstance(got, Mapping):
        raise HfTaujpError(f"evaluate(model, {split!r}) must return {{task: score}}, got {type(got).__name__}")
    missing, extra = [t for t in tasks if t not in got], sorted(set(got) - set(tasks), key=str)
    if missing or extra:
        raise HfTaujpError(f"evaluate(model, {split!r}) returned the wrong tasks: missing {missing}, unexpected "
                           f"{extra} (expected exactly {list(tasks)})")
    try:
        out = {t: None if got[t] is None else float(got[t]) for t in tasks}
    except (TypeError, ValueError):
        raise HfTaujpError(f"evaluate(model, {split!r}) gave a score that is not a number: {dict(got)!r}") from None
    return {t: None if v is None or math.isnan(v) else v for t, v in out.items()}


def _summary(abs_: Mapping[str, float | None], single: Mapping[str, float] | None) -> dict:
    """Mean absolute score (None if a task's is undefined) and, with ``single``, normalized = merged / single
    per task (None where single ≤ 0, left out of the mean: the recipes' rule)."""
    defined = all(v is not None for v in abs_.values())
    out = {"mean": sum(abs_.values()) / len(abs_) if defined else None}
    if single is not None:
        norm = {t: (v / single[t] if v is not None and single[t] > 0 else None) for t, v in abs_.items()}
        vals = [v for v in norm.values() if v is not None]
        out["norm"] = norm
        out["norm_mean"] = sum(vals) / len(vals) if vals and defined else None
    return out


def _choose(settings: list[dict], scores: list, defaults: Mapping) -> int:
    """Index of the chosen setting: ``select_coefficient`` knob by knob in grid order, among the settings still
    tied (to 1e-9) with the best: the value nearest the method's default (1 if none), equally far the smaller;
    a non-numeric knob: the first in grid order."""
    idx = list(range(len(settings)))
    for k in list(settings[0]) or [None]:
        vals = [settings[j].get(k) for j in idx]
        numeric = all(_is_number(v) for v in vals)
        prefer = float(defaults.get(k)) if _is_number(defaults.get(k)) else 1.0
        best = idx[select_coefficient([float(v) for v in vals] if numeric else list(range(len(idx))),
                                      [scores[j] for j in idx], prefer=prefer if numeric else 0.0)]
        r = round(scores[best], TIE_DECIMALS)
        idx = [j for j in idx if settings[j].get(k) == settings[best].get(k) and scores[j] is not None
               and round(scores[j], TIE_DECIMALS) == r]
    return idx[0]


# ------------------------------------------------------------------------------ the comparison
def _run_method(name: str, p: dict, base, vectors: list, evaluate, tasks, single, device, progress) -> dict:
    """Sweep one method's grid on validation, choose, merge the choice again and score it on test."""
    spec, grid = p["spec"], p["grid"]
    main = next(iter(grid), None)
    settings = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    key = "norm_mean" if single.get("val") is not None else "mean"

    def run(setting):
        try:
            return merge(base, vectors, name, progress=False, **p["merge_kw"], **p["fixed"], **setting)
        except HfTaujpError as e:
            raise type(e)(f"{name} at {setting or 'its defaults'}: {e}") from e

    curve, t_eval = [], 0.0
    for setting in tqdm(settings, desc=f"merge-bench {name}", disable=not progress, leave=False):
        model, secs, peak = _measured(lambda: run(setting), device)
        t0 = time.perf_counter()
        val = _scores(evaluate(model, "val"), tasks, "val")
        t_eval += time.perf_counter() - t0
        del model
        s = _summary(val, single.get("val"))
        curve.append({"setting": setting, "val": val, "val_mean": s["mean"], "val_norm": s.get("norm"),
                      "val_norm_mean": s.get("norm_mean"), "score": s[key], "merge_seconds": secs, "peak_mib": peak})
    try:
        i = _choose(settings, [c["score"] for c in curve], spec.parameters or {})
    except MergeConfigError as e:
        raise MergeConfigError(f"{name}: {e}") from None
    model = run(settings[i])
    t0 = time.perf_counter()
    test = _scores(evaluate(model, "test"), tasks, "test")
    t_eval += time.perf_counter() - t0
    s = _summary(test, single.get("test"))
    peaks = [c["peak_mib"] for c in curve if c["peak_mib"] is not None]
    return {"method": name, "main_knob": main, "grid": grid, "fixed": p["fixed"], "curve": curve, "chosen_index": i,
            "chosen": settings[i], "val_score": curve[i]["score"], "test": test, "test_mean": s["mean"],
            "test_norm": s.get("norm"), "test_norm_mean": s.get("norm_mean"),
            "merge_seconds": _stats.median(c["merge_seconds"] for c in curve),
            "peak_mib": max(peaks) if peaks else None, "eval_seconds": t_eval}


def _prepare_base(base: Any, device, trust_remote_code: bool) -> tuple[Any, torch.device]:
    """The base loaded once (a folder / repo id), moved to ``device`` if given (a module is copied first:
    the caller's stays where it is); returns it and the device its tensors are on."""
    if isinstance(base, (str, os.PathLike)):
        base = load_base_model(base, trust_remote_code=trust_remote_code)
    if not isinstance(base, (torch.nn.Module, Mapping)):
        raise MergeConfigError(f"cannot use {type(base).__name__} as a base model")
    sd = base.state_dict() if isinstance(base, torch.nn.Module) else base
    here = next((v.device for v in sd.values() if torch.is_tensor(v)), torch.device("cpu"))
    dev = here if device is None else torch.device(device)
    if dev == here:
        return base, here
    if isinstance(base, Mapping):
        return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in base.items()}, dev
    return copy.deepcopy(base).to(dev), dev


def compare_merges(
    base: Any,
    task_vectors: Mapping[str, Any],
    evaluate: Callable[[Any, str], Mapping[str, float]],
    *,
    methods: Sequence[str] | None = None,
    grids: Mapping[str, Mapping[str, Sequence]] | None = None,
    statistics: Mapping[str, Any] | None = None,
    normalize_by: Mapping[str, Any] | None = None,
    weight_layout: str | Mapping[str, str] | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    check_base_model: bool = True,
    progress: bool = True,
) -> MergeComparison:
    """Compare merge methods by the protocol of the module docstring; returns a :class:`MergeComparison`.

    Args:
        base: ``nn.Module``, state dict, or model folder / repo id (loaded once).
        task_vectors: {task: TaskVector | dict name -> τ | TaskVector folder}, merged in this order.
        evaluate: ``evaluate(merged, split) -> {task: score}``, exactly the tasks of ``task_vectors``, for split
            "val" (every setting) and "test" (the chosen one); ``merged`` is what :func:`~hf_taujp.merging.merge`
            returns (a module copy; a state dict for a state-dict base). Higher is better; None / NaN = undefined.
        methods: registry names (default :data:`DEFAULT_METHODS`).
        grids: {method: {parameter: [values]}} replacing that method's default grid (the first key is its
            main knob); each value is one setting's value (shared by all vectors for a per-vector parameter).
        statistics: {"fisher": {task: F}, "gram": {task: G}, "base_fisher": F0} for fisher_average /
            gradient_matching (fisher + base_fisher) / regmean (gram).
        normalize_by: single-task fine-tuned scores {task: s} (test: normalized = merged / s per task, mean over
            tasks with s > 0), or {"val": {...}, "test": {...}}: then the choice uses the mean *normalized*
            validation score (the recipes' protocol), else the mean absolute validation score.
        weight_layout: passed to the methods whose result depends on it (iso_cts, wudi) for a state-dict base.
        device: where the merges run (the base is moved there once; default: where it is).
        check_base_model: merge()'s fingerprint check (False for a base the vectors' recorded fingerprint does
            not describe, e.g. a recipe's frozen-prefix suffix model).

    Raises:
        MergeConfigError: no vectors, unknown method or grid parameter, empty grid, a grid for a method not
            compared, bad ``normalize_by``; MissingStatisticsError: a method's statistics missing — all before
            any merge. HfTaujpError: ``evaluate`` returned other tasks or a non-number; a merge's error, named
            with its method and setting.
    """
    if not isinstance(task_vectors, Mapping) or not task_vectors:
        raise MergeConfigError("task_vectors must be a non-empty mapping {task: task vector}")
    tasks = list(task_vectors)
    plan = _plan(methods, grids, statistics, tasks, weight_layout)
    for p in plan.values():
        p["merge_kw"]["check_base_model"] = check_base_model
    single = _normalizers(normalize_by, tasks) or {}
    base, dev = _prepare_base(base, device, trust_remote_code)
    vectors = [_load_vector(task_vectors[t]) for t in tasks]
    results = {name: _run_method(name, p, base, vectors, evaluate, tasks, single, dev, progress)
               for name, p in plan.items()}
    return MergeComparison(tasks=tasks, methods=results, selected_by="val_norm_mean" if "val" in single else
                           "val_mean", normalize_by=single or None, device=str(dev),
                           memory_measure="cuda max_memory_allocated growth" if dev.type == "cuda" else
                           ("peak RSS growth (VmHWM)" if os.path.exists("/proc/self/clear_refs") else None))


# ------------------------------------------------------------------------------ the result
def _label(setting: Mapping) -> str:
    """"density=0.2, λ=1" ("(defaults)" for the empty setting)."""
    return ", ".join(f"{'λ' if k == 'lambda_' else k}={format(v, 'g') if isinstance(v, float) else v}"
                     for k, v in setting.items()) or "(defaults)"


@dataclasses.dataclass
class MergeComparison:
    """What :func:`compare_merges` found. ``methods[name]``: ``chosen`` (setting), ``val_score`` (its selection
    score), ``test`` {task: score}, ``test_mean``, ``test_norm`` / ``test_norm_mean`` (with ``normalize_by``),
    ``merge_seconds`` (median over the grid), ``peak_mib`` (max over the grid; MiB), ``eval_seconds`` (total),
    ``grid``, ``fixed``, ``main_knob`` and ``curve``: per setting its validation scores, ``score`` (the one
    selection used: ``selected_by``), ``merge_seconds`` and ``peak_mib``."""

    tasks: list
    methods: dict
    selected_by: str = "val_mean"
    normalize_by: dict | None = None
    memory_measure: str | None = None
    device: str = "cpu"

    def rows(self) -> list[dict]:
        """One row per method: chosen setting, val score, test abs / normalized means, merge s, peak MiB."""
        val = "val norm" if self.selected_by == "val_norm_mean" else "val abs"
        rows = [{"method": n, "setting (by val)": _label(r["chosen"]), val: r["val_score"], "test abs": r["test_mean"],
                 "test norm": r.get("test_norm_mean"), "merge s": f"{r['merge_seconds']:.3g}",
                 "peak MiB": None if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"}
                for n, r in self.methods.items()]
        return [{k: "n/a" if v is None else v for k, v in row.items()} for row in rows]

    def table(self) -> str:
        """Plain-text table (``hf_taujp.evaluation.format_table``) of :meth:`rows`."""
        return format_table(self.rows())

    def task_table(self) -> str:
        """Per-task test scores of each method's chosen setting (normalized in parentheses when known)."""
        def cell(a, z):
            return "n/a" if a is None else f"{a:.3f}" + ("" if z is None else f" ({z:.3f})")
        return format_table([{"method": n, **{t: cell(r["test"][t], (r.get("test_norm") or {}).get(t))
                                              for t in self.tasks}} for n, r in self.methods.items()])

    def to_dict(self) -> dict:
        """JSON-able dict (every setting's validation scores included: the curves)."""
        return {"format": "hf-taujp/merge-bench", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> MergeComparison:
        """The inverse of :meth:`to_dict` (e.g. to re-plot a saved ``merge_bench.json``)."""
        return cls(**{f.name: copy.deepcopy(d[f.name]) for f in dataclasses.fields(cls)})

    def _png(self) -> bytes:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover
            raise HfTaujpError("MergeComparison.plot needs matplotlib: pip install matplotlib") from e
        knobs = list(dict.fromkeys(r["main_knob"] for r in self.methods.values() if r["main_knob"])) or [None]
        fig, axes = plt.subplots(1, len(knobs), figsize=(5.0 * len(knobs), 3.8), squeeze=False, sharey=True)
        for ax, knob in zip(axes[0], knobs):
            for name, r in self.methods.items():
                if r["main_knob"] is None and r["val_score"] is not None:  # one setting: a level
                    ax.axhline(r["val_score"], ls="--", lw=1, label=f"{name} (one setting)")
                if r["main_knob"] is None or r["main_knob"] != knob:
                    continue
                xs = list(dict.fromkeys(c["setting"][knob] for c in r["curve"]))  # profile: best over other knobs
                ys = [max((c["score"] for c in r["curve"] if c["setting"][knob] == x and c["score"] is not None),
                          default=float("nan")) for x in xs]
                pos = xs if all(_is_number(x) for x in xs) else list(range(len(xs)))
                (line,) = ax.plot(pos, ys, marker="o", ms=3, label=f"{name} ({_label(r['chosen'])})")
                ax.plot([pos[xs.index(r["chosen"][knob])]], [r["val_score"]], marker="*", ms=11, color=line.get_color())
                if pos is not xs:
                    ax.set_xticks(pos, [str(x) for x in xs])
            ax.set_xlabel("λ (lambda_)" if knob == "lambda_" else (knob or ""))
            ax.set_ylabel(f"mean {'normalized' if self.selected_by == 'val_norm_mean' else 'absolute'} val. score")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("Merge methods: validation score vs main knob (★ chosen; best over other knobs)", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        plt.close(fig)
        return buf.getvalue()

    def plot(self, path: str | os.PathLike) -> str:
        """PNG at ``path`` (written atomically): per main knob a panel, per method the best validation score at
        each value of its main knob (over its other knobs), the chosen setting starred; methods with one setting
        as a dashed level. Needs matplotlib (an optional extra): ``HfTaujpError`` without it."""
        atomic_write_text(os.fspath(path), self._png())
        return os.fspath(path)

    def markdown(self) -> str:
        """The report: summary table, per-task table and what was measured."""
        rule = "mean normalized" if self.selected_by == "val_norm_mean" else "mean absolute"
        return "\n".join([
            "# Merge methods compared", "", "```", self.table(), "```", "",
            "## Test scores per task (chosen setting; normalized in parentheses)", "", "```", self.task_table(), "```",
            "", f"- Setting chosen per method by the {rule} validation score only; test scores of that setting.",
            f"- merge s: median wall time of one merge over the method's grid ({self.device}); peak MiB: largest "
            f"memory growth during one merge ({self.memory_measure or 'not measured here'}).", ""])

    def save(self, directory: str | os.PathLike, name: str = "merge_bench") -> dict[str, str | None]:
        """Write ``<name>.json`` (:meth:`to_dict`), ``<name>.md`` and ``<name>.png`` into ``directory``, all or
        nothing (``hf_taujp.hub.atomic_dir``; other files there are kept). Without matplotlib no PNG: the JSON
        records why under ``warnings``. Returns the paths (png None then)."""
        data = self.to_dict()
        try:
            png = self._png()
        except HfTaujpError as e:
            png, data["warnings"] = None, [f"no plot: {e}"]
        directory = os.path.abspath(os.fspath(directory))
        paths = {k: os.path.join(directory, f"{name}.{x}") for k, x in (("json", "json"), ("markdown", "md"),
                                                                          ("png", "png"))}
        with atomic_dir(directory) as stage:
            save_json(data, os.path.join(stage, f"{name}.json"))
            atomic_write_text(os.path.join(stage, f"{name}.md"), self.markdown())
            if png is not None:
                atomic_write_text(os.path.join(stage, f"{name}.png"), png)
        return {**paths, "png": paths["png"] if png is not None else None}
