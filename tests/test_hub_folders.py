"""Saving into folders that hold other things, file modes, and names that are neither folders nor repos.

The reference behaviour is transformers' / PEFT's: ``save_pretrained(dir)`` writes its own files into
an existing folder and leaves the rest alone; files follow the umask like any program's (``open``).
"""

import copy
import json
import os
import stat
import warnings

import pytest
import torch
from transformers import GPT2LMHeadModel

from hf_taujp import hub
from hf_taujp.hub import ArtifactNotFoundError, HfTaujpError
from hf_taujp.merging.statistics import FisherStatistics, GramStatistics
from hf_taujp.task_vector import TaskVector
from tests.tiny_models import tiny_gpt2 as _tiny_gpt2

IDS = torch.tensor([[1, 5, 7, 11, 3, 2]])


def tiny_gpt2(seed=0):
    return _tiny_gpt2(seed=seed, n_layer=1, n_embd=16, vocab_size=50, n_positions=16).eval()


@pytest.fixture(scope="module")
def tv():
    base = tiny_gpt2()
    g = torch.Generator().manual_seed(1)
    return TaskVector({k: 0.01 * torch.randn(p.shape, generator=g) for k, p in base.named_parameters()},
                      base_model="org/tiny", task="toy")


def trainer_output_dir(d):
    """What a Trainer leaves in output_dir: a checkpoint folder and its state."""
    (d / "checkpoint-500").mkdir(parents=True)
    (d / "checkpoint-500" / "optimizer.pt").write_bytes(b"opt")
    (d / "trainer_state.json").write_text('{"global_step": 500}')
    (d / "notes.txt").write_text("mine")
    return {"checkpoint-500/optimizer.pt": b"opt", "trainer_state.json": b'{"global_step": 500}', "notes.txt": b"mine"}


def files_of(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


@pytest.mark.parametrize("artifact", ["task_vector", "fisher", "gram"])
def test_save_keeps_other_files(tv, tmp_path, artifact):
    d = tmp_path / "out"
    theirs = trainer_output_dir(d)
    if artifact == "task_vector":
        obj, load = tv, TaskVector.from_pretrained
    else:
        cls = FisherStatistics if artifact == "fisher" else GramStatistics
        obj = cls({k: v.abs() for k, v in tv.items()}, num_examples=3, base_model="org/tiny", task="toy")
        load = cls.from_pretrained
    obj.save_pretrained(d)
    obj.save_pretrained(d)  # a second save into its own folder is fine too
    after = files_of(d)
    assert {k: after[k] for k in theirs} == theirs
    back = load(d)
    assert all(torch.equal(back.tensors[k], obj.tensors[k]) for k in obj.tensors)
    assert not [f for f in os.listdir(d) if f.startswith(".")] and sorted(os.listdir(tmp_path)) == ["out"]


def test_peft_adapter_then_task_vector_in_one_folder(tmp_path):
    """The README's sequence: a PEFT adapter saved to "tv-sst2", then a TaskVector saved to "tv-sst2"."""
    import peft

    base = tiny_gpt2()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    d = tmp_path / "tv-sst2"
    pm.save_pretrained(d)
    adapter_files = files_of(d)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(adapter_files)
    tv = TaskVector.from_peft(pm, base=base)
    with pytest.warns(UserWarning, match="README.md.*not an hf-taujp model card.*kept"):
        tv.save_pretrained(d)
    after = files_of(d)
    assert {k: after[k] for k in adapter_files} == adapter_files  # PEFT's card kept byte for byte
    assert {"config.json", "task_vector.safetensors"} <= set(after)
    # both still load, and agree with each other (PEFT's forward is the reference)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), d).eval()
    with torch.no_grad():
        ref = loaded(IDS).logits
        out = TaskVector.from_pretrained(d).apply_to(base)(IDS).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_foreign_config_json_is_never_replaced(tv, tmp_path):
    d = tmp_path / "model"
    tiny_gpt2().save_pretrained(d)  # a model folder: its config.json is not ours
    before = files_of(d)
    with pytest.raises(HfTaujpError, match="config.json of another artifact.*model config.*Nothing was written"):
        tv.save_pretrained(d)
    assert files_of(d) == before
    t = tmp_path / "tv"
    tv.save_pretrained(t)
    before = files_of(t)
    fisher = FisherStatistics({k: v.abs() for k, v in tv.items()}, num_examples=3)
    with pytest.raises(HfTaujpError, match="hf-taujp/task_vector.*hf-taujp/fisher"):
        fisher.save_pretrained(t)
    assert files_of(t) == before


def test_stale_shards_of_our_own_save_are_removed_only(tv, tmp_path):
    d = tmp_path / "tv"
    d.mkdir()
    (d / "other-00001-of-00002.safetensors").write_bytes(b"not ours")  # another prefix: kept
    tv.save_pretrained(d, max_shard_size="2KB")
    shards = sorted(f for f in os.listdir(d) if f.startswith("task_vector-"))
    assert len(shards) > 2
    tv.save_pretrained(d)  # single file now: the old shards and index would shadow it
    assert sorted(os.listdir(d)) == ["README.md", "config.json", "other-00001-of-00002.safetensors",
                                     "task_vector.safetensors"]
    (2 * tv).save_pretrained(d, max_shard_size="2KB")  # and back to shards: the single file goes
    assert "task_vector.safetensors" not in os.listdir(d)
    back = TaskVector.from_pretrained(d)
    assert all(torch.equal(back[k], 2 * tv[k]) for k in tv.keys())


def test_failed_save_keeps_previous_and_other_files(tv, tmp_path, monkeypatch):
    d = tmp_path / "out"
    theirs = trainer_output_dir(d)
    tv.save_pretrained(d)
    before = files_of(d)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(TaskVector, "model_card", boom)
    with pytest.raises(OSError, match="disk full"):
        (3 * tv).save_pretrained(d, max_shard_size="2KB")
    assert files_of(d) == before and set(theirs) <= set(before)
    assert not [f for f in os.listdir(d) if f.startswith(".")]


def test_streaming_merge_into_a_folder_with_other_files(tv, tmp_path):
    from hf_taujp.merging.streaming import merge_streaming

    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "base")
    TaskVector(tv.tensors).save_pretrained(tmp_path / "tv")
    out = tmp_path / "merged"
    theirs = trainer_output_dir(out)
    merge_streaming(str(tmp_path / "base"), [str(tmp_path / "tv")], str(out), progress=False)
    merge_streaming(str(tmp_path / "base"), [str(tmp_path / "tv")], str(out), weights=[0.5], progress=False)
    after = files_of(out)
    assert {k: after[k] for k in theirs} == theirs
    merged = GPT2LMHeadModel.from_pretrained(out)
    for n, p in base.named_parameters():
        torch.testing.assert_close(dict(merged.named_parameters())[n], p + 0.5 * tv[n])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_and_folders_follow_the_umask(tv, tmp_path, umask):
    old = os.umask(umask)
    try:
        tv.save_pretrained(tmp_path / "new", max_shard_size="2KB")  # a new folder
        (tmp_path / "existing").mkdir()
        FisherStatistics({k: v.abs() for k, v in tv.items()}, num_examples=2).save_pretrained(tmp_path / "existing")
        hub.atomic_write_text(tmp_path / "existing" / "results.json", "{}")
        # the reference: what plain open() / mkdir create under this umask
        (tmp_path / "ref_dir").mkdir()
        (tmp_path / "ref_file").write_text("x")
    finally:
        os.umask(old)
    want_file = stat.S_IMODE(os.stat(tmp_path / "ref_file").st_mode)
    want_dir = stat.S_IMODE(os.stat(tmp_path / "ref_dir").st_mode)
    assert want_file == 0o666 & ~umask and want_dir == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == want_dir
    for folder in ("new", "existing"):
        for f in os.listdir(tmp_path / folder):
            assert stat.S_IMODE(os.stat(tmp_path / folder / f).st_mode) == want_file, f


