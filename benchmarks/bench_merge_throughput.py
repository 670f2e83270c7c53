"""Streaming-merge throughput against the I/O floor and mergekit, measured side by side in one run.

Task arithmetic of base + K task vectors (K = 4), float32, on a random model saved with
save_pretrained: `--model gpt2` (GPT-2 small, 124M, 0.50 GB, tied embeddings; the work folder of
bench_merge_vs_mergekit.py is reused) or `--model llama` (Llama-shaped, hidden 1024, 20 layers,
MLP 2816, vocabulary 32000, untied head: 322M, 1.29 GB). Setup as in bench_merge_vs_mergekit.py:
fine-tuned copies θ_t = θ0 + 0.01·N(0, 1) as model folders for mergekit, τ_t = θ_t − θ0 (from the
saved files) as TaskVector folders for hf-taujp; both outputs must agree bit for bit (exit 1 if not).

Rows, each the median of --repeat runs, interleaved (floor, ours, ours CLI, mergekit, floor, ...)
so that the machine's load is the same for all of them, each after an untimed read of its inputs
(a warm page cache for every row):
  I/O floor         read base + K vectors once (pread into one reused 16 MiB buffer) and write one
                    output-sized file (pwrite), one after the other: the bytes any merge must move
  hf-taujp          merge_streaming(...) in this process (no import cost)
  hf-taujp CLI      `python -m hf_taujp merge recipe.json OUT` (imports included)
  mergekit CLI      `mergekit-yaml ... --no-write-model-card` (mergekit 0.1.5 in its own venv; see
                    bench_merge_vs_mergekit.py for the setup)
GB/s = (input bytes + output bytes) / wall seconds, the same bytes for every row; "mergekit/x" =
mergekit's wall time over the row's; CPU s = user + sys of every thread (on a loaded machine wall
time follows the CPU share the scheduler gives, so the CPU ratios are the steadier ones). Every run
writes a fresh output folder. Run (disk: ≈ 11 × the model for --model llama; ≈ 4 min on 2 cores):
    HF_HUB_OFFLINE=1 python benchmarks/bench_merge_throughput.py --model llama [--work DIR] [--repeat 3]
Timings on a shared machine are noisy: compare the rows of one run, not runs.
"""
import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_merge_vs_mergekit import setup as setup_gpt2  # noqa: E402

K = 4


