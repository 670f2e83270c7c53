"""The GLUE recipe's report: results.json / results.md / the α-curve PNG rewritten after every run (a run that stops
early keeps what it finished, marked PARTIAL), the λ chosen on validation when a method ran at several, the
title and the reading notes, and the summary printed at the end.
"""

from __future__ import annotations

import time

from .report import TAUJP_COLUMN_NOTE, addition_rows, per_task_rows, table, write_report
from .runner import kfac_note, lambda_selection
from .tasks import GLUE_TASKS

__all__: list[str] = []  # the recipe's private parts


def _score_at_1(res: dict) -> float:
    """A run's mean validation score at α = 1 (what chooses λ among a method's runs)."""
    return next(c["avg_abs"] for c in res["curve"] if c["alpha"] == 1.0)


def _report(output_dir, results, runs, task_names, batch_size, t_start, complete):
    """(Re)write results.json / .md / PNG from the runs finished so far; `complete` marks the final write.
    Returns (table rows, notes, paths)."""
    done = results["methods"]
    merged = results.get("merges", {})
    selection = lambda_selection(results, runs, _score_at_1)
    if selection:
        results["lambda_selection"] = selection
    rows_ = addition_rows({**done, **merged}, results["zero_shot"])
    results["table"] = rows_
    results["complete"] = complete
    results["wall_time_s"] = round(time.time() - t_start, 1)
    notes = _notes(results, task_names, batch_size)
    if not complete:
        notes.append(f"PARTIAL: {len(done)} of {len(runs)} method runs finished")
    shown = {**done, **merged}
    paths = write_report(output_dir, results, rows_, _title(results, task_names), shown,
                         extra_tables=[("Per-task normalized score at α = 1 (test split)", per_task_rows(shown, task_names)),
                                       ("Per-task normalized score at best α (test split)",
                                        per_task_rows(shown, task_names, "best"))],
                         notes=[_reading(results, task_names), *notes])
    return rows_, notes, paths


def _notes(results, task_names, batch_size) -> list[str]:
    """The report's notes: the metrics, the splits, the columns, and the statistics merges' / kfac settings."""
    notes = [
        "scores: " + ", ".join(f"{n} {_METRIC_NAMES.get(results['tasks'][n]['metric'], results['tasks'][n]['metric'])}"
                               for n in task_names) + ", by rank classification over label words",
        f"single / abs / norm: the {_test_split(results, task_names)}; α chosen on a validation split held out from "
        "train; the α-curve PNG shows that validation split",
        "norm = merged / single-task score of the same method (n/a when single ≤ 0, left out of means)",
        TAUJP_COLUMN_NOTE,
        f"s/step: mean training seconds per step (batch {batch_size}; frozen-prefix cache: "
        f"{results['frozen_prefix']['used']})",
    ]
    if "statistics" in results:
        st = results["statistics"]
        notes.append(
            "<method> · <merge>: that method's vectors merged by fisher_average (θ0 + α·T·Σ F_t τ_t / Σ F_s), "
            "gradient_matching (Daheim et al.: θ0 + Σ_t α(s0·H0 + s_t F_t)/(s0·H0 + α Σ_s s_s F_s) τ_t) or regmean "
            f"(θ0 + α·T·(Σ G_t)⁻¹ Σ G_t τ_t), statistics on {st['fisher_examples']} training examples per task; "
            f"s_t = training examples per task, s0 = {st['base_fisher_weight_s0']:g}"
            + (" (default: the mean s_t)" if st["s0_default"] else "")
            + ": large s0 → task arithmetic, s0 = 0 → Fisher averaging, no principled value for an LLM whose "
              "pretraining data is unseen")
    if "curvature" in results:
        notes.append(kfac_note(results["curvature"]))
    for label, sel in results.get("lambda_selection", {}).items():
        notes.append(f"{label}: λ = {sel['chosen']:g} chosen on validation (the best mean validation score at α = 1 "
                     "among its runs)")
    return notes


def _summary(results, task_names, rows, notes) -> str:
    """What run_glue prints at the end: title, reading, the table, per-task normalized scores at α = 1, notes."""
    shown = {**results["methods"], **results.get("merges", {})}
    return "\n".join([f"\n{_title(results, task_names)}", _reading(results, task_names), table(rows),
                      "\nper-task normalized score at α = 1:", table(per_task_rows(shown, task_names)),
                      *(f"  - {n}" for n in notes)])


_METRIC_NAMES = {"accuracy": "accuracy", "matthews_correlation": "Matthews corr.", "f1_accuracy": "(acc + F1)/2"}


def _is_glue(results: dict, task_names) -> bool:
    """Only built-in GLUE tasks (none from a task spec)."""
    return all(results["tasks"][n].get("source", "glue") == "glue" and n in GLUE_TASKS for n in task_names)


def _title(results: dict, task_names) -> str:
    """The report's title: names the tasks ("GLUE" only when they all are the built-in GLUE tasks) and the model."""
    model = str(results["model"]).rstrip("/").split("/")[-1]
    kind = "GLUE task addition" if _is_glue(results, task_names) else "Task addition"
    return f"{kind}: {', '.join(task_names)} ({model})"


def _test_split(results: dict, task_names) -> str:
    return "GLUE dev set (test labels are hidden)" if _is_glue(results, task_names) else "tasks' test split"


def _reading(results: dict, task_names) -> str:
    """The first lines a reader sees: what the numbers are, and what 'best α = 0' means."""
    val = {n: results["sizes"][n]["val"] for n in task_names}
    text = (f"How to read it: scores on the {_test_split(results, task_names)}; 'single' = each task's own fine-tuned "
            f"model, 'abs' = one merged model θ0 + α·Σ τ_t on every task, 'norm' = abs / single per task. α is chosen "
            f"on a validation split held out from train ({min(val.values())}–{max(val.values())} rows per task); "
            "best α = 0.00 means no α > 0 beat the zero-shot model θ0 on validation, so the merge is θ0 itself.")
    return text
