"""hf-taujp streaming merge vs mergekit on GPT-2 small (124M, random init): base + 4 task vectors.

Setup, once (mergekit lives in its own venv, from PyPI; the hf-taujp tests never import it). The
constraint keeps pip from replacing the installed torch with a multi-GB CUDA build:
    echo "torch==2.13.0" > /tmp/mk-constraints.txt      # the torch version installed here
    python -m venv --system-site-packages /tmp/mk
    /tmp/mk/bin/pip install -c /tmp/mk-constraints.txt mergekit      # 0.1.5 when this was written
Run (≈ 4 min on 2 cores; the work folder takes ≈ 6 GB, reused between runs):
    HF_HUB_OFFLINE=1 python benchmarks/bench_merge_vs_mergekit.py [--work /tmp/mkbench] \
        [--methods task_arithmetic ties] [--repeat 3] [--mk-repeat 1]

Both tools run as command-line programs (`mergekit-yaml` and `hf-taujp merge`, i.e. python -m
hf_taujp merge) timed by /usr/bin/time -v: wall time and peak RSS, import time included (also
printed alone, as `import`). Inputs: the base and four fine-tuned copies θ_t = θ0 + 0.01·N(0, 1) as
model folders for mergekit, and their task vectors τ_t = θ_t − θ0 (computed from the saved files)
as TaskVector folders for hf-taujp, so both see bit-identical deltas. Both merge in float32.
hf-taujp runs `ties` with definition="mergekit" (mergekit 0.1.5's TIES: per-tensor trim to
k = max(1, int(density·numel)) largest |τ|, δ_t = w_t·τ̂_t, sign elected on Σ δ_t, sum of the
agreeing δ_t divided by Σ w_t over them) so both compute the same function. The script checks that
the outputs agree (task_arithmetic bit for bit; ties except entries whose |τ| ties with the trim
threshold, where mergekit's argsort keeps an arbitrary subset and hf-taujp keeps all) and exits 1
if not. Timings on a shared machine are noisy: compare the two columns of one run.
"""
import argparse
import json
import os
import re
import subprocess
import sys

import torch


def timed(cmd, env=None):
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    h, m, s = wall.groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return (int(h or 0) * 3600 + int(m) * 60 + float(s)), rss / 1024