# ------------------------------------------------------------------------ names that are not there
@pytest.mark.parametrize("name", ["./no/such/tv", "/no/such/tv", "~/no-such-tv-folder", "runs/a/tv"])
def test_missing_local_folder_says_no_such_folder(name):
    for load in (TaskVector.from_pretrained, FisherStatistics.from_pretrained, TaskVector.from_peft):
        with pytest.raises(ArtifactNotFoundError, match="No such folder"):
            load(name)


def test_missing_path_object_and_bad_repo_id(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="No such folder"):
        TaskVector.from_pretrained(tmp_path / "tv")
    with pytest.raises(ArtifactNotFoundError, match="neither an existing folder nor a valid Hub repo id"):
        TaskVector.from_pretrained("bad name!")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(ArtifactNotFoundError, match="is a file"):
        TaskVector.from_pretrained(str(tmp_path / "f.json"))


def test_offline_and_unreachable_hub_name_the_repo(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ArtifactNotFoundError, match="'org/tv'.*HF_HUB_OFFLINE is set"):
        TaskVector.from_pretrained("org/tv")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ArtifactNotFoundError, match="Hub could not be reached to fetch repo 'org/tv'"):
        TaskVector.from_pretrained("org/tv", cache_dir=str(tmp_path / "cache"))


def test_cards_come_from_one_builder(tv, tmp_path):
    from huggingface_hub.repocard import metadata_load

    tv.save_pretrained(tmp_path / "tv")
    FisherStatistics({k: v.abs() for k, v in tv.items()}, num_examples=3, base_model="/local/base").save_pretrained(tmp_path / "f")
    TaskVector(tv.tensors).save_pretrained(tmp_path / "anon")
    for d, tag in (("tv", "task-vector"), ("f", "fisher")):
        meta = metadata_load(tmp_path / d / "README.md")
        assert meta["library_name"] == "hf-taujp" and meta["tags"][0] == "hf-taujp" and tag in meta["tags"]
    assert metadata_load(tmp_path / "tv" / "README.md")["base_model"] == "org/tiny"
    assert "base_model" not in metadata_load(tmp_path / "f" / "README.md")  # a local path is not a Hub link
    anon = (tmp_path / "anon" / "README.md").read_text()
    assert "a model without a Hub id" in anon and "None" not in anon.split("## Training")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own card is ours: replaced silently
        tv.save_pretrained(tmp_path / "tv")
    assert json.loads((tmp_path / "tv" / "config.json").read_text())["format"] == "hf-taujp/task_vector"


def test_adapter_folder_given_to_from_pretrained_points_to_from_peft(tmp_path):
    import peft

    pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"]))
    pm.save_pretrained(tmp_path / "adapter")
    with pytest.raises(HfTaujpError, match="PEFT adapter: use TaskVector.from_peft"):
        TaskVector.from_pretrained(tmp_path / "adapter")
