"""`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (torchrun, DDP over gloo;
`TrainingArguments(use_cpu=True)`): the τJp run finishes, the penalty reaches
the log history, and both ranks end with identical parameters."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    import os, sys, torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from hf_taujp.linearize import linearize
    from hf_taujp.trainer import TauJpConfig, TauJpTrainer

    out = sys.argv[1]
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    names = [n for n, _ in base.named_parameters() if ".h.1." in n]
    model = linearize(base, parameter_names=names)
    g = torch.Generator().manual_seed(1)
    train = [{"input_ids": (ids := torch.randint(0, 32, (8,), generator=g)), "labels": ids} for _ in range(32)]
    reg_a = [{"input_ids": torch.randint(32, 64, (8,), generator=g)} for _ in range(16)]
    reg_b = [{"input_ids": torch.randint(16, 48, (8,), generator=g)} for _ in range(16)]
    args = TauJpConfig(output_dir=os.path.join(out, "run"), max_steps=4, per_device_train_batch_size=4,
                       learning_rate=1e-2, logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
                       disable_tqdm=True, taujp_lambda=1.0, taujp_batch_ratio=0.5, seed=0)
    tr = TauJpTrainer(model=model, args=args, train_dataset=train, regularization_datasets={"a": reg_a, "b": reg_b})
    tr.train()
    rank = tr.accelerator.process_index
    torch.save({"tau": model.get_tangents(), "n": tr.accelerator.num_processes, "log": tr.state.log_history,
                "visits": list(tr.taujp_visits), "backend": torch.distributed.get_backend(),
                "wrapped": type(tr.model_wrapped).__name__}, os.path.join(out, f"rank{rank}.pt"))
''')


def test_ddp_two_processes_agree(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(29500 + os.getpid() % 1000), "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    assert r0["n"] == r1["n"] == 2
    assert r0["backend"] == "gloo" and r0["wrapped"] == "DistributedDataParallel"
    assert r0["visits"] == r1["visits"] == [("a",), ("b",), ("a",), ("b",)]
    moved = 0.0
    for name, t in r0["tau"].items():
        torch.testing.assert_close(t, r1["tau"][name], rtol=0, atol=0)
        moved = max(moved, float(t.abs().max()))
    assert moved > 0  # training happened
    logged = [h["taujp_penalty"] for h in r0["log"] if "taujp_penalty" in h]
    assert len(logged) == 2 and logged[-1] > 0
