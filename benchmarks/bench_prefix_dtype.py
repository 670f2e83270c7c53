"""What the GLUE recipe's frozen-prefix cache would gain in bf16: one forward of SmolLM2-135M's decoder body
(the offline model's ``model.model``, its 30 layers; the main job's cache runs the first 29) on a batch of the
main job's shape, fp32 against bf16 autocast, side by side in one run (rounds interleaved, so a
change of machine load hits both alike). Not used by the recipes: the cache stays fp32 (its check against the
full model is exact there); this measures what that choice costs.

    python benchmarks/bench_prefix_dtype.py --threads 1            # batch 32 × 80 tokens, 3 rounds
"""

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=80)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from hf_taujp.recipes.models import load_text_model

    model, _, _ = load_text_model("smollm2")
    model.eval()
    x = torch.randint(100, 1000, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    times = {"fp32": [], "bf16 autocast": []}
    with torch.no_grad():
        ref = model.model(input_ids=x).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.model(input_ids=x).last_hidden_state.float()
        for _ in range(a.rounds):
            for mode in times:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
                    t = time.perf_counter()
                    model.model(input_ids=x)
                    times[mode].append(time.perf_counter() - t)
    fp = statistics.median(times["fp32"])
    print(f"SmolLM2-135M body, batch {a.batch} × {a.seq} tokens, {a.threads} thread(s), median of {a.rounds}")
    print(f"{'mode':<15}{'seconds':>9}{'× fp32':>9}")
    for mode, ts in times.items():
        m = statistics.median(ts)
        print(f"{mode:<15}{m:>9.2f}{m / fp:>9.2f}")
    rel = float((low - ref).norm() / ref.norm())
    print(f"bf16 hidden states vs fp32: relative error {rel:.2e} (‖Δ‖ / ‖h‖, last layer)")


if __name__ == "__main__":
    main()
