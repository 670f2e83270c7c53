"""Check GLUE recipe runs against the τJp paper's claims (issue 9, §5), from their results.json.

    python scripts/glue_targets.py hf_taujp_glue/results.json
    python scripts/glue_targets.py --reference full/results.json inv/*/results.json   # investigation runs

Prints, per τJp run (one per λ), the checks: one-shot (α = 1) normalized ≥ 0.95; on every task where
linear FT's one-shot normalized is < 0.90, τJp ≥ linear + 0.05; single-task mean within 0.02 of linear
FT's; one-shot absolute mean ≥ linear FT's best-α absolute mean; the validation α-curve within 0.03 of
its peak over α ∈ [0.8, 1.2]; and whether non-linear FT loses ≥ 0.05 normalized at α = 1 (interference).
Dev numbers come from the report; the curve is the validation split's (the only split with α > 1).

A run that trained only τJp (``--methods taujp``) takes linear / non-linear FT from ``--reference``, a run
with the same data, steps, lr, layers and seed. With several runs, a last table compares them; the
column to choose by is "val @ α=1" (mean validation score at α = 1, the recipe's own λ criterion):
everything else there is the dev set, reported, never chosen on.
"""
import argparse
import json


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def describe(r):
    t = r["taujp"]
    return (f"reg ratio {t['batch_ratio']:g}, output {t['output']}, {t['mode']}, "
            f"{r['trained_parameters']} trained tensors")


def check(path, reference=None):
    r = json.load(open(path, encoding="utf-8"))
    m = r["methods"]
    ref = json.load(open(reference, encoding="utf-8"))["methods"] if reference else {}
    lin = m.get("linear FT") or ref.get("linear FT")
    non = m.get("non-linear FT") or ref.get("non-linear FT")
    chosen = {v["chosen"] for v in r.get("lambda_selection", {}).values()}
    rows, summary = [], []
    for label, t in m.items():
        if not label.startswith("linear FT + τJp"):
            continue
        lam = t.get("taujp_lambda")
        one = t["one_shot"]
        checks = {"one-shot norm ≥ 0.95": (round(one["avg_norm"], 3), one["avg_norm"] >= 0.95)}
        if lin:
            weak = {k: v for k, v in lin["one_shot"]["norm"].items() if v is not None and v < 0.90}
            gains = {k: round(one["norm"][k] - v, 3) for k, v in weak.items() if one["norm"].get(k) is not None}
            checks["+0.05 where linear < 0.90"] = (gains, all(g >= 0.05 for g in gains.values()))
            d = mean(t["single"]["test"].values()) - mean(lin["single"]["test"].values())
            checks["single within 0.02 of linear"] = (round(d, 3), abs(d) <= 0.02)
            checks["one-shot abs ≥ linear best-α abs"] = ((round(one["avg_abs"], 3), round(lin["best"]["avg_abs"], 3)),
                                                        one["avg_abs"] >= lin["best"]["avg_abs"])
        band = [c["avg_norm"] for c in t["curve"] if 0.8 - 1e-9 <= c["alpha"] <= 1.2 + 1e-9]
        peak = max(c["avg_norm"] for c in t["curve"])
        checks["val curve within 0.03 of peak on [0.8, 1.2]"] = (round(peak - min(band), 3), peak - min(band) <= 0.03)
        rows.append((label + (" [chosen on validation]" if lam in chosen else ""), checks))
        val1 = next(c["avg_abs"] for c in t["curve"] if abs(c["alpha"] - 1.0) < 1e-9)
        summary.append({"run": f"{path}: {label}", "config": f"λ {lam:g}, {describe(r)}", "val @ α=1": val1,
                        "single": mean(t["single"]["test"].values()), "one-shot abs": one["avg_abs"],
                        "one-shot norm": one["avg_norm"], "off-diag": t["taujp_offdiag_mean"],
                        "curve gap": peak - min(band)})
    if non:
        rows.append(("non-linear FT", {"interference: one-shot norm ≤ 0.95": (round(non["one_shot"]["avg_norm"], 3),
                                                                             non["one_shot"]["avg_norm"] <= 0.95)}))
    print(path)
    for label, checks in rows:
        print(" ", label)
        for k, (v, ok) in checks.items():
            print(f"    {'PASS' if ok else 'FAIL'}  {k}: {v}")
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="*", default=["hf_taujp_glue/results.json"])
    ap.add_argument("--reference", help="results.json holding linear / non-linear FT for runs that lack them")
    a = ap.parse_args(argv)
    summary = [s for p in a.results for s in check(p, a.reference)]
    if len(summary) > 1:
        from hf_taujp.evaluation import format_table

        print("\nτJp runs (val @ α=1: validation split, the criterion; the rest: dev set)\n" + format_table(summary))


if __name__ == "__main__":
    main()
