"""merge() over in-memory models and TaskVector folders: θ = θ0 + Σ α_t τ_t written out by hand."""
import json
import os

import pytest
import torch
from transformers import GPT2LMHeadModel

from hf_taujp import hub
from hf_taujp.merging import merge
from hf_taujp.task_vector import TaskVector
from hf_taujp.merging.methods import MergeConfigError, MissingStatisticsError
from tests.tiny_models import tiny_gpt2


def _model(seed=0):
    return tiny_gpt2(seed=seed, n_embd=16, vocab_size=50)


def _finetuned(base, seed):
    ft = GPT2LMHeadModel(base.config)
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return ft


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

    bad = dict(t1)
    bad["transformer.wpe.weight"] = torch.zeros(3, 3)
    with pytest.raises(hub.BaseModelMismatchError, match="shape"):
        merge(base, [bad], progress=False)


def test_vectors_of_different_bases_raise(tmp_path):
    base, other = _model(0), _model(1)
    tv_a = TaskVector.from_models(base, _finetuned(base, 1))
    tv_b = TaskVector.from_models(other, _finetuned(other, 2))
    with pytest.raises(hub.BaseModelMismatchError, match="different base models"):
        merge(base, [tv_a, tv_b], progress=False)
    tv_b.save_pretrained(tmp_path / "b")  # same through a folder, checked against the given base
    with pytest.raises(hub.BaseModelMismatchError, match="fingerprint"):
        merge(base, [str(tmp_path / "b")], progress=False)
    out = merge(other, [str(tmp_path / "b")], progress=False)  # its own base is fine
    n = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(out.state_dict()[n], _finetuned(other, 2).state_dict()[n])
    lin = TaskVector(dict(tv_a.tensors), kind="linear")
    with pytest.raises(MergeConfigError, match="linear"):  # mixed kinds
        merge(base, [lin, tv_a], progress=False)


def test_return_task_vector_metadata_and_roundtrip(tmp_path):
    base = _model()
    tv1 = TaskVector.from_models(base, _finetuned(base, 3), task="a")
    tv1.save_pretrained(tmp_path / "a")
    tv2 = TaskVector.from_models(base, _finetuned(base, 4), task="b")
    out = merge(base, [str(tmp_path / "a"), tv2], "task_arithmetic", weights=[0.3, 0.6], return_task_vector=True,
                progress=False)
    assert isinstance(out, TaskVector) and out.kind == "nonlinear" and out.task == "merge:task_arithmetic"
    assert out.base_fingerprint == tv1.base_fingerprint and out.training["merge"]["sources"] == ["a", "b"]
    n = "transformer.h.1.mlp.c_proj.weight"
    torch.testing.assert_close(out[n], 0.3 * tv1[n] + 0.6 * tv2[n])
    model = out.apply_to(base)  # the merged vector applies to its base
    torch.testing.assert_close(dict(model.named_parameters())[n], dict(base.named_parameters())[n] + out[n])


def test_seed_reproduces_dare_merges():
    base = _model()
    t1, t2 = _taus(base, 8), _taus(base, 9)
    kw = dict(density=0.5, weights=[1.0, 1.0], progress=False)
    a = merge(base, [t1, t2], "dare_ties", seed=7, **kw).state_dict()
    torch.manual_seed(123)  # the global RNG plays no part once a seed is given
    b = merge(base, [t1, t2], "dare_ties", seed=7, **kw).state_dict()
    c = merge(base, [t1, t2], "dare_ties", seed=8, **kw).state_dict()
    n = "transformer.h.0.mlp.c_fc.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[n], c[n])
    # each parameter draws its own mask: kept entries of τ1 differ between two same-shape parameters
    m1 = merge(base, [t1], "dare_linear", seed=7, **{**kw, "weights": [1.0]}, return_task_vector=True)
    k1, k2 = "transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"
    assert not torch.equal(m1[k1] != 0, m1[k2] != 0)
