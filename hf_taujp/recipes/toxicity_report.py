"""The toxicity recipe's report: the trade-off plot (toxicity against perplexity across α), the results table
(method × reported α) and the results files (results.json, results.md, tradeoff.png)."""

from __future__ import annotations

import os

from .toxicity_scorers import TOXIC_THRESHOLD


# --------------------------------------------------------------------------------------------------- plot
def plot_tradeoff(results: dict, path: str, title: str) -> str:
    """PNG of the validation curves: toxic rate and mean toxicity (pooled over the prompt sets) against validation
    perplexity across α, one curve per method (points labelled with α), the base model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    b = results["base_val"]
    for ax, key, ylabel in zip(axes, ("toxic_rate", "mean_toxicity"),
                               (f"toxic rate (score > {TOXIC_THRESHOLD})", "mean toxicity score")):
        for label, r in results["methods"].items():
            xs = [c["val_ppl"] for c in r["curve"]]
            ys = [c[key] for c in r["curve"]]
            ax.plot(xs, ys, marker="o", ms=3, label=f"{label} (chosen α={r['chosen_alpha']:g})")
            for c in r["curve"]:
                ax.annotate(f"{c['alpha']:g}", (c["val_ppl"], c[key]), fontsize=6)
        ax.plot([b["val_ppl"]], [b[key]], "k*", ms=10, label="base θ0")
        ax.set_xlabel("validation perplexity (WikiText)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: θ0 − α τ across α (scorer {results['scorer']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

# ------------------------------------------------------------------------------------------ table, files
def _table(results: dict, sets: list[str]) -> list[dict]:
    """The reported rows: the base, then per method its chosen α, α = 1 and θ0 + τ (the toxic model), each with
    the toxic rate and mean toxicity of every prompt set in `sets` and the test perplexity."""
    def row(method, r):
        out = {"method": method, "α": "" if r.get("alpha") is None else f"{r['alpha']:g}"}
        for k in sets:
            p = r["per_prompt_set"][k]
            out[f"toxic % ({k})"] = 100 * p["toxic_rate"]
            out[f"mean tox ({k})"] = p["mean_toxicity"]
        out["ppl (test)"] = r["test_ppl"]
        return out

    rows = [row("base θ0", results["base"])]
    for label, r in results["methods"].items():
        rows.append({**row(label, r["chosen"]), "method": f"{label} (chosen α)"})
        rows.append({**row(label, r["alpha_1"]), "method": f"{label} (α = 1)"})
        rows.append({**row(label, r["toxic_model"]), "method": f"{label}: θ0 + τ"})
    return rows


def _write(output_dir: str, results: dict, rows: list[dict], title: str) -> dict:
    """results.json, results.md, tradeoff.png (the report module's α-curve plot is for task addition; the
    JSON / table writers are shared)."""
    from ..evaluation import format_table, save_json
    from ..hub import atomic_write_text

    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, "results.json"), "markdown": os.path.join(output_dir, "results.md"),
             "png": os.path.join(output_dir, "tradeoff.png")}
    try:
        plot_tradeoff(results, paths["png"], title)
    except ImportError as e:  # matplotlib is an optional extra: say so in the results instead of failing the run
        paths["png"] = None
        results.setdefault("warnings", []).append(f"no trade-off plot: {e}")
    save_json(results, paths["json"])
    g = results["generation"]
    shown = ("top_k", "temperature", "top_p", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size")
    notes = [f"scorer: {results['scorer']} (score > {TOXIC_THRESHOLD} = toxic); generations: ≤ "
             f"{g['max_new_tokens']} new tokens, sampled with " + ", ".join(f"{k} {g['sampling'][k]}" for k in shown)
             + " (every setting explicit, none from the model's generation_config; all in results.json "
             "generation.sampling)",
             "prompts: α chosen on one half of the eliciting / --prompts-file prompts, results on the other half "
             "(results.json: prompt_split); the authors' single prompt on both",
             f"perplexity: WikiText test, blocks of {results['perplexity']['block_size']} tokens, stride "
             f"{results['perplexity']['stride']}", f"α selection: {results['selection']}",
             "θ0 + τ: the fine-tuned toxic model (α = −1), the other end of the scale",
             f"τJp: λ = {results['taujp']['lambda']}, penalty from step {results['taujp']['start_step']} "
             f"of {results['steps']}"]
    if not results.get("complete", True):
        notes.append(f"PARTIAL: {len(results['methods'])} method(s) finished so far")
    text = [f"# {title}", "", "```", format_table(rows), "```", "", *[f"- {n}" for n in notes]]
    atomic_write_text(paths["markdown"], "\n".join(text) + "\n")
    return paths
