"""Tokens/s of generation from a linearized causal LM, with and without the tangent-carrying KV cache.

Commands (the README's numbers):
    python benchmarks/bench_generation.py --threads 1               # GPT-2's vocabulary
    python benchmarks/bench_generation.py --threads 1 --vocab 1000  # the transformer body dominates

Model: GPT-2 architecture, random init, ``--layers 4 --hidden 256 --heads 4`` and GPT-2's vocabulary
(50257; ``--vocab`` to change), batch 1, an 8-token prompt, greedy decoding with
``min_new_tokens = max_new_tokens`` so every run decodes exactly N tokens. τ is random (every parameter
linearized). Columns, each through ``generate(input_ids=..., max_new_tokens=N, ...)``:

- ``ordinary``: the base model's own cached ``generate`` (the floor);
- ``lin cached``: ``hf_taujp.linearize(model, tangents=τ).generate(...)``: dual-tensor parameters, the
  KV cache carrying keys/values and their tangents, :class:`hf_taujp.generation.FastForwardAD` and the
  summed output layer on;
- ``lin torch-AD``: the same with PyTorch's own forward-AD rules everywhere (``fast=False``);
- ``lin no cache``: ``use_cache=False``: each step re-reads the whole prefix (O(n²)).

One warm-up call per column, then ``--repeats`` timed calls (default 1: one run) in interleaved order;
the median is printed. Time is the process's CPU time (``time.process_time``): with one thread it is the
wall time of a quiet machine, and it does not count the time another process holds the core (the
machine these numbers come from is shared; wall time is printed too). Targets (issue 11): lin cached
≥ 3× faster than lin no cache at 256 new tokens, and ≤ 2.2× the time of ordinary cached generation.
The load average is printed: compare runs made under similar load.
"""

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_taujp.generation import linearized_generate
    from hf_taujp.linearize import linearize

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_pos = args.prompt + max(args.tokens)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=args.vocab,
                     n_positions=max(1024, n_pos), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = GPT2LMHeadModel(cfg).eval()
    tau = {n: 1e-2 * torch.randn_like(p) for n, p in model.named_parameters()}
    lin = linearize(model, tangents=tau)
    x = torch.randint(2, args.vocab, (1, args.prompt))

    def columns(n):
        kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return {
            "ordinary": lambda: model.generate(**kw),
            "lin cached": lambda: lin.generate(**kw),
            "lin torch-AD": lambda: linearized_generate(model, lin._primals(), lin._tangents(), fast=False, **kw),
            "lin no cache": lambda: lin.generate(use_cache=False, **kw),
        }

    print(f"GPT-2 config: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; batch 1, prompt {args.prompt}; "
          f"torch threads {args.threads}; load average before {os.getloadavg()[0]:.2f}")
    rows = []
    for n in args.tokens:
        cols = columns(n)
        times: dict[str, list[float]] = {k: [] for k in cols}
        walls: dict[str, list[float]] = {k: [] for k in cols}
        for f in cols.values():  # warm-up
            f()
        for _ in range(args.repeats):
            for k, f in cols.items():
                t0, w0 = time.process_time(), time.perf_counter()
                out = f()
                times[k].append(time.process_time() - t0)
                walls[k].append(time.perf_counter() - w0)
                assert out.shape[1] == args.prompt + n, out.shape
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((n, med))
        print(f"{n} new tokens, wall s: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in walls.items()))
    print(f"load average after {os.getloadavg()[0]:.2f}\n")
    names = list(rows[0][1])
    print("tokens per CPU second (one thread):")
    print(f"{'new tokens':>10} | " + " | ".join(f"{k + ' tok/s':>18}" for k in names)
          + " | cached vs no cache | lin cached / ordinary | torch-AD / lin cached")
    for n, med in rows:
        print(f"{n:>10} | " + " | ".join(f"{n / med[k]:>18.1f}" for k in names)
              + f" | {med['lin no cache'] / med['lin cached']:>17.2f}x | {med['lin cached'] / med['ordinary']:>20.2f}x"
              + f" | {med['lin torch-AD'] / med['lin cached']:>20.2f}x")


if __name__ == "__main__":
    main()
