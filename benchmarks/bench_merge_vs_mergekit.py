"""hf-taujp streaming merge vs mergekit on GPT-2 small (124M, random init): base + 4 task vectors.

Setup (mergekit lives in its own venv; tests never import it):
    echo "torch==2.13.0" > /tmp/mk-constraints.txt
    python -m venv --system-site-packages /tmp/mk && /tmp/mk/bin/pip install -c /tmp/mk-constraints.txt mergekit
Run:
    HF_HUB_OFFLINE=1 python benchmarks/bench_merge_vs_mergekit.py [--work /tmp/mkbench] [--methods task_arithmetic ties]
Prints wall time and peak RSS (from /usr/bin/time -v) of both, and the max |difference| of the outputs.
hf-taujp runs ties with definition="mergekit" so both compute the same function.
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
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_taujp import hub

    if os.path.exists(os.path.join(work, "done")):
        return
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config())
    base.save_pretrained(os.path.join(work, "base"))
    sd = {n: p.detach() for n, p in base.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for k in range(4):
        tau = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in sd.items()}
        with hub.atomic_dir(os.path.join(work, f"tv{k}")) as tmp:
            hub.save_safetensors_sharded(tau, tmp, prefix="task_vector")
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"format": "hf-taujp/task_vector", "format_version": 1, "kind": "nonlinear"}, f)
        ft = GPT2LMHeadModel(GPT2Config())
        ft.load_state_dict({n: p + tau[n] for n, p in sd.items()}, strict=False)
        ft.save_pretrained(os.path.join(work, f"ft{k}"))
    open(os.path.join(work, "done"), "w").close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/mkbench")
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties"])
    ap.add_argument("--density", type=float, default=0.2)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    setup(a.work)
    from hf_taujp import hub

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for method in a.methods:
        params = {"density": a.density} if method == "ties" else {}
        mk_yaml = {"merge_method": method, "base_model": os.path.join(a.work, "base"), "dtype": "float32",
                   "models": [{"model": os.path.join(a.work, f"ft{k}"), "parameters": {"weight": 1.0, **params}}
                              for k in range(4)]}
        y = os.path.join(a.work, f"mk_{method}.yaml")
        with open(y, "w") as f:
            json.dump(mk_yaml, f)  # JSON is YAML
        mk_out = os.path.join(a.work, f"out_mk_{method}")
        t_mk, r_mk = timed([a.mergekit, y, mk_out, "--no-write-model-card", "--allow-crimes"], env)
        ours = {"base_model": os.path.join(a.work, "base"), "method": method, "dtype": "float32",
                "vectors": [{"path": os.path.join(a.work, f"tv{k}"), "weight": 1.0} for k in range(4)],
                "parameters": {**params, **({"definition": "mergekit"} if method == "ties" else {})}}
        oy = os.path.join(a.work, f"ours_{method}.yaml")
        with open(oy, "w") as f:
            json.dump(ours, f)
        our_out = os.path.join(a.work, f"out_ours_{method}")
        code = f"import sys; from hf_taujp.merging.recipe import cli_merge; sys.exit(cli_merge([{oy!r}, {our_out!r}, '--no-progress']))"
        t_us, r_us = timed([sys.executable, "-c", code], env)
        A = hub.load_safetensors(mk_out, "model")
        B = hub.load_safetensors(our_out, "model")
        diff = max((A[n].float() - B[n].float()).abs().max().item() for n in B if n in A)
        print(f"{method:16s} mergekit {t_mk:7.1f} s {r_mk:7.0f} MiB | hf-taujp {t_us:7.1f} s {r_us:7.0f} MiB | "
              f"speed-up {t_mk / t_us:4.1f}x  max|diff| {diff:.2e}")


if __name__ == "__main__":
    main()
