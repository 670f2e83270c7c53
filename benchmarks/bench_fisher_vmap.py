"""Diagonal Fisher: torch.func vmap-over-grad (hf_taujp.merging.estimate_fisher) vs a batch-size-1 loop.

    python benchmarks/bench_fisher_vmap.py [--n 64] [--batch 16] [--seq 32] [--n-embd 64] [--n-layer 2]
        [--vocab 500] [--dtype float64] [--attn sdpa] [--repeat 3] [--threads N]

Same model (GPT-2 shaped, random init, eval mode, transformers' default SDPA attention unless
--attn eager), same examples: the empirical
Fisher (gold next tokens) both ways must agree to float64 rounding (max relative difference printed;
the test suite checks the same on a smaller model); then the median wall time of `--repeat`
alternating runs of each, the ratio loop / vmap, and the true (sampled-label) Fisher's time, which
draws its labels inside the same vmapped forward. Load on a shared machine makes single timings
noisy: read the ratio, and the load average printed with it.
"""
import argparse
import os
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_taujp.merging.fisher import estimate_fisher


def loop_fisher(m, ids):
    """Reference: one example at a time, ordinary backward, mean of squared gradients."""
    sums = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for i in range(ids.shape[0]):
        m.zero_grad()
        x = ids[i:i + 1]
        torch.log_softmax(m(input_ids=x).logits[0, :-1], -1).gather(-1, x[0, 1:, None]).sum().backward()
        for n, p in m.named_parameters():
            sums[n] += p.grad ** 2
    return {n: s / ids.shape[0] for n, s in sums.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=500)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention (transformers' default: sdpa)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=a.n_layer, n_embd=a.n_embd, n_head=4, vocab_size=a.vocab, n_positions=max(64, a.seq),
                     attn_implementation=a.attn, bos_token_id=0, eos_token_id=0)
    m = GPT2LMHeadModel(cfg).to(getattr(torch, a.dtype)).eval()
    ids = torch.randint(0, a.vocab, (a.n, a.seq))
    batches = [{"input_ids": ids[i:i + a.batch]} for i in range(0, a.n, a.batch)]
    estimate_fisher(m, batches[:1], empirical=True, progress=False)  # warm-up
    t_vmap, t_loop, t_true = [], [], []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        f = estimate_fisher(m, batches, empirical=True, progress=False)
        t_vmap.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = loop_fisher(m, ids)
        t_loop.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        estimate_fisher(m, batches, progress=False)
        t_true.append(time.perf_counter() - t0)
    err = max(((f.tensors[n] - r).abs().max() / r.abs().max().clamp(min=1e-300)).item() for n, r in ref.items())
    nparam = sum(p.numel() for p in m.parameters())
    tv, tl, tt = (statistics.median(x) for x in (t_vmap, t_loop, t_true))
    print(f"GPT-2 shaped {nparam / 1e6:.2f}M params, {a.dtype}, {a.attn} attention, {a.n} examples × {a.seq} tokens, batch {a.batch}, "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'empirical Fisher, vmap (estimate_fisher)':44s} {tv:7.2f} s")
    print(f"{'empirical Fisher, per-example loop':44s} {tl:7.2f} s")
    print(f"{'true Fisher (sampled labels), vmap':44s} {tt:7.2f} s")
    print(f"loop / vmap = {tl / tv:.2f}x   max relative difference vmap vs loop = {err:.2e}")


if __name__ == "__main__":
    main()
