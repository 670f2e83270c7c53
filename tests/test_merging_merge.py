"""merge() over in-memory models and TaskVector folders: θ = θ0 + Σ α_t τ_t written out by hand."""
import json
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_taujp import hub
from hf_taujp.merging import merge
from hf_taujp.merging.methods import MergeConfigError, MissingStatisticsError


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))


def _taus(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: 0.01 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def test_task_arithmetic_module_by_hand():
    base = _model()
    t1, t2 = _taus(base, 1), _taus(base, 2)
    out = merge(base, [t1, t2], "task_arithmetic", weights=[0.5, -1.0], progress=False)
    for n, p in base.named_parameters():
        torch.testing.assert_close(dict(out.named_parameters())[n], p + 0.5 * t1[n] - t2[n])
    # tied head follows the merged embedding, and the base is untouched
    assert out.lm_head.weight.data_ptr() == out.transformer.wte.weight.data_ptr()
    assert not torch.equal(out.transformer.wte.weight, base.transformer.wte.weight)


def test_state_dict_and_dtype():
    base = _model()
    sd = {n: p.detach().clone() for n, p in base.named_parameters()}
    t1 = _taus(base, 3)
    out = merge(sd, [t1], weights=2.0, dtype="bfloat16", progress=False)
    n = "transformer.h.0.attn.c_attn.weight"
    assert out[n].dtype == torch.bfloat16
    torch.testing.assert_close(out[n], (sd[n] + 2.0 * t1[n]).to(torch.bfloat16))


def test_vector_folder(tmp_path):
    base = _model()
    t1 = _taus(base, 4)
    d = tmp_path / "tv"
    with hub.atomic_dir(d) as tmp:
        hub.save_safetensors_sharded(t1, tmp, prefix="task_vector")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format": "hf-taujp/task_vector", "format_version": 1, "kind": "nonlinear"}, f)
    out = merge(base.state_dict(), [str(d)], "ties", density=1.0, progress=False)
    n = "transformer.wpe.weight"
    torch.testing.assert_close(out[n], base.state_dict()[n] + t1[n])


def test_return_task_vector_fisher_average():
    base = _model()
    t1, t2 = _taus(base, 5), _taus(base, 6)
    F1 = {n: torch.ones_like(v) for n, v in t1.items()}
    F2 = {n: 3 * torch.ones_like(v) for n, v in t1.items()}
    tv = merge(base, [t1, t2], "fisher_average", fishers=[F1, F2], return_task_vector=True, progress=False)
    tensors = tv if isinstance(tv, dict) else tv.tensors
    n = "transformer.h.1.mlp.c_fc.weight"
    torch.testing.assert_close(tensors[n], 0.25 * t1[n] + 0.75 * t2[n])


def test_bad_inputs():
    base = _model()
    t1 = _taus(base, 7)
    with pytest.raises(MergeConfigError, match="empty"):
        merge(base, [], progress=False)
    with pytest.raises(MissingStatisticsError):
        merge(base, [t1], "gradient_matching", progress=False)
    with pytest.raises(MergeConfigError, match="density"):
        merge(base, [t1], "dare_ties", density=0.0, progress=False)

    class TV:
        def __init__(self, tensors, fp):
            self.tensors, self.base_fingerprint, self.base_model, self.kind = tensors, fp, fp, "nonlinear"

    with pytest.raises(hub.BaseModelMismatchError, match="different base"):
        merge(base, [TV(t1, "aaa"), TV(t1, "bbb")], progress=False)
    bad = dict(t1)
    bad["transformer.wpe.weight"] = torch.zeros(3, 3)
    with pytest.raises(hub.BaseModelMismatchError, match="shape"):
        merge(base, [bad], progress=False)