def setup_llama(work):
    """Llama-shaped base (random init), K fine-tuned copies and their task vectors, as setup_gpt2 does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_taujp import hub
    from hf_taujp.task_vector import TaskVector, fingerprint

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)
    if not os.path.exists(os.path.join(work, "done")):
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg)
        base.save_pretrained(os.path.join(work, "base"))
        sd = {n: p.detach().clone() for n, p in base.named_parameters()}  # load_state_dict below writes the params
        g = torch.Generator().manual_seed(1)
        for k in range(K):
            ft = {n: p + 0.01 * torch.randn(p.shape, generator=g) for n, p in sd.items()}
            base.load_state_dict(ft)
            base.save_pretrained(os.path.join(work, f"ft{k}"))
            del ft
        del base, sd
        open(os.path.join(work, "done"), "w").close()
    if not os.path.exists(os.path.join(work, "done_tv")):
        bsd = hub.load_safetensors(os.path.join(work, "base"), "model")
        fp = fingerprint(bsd)
        for k in range(K):
            fsd = hub.load_safetensors(os.path.join(work, f"ft{k}"), "model")
            tv = TaskVector.from_state_dicts(bsd, fsd, base_model="llama-random", task=f"t{k}")
            tv.base_fingerprint = fp
            tv.save_pretrained(os.path.join(work, f"tv{k}"))
            del fsd, tv
        open(os.path.join(work, "done_tv"), "w").close()


def _cpu_self():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def in_process(fn):
    """(wall s, CPU s of every thread of this process) of ``fn()``."""
    c, t = _cpu_self(), time.perf_counter()
    fn()
    return time.perf_counter() - t, _cpu_self() - c


def command(cmd, env):
    """(wall s, user + sys CPU s) of a command, from /usr/bin/time -v."""
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    h, m, sec = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr).groups()
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", r.stderr).group(1)) for k in ("User", "System"))
    return int(h or 0) * 3600 + int(m) * 60 + float(sec), cpu


def _files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def read_all(inputs, chunk=16 << 20):
    """pread every file of ``inputs`` once into one reused buffer."""
    mv = memoryview(torch.empty(chunk, dtype=torch.uint8).numpy())
    for path in inputs:
        fd = os.open(path, os.O_RDONLY)
        try:
            off = 0
            while (n := os.preadv(fd, [mv], off)) > 0:
                off += n
        finally:
            os.close(fd)


def io_floor(inputs, out_path, out_bytes, chunk=16 << 20):
    """pread every file of ``inputs`` once, then pwrite ``out_bytes`` to a new file ``out_path``."""
    read_all(inputs, chunk)
    mv = memoryview(torch.empty(chunk, dtype=torch.uint8).numpy())
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, out_bytes, chunk):
            os.pwrite(fd, mv[:min(chunk, out_bytes - off)], off)
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["gpt2", "llama"], default="llama")
    ap.add_argument("--work", default=None, help="default /tmp/mkbench (gpt2) or /tmp/mkbench-llama")
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mk-repeat", type=int, default=None, help="mergekit runs (default: --repeat)")
    a = ap.parse_args()
    work = a.work or ("/tmp/mkbench" if a.model == "gpt2" else "/tmp/mkbench-llama")
    if not os.path.exists(a.mergekit):
        sys.exit(f"{a.mergekit} not found: install mergekit in its own venv first (see bench_merge_vs_mergekit.py)")
    os.makedirs(work, exist_ok=True)
    (setup_gpt2 if a.model == "gpt2" else setup_llama)(work)

    from hf_taujp import hub
    from hf_taujp.merging import merge_streaming

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base, tvs = os.path.join(work, "base"), [os.path.join(work, f"tv{k}") for k in range(K)]
    inputs = _files(base) + [f for d in tvs for f in _files(d)]
    in_bytes = sum(os.path.getsize(f) for f in inputs)
    out_bytes = sum(os.path.getsize(f) for f in _files(base))
    moved = in_bytes + out_bytes
    mk_yaml = {"merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
               "models": [{"model": os.path.join(work, f"ft{k}"), "parameters": {"weight": 1.0}} for k in range(K)]}
    ours = {"base_model": base, "method": "task_arithmetic", "dtype": "float32",
            "vectors": [{"path": d, "weight": 1.0} for d in tvs]}
    for name, obj in (("tp_mk.yaml", mk_yaml), ("tp_ours.json", ours)):
        with open(os.path.join(work, name), "w") as f:
            json.dump(obj, f)  # JSON is YAML
    out_ours, out_cli, out_mk = (os.path.join(work, f"tp_out_{s}") for s in ("ours", "cli", "mk"))
    floor_path = os.path.join(work, "tp_floor.bin")

    times = {"floor": [], "ours": [], "cli": [], "mk": []}
    mk_repeat = a.repeat if a.mk_repeat is None else a.mk_repeat

    def fresh(*paths):  # every run writes a new output (replacing a GB file costs ~1 s of unlink)
        for p in paths:
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)

    mk_inputs = _files(base) + [f for k in range(K) for f in _files(os.path.join(work, f"ft{k}"))]
    for r in range(a.repeat):
        # mergekit's output of its last run is kept for the bit-for-bit check (with --mk-repeat < --repeat)
        fresh(floor_path, out_ours, out_cli, *([out_mk] if r < mk_repeat else []))
        # before each row, an untimed read of its inputs: all rows start from a warm page cache (the two
        # input sets together may not fit in it, and a row after mergekit's would read from disk)
        read_all(inputs)
        times["floor"].append(in_process(lambda: io_floor(inputs, floor_path, out_bytes)))
        read_all(inputs)
        times["ours"].append(in_process(lambda: merge_streaming(base, tvs, out_ours, "task_arithmetic",
                                                                dtype="float32", progress=False)))
        read_all(inputs)
        times["cli"].append(command([sys.executable, "-m", "hf_taujp", "merge", os.path.join(work, "tp_ours.json"),
                                     out_cli, "--no-progress"], env))
        if r < mk_repeat:
            read_all(mk_inputs)
            times["mk"].append(command([a.mergekit, os.path.join(work, "tp_mk.yaml"), out_mk,
                                        "--no-write-model-card", "--allow-crimes"], env))
        print(f"run {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f} s (CPU {v[-1][1]:.2f})" for k, v in times.items()
                                           if len(v) > r) + f"; load {os.getloadavg()[0]:.1f}", flush=True)
    fresh(floor_path)

    A, B = hub.load_safetensors(out_mk, "model"), hub.load_safetensors(out_ours, "model")
    C = hub.load_safetensors(out_cli, "model")
    same = set(A) == set(B) == set(C) and all(torch.equal(A[n], B[n]) and torch.equal(B[n], C[n]) for n in B)
    del A, B, C

    wall = {k: statistics.median(x[0] for x in v) for k, v in times.items()}
    cpu = {k: statistics.median(x[1] for x in v) for k, v in times.items()}
    print(f"\n{a.model}: task arithmetic, base + {K} vectors, fp32; {in_bytes / 1e9:.2f} GB read + "
          f"{out_bytes / 1e9:.2f} GB written; median of {a.repeat} (mergekit {mk_repeat}); {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':14s} {'wall s':>7s} {'GB/s':>6s} {'x floor':>8s} {'mergekit/x':>10s} | {'CPU s':>6s} {'x floor':>8s}")
    labels = {"floor": "I/O floor", "ours": "hf-taujp", "cli": "hf-taujp CLI", "mk": "mergekit CLI"}
    for k in ("floor", "ours", "cli", "mk"):
        print(f"{labels[k]:14s} {wall[k]:7.2f} {moved / wall[k] / 1e9:6.2f} {wall[k] / wall['floor']:7.2f}x "
              f"{wall['mk'] / wall[k]:9.2f}x | {cpu[k]:6.2f} {cpu[k] / cpu['floor']:7.2f}x")
    print(f"outputs bit-identical (hf-taujp, CLI, mergekit): {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