def setup(work):
    """Base (GPT-2 small, random init), 4 fine-tuned copies θ_t = θ0 + 0.01·N(0, 1) saved as models for
    mergekit, and their task vectors τ_t = θ_t − θ0 (recomputed from the saved files, so both tools see
    identical deltas) saved with TaskVector.save_pretrained (base fingerprint recorded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_taujp import hub
    from hf_taujp.task_vector import TaskVector

    if not os.path.exists(os.path.join(work, "done")):
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config())
        base.save_pretrained(os.path.join(work, "base"))
        sd = {n: p.detach() for n, p in base.named_parameters()}
        g = torch.Generator().manual_seed(1)
        for k in range(4):
            ft = GPT2LMHeadModel(GPT2Config())
            ft.load_state_dict({n: p + 0.01 * torch.randn(p.shape, generator=g) for n, p in sd.items()}, strict=False)
            ft.save_pretrained(os.path.join(work, f"ft{k}"))
        open(os.path.join(work, "done"), "w").close()
    if not os.path.exists(os.path.join(work, "done_tv3")):
        base = GPT2LMHeadModel.from_pretrained(os.path.join(work, "base"))
        bsd = hub.load_safetensors(os.path.join(work, "base"), "model")
        for k in range(4):
            fsd = hub.load_safetensors(os.path.join(work, f"ft{k}"), "model")
            tv = TaskVector.from_state_dicts(bsd, fsd, base_model="gpt2-random", task=f"t{k}")
            from hf_taujp.task_vector import fingerprint
            tv.base_fingerprint = fingerprint(base)
            tv.save_pretrained(os.path.join(work, f"tv{k}"))
        open(os.path.join(work, "done_tv3"), "w").close()


def at_threshold(work, name, differ, density):
    """True if at every differing entry of ``name`` some |τ_t| equals τ_t's trim threshold (the k-th
    largest |τ_t|, k = max(1, int(density·numel)), by torch.kthvalue), i.e. only tie-breaking differs."""
    from hf_taujp import hub

    hit = torch.zeros(int(differ.sum()), dtype=torch.bool)
    for k in range(4):
        with hub.SafetensorsReader(os.path.join(work, f"tv{k}"), "task_vector") as r:
            t = r.get(name).abs().reshape(-1)
        kk = max(1, int(density * t.numel()))
        thr = torch.kthvalue(t, t.numel() - kk + 1).values
        hit |= t[differ.reshape(-1)] == thr
    return bool(hit.all())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/mkbench")
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=3, help="hf-taujp runs per method (median time, max RSS)")
    ap.add_argument("--mk-repeat", type=int, default=1, help="mergekit runs per method (ties takes minutes)")
    ap.add_argument("--reuse-mergekit", action="store_true", help="reuse mergekit timings cached in "
                    "<work>/mergekit_results.json by an earlier run instead of re-timing mergekit")
    a = ap.parse_args()
    if not os.path.exists(a.mergekit):
        sys.exit(f"{a.mergekit} not found: install mergekit in its own venv first (see the top of this file)")
    os.makedirs(a.work, exist_ok=True)
    setup(a.work)
    from hf_taujp import hub

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    mk_python = os.path.join(os.path.dirname(a.mergekit), "python")
    imp_mk = timed([mk_python, "-c", "import mergekit.scripts.run_yaml"], env)
    imp_us = timed([sys.executable, "-c", "import hf_taujp.merging.recipe"], env)
    cache_path = os.path.join(a.work, "mergekit_results.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    rows, ok = [], True
    head = (f"{'method':16s} {'mergekit s':>10s} {'MiB':>6s} | {'hf-taujp s':>10s} {'MiB':>6s} | {'speed-up':>8s} "
            f"{'memory':>6s} | max|diff|  entries differing")
    for method in a.methods:
        params = {"density": a.density} if method == "ties" else {}
        key = f"{method}:{a.density}"
        mk_out = os.path.join(a.work, f"out_mk_{method}")
        if not a.reuse_mergekit or key not in cache or not os.path.isdir(mk_out):
            mk_yaml = {"merge_method": method, "base_model": os.path.join(a.work, "base"), "dtype": "float32",
                       "models": [{"model": os.path.join(a.work, f"ft{k}"), "parameters": {"weight": 1.0, **params}}
                                  for k in range(4)]}
            y = os.path.join(a.work, f"mk_{method}.yaml")
            with open(y, "w") as f:
                json.dump(mk_yaml, f)  # JSON is YAML
            runs = [timed([a.mergekit, y, mk_out, "--no-write-model-card", "--allow-crimes"], env)
                    for _ in range(a.mk_repeat)]
            cache[key] = (sorted(r[0] for r in runs)[len(runs) // 2], max(r[1] for r in runs))
            json.dump(cache, open(cache_path, "w"))
        t_mk, r_mk = cache[key]
        ours = {"base_model": os.path.join(a.work, "base"), "method": method, "dtype": "float32",
                "vectors": [{"path": os.path.join(a.work, f"tv{k}"), "weight": 1.0} for k in range(4)],
                "parameters": {**params, **({"definition": "mergekit"} if method == "ties" else {})}}
        oy = os.path.join(a.work, f"ours_{method}.yaml")
        with open(oy, "w") as f:
            json.dump(ours, f)
        our_out = os.path.join(a.work, f"out_ours_{method}")
        runs = [timed([sys.executable, "-m", "hf_taujp", "merge", oy, our_out, "--no-progress"], env)
                for _ in range(a.repeat)]
        t_us = sorted(r[0] for r in runs)[len(runs) // 2]
        r_us = max(r[1] for r in runs)
        A = hub.load_safetensors(mk_out, "model")
        B = hub.load_safetensors(our_out, "model")
        common = [n for n in B if n in A]
        if len(common) != len(B):
            ok = False
            print(f"tensors missing from mergekit's output: {sorted(set(B) - set(A))[:5]}")
        diff = max((A[n].float() - B[n].float()).abs().max().item() for n in common)
        ndiff = sum(int((A[n] != B[n]).sum()) for n in common)
        total = sum(B[n].numel() for n in common)
        # TA must be bit-identical; TIES may differ only where some |τ_t| equals its trim threshold
        good = ndiff == 0 if method == "task_arithmetic" else ndiff <= 1e-6 * total and all(
            at_threshold(a.work, n, A[n] != B[n], a.density) for n in common if not torch.equal(A[n], B[n]))
        ok &= good
        rows.append(f"{method:16s} {t_mk:10.1f} {r_mk:6.0f} | {t_us:10.1f} {r_us:6.0f} | {t_mk / t_us:7.1f}x "
                    f"{r_us / r_mk:5.2f}x | {diff:.1e}  {ndiff}/{total}{'' if good else '  <-- DISAGREE'}")
        print(rows[-1], flush=True)
    print(f"\nGPT-2 small (124M) fp32, base + 4 task vectors, density {a.density}; hf-taujp: median of {a.repeat} "
          f"runs, mergekit: median of {a.mk_repeat}; peak RSS = max over runs")
    print(head)
    print("\n".join(rows))
    print(f"{'import alone':16s} {imp_mk[0]:10.1f} {imp_mk[1]:6.0f} | {imp_us[0]:10.1f} {imp_us[1]:6.0f} |"
          "  (python -c 'import mergekit.scripts.run_yaml' / 'import hf_taujp.merging.recipe')")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
