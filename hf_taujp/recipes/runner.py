"""The one recipe shape. Every recipe (GLUE, toxicity, CLIP) tells the same story —

    tasks and data → model → encode → fine-tune every task with every run → compose → evaluate → report

— and fills in only its own parts as a :class:`Recipe`: its constructor loads and checks the tasks, the data
and the model and encodes the examples (everything before training, so bad input fails before any of it);
``train(run, task)`` fine-tunes one task vector; ``evaluate(run, vectors)`` composes and scores them;
``after_run`` adds what a run's vectors also feed (statistics merges, merge comparisons, negation); and
``report(complete)`` writes the results files. :func:`run_methods` owns the loop over the runs — training
each task, saving each vector, the partial-results write after every run — and :func:`push_outputs` the Hub
push; :func:`plan_runs` turns (methods × their λ) into :class:`Run` s with distinct labels and folders, and
:func:`lambda_selection` marks the λ chosen on validation when a method ran at several. The α choice on
validation is the evaluation protocols' (:mod:`hf_taujp.evaluation`).

What the recipes' parts share is re-exported here (one import for a recipe): the fine-tuning methods
(:mod:`.finetuning`), the statistics-based merges (:mod:`.statistics_merges`), the kfac methods' curvature
(:mod:`.curvature`), and the merge-method comparison of a run's vectors (below). Where a new piece goes:

* a fine-tuning method or a knob of every fine-tune: :data:`.finetuning.METHODS` / :func:`.finetuning.finetune`;
* a regularizer: :mod:`hf_taujp.trainer` (a ``TauJpConfig`` field), then a method in ``METHODS``;
* a recipe: one module with a :class:`Recipe` subclass and its CLI (``add_arguments`` / ``main``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..hub import HfTaujpError
from ..task_vector import TaskVector
from .common import float_list, jsonable, subsample, torch_threads, weights_of
from .curvature import KFAC_PROBES, add_kfac_arguments, check_kfac_options, estimate_curvature, kfac_layers, kfac_note
from .finetuning import (DTYPES, METHODS, Method, add_low_rank_arguments, check_rank_and_dtype, finetune,
                         low_rank_targets, parse_methods)
from .statistics_merges import (STATISTICS_MERGES, add_statistics_arguments, check_statistics_options,
                                estimate_statistics, evaluate_statistics_merges, parse_merge_methods,
                                statistics_batches, statistics_merge)

__all__ = ["METHODS", "Method", "parse_methods", "finetune", "estimate_curvature", "STATISTICS_MERGES", "parse_merge_methods",
           "statistics_batches", "estimate_statistics", "statistics_merge", "add_statistics_arguments",
           "KFAC_PROBES", "add_kfac_arguments", "check_kfac_options", "kfac_note", "kfac_layers", "low_rank_targets", "DTYPES",
           "check_rank_and_dtype", "add_low_rank_arguments", "check_statistics_options", "parse_compare_options",
           "compare_and_save", "Run", "plan_runs", "Recipe", "run_methods", "lambda_selection", "push_outputs",
           "subsample", "weights_of", "jsonable", "torch_threads", "float_list", "evaluate_statistics_merges", "SHAPE_ALPHAS"]

SHAPE_ALPHAS = (1.1, 1.2, 1.3, 1.4, 1.5)  # α beyond 1 the recipes plot (the curve's shape), never chosen


# ------------------------------------------------------------------------------------------ the shape
@dataclass(frozen=True)
class Run:
    """One fine-tuning configuration of a recipe: ``method`` at ``lam`` (its penalty weight; unused by methods
    without one), reported as ``label`` (``results["methods"]`` key), saved under ``task_vectors/<folder>``."""

    method: Method
    lam: float | str | None
    label: str
    folder: str


def plan_runs(methods: Sequence[Method], lambdas_of: Callable[[Method], Sequence] | None = None,
              lambda_text: Callable[[object], str] = str) -> list[Run]:
    """One :class:`Run` per (method, λ of ``lambdas_of(method)``; default one run with λ None). A method with
    several λ is labelled "<label> (λ=<λ>)" and saved under "<name>_lambda<λ>"; "+" in a name becomes "_".

    Raises:
        HfTaujpError: two runs that would share a label or a folder (nothing is overwritten).
    """
    runs = []
    for m in methods:
        lams = list(lambdas_of(m)) if lambdas_of is not None else [None]
        several = len(lams) > 1
        for lam in lams:
            runs.append(Run(m, lam, f"{m.label} (λ={lambda_text(lam)})" if several else m.label,
                            m.name.replace("+", "_") + (f"_lambda{lambda_text(lam)}" if several else "")))
    for field_ in ("label", "folder"):
        names = [getattr(r, field_) for r in runs]
        if len(set(names)) != len(names):
            shared = sorted({n for n in names if names.count(n) > 1})
            raise HfTaujpError(f"λ {[r.lam for r in runs]}: two runs would share the {field_} {shared}")
    return runs


class Recipe:
    """A recipe's own parts; :func:`run_methods` runs them. The constructor does everything before training
    (checks, data, model, encoding) and sets ``tasks``, ``output_dir`` and ``results`` (with a ``"methods"``
    dict that :func:`run_methods` fills in)."""

    tasks: list[str]
    output_dir: str
    results: dict

    def train(self, run: Run, task: str) -> tuple[TaskVector, dict]:
        """Fine-tune (or load) ``task``'s vector for ``run``: (TaskVector, stats of :func:`finetune`)."""
        raise NotImplementedError

    def vector_dir(self, run: Run, task: str) -> str | None:
        """Where ``task``'s vector of ``run`` is saved (None: not saved, e.g. loaded or a non-main process)."""
        return os.path.join(self.output_dir, "task_vectors", run.folder, task)

    def evaluate(self, run: Run, vectors: Mapping[str, TaskVector], stats: Mapping[str, dict]) -> dict:
        """Compose ``vectors`` and score them: the run's entry of ``results["methods"]``."""
        raise NotImplementedError

    def after_run(self, run: Run, vectors: Mapping[str, TaskVector], res: dict) -> None:
        """What a run's vectors also feed (statistics merges, merge comparisons, negation); default nothing."""

    def report(self, complete: bool) -> None:
        """(Re)write the results files from ``results``; ``complete`` is False for a partial write."""
        raise NotImplementedError


