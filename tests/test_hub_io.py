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


def _mixed():
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(7, 5, generator=g), "h": torch.randn(3, generator=g).to(torch.bfloat16),
            "ids": torch.arange(11, dtype=torch.int64), "mask": torch.rand(4, 2, generator=g) > 0.5,
            "empty": torch.zeros(0, 3), "view": torch.randn(6, 6, generator=g)[:, ::2]}


def test_writer_output_loads_with_safetensors_itself(tmp_path):
    # The independent reference is safetensors' own reader: our pwrite writer must produce valid files.
    from safetensors import safe_open
    from safetensors.torch import load_file

    t = _mixed()
    files = save_safetensors_sharded(t, tmp_path, "tv", max_shard_size=150, metadata={"k": "v"})
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and files[-1] == "tv.safetensors.index.json"
    index = json.loads((tmp_path / files[-1]).read_text())
    got = {}
    for f in shards:
        got.update(load_file(str(tmp_path / f)))
        with safe_open(str(tmp_path / f), framework="pt") as h:
            assert h.metadata() == {"format": "pt", "k": "v"}
            assert all(index["weight_map"][k] == f for k in h.keys())
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) and got[k].dtype == t[k].dtype for k in t)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())


def test_reader_reads_files_written_by_safetensors(tmp_path):
    from safetensors.torch import save_file

    t = {k: v.contiguous() for k, v in _mixed().items()}
    save_file(t, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    with SafetensorsReader(tmp_path, "x") as r:
        assert sorted(r.keys()) == sorted(t) and len(r) == len(t) and r.metadata() == {"format": "pt"}
        assert r.dtype("h") == "BF16" and r.torch_dtype("h") == torch.bfloat16 and r.shape("w") == (7, 5)
        assert all(torch.equal(r.get(k), t[k]) for k in t)
        buf = torch.empty(3, dtype=torch.int64)
        assert r.read_into("ids", 4, buf).tolist() == [4, 5, 6]


def test_one_cut_rule_for_every_writer(tmp_path):
    # save_safetensors_sharded and the streaming merge's writer are one writer with one cut rule.
    from hf_taujp import safetensors_io
    from hf_taujp.merging import safetensors_io as old

    assert old.ShardedWriter is safetensors_io.ShardedWriter and old.StreamReader is safetensors_io.SafetensorsReader
    specs = [("a", (10,), torch.float32), ("b", (30,), torch.float32), ("c", (5,), torch.float32)]
    # 40 + 120 > 150 → cut before b; 120 + 20 ≤ 150 → c joins b
    assert [[s[0] for s in shard] for shard in safetensors_io.plan_shards(specs, 150)] == [["a"], ["b", "c"]]
    files = save_safetensors_sharded({n: torch.zeros(s) for n, s, _ in specs}, tmp_path, "p", max_shard_size=150)
    assert files == ["p-00001-of-00002.safetensors", "p-00002-of-00002.safetensors", "p.safetensors.index.json"]
