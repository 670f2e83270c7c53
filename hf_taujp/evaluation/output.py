"""Results out: plain-text tables (no pandas), JSON written atomically, α curves (matplotlib)."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from ..errors import HfTaujpError
from ..hub import atomic_write_text


def format_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None, floatfmt: str = ".3f") -> str:
    """A plain-text table (no pandas): one row per dict, columns in order (default: keys of the first)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def cell(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join([line, sep, *body])


def save_json(obj, path) -> None:
    """Write `obj` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


def plot_alpha_curves(results: Mapping[str, Mapping], path, title: str = "Task addition") -> str:
    """PNG of mean normalized (validation) accuracy against α, one line per method.

    `results`: `{method: evaluate_task_addition(...) result}`. Needs matplotlib (optional extra).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        raise HfTaujpError("plot_alpha_curves needs matplotlib: pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, res in results.items():
        xs = [r["alpha"] for r in res["curve"]]
        ys = [r["avg_norm"] if r["avg_norm"] is not None else float("nan") for r in res["curve"]]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{method} (best α={res['best_alpha']:.2f})")
    ax.set_xlabel("α  (θ0 + α Σ τ_t)")
    ax.set_ylabel("mean normalized score (validation split)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
    return str(path)
