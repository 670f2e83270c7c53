"""Cost of one linearized forward+backward step vs an ordinary one: GPT-2 small (124M), random init, CPU.

Command (the closing note's numbers):
    python benchmarks/bench_linearized_step.py                       # batch 4 x 128 tokens, 3 timed steps, 2 rounds
    python benchmarks/bench_linearized_step.py --threads 1 --plain   # one thread; add a bare torch.func.jvp reference
    python benchmarks/bench_linearized_step.py --threads 1 --sweep   # sequence-length sweep, Llama-shaped (below)

``--sweep``: SmolLM2-135M shapes (hidden 576, 9 query / 3 key-value heads, MLP 1536, RoPE), random init,
``--sweep-layers`` layers (default 2) and a ``--sweep-vocab`` vocabulary (default 8192) so that L = 2048
fits a CPU budget; L ∈ ``--lengths`` (default 128, 512, 2048) at a constant 2048 tokens per batch
(batch = 2048 / L). Modes: ``normal``, ``linearized`` (attention by hf_taujp's linearized SDPA, the
default) and ``linearized-math`` (the math-kernel reference, ``forward_ad_attention(attention="math")``).
Issue-13 targets: linearized / normal ≤ 1.8× time at every L, ≤ 1.6× step memory at L = 2048.

``--keep K``: the output layer's input under ``logits_to_keep=K`` (the recipes' answer-position logits), on the
``--sweep`` model (SmolLM2 widths, ``--sweep-layers`` layers, ``--sweep-vocab`` vocabulary), batch ``--batch`` ×
``--seq``; a step = forward with ``logits_to_keep=K``, cross-entropy on the K kept positions, backward. transformers
hands the head the strided view ``hidden_states[:, -K:, :]``; ``F.linear`` on it takes a slow batched path on CPU.
The slow path is taken when the weight does not require grad (measured, torch 2.13: 50 ms against 8 ms for
32 × 2 rows at vocab 8192; with a trainable weight both take 8 ms), i.e. for a frozen head: every linearized
model, and the recipes' fine-tunes of the last decoder layers. Modes: ``normal (strided)`` (the model as loaded,
output layer and embeddings frozen, the rest trained), ``normal (contiguous)`` (the same with
``hf_taujp.linearize.contiguous_head_input`` kept on it, as the recipes do), ``linearized`` (every
forward-mode pass of hf_taujp installs that hook) and ``linearized (strided)`` (the hook disabled: the
linearized forward before the fix):
    python benchmarks/bench_linearized_step.py --threads 1 --keep 2 --batch 32 --seq 64

Modes (each step = forward, task loss, backward, zero_grad; the model in train mode, dropout 0):
- ``normal``: every parameter trainable, ``model(input_ids, labels=input_ids).loss.backward()``.
- ``linearized``: ``hf_taujp.linearize(model)`` (every parameter linearized, τ trainable), the loss is the
  causal-LM cross-entropy of f(x; θ0) + J f(x; θ0)·τ.
- ``plain-jvp`` (``--plain``): the same linearized loss written directly with ``torch.func.jvp`` over
  ``torch.func.functional_call`` and the math SDPA kernel: what hf_taujp's wrapper costs on top.

Each (mode, round) runs in a fresh subprocess, rounds interleaved (normal, linearized, normal, …) so that a
change in machine load hits both modes alike. Per mode: median wall seconds per step and median process
CPU seconds per step (all threads; with several threads it includes OpenMP spin-waiting, so it is the
cleanest cost measure at ``--threads 1``) over every timed step of every round; peak RSS of the process
(``ru_maxrss``) and "step RSS" = peak minus the RSS right after the model was built (activations,
gradients, optimiser-free). The machine load (``os.getloadavg``) is printed before and after: on a loaded
machine OpenMP threads wait for each other at every kernel, which hurts the many small element-wise kernels
of forward-mode AD far more than large matmuls; compare ``--threads 1`` there.

FLOP floor: per linear layer the ordinary step costs 3 matmuls (forward, dX, dW), the
linearized one 5 (primal W·x, tangent τ·x + W·ẋ, backward dτ and dẋ): ≈ 5/3 = 1.67×.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _model(arch: str, layers: int, vocab: int, seq: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "llama":  # SmolLM2-135M's shapes (config.json of HuggingFaceTB/SmolLM2-135M), fewer layers / vocab
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max(seq, 2048),
                          rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_dropout=0.0)
        return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").train(), cfg.vocab_size
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).train(), cfg.vocab_size


def _build(mode: str, batch: int, seq: int, arch: str = "gpt2", layers: int = 2, vocab: int = 8192):
    import torch

    torch.manual_seed(0)
    model, vocab_size = _model(arch, layers, vocab, seq)
    x = torch.randint(0, vocab_size, (batch, seq))
    if mode == "normal":
        def step():
            model(input_ids=x, labels=x).loss.backward()
            model.zero_grad(set_to_none=True)
    elif mode in ("linearized", "linearized-math"):
        from hf_taujp.attention import forward_ad_attention
        from hf_taujp.linearize import linearize

        lin = linearize(model)
        path = "math" if mode == "linearized-math" else None

        def step():
            with forward_ad_attention(attention=path):
                lin(input_ids=x, labels=x).loss.backward()
            lin.zero_grad(set_to_none=True)
    elif mode == "plain-jvp":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for p in model.parameters():
            p.requires_grad_(False)
        primals = dict(model.named_parameters())
        tau = {n: torch.zeros_like(p, requires_grad=True) for n, p in primals.items()}

        def f(params):
            return torch.func.functional_call(model, params, (), {"input_ids": x, "use_cache": False}).logits

        def step():
            with sdpa_kernel([SDPBackend.MATH]):
                p, t = torch.func.jvp(f, (primals,), (tau,))
            logits = p + t
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            for v in tau.values():
                v.grad = None
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return step


KEEP_MODES = ("normal (strided)", "normal (contiguous)", "linearized (strided)", "linearized")


def _build_keep(mode: str, batch: int, seq: int, layers: int, vocab: int, keep: int):
    """A training step with ``logits_to_keep=keep`` on the SmolLM2-shaped model (see ``--keep`` above)."""
    import torch

    import importlib

    lin_mod = importlib.import_module("hf_taujp.linearize")  # the module (the package exports a function of that name)
    torch.manual_seed(0)
    model, vocab_size = _model("llama", layers, vocab, seq)
    x = torch.randint(0, vocab_size, (batch, seq))
    y = torch.randint(0, vocab_size, (batch * keep,))
    if mode.startswith("normal"):
        model.get_output_embeddings().weight.requires_grad_(False)  # frozen head (tied: the embeddings too)
    if mode == "normal (contiguous)":
        lin_mod.contiguous_head_input(model)
    if mode == "linearized (strided)":
        importlib.import_module("hf_taujp.jvp_context").contiguous_head_input = lambda model: None  # this subprocess only: the forward before the fix
    net = lin_mod.linearize(model) if mode.startswith("linearized") else model

    def step():
        logits = net(input_ids=x, logits_to_keep=keep).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y).backward()
        net.zero_grad(set_to_none=True)

    return step


def run_mode(mode: str, batch: int, seq: int, steps: int, threads: int | None, arch: str = "gpt2", layers: int = 2,
             vocab: int = 8192, keep: int = 0) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    step = _build_keep(mode, batch, seq, layers, vocab, keep) if keep else _build(mode, batch, seq, arch, layers, vocab)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu = [], []
    for i in range(steps + 1):  # the first step is a warm-up (allocator, lazy init)
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        if i:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "wall": wall, "cpu": cpu, "peak_rss_mib": peak / 1024, "step_rss_mib": (peak - rss0) / 1024,
            "threads": torch.get_num_threads()}


def _child(a, mode: str, *options) -> dict:
    """Run one measurement in a fresh subprocess (this script with ``--mode``) and return its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, *map(str, options)]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} {' '.join(map(str, options))} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2, help="fresh subprocesses per mode, interleaved")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--plain", action="store_true", help="also time a bare torch.func.jvp implementation")
    ap.add_argument("--sweep", action="store_true", help="sequence-length sweep on a Llama-shaped model (see top)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--sweep-layers", type=int, default=2)
    ap.add_argument("--sweep-vocab", type=int, default=8192)
    ap.add_argument("--sweep-tokens", type=int, default=2048, help="tokens per batch (batch = tokens / L)")
    ap.add_argument("--keep", type=int, default=0, help="logits_to_keep benchmark with this many kept positions (see top)")
    ap.add_argument("--arch", default="gpt2", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a.mode, a.batch, a.seq, a.steps, a.threads, a.arch, a.sweep_layers, a.sweep_vocab,
                                  a.keep)))
        return
    if a.keep:
        return keep_table(a)
    if a.sweep:
        return sweep(a)
    modes = ["normal", "linearized"] + (["plain-jvp"] if a.plain else [])
    load0 = os.getloadavg()
    results: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(a.rounds):
        for mode in modes:
            results[mode].append(_child(a, mode, "--batch", a.batch, "--seq", a.seq, "--steps", a.steps))
            print(f"  round {r + 1}/{a.rounds} {mode}: {statistics.median(results[mode][-1]['wall']):.2f} s/step",
                  file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    rows = {}
    for m, rs in results.items():
        rows[m] = {
            "wall": statistics.median([w for r in rs for w in r["wall"]]),
            "cpu": statistics.median([c for r in rs for c in r["cpu"]]),
            "peak": max(r["peak_rss_mib"] for r in rs),
            "step": max(r["step_rss_mib"] for r in rs),
            "threads": rs[0]["threads"],
        }
    n = rows["normal"]
    print(f"GPT-2 small (124M, random init), batch {a.batch}x{a.seq}, CPU, {rows['normal']['threads']} thread(s), "
          f"median of {a.rounds}x{a.steps} steps; load average before {load0[0]:.2f}, after {load1[0]:.2f} "
          f"({os.cpu_count()} cores)")
    print(f"| {'mode':<11}| {'s/step (wall)':>13} | {'CPU s/step':>10} | {'peak RSS MiB':>12} | {'step RSS MiB':>12} |"
          f" {'time ratio':>10} | {'step RSS ratio':>14} |")
    print("|" + "|".join("-" * w for w in (12, 15, 12, 14, 14, 12, 16)) + "|")
    for m, r in rows.items():
        print(f"| {m:<11}| {r['wall']:>13.2f} | {r['cpu']:>10.2f} | {r['peak']:>12.0f} | {r['step']:>12.0f} |"
              f" {r['wall'] / n['wall']:>9.2f}x | {r['step'] / max(n['step'], 1):>13.2f}x |")


def keep_table(a) -> None:
    """Step time with ``logits_to_keep``: the strided head input against the contiguous one (fresh subprocess each)."""
    load0 = os.getloadavg()
    res: dict[str, list[dict]] = {m: [] for m in KEEP_MODES}
    for r in range(a.rounds):
        for mode in (KEEP_MODES if r % 2 == 0 else KEEP_MODES[::-1]):
            res[mode].append(_child(a, mode, "--keep", a.keep, "--batch", a.batch, "--seq", a.seq, "--steps", a.steps,
                                    "--sweep-layers", a.sweep_layers, "--sweep-vocab", a.sweep_vocab))
            print(f"  round {r + 1}/{a.rounds} {mode}: CPU {statistics.median(res[mode][-1]['cpu']):.3f} s/step",
                  file=sys.stderr, flush=True)
    cpu = {m: statistics.median([c for x in rs for c in x["cpu"]]) for m, rs in res.items()}
    wall = {m: statistics.median([w for x in rs for w in x["wall"]]) for m, rs in res.items()}
    print(f"Llama-shaped (SmolLM2-135M widths, {a.sweep_layers} layers, vocab {a.sweep_vocab}, random init), batch "
          f"{a.batch}x{a.seq}, logits_to_keep={a.keep}, forward + CE on the kept logits + backward, CPU, "
          f"{a.threads or 'default'} thread(s), median of {a.rounds}x{a.steps} steps; load average before {load0[0]:.2f}, "
          f"after {os.getloadavg()[0]:.2f}")
    print(f"| {'mode':<21}| {'CPU s/step':>10} | {'wall s/step':>11} | {'strided / contiguous (CPU)':>26} |")
    print("|" + "|".join("-" * w for w in (22, 12, 13, 28)) + "|")
    for m in KEEP_MODES:
        ref = "normal (contiguous)" if m.startswith("normal") else "linearized"
        ratio = f"{cpu[m] / cpu[ref]:.1f}x" if "strided" in m else ""
        print(f"| {m:<21}| {cpu[m]:>10.3f} | {wall[m]:>11.3f} | {ratio:>26} |")


def sweep(a) -> None:
    """Linearized vs normal step on a Llama-shaped model at several sequence lengths (fresh subprocess each)."""
    modes = ["normal", "linearized", "linearized-math"]
    load0 = os.getloadavg()
    table = []
    for seq in a.lengths:
        batch = max(1, a.sweep_tokens // seq)
        res: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(a.rounds):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                res[mode].append(_child(a, mode, "--arch", "llama", "--batch", batch, "--seq", seq, "--steps", a.steps,
                                        "--sweep-layers", a.sweep_layers, "--sweep-vocab", a.sweep_vocab))
                print(f"  L={seq} round {r + 1}/{a.rounds} {mode}: {statistics.median(res[mode][-1]['wall']):.2f} s/step "
                      f"(CPU {statistics.median(res[mode][-1]['cpu']):.2f} s)",
                      file=sys.stderr, flush=True)
        row = {m: {"wall": statistics.median([w for x in rs for w in x["wall"]]),
                   "cpu": statistics.median([c for x in rs for c in x["cpu"]]),
                   "step": max(x["step_rss_mib"] for x in rs)} for m, rs in res.items()}
        n = row["normal"]
        table.append({"L": seq, "batch": batch, "normal CPU s": n["cpu"], "linearized CPU s": row["linearized"]["cpu"],
                      "math-attn CPU s": row["linearized-math"]["cpu"],
                      "CPU lin/normal": row["linearized"]["cpu"] / n["cpu"],
                      "CPU math/normal": row["linearized-math"]["cpu"] / n["cpu"],
                      "wall lin/normal": row["linearized"]["wall"] / n["wall"],
                      "normal MiB": n["step"], "linearized MiB": row["linearized"]["step"],
                      "math-attn MiB": row["linearized-math"]["step"],
                      "mem lin/normal": row["linearized"]["step"] / max(n["step"], 1),
                      "mem math/normal": row["linearized-math"]["step"] / max(n["step"], 1)})
    from hf_taujp.evaluation import format_table

    print(f"Llama-shaped (SmolLM2-135M widths, {a.sweep_layers} layers, vocab {a.sweep_vocab}, random init), "
          f"{a.sweep_tokens} tokens per batch, CPU, {a.threads or 'default'} thread(s), median of {a.rounds}x{a.steps} "
          f"steps (CPU s: process CPU time per step, the steady measure on a shared machine); memory = step RSS "
          f"(peak − RSS after build); load average before {load0[0]:.2f}, after "
          f"{os.getloadavg()[0]:.2f}")
    print(format_table(table, floatfmt=".3g"))


if __name__ == "__main__":
    main()
