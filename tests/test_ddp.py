"""`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (torchrun, DDP over gloo;
`TrainingArguments(use_cpu=True)`): the τJp run finishes, the penalty reaches
the log history, and both ranks end with identical parameters; the CLIP recipe under DDP matches one process.

(`accelerate launch --cpu --num_processes 2` starts ONE process: accelerate 1.15's CPU launcher spawns several
only through mpirun with `--mpirun_hostfile`; `--multi_gpu` goes through torchrun, which works on CPU.)"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hf_taujp import TaskVector

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
    torch.distributed.destroy_process_group()  # not at interpreter exit: gloo can abort there
    # and skip interpreter teardown: gloo's threads were seen to abort there ("terminate called without an
    # active exception", once in ~10 CI runs) after the work above was saved; the results are checked below
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
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


# ------------------------------------------------------------------------------ the CLIP recipe under DDP
CLIP_WORKER = textwrap.dedent('''
    import os, sys, torch
    import torch.distributed as dist
    from hf_taujp import TaskVector
    from hf_taujp.recipes import clip as C
    from hf_taujp.recipes import clip_recipe as CR  # where ClipRecipe finds what is spied on

    out, data, tag = sys.argv[1:4]
    tau, writes = {}, []
    finetune = CR.finetune_clip

    def spy(clf, method, rows, args, **kw):  # every process's own task vector, before anything is written
        tv, stats = finetune(clf, method, rows, args, **kw)
        tau[f"{method.name}/{kw['meta']['task']}"] = {k: v.detach().clone() for k, v in tv.tensors.items()}
        return tv, stats

    def record(name, fn):
        def wrapped(*a, **k):
            writes.append(name)
            return fn(*a, **k)
        return wrapped

    CR.finetune_clip = spy
    CR._save_heads = record("heads", CR._save_heads)
    CR.write_report = record("report", CR.write_report)
    TaskVector.save_pretrained = record("task_vector", TaskVector.save_pretrained)
    common = ["--model", "tiny", "--tasks", "mnist,fashion_mnist", "--data-dir", data, "--batch-size", "8",
              "--lr", "1e-3", "--warmup-steps", "1", "--reg-ratio", "0.25", "--threads", "1"]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    record_ = {}
    if world > 1:
        # 19 training rows < steps × batch: the Trainer wraps around, and the 5 batches of 4 do not split evenly
        # over 2 processes (accelerate's even_batches completes the short one); evaluation sets of 5 rows
        uneven = C.run_clip("tiny", "mnist,fashion_mnist", data_dir=data, methods="taujp", batch_size=8,
                            learning_rate=1e-3, warmup_steps=1, taujp_batch_ratio=0.25, steps=4, max_train=25,
                            max_test=5, negation_control="none", output_dir=os.path.join(out, tag + "_uneven"))
        record_["uneven"] = {"results": uneven, "tau": dict(tau)}
        record_["backend"] = dist.get_backend()
        tau.clear()
        writes.clear()
    # the command itself (C.main: argument parsing, the run, then the process group is closed)
    res = C.main(common + ["--methods", "nonlinear,taujp", "--output-dir", os.path.join(out, tag), "--steps", "3",
                           "--max-train", "45", "--max-test", "15"])
    assert not dist.is_initialized()
    record_.update({"results": res, "tau": dict(tau), "writes": list(writes), "world": world,
                    "listing": sorted(os.listdir(os.path.join(out, tag)))})
    torch.save(record_, os.path.join(out, f"{tag}-rank{rank}.pt"))
''')


def _timeless(results):
    """results without the wall-clock entries (they differ between processes and runs)."""
    r = {k: v for k, v in results.items() if k not in ("wall_time_s", "table")}
    r["methods"] = {m: {k: v for k, v in res.items() if k != "seconds_per_step"} for m, res in r["methods"].items()}
    return r


def test_clip_recipe_under_ddp_matches_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) of the tiny CLIP recipe against the same
    command in one process. `--batch-size` is the global batch (4 images per process per step), and the recipe
    takes exactly steps × batch training rows, so both runs take the same optimizer steps on the same batches:
    the task vectors agree up to float summation order, the two processes' vectors agree exactly. Validation
    (11 rows) and test (15 rows, 9 for the held-out control) do not split evenly over 2 processes: evaluation
    pads the shares and gathers; both processes return the same results as the single process. Only rank 0
    writes (heads, 4 task vectors, the report after each of the 2 methods), and every file is in place when the
    processes return. Before it, a run in the same processes has fewer training rows than steps × batch, split
    unevenly (5 batches of 4 over 2 processes): it finishes and the processes agree."""
    from clip_offline import offline_data_dir

    data = offline_data_dir(tmp_path)  # MNIST-shaped stand-ins for mnist, fashion_mnist + a fake held-out control "svhn"
    script = tmp_path / "clip_worker.py"
    script.write_text(CLIP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(29500 + (os.getpid() + 7) % 1000),
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    for cmd in (launch + [str(script), str(tmp_path), data, "ddp"], [sys.executable, str(script), str(tmp_path), data, "one"]):
        # a hang guard, generous: on a shared 2-core machine a nice'd launch can wait minutes for CPU
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1, one = (torch.load(tmp_path / f, weights_only=False) for f in ("ddp-rank0.pt", "ddp-rank1.pt", "one-rank0.pt"))
    assert (r0["world"], r1["world"], one["world"]) == (2, 2, 1) and r0["backend"] == "gloo"
    assert r0["results"]["num_processes"] == 2 and one["results"]["num_processes"] == 1
    assert r0["results"]["num_processes"] == 2 and r0["results"]["per_device_batch_size"] == 4
    assert r0["results"]["taujp"]["reg_batch_size"] == one["results"]["taujp"]["reg_batch_size"] == 2
    # only the main process writes; when the processes return, everything is there and no temporary file is left
    assert r1["writes"] == [] and one["writes"] == r0["writes"]
    assert sorted(r0["writes"]) == ["heads"] + ["report"] * 2 + ["task_vector"] * 4  # a report after each method
    assert r0["listing"] == r1["listing"] == one["listing"]
    assert {"results.json", "results.md", "alpha_curves.png", "zero_shot_heads.safetensors", "task_vectors"} <= set(
        r0["listing"]) and not any("tmp" in f for f in r0["listing"])
    # the same task vectors: equal across the processes, equal to the one-process run up to summation order
    assert sorted(r0["tau"]) == sorted(one["tau"]) == ["nonlinear/fashion_mnist", "nonlinear/mnist", "taujp/fashion_mnist", "taujp/mnist"]
    for key, tau in r0["tau"].items():
        assert max(float(t.abs().max()) for t in tau.values()) > 1e-4, key  # training happened
        for name, t in tau.items():
            torch.testing.assert_close(t, r1["tau"][key][name], rtol=0, atol=0)
        # measured ‖Δ‖/‖τ‖ ≈ 1e-4 over the whole vector. Not per tensor: parameters whose gradient is exactly 0
        # in exact arithmetic (the key bias: softmax ignores a shift shared by all keys) get rounding noise,
        # which Adam's g / √v scales up to ±lr steps in either run.
        diff = sum(float((t - one["tau"][key][n]).norm()) ** 2 for n, t in tau.items()) ** 0.5
        norm = sum(float(t.norm()) ** 2 for t in one["tau"][key].values()) ** 0.5
        assert diff <= 1e-3 * norm, (key, diff / norm)
    saved = TaskVector.from_pretrained(str(tmp_path / "ddp" / "task_vectors" / "taujp" / "mnist"))
    for name, t in saved.tensors.items():
        torch.testing.assert_close(t, r0["tau"]["taujp/mnist"][name], rtol=0, atol=0)
    # evaluation gathered: both processes return the same results, the zero-shot accuracies (no training
    # involved) are the one-process run's, and the held-out control is the fake task
    assert _timeless(r0["results"]) == _timeless(r1["results"])
    assert r0["results"]["zero_shot"] == one["results"]["zero_shot"]
    assert r0["results"]["negation_control"]["zero_shot"] == one["results"]["negation_control"]["zero_shot"]
    assert r0["results"]["negation_control"]["name"] == "svhn"
    assert r0["results"]["sizes"]["mnist"] == {"train": 34, "val": 11, "test": 15, "train_used": 24}
    assert sorted(r0["results"]["negation"]["linear FT + τJp"]) == ["fashion_mnist", "mnist"]
    for label, res in r0["results"]["methods"].items():
        mat, ref = res["taujp_matrix"], one["results"]["methods"][label]["taujp_matrix"]
        assert len(mat) == 2 and all(len(row) == 2 for row in mat)  # one row from each process
        np.testing.assert_allclose(mat, ref, rtol=1e-3)
    # uneven shards: no deadlock (the launch returned), the processes still agree
    u0, u1 = r0["uneven"], r1["uneven"]
    assert u0["results"]["sizes"]["mnist"] == {"train": 19, "val": 6, "test": 5, "train_used": 19}
    assert _timeless(u0["results"]) == _timeless(u1["results"]) and u0["results"]["negation"] == {}
    for key, tau in u0["tau"].items():
        for name, t in tau.items():
            torch.testing.assert_close(t, u1["tau"][key][name], rtol=0, atol=0)
