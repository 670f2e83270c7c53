import json
import os

import pytest
import torch

from hf_taujp.hub import (
    CorruptFileError,
    HfTaujpError,
    SafetensorsReader,
    UnsafeFileError,
    atomic_dir,
    check_finite,
    load_safetensors,
    parse_size,
    save_safetensors_sharded,
)


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {f"layer.{i}.weight": torch.randn(50, 40, generator=g) for i in range(6)}


def test_sharded_roundtrip_is_bitwise(tmp_path):
    t = _tensors()
    out = tmp_path / "tv"
    with atomic_dir(out) as d:
        files = save_safetensors_sharded(t, d, "task_vector", max_shard_size=20_000)
    assert "task_vector.safetensors.index.json" in files and len(files) > 2
    index = json.loads((out / "task_vector.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in t.values())
    back = load_safetensors(out, "task_vector")
    assert all(torch.equal(back[k], t[k]) for k in t)
    with SafetensorsReader(out, "task_vector") as r:
        assert r.shape("layer.3.weight") == (50, 40) and r.dtype("layer.3.weight") == "F32"


def test_failed_write_keeps_previous_folder(tmp_path):
    out = tmp_path / "tv"
    with atomic_dir(out) as d:
        save_safetensors_sharded({"a": torch.ones(3)}, d, "tv")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as d:
            save_safetensors_sharded({"a": torch.zeros(3)}, d, "tv")
            raise RuntimeError("crash mid-write")
    assert torch.equal(load_safetensors(out, "tv")["a"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["tv"]  # no temp folder left behind


def test_truncated_and_missing_files_are_named(tmp_path):
    out = tmp_path / "tv"
    with atomic_dir(out) as d:
        save_safetensors_sharded(_tensors(), d, "tv", max_shard_size=20_000)
    shard = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))[1]
    with open(out / shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptFileError, match=shard):
        load_safetensors(out, "tv")
    os.remove(out / shard)
    with pytest.raises(CorruptFileError, match="Missing file"):
        load_safetensors(out, "tv")


def test_pickle_only_folder_is_refused(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "task_vector.bin")
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_safetensors(tmp_path, "task_vector")


def test_check_finite_and_sizes():
    with pytest.raises(HfTaujpError, match="'b'"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, what="task vector")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1MiB") == 2**20
    with pytest.raises(HfTaujpError):
        parse_size("lots")
