"""Diagonal Fisher: torch.func vmap-over-grad (hf_taujp.merging.estimate_fisher) vs a batch-size-1 loop.

python benchmarks/bench_fisher_vmap.py [--n 64] [--batch 16]
Prints max relative difference (float64 -> must be ~1e-12) and the speed ratio loop / vmap.
"""
import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_taujp.merging.fisher import estimate_fisher


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    a = ap.parse_args()
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64,
                                   attn_implementation="eager")).double().eval()
    ids = torch.randint(0, 500, (a.n, a.seq))
    batches = [{"input_ids": ids[i:i + a.batch]} for i in range(0, a.n, a.batch)]
    t0 = time.perf_counter()
    f = estimate_fisher(m, batches, empirical=True, progress=False)
    t_vmap = time.perf_counter() - t0
    t0 = time.perf_counter()
    sums = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for i in range(a.n):
        m.zero_grad()
        x = ids[i:i + 1]
        torch.log_softmax(m(input_ids=x).logits[0, :-1], -1).gather(-1, x[0, 1:, None]).sum().backward()
        for n, p in m.named_parameters():
            sums[n] += p.grad ** 2
    t_loop = time.perf_counter() - t0
    err = max(((f.tensors[n] - s / a.n).abs().max() / (s / a.n).abs().max().clamp(min=1e-300)).item() for n, s in sums.items())
    print(f"examples {a.n}  batch {a.batch}  seq {a.seq}  float64")
    print(f"vmap {t_vmap:.2f} s   loop {t_loop:.2f} s   loop/vmap {t_loop / t_vmap:.2f}x   max rel diff {err:.2e}")


if __name__ == "__main__":
    main()
