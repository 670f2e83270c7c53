"""Step time and peak memory of low-rank fine-tuning, side by side, same Llama-shaped model and batch:

  PEFT LoRA | low-rank linearized | low-rank linearized + τJp (cyclic) | full-rank linearized

Every method trains the same target modules (q/k/v/o and gate/up/down of every layer) through TauJpTrainer
(the stock Trainer loop: forward, backward, AdamW step), each in its own subprocess so peak memory is per method.
LoRA and the low-rank linearized model have the same trainable parameters (r, lora_alpha); full-rank
linearized trains a τ of every targeted weight's size. τJp: cyclic over 3 other tasks, reg batch =
ceil(ratio × batch).

    python benchmarks/bench_lowrank.py                 # hidden 2048, intermediate 8192, 16 heads / 8 KV heads,
                                                       # 2 layers, seq 512, batch 4, r 16, fp32 (CPU)
    python benchmarks/bench_lowrank.py --dtype bf16 --layers 4   # on a GPU: bf16 base, float32 factors

Reports the median step time after the warm-up steps (wall clock and process CPU time), peak RSS (CPU) or
peak CUDA memory, and ratios to LoRA; targets: low-rank linearized / LoRA ≤ 1.8× time and ≤ 1.5× peak
memory, + τJp (ratio 1/8) ≤ 1.15× low-rank linearized.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import _rss_mib, best_of_rounds  # noqa: E402  (one RSS reader and round loop)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "PEFT LoRA": ("lora", 0.0),
    "low-rank linearized": ("lowrank", 0.0),
    "low-rank linearized + τJp": ("lowrank", 0.1),
    "full-rank linearized": ("fullrank", 0.0),
}


def child(a) -> dict:
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from hf_taujp import LinearizedConfig
    from hf_taujp.trainer import TauJpConfig, TauJpTrainer

    kind, lam = METHODS[a.method]
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, num_hidden_layers=a.layers, vocab_size=a.vocab,
                      max_position_embeddings=max(a.seq, 128), attention_dropout=0.0, tie_word_embeddings=False)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    if cuda:
        model = model.cuda()
    if kind == "lora":
        pc = peft.LoraConfig(task_type="CAUSAL_LM", r=a.rank, lora_alpha=2 * a.rank, target_modules=TARGETS)
    elif kind == "lowrank":
        pc = LinearizedConfig(task_type="CAUSAL_LM", r=a.rank, lora_alpha=2 * a.rank, target_modules=TARGETS)
    else:
        pc = LinearizedConfig(task_type="CAUSAL_LM", target_modules=TARGETS)
    model = peft.get_peft_model(model, pc)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    n = a.batch * (a.steps + a.warmup)
    train = [{"input_ids": (x := torch.randint(0, a.vocab, (a.seq,), generator=g)), "labels": x} for _ in range(n)]
    regs = {f"task{i}": [{"input_ids": torch.randint(0, a.vocab, (a.seq,), generator=g)} for _ in range(16)]
            for i in range(3)} if lam > 0 else None
    times, cpu = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            cpu.append(time.process_time() - self.c)

    with tempfile.TemporaryDirectory() as d:
        args = TauJpConfig(output_dir=d, max_steps=a.steps + a.warmup, per_device_train_batch_size=a.batch,
                           learning_rate=1e-4, save_strategy="no", report_to="none", disable_tqdm=True,
                           logging_steps=10_000, taujp_lambda=lam, taujp_mode="cyclic", taujp_batch_ratio=a.ratio,
                           use_cpu=not cuda, remove_unused_columns=False)
        tr = TauJpTrainer(model=model, args=args, train_dataset=train, regularization_datasets=regs,
                          callbacks=[Timer()])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
        else:
            before = _rss_mib()
        tr.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": a.method, "step_s": statistics.median(times[a.warmup:]), "cpu_s": statistics.median(cpu[a.warmup:]),
            "peak_mib": peak, "train_mib": peak - before, "trainable": trainable,
            "params": sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ratio", type=float, default=1 / 8)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="rounds over all methods; per method the fastest round counts")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.method:
        print("RESULT " + json.dumps(child(a)))
        return
    chosen = [m.strip() for m in a.methods.split(",")]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    load0 = os.getloadavg()[0]
    best = best_of_rounds(os.path.abspath(__file__), chosen, a.repeats, [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("method", "repeats", "methods")])
    rows = [best[m] for m in chosen if m in best]
    if not rows:
        sys.exit("no method ran")
    from hf_taujp.evaluation import format_table

    ref = best.get("PEFT LoRA", rows[0])
    low = best.get("low-rank linearized", ref)
    table = [{"method": r["method"], "trainable M": r["trainable"] / 1e6, "step s": r["step_s"],
              "× LoRA": r["step_s"] / ref["step_s"], "CPU s": r["cpu_s"], "CPU × LoRA": r["cpu_s"] / ref["cpu_s"],
              "× low-rank lin": r["step_s"] / low["step_s"], "peak MiB": round(r["peak_mib"]),
              "peak × LoRA": r["peak_mib"] / ref["peak_mib"], "peak − pre-train MiB": round(r["train_mib"])}
             for r in rows]
    import torch

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {a.threads or torch.get_num_threads()} threads"
    print(f"Llama-shaped LM: hidden {a.hidden}, intermediate {a.intermediate}, {a.heads} heads / {a.kv_heads} KV heads, "
          f"{a.layers} layers, vocab {a.vocab}, seq {a.seq}, batch {a.batch}, r {a.rank}, {a.dtype}, "
          f"{rows[0]['params'] / 1e6:.0f}M frozen params, {dev}; median of {a.steps} steps after {a.warmup} warm-up, "
          f"best of {a.repeats} rounds; τJp reg batch {math.ceil(a.ratio * a.batch)} (ratio {a.ratio:g}, cyclic); "
          f"load average before {load0:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    print(format_table(table, floatfmt=".2f"))
    print("Targets: low-rank linearized / LoRA ≤ 1.8× time, ≤ 1.5× peak memory; + τJp / low-rank linearized ≤ 1.15×.")


if __name__ == "__main__":
    main()
