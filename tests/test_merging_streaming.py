"""Streaming merges from safetensors folders: output loads with from_pretrained and equals
θ0 + Σ α_t τ_t computed in memory by hand; failures leave no output folder."""
import json
import os

import pytest
import torch
from transformers import GPT2LMHeadModel

from hf_taujp import hub
from hf_taujp.merging.streaming import merge_streaming
from tests.tiny_models import tiny_gpt2


def _setup(tmp_path):
    m = tiny_gpt2(seed=0, n_embd=16, vocab_size=50)
    m.save_pretrained(tmp_path / "base")
    sd = m.state_dict()
    g = torch.Generator().manual_seed(1)
    vecs, dirs = [], []
    for k in range(2):
        t = {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in m.named_parameters()}
        d = tmp_path / f"tv{k}"
        with hub.atomic_dir(d) as tmp:
            hub.save_safetensors_sharded(t, tmp, prefix="task_vector")
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({"format": "hf-taujp/task_vector", "format_version": 1, "kind": "nonlinear"}, f)
        vecs.append(t)
        dirs.append(str(d))
    return m, sd, vecs, dirs


def test_streaming_task_arithmetic_sharded(tmp_path):
    m, sd, vecs, dirs = _setup(tmp_path)
    out = merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "out"), weights=[1.0, -0.5],
                          max_shard_size="20KB", progress=False)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    merged = GPT2LMHeadModel.from_pretrained(out)
    for n, p in m.named_parameters():
        torch.testing.assert_close(dict(merged.named_parameters())[n], p + vecs[0][n] - 0.5 * vecs[1][n])


def test_streaming_dtype_and_task_vector_output(tmp_path):
    m, sd, vecs, dirs = _setup(tmp_path)
    out = merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "tvout"), "ties", density=1.0,
                          output_kind="task_vector", dtype="bfloat16", progress=False)
    got = hub.load_safetensors(out, "task_vector")
    n = "transformer.h.1.attn.c_proj.weight"
    a, b = vecs[0][n], vecs[1][n]
    same = torch.sign(a) == torch.sign(a + b)  # elected sign = sign of the sum (total mass)
    want = torch.where(torch.sign(a) == torch.sign(b), (a + b) / 2, torch.where(same, a, b))
    assert got[n].dtype == torch.bfloat16
    torch.testing.assert_close(got[n], want.to(torch.bfloat16))


def test_streaming_failure_writes_nothing(tmp_path):
    _, _, _, dirs = _setup(tmp_path)
    with pytest.raises(hub.HfTaujpError, match="density"):
        merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "bad"), "ties", density=1.5, progress=False)
    with pytest.raises(hub.HfTaujpError, match="fisher"):
        merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "bad"), "gradient_matching", progress=False)
    assert not os.path.exists(tmp_path / "bad")


def test_recipe_yaml_and_cli(tmp_path):
    from hf_taujp.merging.recipe import cli_merge

    m, sd, vecs, dirs = _setup(tmp_path)
    rec = tmp_path / "r.yaml"
    rec.write_text(f"base_model: {tmp_path / 'base'}\nmerge_method: task_arithmetic\nmodels:\n"
                   f"  - model: {dirs[0]}\n    parameters: {{weight: 0.3}}\n  - path: {dirs[1]}\n    weight: -1\n"
                   "dtype: float32\n")
    assert cli_merge([str(rec), str(tmp_path / "o"), "--no-progress"]) == 0
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "o")
    n = "transformer.h.0.mlp.c_proj.weight"
    torch.testing.assert_close(merged.state_dict()[n], sd[n] + 0.3 * vecs[0][n] - vecs[1][n])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base_model: {tmp_path / 'base'}\nvectors: []\n")
    assert cli_merge([str(bad), str(tmp_path / "o2")]) == 2 and not os.path.exists(tmp_path / "o2")


@pytest.mark.parametrize("chunk", [37, 0])
def test_streaming_in_slices_equals_in_memory_merge(tmp_path, chunk):
    # slices of 37 entries cut every tensor into many pieces, read into alternating reused buffers
    from hf_taujp.merging import FisherStatistics, merge

    m, sd, vecs, dirs = _setup(tmp_path)
    g = torch.Generator().manual_seed(9)
    fishers = [FisherStatistics({n: torch.rand(t.shape, generator=g) for n, t in v.items()}, num_examples=10 * (k + 1))
               for k, v in enumerate(vecs)]
    base_f = FisherStatistics({n: torch.rand(t.shape, generator=g) for n, t in vecs[0].items()}, num_examples=5)
    fdirs = []
    for k, f in enumerate([*fishers, base_f]):
        f.save_pretrained(tmp_path / f"f{k}")
        fdirs.append(str(tmp_path / f"f{k}"))
    out = merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "gm"), "gradient_matching", fishers=fdirs[:2],
                          base_fisher=fdirs[2], lambda_=0.6, chunk_elements=chunk, progress=False)
    want = merge(m, vecs, "gradient_matching", fishers=fishers, base_fisher=base_f, lambda_=0.6, progress=False)
    got = GPT2LMHeadModel.from_pretrained(out).state_dict()
    for n, p in want.state_dict().items():
        assert torch.equal(got[n], p), n


def test_streaming_seeded_dare_equals_in_memory(tmp_path):
    # whole-tensor path, masks seeded by parameter name: same merge whichever way tensors are read
    from hf_taujp.merging import merge

    m, sd, vecs, dirs = _setup(tmp_path)
    out = merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "dare"), "dare_ties", p=0.5, seed=3,
                          weights=[1.0, 0.5], max_shard_size="30KB", progress=False)
    want = merge(m, vecs, "dare_ties", p=0.5, seed=3, weights=[1.0, 0.5], progress=False).state_dict()
    got = GPT2LMHeadModel.from_pretrained(out).state_dict()
    assert all(torch.equal(got[n], want[n]) for n in want)