def run_methods(recipe: Recipe, runs: Sequence[Run]) -> dict:
    """Train every task with every run, save each vector, evaluate and extend each run, and rewrite the report
    after every run (a long run that stops early keeps what it finished). Returns ``recipe.results``."""
    for run in runs:
        vectors, stats = {}, {}
        for task in recipe.tasks:
            tv, st = recipe.train(run, task)
            folder = recipe.vector_dir(run, task)
            if folder is not None:
                tv.save_pretrained(folder)
            vectors[task], stats[task] = tv, st
        res = recipe.evaluate(run, vectors, stats)
        recipe.results["methods"][run.label] = res
        recipe.after_run(run, vectors, res)
        recipe.report(complete=len(recipe.results["methods"]) == len(runs))
    return recipe.results


def lambda_selection(results: Mapping, runs: Sequence[Run], score: Callable[[dict], float]) -> dict:
    """``{method label: {criterion, validation_score_at_alpha_1, chosen}}`` for every method run at several λ:
    the λ whose finished run has the highest validation ``score(results["methods"][label])`` (ties: the smaller
    λ). Never chosen on the reported split."""
    selection = {}
    for m in dict.fromkeys(r.method for r in runs):
        lams = [(r.lam, r.label) for r in runs if r.method is m]
        if len(lams) < 2:
            continue
        val = {lam: score(results["methods"][label]) for lam, label in lams if label in results["methods"]}
        if val:
            selection[m.label] = {"criterion": "mean validation score at α = 1 (validation split held out from train)",
                                  "validation_score_at_alpha_1": val,
                                  "chosen": max(val, key=lambda k: (round(val[k], 9), -k))}
    return selection


def push_outputs(output_dir: str, repo_id: str, subfolders: Iterable[str] = ()) -> list[str]:
    """Push ``<output_dir>/task_vectors`` to ``repo_id`` and each existing ``<output_dir>/<subfolder>`` (statistics,
    curvature) under that subfolder; returns what was pushed."""
    from .. import hub

    hub.push_folder_to_hub(os.path.join(output_dir, "task_vectors"), repo_id)
    pushed = ["task vectors"]
    for sub in subfolders:
        if os.path.isdir(os.path.join(output_dir, sub)):
            hub.push_folder_to_hub(os.path.join(output_dir, sub), repo_id, subfolder=sub)
            pushed.append(sub)
    return pushed


def parse_compare_options(compare_merges, compare_sets, method_list) -> tuple[list[str], list[str]]:
    """(merge methods to compare, recipe methods whose vectors they merge) of a recipe's ``--compare-merges`` /
    ``--compare-sets``, checked before any work ("default" = ``hf_taujp.evaluation.DEFAULT_METHODS``).

    Raises:
        MergeConfigError: an unknown merge method. HfTaujpError: none given, or a set that is not a method of the run.
    """
    if compare_merges is None:
        return [], []
    from ..evaluation import DEFAULT_METHODS
    from ..merging import get_method_spec

    names = [m.strip() for m in compare_merges.split(",")] if isinstance(compare_merges, str) else list(compare_merges)
    names = list(DEFAULT_METHODS) if names == ["default"] else [n for n in names if n]
    for n in names:
        get_method_spec(n)  # MergeConfigError naming the known methods
    sets = [m.strip() for m in compare_sets.split(",")] if isinstance(compare_sets, str) else list(compare_sets)
    known = [m.name for m in method_list]
    if not names or not sets or any(x not in known for x in sets):
        raise HfTaujpError(f"compare_merges needs merge methods and compare_sets among the run's methods {known}; "
                           f"got {names} on {sets}")
    return names, sets

def compare_and_save(model, label: str, folder: str, vectors, single, bench_list, evaluate, output_dir: str, results: dict,
                     *, prefix: str, check_base_model: bool = True, save: bool = True) -> None:
    """:func:`hf_taujp.evaluation.compare_merges` of one recipe method's vectors with the recipe's ``evaluate``
    (``normalize_by`` its single-task scores), saved under ``<output_dir>/merge_bench/<folder>/`` and recorded in
    ``results["merge_bench"][label]`` (``save=False``: recorded only, e.g. on the non-main processes of DDP); prints
    the table."""
    import os

    from ..evaluation import compare_merges

    say = print if save else (lambda *a, **k: None)
    say(f"{prefix} comparing merges of {label}: {', '.join(bench_list)}")
    cmp = compare_merges(model, vectors, evaluate, methods=bench_list, normalize_by=single,
                         check_base_model=check_base_model, progress=save)
    if save:
        cmp.save(os.path.join(output_dir, "merge_bench", folder))
    results.setdefault("merge_bench", {})[label] = cmp.to_dict()
    say(f"{prefix} merge methods on {label} (chosen on validation, test scores):\n" + cmp.table())
