"""The recipes' report: task-addition results → table rows, JSON, α-curve PNG, Markdown summary.

Normalized score (Ilharco et al. 2023; Ortiz-Jiménez et al. 2023) = merged score / single-task score of
the same fine-tuning method, per task, then averaged. It is undefined (None, shown "n/a", left out of
the mean) when the single-task score is ≤ 0 — e.g. a Matthews correlation of 0 — never counted as 0.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ..evaluation import format_table, plot_alpha_curves, save_json

__all__ = ["mean_defined", "addition_rows", "per_task_rows", "write_report", "table", "TAUJP_COLUMN_NOTE"]

TAUJP_COLUMN_NOTE = ("τJp off-diag: mean over task pairs t ≠ t' of ‖J f(x'; θ0)·τ_t‖ on held-out inputs x' of task t' "
                     "(how much task t's vector moves the outputs on the other tasks; lower = more disentangled)")


def mean_defined(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def addition_rows(results: Mapping[str, Mapping], zero_shot: Mapping[str, float] | None = None) -> list[dict]:
    """One row per method: single, one-shot (α = 1) and best-α absolute / normalized means, τJp off-diag, s/step."""
    rows = []
    if zero_shot:
        rows.append({"method": "zero-shot θ0", "abs (α=1)": mean_defined(zero_shot.values())})
    for label, r in results.items():
        rows.append({
            "method": label,
            "single": mean_defined(r["single"]["test"].values()),
            "abs (α=1)": r["one_shot"]["avg_abs"], "norm (α=1)": r["one_shot"]["avg_norm"],
            "best α (val)": f"{r['best_alpha']:.2f}",
            "abs (best α)": r["best"]["avg_abs"], "norm (best α)": r["best"]["avg_norm"],
            "τJp off-diag": r.get("taujp_offdiag_mean"),
            "s/step": r.get("seconds_per_step"),
        })
    return rows


def per_task_rows(results: Mapping[str, Mapping], tasks: Sequence[str], key: str = "one_shot") -> list[dict]:
    """Per-task normalized scores of ``key`` ("one_shot" or "best") for each method."""
    rows = []
    for label, r in results.items():
        row = {"method": label}
        for t in tasks:
            v = r[key]["norm"][t]
            row[t] = "n/a" if v is None else v
        rows.append(row)
    return rows


def table(rows: Sequence[Mapping]) -> str:
    """`format_table` over the union of the rows' keys (first-seen order); missing cells stay blank."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return format_table(rows, columns)


def write_report(output_dir: str, results: dict, rows: list[dict], title: str, curves: Mapping[str, Mapping],
                 extra_tables: Sequence[tuple[str, list[dict]]] = (), notes: Sequence[str] = ()) -> dict:
    """Write results.json, results.md (tables + notes) and alpha_curves.png; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "results.json"), "markdown": os.path.join(output_dir, "results.md")}
    try:
        paths["png"] = plot_alpha_curves(curves, os.path.join(output_dir, "alpha_curves.png"), title=title)
    except Exception as e:  # noqa: BLE001 - matplotlib is an optional extra; say so instead of failing the run
        paths["png"] = None
        warning = f"no α-curve plot: {e}"
        if warning not in results.setdefault("warnings", []):  # the report is rewritten after every run
            results["warnings"].append(warning)
    save_json(results, paths["json"])
    text = [f"# {title}", "", "```", table(rows), "```", ""]
    for name, rows_ in extra_tables:
        text += [f"## {name}", "", "```", table(rows_), "```", ""]
    text += [f"- {n}" for n in notes]
    from ..hub import atomic_write_text

    atomic_write_text(paths["markdown"], "\n".join(text) + "\n")
    return paths
