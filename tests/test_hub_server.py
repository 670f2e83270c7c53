"""Hub sharing over real HTTP: pull through an olah mirror on 127.0.0.1; push intercepted at HfApi."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from hf_taujp.task_vector import TaskVector
from tests.tiny_models import tiny_gpt2

CLIENT = """
import json, sys
from safetensors.torch import save_file
from hf_taujp.task_vector import TaskVector
tv = TaskVector.from_pretrained({repo!r}, revision={rev!r})
save_file({{k: v.contiguous() for k, v in tv.items()}}, {out!r})
print(json.dumps(tv.metadata()))
"""


@pytest.fixture(scope="module")
def vectors():
    base = tiny_gpt2(seed=0, vocab_size=101)
    g = torch.Generator().manual_seed(1)
    tau = {k: 0.01 * torch.randn(p.shape, generator=g) for k, p in base.named_parameters()}
    meta = dict(base_model="org/tiny-gpt2", base_model_revision="main", task="toy", training={"taujp_lambda": 0.1})
    return TaskVector(tau, **meta), TaskVector({k: 2 * v for k, v in tau.items()}, **meta)


def _pull(server, tmp_path, repo, rev=None):
    out = str(tmp_path / f"pulled-{rev}.safetensors")
    meta = server.run_client(CLIENT.format(repo=repo, rev=rev, out=out), hf_home=str(tmp_path / "hf"))
    return load_file(out), json.loads(meta.strip().splitlines()[-1])


def test_pull_over_http_with_revision(server, vectors, tmp_path):
    v1, v2 = vectors
    v1.save_pretrained(tmp_path / "v1", max_shard_size="40KB")  # sharded: index + several files over HTTP
    sha1 = server.commit_folder("org/tv", str(tmp_path / "v1"))
    v2.save_pretrained(tmp_path / "v2")
    server.commit_folder("org/tv", str(tmp_path / "v2"))
    latest, meta = _pull(server, tmp_path, "org/tv")
    assert meta == v2.metadata()
    assert latest.keys() == v2.tensors.keys() and all(torch.equal(latest[k], v2[k]) for k in v2.keys())
    old, _ = _pull(server, tmp_path, "org/tv", rev=sha1)
    assert all(torch.equal(old[k], v1[k]) for k in v1.keys())


def test_push_intercepted_then_pulled(server, vectors, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    v1, _ = vectors
    calls = {}

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kw):
        calls["create_repo"] = dict(repo_id=repo_id, private=private, exist_ok=exist_ok, repo_type=repo_type, token=self.token)
        return f"{server.endpoint}/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, revision=None, repo_type=None, **kw):
        files = sorted(os.listdir(folder_path))
        card = open(os.path.join(folder_path, "README.md")).read()
        calls["upload_folder"] = dict(repo_id=repo_id, files=files, card=card, message=commit_message, revision=revision)
        return server.commit_folder(repo_id, folder_path, message=commit_message)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    v1.push_to_hub("org/pushed", private=True, token="hf_not_a_real_token", commit_message="first vector")
    assert calls["create_repo"] == dict(repo_id="org/pushed", private=True, exist_ok=True, repo_type="model",
                                        token="hf_not_a_real_token")
    up = calls["upload_folder"]
    assert up["repo_id"] == "org/pushed" and up["message"] == "first vector"
    assert up["files"] == ["README.md", "config.json", "task_vector.safetensors"]
    assert "base_model: org/tiny-gpt2" in up["card"] and "library_name: hf-taujp" in up["card"]
    assert "- taujp" in up["card"] and "- task-vector" in up["card"]
    pulled, meta = _pull(server, tmp_path, "org/pushed")
    assert meta == v1.metadata() and all(torch.equal(pulled[k], v1[k]) for k in v1.keys())


def test_missing_repo_is_an_error(server, tmp_path):
    with pytest.raises(AssertionError, match="RepositoryNotFound|404"):
        _pull(server, tmp_path, "org/does-not-exist")


def test_repo_without_config_is_refused_and_pickles_are_never_downloaded(server, vectors, tmp_path):
    v1, _ = vectors
    folder = tmp_path / "noconfig"
    v1.save_pretrained(folder)
    os.remove(folder / "config.json")
    torch.save({"w": torch.ones(300)}, folder / "pytorch_model.bin")  # a pickle next to the tensors
    server.commit_folder("org/noconfig", str(folder))
    hf_home = tmp_path / "hf-noconfig"
    with pytest.raises(AssertionError, match="no config.json: not an hf-taujp task vector"):
        server.run_client(CLIENT.format(repo="org/noconfig", rev=None, out=str(tmp_path / "x.safetensors")),
                          hf_home=str(hf_home))
    fetched = [f for _, _, files in os.walk(hf_home) for f in files]
    assert "task_vector.safetensors" in fetched and not any(f.endswith(".bin") for f in fetched)


def test_push_over_a_sharded_push_removes_the_stale_shards(server, vectors, tmp_path, monkeypatch):
    """upload_folder adds files to a repo; without delete_patterns the index of a previous sharded push
    would stay and shadow the new single file on the next download. The intercept applies
    huggingface_hub's documented semantics: delete remote files matching delete_patterns, except
    those being uploaded, then add the folder's files on top of the tree."""
    import fnmatch
    import shutil

    from huggingface_hub import HfApi

    v1, v2 = vectors

    def create_repo(self, repo_id, **kw):
        return f"{server.endpoint}/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, delete_patterns=None, **kw):
        repo = os.path.join(server.mirrors, "models", *repo_id.split("/"))
        tree = tmp_path / f"tree-{len(os.listdir(tmp_path))}"
        tree.mkdir()
        if os.path.isdir(repo):
            for name in os.listdir(repo):
                if name != ".git" and not any(fnmatch.fnmatch(name, p) for p in delete_patterns or []):
                    shutil.copy2(os.path.join(repo, name), tree / name)
        (tree / "notes.txt").write_text("a file someone else put in the repo")
        for name in os.listdir(folder_path):
            shutil.copy2(os.path.join(folder_path, name), tree / name)
        return server.commit_folder(repo_id, str(tree))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    v1.push_to_hub("org/repushed", max_shard_size="40KB")
    v2.push_to_hub("org/repushed")  # single file now
    repo = os.path.join(server.mirrors, "models", "org", "repushed")
    assert sorted(f for f in os.listdir(repo) if f != ".git") == ["README.md", "config.json", "notes.txt",
                                                                   "task_vector.safetensors"]
    pulled, meta = _pull(server, tmp_path, "org/repushed")
    assert all(torch.equal(pulled[k], v2[k]) for k in v2.keys())
