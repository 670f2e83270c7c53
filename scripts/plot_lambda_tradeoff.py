"""The λ trade-off of each penalty form (issue 21), from `hf-taujp glue` runs' results.json: for every run (a method
at one λ) its single-task mean (GLUE dev) against the off-diagonal ‖J·τ‖ (interference on the other tasks' held-out
prompts), and its merged model's mean at α = 1 — one line per penalty form, λ written beside each point.

    python scripts/plot_lambda_tradeoff.py RUN_DIR [RUN_DIR ...] --out docs/lambda_tradeoff.png

Prints the table it plots (form, λ, single, abs α = 1, norm α = 1, best α, off-diag ‖J·τ‖). Points are what the
runs measured; nothing is fitted. The reference lines are each run's own linear FT / non-linear FT rows when
present (the recipe's baselines on the same data).
"""

from __future__ import annotations

import argparse
import json
import os
import re


def points(run_dirs):
    """[(form, λ, row)] for every regularized row of the runs' tables, and the baseline rows by label."""
    out, base = [], {}
    for d in run_dirs:
        r = json.load(open(os.path.join(d, "results.json"), encoding="utf-8"))
        form = r.get("taujp", {}).get("norm", "l2")
        lam_default = r.get("taujp", {}).get("lambda")
        for row in r["table"]:
            label = row["method"]
            if label in ("linear FT", "non-linear FT"):
                base[label] = row
                continue
            m = re.match(r"(.*?)(?: \(λ=(.*)\))?$", label)
            name, lam = m.group(1), m.group(2)
            if name == "linear FT + τJp":
                kind = f"τJp {form}"
                lam = lam or lam_default
            elif name == "linear FT + KFAC":
                kind = "KFAC (" + r.get("curvature", {}).get("probe", "?") + " probe)"
                lam = lam or r.get("curvature", {}).get("lambda")
            else:
                continue
            out.append((kind, float(lam), row))
    return sorted(out, key=lambda p: (p[0], p[1])), base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="lambda_tradeoff.png")
    a = p.parse_args(argv)
    pts, base = points(a.runs)
    from hf_taujp.evaluation import format_table

    rows = [{"form": k, "λ": f"{lam:g}", "single": r["single"], "abs α=1": r["abs (α=1)"], "norm α=1": r["norm (α=1)"],
             "best α": r["best α (val)"], "off-diag ‖J·τ‖": r["τJp off-diag"]} for k, lam, r in pts]
    rows += [{"form": label, "λ": "", "single": r["single"], "abs α=1": r["abs (α=1)"], "norm α=1": r["norm (α=1)"],
              "best α": r["best α (val)"], "off-diag ‖J·τ‖": r["τJp off-diag"]} for label, r in base.items()]
    print(format_table(rows, floatfmt=".3f"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in dict.fromkeys(k for k, _, _ in pts):
        sel = [(lam, r) for k, lam, r in pts if k == kind]
        for ax, key in zip(axes, ("single", "abs (α=1)")):
            xs, ys = [r["τJp off-diag"] for _, r in sel], [r[key] for _, r in sel]
            ax.plot(xs, ys, "o-", label=kind)
            for (lam, _), x, y in zip(sel, xs, ys):
                ax.annotate(f"{lam:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for ax, key, title in zip(axes, ("single", "abs (α=1)"), ("single-task mean (dev)", "merged at α = 1, mean (dev)")):
        for label, r in base.items():
            ax.scatter([r["τJp off-diag"]], [r[key]], marker="x", color="k")
            ax.annotate(label, (r["τJp off-diag"], r[key]), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xlabel("off-diagonal ‖J·τ‖ (interference; lower = more disentangled)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = a.out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, a.out)  # atomic
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()
