"""Time and peak memory of one forward+backward step: ordinary vs linearized GPT-2-small (random init, CPU).

Memory = peak RSS of a fresh subprocess per mode (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
minus the RSS right after the model is built, so it measures the step's activations and gradients.
Usage: python benchmarks/bench_linearized_step.py [--batch 4] [--seq 128] [--steps 3]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run_mode(mode: str, batch: int, seq: int, steps: int) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_taujp.linearize import linearize

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).train()
    if mode == "linearized":
        model = linearize(model)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps + 1):  # first step is warm-up
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "median_s": statistics.median(times[1:]), "peak_rss_mib": peak / 1024,
            "step_rss_mib": (peak - rss0) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a.mode, a.batch, a.seq, a.steps)))
        return
    rows = []
    for mode in ("normal", "linearized"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--batch", str(a.batch), "--seq", str(a.seq),
                              "--steps", str(a.steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"GPT-2 small (124M), batch {a.batch}x{a.seq}, CPU, median of {a.steps} steps")
    print(f"{'mode':<12}{'step s':>10}{'peak RSS MiB':>15}{'step RSS MiB':>15}")
    for r in rows:
        print(f"{r['mode']:<12}{r['median_s']:>10.3f}{r['peak_rss_mib']:>15.0f}{r['step_rss_mib']:>15.0f}")
    print(f"ratio linearized/normal: time {rows[1]['median_s'] / rows[0]['median_s']:.2f}x, "
          f"step RSS {rows[1]['step_rss_mib'] / max(rows[0]['step_rss_mib'], 1):.2f}x")


if __name__ == "__main__":
    main()
