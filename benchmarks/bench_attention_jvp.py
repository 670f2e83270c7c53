"""Attention under linearized fine-tuning: time and peak memory, side by side, per sequence length.

    python benchmarks/bench_attention_jvp.py --threads 1            # L = 256, 1024, 2048, 4096 (~4 min)
    python benchmarks/bench_attention_jvp.py --threads 1 --lengths 256 1024 2048 --reps 3

Llama-shaped heads (SmolLM2-135M: 9 query heads, 3 key/value heads, head dim 64), batch 1, causal, fp32.
Three computations, each ending in the gradients a training step needs:

* (a) ``sdpa``: ordinary attention, ``F.scaled_dot_product_attention`` (fused CPU flash kernel, native
  GQA) forward + backward to (Q, K, V);
* (b) ``math jvp``: linearized attention as every peer runs it, ``torch.func.jvp`` of SDPA on the math
  kernel, then backward from a loss on the tangent to (tQ, tK, tV);
* (c) ``ours``: the same with :func:`hf_taujp.attention_jvp.linearized_sdpa`.

Time: median over ``--reps`` runs after one warm-up, wall clock and process CPU time (with one thread on a
shared machine the CPU time is the steadier measure: it does not count time spent waiting for a core).
Peak memory: the high-water mark of bytes allocated during the call (inputs excluded), from
torch.profiler's allocation events (``profile_memory=True``), one profiled run per computation; every
length runs in a fresh subprocess; at L > 2048 the math path is timed once (≈ 40 s a call). (c)/(a) and (b)/(c) ratios
are printed; targets (issue 13) at L = 2048: memory (c) ≤ 1.6× (a) and ≥ 4× below (b), time (c) ≤ 2.5× (a).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HQ, HK, E = 9, 3, 64


def child(length: int, reps: int, threads: int, skip_math_above: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    from hf_taujp.attention_jvp import linearized_sdpa

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, length, E, generator=g) for h in (HQ, HK, HK))
    tq, tk, tv = (torch.randn(x.shape, generator=g).requires_grad_() for x in (q, k, v))
    w = torch.randn(1, HQ, length, E, generator=g)
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))

    def sdpa():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # the fused kernel, or an error: never silently math
            o = F.scaled_dot_product_attention(qa, ka, va, is_causal=True, enable_gqa=True)
        return torch.autograd.grad((o * w).sum(), (qa, ka, va))

    def math_jvp():
        with sdpa_kernel([SDPBackend.MATH]):
            _, t = torch.func.jvp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True,
                                                                                  enable_gqa=True),
                                  (q, k, v), (tq, tk, tv))
        return torch.autograd.grad((t * w).sum(), (tq, tk, tv))

    def ours():
        _, t = torch.func.jvp(lambda a, b, c: linearized_sdpa(a, b, c, is_causal=True, enable_gqa=True),
                              (q, k, v), (tq, tk, tv))
        return torch.autograd.grad((t * w).sum(), (tq, tk, tv))

    fns = {"sdpa": sdpa, "math jvp": math_jvp, "ours": ours}
    if length > skip_math_above:
        fns.pop("math jvp")
    res = {"L": length, "threads": torch.get_num_threads()}
    # agreement of (b) and (c): the gradients w.r.t. the tangents (a sanity check, not a test)
    if "math jvp" in fns and length <= 2048:
        res["max |Δgrad|"] = max((a - b).abs().max().item() for a, b in zip(math_jvp(), ours()))
    times: dict[str, list[float]] = {n: [] for n in fns}
    cpu: dict[str, list[float]] = {n: [] for n in fns}
    for n, fn in fns.items():
        fn()  # warm-up
    for rep in range(reps):  # interleaved, so that a change in machine load hits all alike
        for n, fn in fns.items():
            if n == "math jvp" and length > 2048 and rep:  # ~40 s a call at 4096: timed once (run < 5 min)
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    for n, fn in fns.items():
        res[f"{n} ms"] = 1000 * statistics.median(times[n])
        res[f"{n} cpu ms"] = 1000 * statistics.median(cpu[n])
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        res[f"{n} MiB"] = _peak_bytes(prof) / 2**20
    return res


def _peak_bytes(prof) -> int:
    """High-water mark of the running sum of allocation events (+ alloc, − free) within the profiled block."""
    evs = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"))
    cur = peak = 0
    for _, n in evs:
        cur += n
        peak = max(peak, cur)
    return peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); use 1 on a shared machine")
    ap.add_argument("--skip-math-above", type=int, default=4096, help="longest L for the math path (its memory is L²)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.reps, a.threads, a.skip_math_above)))
        return
    rows = []
    load0 = os.getloadavg()[0]
    for length in a.lengths:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(length), "--reps", str(a.reps),
               "--threads", str(a.threads), "--skip-math-above", str(a.skip_math_above)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"L={length} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
        print(f"  done L={length}", file=sys.stderr, flush=True)
    from hf_taujp.evaluation import format_table

    table = []
    for r in rows:
        m = r.get("math jvp MiB")
        table.append({
            "L": r["L"],
            "(a) sdpa ms": r["sdpa ms"], "(b) math jvp ms": r.get("math jvp ms", float("nan")), "(c) ours ms": r["ours ms"],
            "time c/a": r["ours ms"] / r["sdpa ms"],
            "CPU time c/a": r["ours cpu ms"] / r["sdpa cpu ms"],
            "CPU time b/a": r["math jvp cpu ms"] / r["sdpa cpu ms"] if "math jvp cpu ms" in r else float("nan"),
            "(a) MiB": r["sdpa MiB"], "(b) MiB": m if m is not None else float("nan"), "(c) MiB": r["ours MiB"],
            "mem c/a": r["ours MiB"] / r["sdpa MiB"],
            "mem b/c": (m / r["ours MiB"]) if m is not None else float("nan"),
            "max |Δgrad| b vs c": r.get("max |Δgrad|", float("nan")),
        })
    print(f"Attention fwd + bwd, Llama-shaped heads ({HQ} q / {HK} kv heads, dim {E}), batch 1, causal, fp32, CPU, "
          f"{rows[0]['threads']} thread(s); median of {a.reps} after a warm-up (ms: wall clock); peak = allocated bytes "
          f"(torch.profiler); load average before {load0:.2f}, after {os.getloadavg()[0]:.2f}")
    print(format_table(table, floatfmt=".3g"))


if __name__ == "__main__":
    main()
