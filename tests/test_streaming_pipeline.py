"""The streaming merge's pipeline (one reader thread, the merge, one writer thread, reused buffers): outputs
equal θ0 + Σ α_t τ_t computed by hand however jobs interleave (slices of a few entries, tensors copied
straight from their read buffers between merged slices, whole-tensor methods), and a failed write
stops the merge with nothing written."""
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from hf_taujp import hub
from hf_taujp.merging import merge
from hf_taujp.merging.streaming import ShardedWriter, merge_streaming
from tests.tiny_models import tiny_gpt2


def _vector(tmp_path, name, tensors):
    d = tmp_path / name
    with hub.atomic_dir(d) as tmp:
        hub.save_safetensors_sharded(tensors, tmp, prefix="task_vector")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format": "hf-taujp/task_vector", "format_version": 1, "kind": "nonlinear"}, f)
    return str(d)


@pytest.fixture
def setup(tmp_path):
    m = tiny_gpt2(seed=0, n_layer=2, n_embd=16, vocab_size=50, n_positions=16)
    m.save_pretrained(tmp_path / "base")
    sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    names = list(sd)
    g = torch.Generator().manual_seed(1)
    # vector 0 has every 2nd tensor, vector 1 every 3rd: a third of the tensors are in neither and are
    # copied from the base (straight from their read buffers) between merged slices
    t0 = {n: 0.1 * torch.randn(sd[n].shape, generator=g) for n in names[::2]}
    t1 = {n: 0.1 * torch.randn(sd[n].shape, generator=g) for n in names[::3]}
    assert len(set(names) - set(t0) - set(t1)) > 5
    return m, sd, [_vector(tmp_path, "t0", t0), _vector(tmp_path, "t1", t1)], [t0, t1]


@pytest.mark.parametrize("chunk,slow_writes", [(1, False), (7, True), (1 << 18, False)])
def test_interleaved_copies_and_slices(tmp_path, setup, monkeypatch, chunk, slow_writes):
    m, sd, dirs, taus = setup
    if slow_writes:  # a writer that lags: a read into a buffer it has not written from yet would show
        for meth in ("write", "write_range"):
            real = getattr(ShardedWriter, meth)
            monkeypatch.setattr(ShardedWriter, meth, lambda self, *a, _real=real: (time.sleep(2e-4), _real(self, *a)))
    out = merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "out"), weights=[0.5, -1.0],
                          chunk_elements=chunk, progress=False)
    got = load_file(os.path.join(out, "model.safetensors"))
    assert set(got) == set(sd)
    for n, b in sd.items():
        if n not in taus[0] and n not in taus[1]:
            assert torch.equal(got[n], b), n  # copied
            continue
        zero = torch.zeros_like(b)
        delta = 0.5 * taus[0].get(n, zero) - taus[1].get(n, zero)  # Δ first, then θ0 (the method's order)
        assert torch.equal(got[n], b + delta), n


def test_whole_tensor_method_with_copies(tmp_path, setup):
    m, sd, dirs, taus = setup
    out = merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "out"), "ties", density=0.5,
                          progress=False)
    got = load_file(os.path.join(out, "model.safetensors"))
    want = merge(sd, taus, "ties", density=0.5, progress=False)
    for n in sd:
        assert torch.equal(got[n], want[n]), n


def test_a_failed_write_stops_the_merge(tmp_path, setup, monkeypatch):
    m, sd, dirs, taus = setup
    calls = []
    real = ShardedWriter.write_range

    def flaky(self, name, start, chunk):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full (simulated)")
        return real(self, name, start, chunk)

    monkeypatch.setattr(ShardedWriter, "write_range", flaky)
    with pytest.raises(OSError, match="disk full"):
        merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "out"), chunk_elements=7, progress=False)
    assert not (tmp_path / "out").exists()
