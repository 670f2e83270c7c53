"""Low-rank linearized fine-tuning on more than one process (2 CPU processes, gloo, on 127.0.0.1).

- DDP: the gradients of A and B (task loss of f_lin + the τJp penalty on another task's inputs) on two ranks
  holding half the batch each equal one process on the whole batch.
- FSDP2 (``fully_shard``): refused with an error naming FSDP before any pass (forward-mode AD over sharded
  parameters is not supported; see docs/scaling.md), never a step on unreduced gradients.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    import os, sys, torch, peft
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    sys.path.insert(0, sys.argv[3])
    from hf_taujp import LinearizedConfig
    from hf_taujp.errors import HfTaujpError
    from hf_taujp.trainer import taujp_penalty
    from tests.tiny_models import tiny_llama

    out, world = sys.argv[1], int(sys.argv[2])
    rank = int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_llama(dropout=0.0), LinearizedConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                                      target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(7)
    pm.base_model.set_factors({n: (0.2 * torch.randn(A.shape, generator=g), 0.2 * torch.randn(B.shape, generator=g))
                               for n, (A, B, _) in pm.base_model.get_factors().items()})
    ids = torch.randint(0, 32, (4, 6), generator=g)
    reg = torch.randint(32, 64, (4, 6), generator=g)
    lo, hi = (rank * 4 // world, (rank + 1) * 4 // world)
    model = DDP(pm) if world > 1 else pm
    loss = model(input_ids=ids[lo:hi], labels=ids[lo:hi]).loss
    # the τJp term on the other task's inputs, from the unwrapped model's forward-mode pass (as TauJpTrainer)
    _, tangent = pm.base_model.jvp(input_ids=reg[lo:hi])
    total = loss + 0.5 * taujp_penalty(tangent.logits)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    result = {"grads": grads}
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        sharded = tiny_llama(dropout=0.0)
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        try:
            sp = peft.get_peft_model(sharded, LinearizedConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
            sp(input_ids=ids[lo:hi], labels=ids[lo:hi]).loss.backward()
            result["fsdp"] = "trained"
        except HfTaujpError as e:
            result["fsdp"] = str(e)
    torch.save(result, os.path.join(out, f"rank{rank}_of{world}.pt"))
    if world > 1:
        dist.destroy_process_group()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
''')

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _run(tmp_path, world):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29600 + os.getpid() % 1000 + world))
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(world), ROOT],
                              env=dict(env, RANK=str(r), WORLD_SIZE=str(world)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(tmp_path / f"rank{r}_of{world}.pt", weights_only=False) for r in range(world)]


def test_ddp_gradients_of_the_factors_equal_one_process_and_fsdp_is_refused(tmp_path):
    (one,) = _run(tmp_path, 1)
    r0, r1 = _run(tmp_path, 2)
    assert one["grads"] and all(k.endswith((".lora_A", ".lora_B")) for k in one["grads"])
    for name, g in one["grads"].items():
        # DDP averages the two half-batch gradients: equal to the full-batch mean-loss gradient
        torch.testing.assert_close(r0["grads"][name], g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r1["grads"][name], r0["grads"][name], rtol=0, atol=0)
    for r in (r0, r1):
        assert "FSDP" in r["fsdp"] and "not supported" in r["fsdp"], r["fsdp"]
