"""Check a GLUE recipe run against the τJp paper's claims (issue 9, §5), from its results.json.

    python scripts/glue_targets.py hf_taujp_glue/results.json

Prints, per τJp run (one per λ), the checks: one-shot (α = 1) normalized ≥ 0.95; on every task where
linear FT's one-shot normalized is < 0.90, τJp ≥ linear + 0.05; single-task mean within 0.02 of linear
FT's; one-shot absolute mean ≥ linear FT's best-α absolute mean; the validation α-curve within 0.03 of
its peak over α ∈ [0.8, 1.2]; and whether non-linear FT loses ≥ 0.05 normalized at α = 1 (interference).
Dev numbers come from the report; the curve is the validation split's (the only split with α > 1).
"""
import json
import sys


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def main(path):
    r = json.load(open(path, encoding="utf-8"))
    m = r["methods"]
    lin, non = m.get("linear FT"), m.get("non-linear FT")
    chosen = {v["chosen"] for v in r.get("lambda_selection", {}).values()}
    rows = []
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
    if non:
        rows.append(("non-linear FT", {"interference: one-shot norm ≤ 0.95": (round(non["one_shot"]["avg_norm"], 3),
                                                                             non["one_shot"]["avg_norm"] <= 0.95)}))
    for label, checks in rows:
        print(label)
        for k, (v, ok) in checks.items():
            print(f"  {'PASS' if ok else 'FAIL'}  {k}: {v}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "hf_taujp_glue/results.json")
