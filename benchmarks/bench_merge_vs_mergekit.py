"""hf-taujp streaming merge vs mergekit on GPT-2 small (124M, random init): base + 4 task vectors.

Setup (mergekit lives in its own venv; tests never import it):
    echo "torch==2.13.0" > /tmp/mk-constraints.txt
    python -m venv --system-site-packages /tmp/mk && /tmp/mk/bin/pip install -c /tmp/mk-constraints.txt mergekit
Run:
    HF_HUB_OFFLINE=1 python benchmarks/bench_merge_vs_mergekit.py [--work /tmp/mkbench] [--methods task_arithmetic ties]
Prints wall time and peak RSS (from /usr/bin/time -v) of both, and the max |difference| of the outputs.
hf-taujp runs ties with definition="mergekit" so both compute the same function. mergekit's timings
are cached in <work>/mergekit_results.json (pass --rerun-mergekit to re-measure them).
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
    if not os.path.exists(os.path.join(work, "done_tv2")):
        base = GPT2LMHeadModel.from_pretrained(os.path.join(work, "base"))
        bsd = hub.load_safetensors(os.path.join(work, "base"), "model")
        for k in range(4):
            fsd = hub.load_safetensors(os.path.join(work, f"ft{k}"), "model")
            tv = TaskVector.from_state_dicts(bsd, fsd, base_model="gpt2-random", task=f"t{k}")
            from hf_taujp.task_vector import fingerprint
            tv.base_fingerprint = fingerprint(base)
            tv.save_pretrained(os.path.join(work, f"tv{k}"))
        open(os.path.join(work, "done_tv2"), "w").close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/mkbench")
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeat", type=int, default=3, help="hf-taujp runs per method (median time reported)")
    ap.add_argument("--rerun-mergekit", action="store_true", help="re-time mergekit instead of reusing "
                    "mergekit_results.json in --work (mergekit ties takes minutes)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    setup(a.work)
    from hf_taujp import hub

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cache_path = os.path.join(a.work, "mergekit_results.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    rows = []
    for method in a.methods:
        params = {"density": a.density} if method == "ties" else {}
        key = f"{method}:{a.density}"
        mk_out = os.path.join(a.work, f"out_mk_{method}")
        if a.rerun_mergekit or key not in cache or not os.path.isdir(mk_out):
            mk_yaml = {"merge_method": method, "base_model": os.path.join(a.work, "base"), "dtype": "float32",
                       "models": [{"model": os.path.join(a.work, f"ft{k}"), "parameters": {"weight": 1.0, **params}}
                                  for k in range(4)]}
            y = os.path.join(a.work, f"mk_{method}.yaml")
            with open(y, "w") as f:
                json.dump(mk_yaml, f)  # JSON is YAML
            cache[key] = timed([a.mergekit, y, mk_out, "--no-write-model-card", "--allow-crimes"], env)
            json.dump(cache, open(cache_path, "w"))
        t_mk, r_mk = cache[key]
        ours = {"base_model": os.path.join(a.work, "base"), "method": method, "dtype": "float32",
                "vectors": [{"path": os.path.join(a.work, f"tv{k}"), "weight": 1.0} for k in range(4)],
                "parameters": {**params, **({"definition": "mergekit"} if method == "ties" else {})}}
        oy = os.path.join(a.work, f"ours_{method}.yaml")
        with open(oy, "w") as f:
            json.dump(ours, f)
        our_out = os.path.join(a.work, f"out_ours_{method}")
        code = f"import sys; from hf_taujp.merging.recipe import cli_merge; sys.exit(cli_merge([{oy!r}, {our_out!r}, '--no-progress']))"
        runs = [timed([sys.executable, "-c", code], env) for _ in range(a.repeat)]
        t_us = sorted(r[0] for r in runs)[len(runs) // 2]
        r_us = max(r[1] for r in runs)
        A = hub.load_safetensors(mk_out, "model")
        B = hub.load_safetensors(our_out, "model")
        common = [n for n in B if n in A]
        diff = max((A[n].float() - B[n].float()).abs().max().item() for n in common)
        ndiff = sum(int(((A[n].float() - B[n].float()).abs() > 1e-6).sum()) for n in common)
        total = sum(B[n].numel() for n in common)
        rows.append(f"{method:16s} mergekit {t_mk:7.1f} s {r_mk:7.0f} MiB | hf-taujp {t_us:7.1f} s {r_us:7.0f} MiB | "
                    f"speed-up {t_mk / t_us:4.1f}x  memory {r_us / r_mk:4.2f}x  max|diff| {diff:.2e} "
                    f"({ndiff}/{total} entries differ by > 1e-6)")
        print(rows[-1], flush=True)
    print("\n".join(["", "summary (median wall of hf-taujp runs, max RSS):"] + rows))


if __name__ == "__main__":
    main()
