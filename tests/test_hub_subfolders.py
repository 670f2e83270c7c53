"""One repo, many artifacts: sub-folders (``subfolder=``), listing them, and pushes to a new branch.

The recipes push ``task_vectors/<method>/<task>/`` into one repo; every loader reads such a layout back with
``subfolder=`` as transformers and huggingface_hub do, locally and over HTTP (an olah mirror on 127.0.0.1,
tests/hub_server.py). Pushes are intercepted at huggingface_hub's client boundary. The reference for a push
to a new ``revision`` is transformers' own ``push_to_hub``, run under the same intercept: both must create
the branch (``HfApi.create_branch``) with the same arguments before the commit.
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from hf_taujp import hub
from hf_taujp.errors import ArtifactNotFoundError, CorruptFileError, HfTaujpError, MergeConfigError
from hf_taujp.hub import TaskVectorInfo, list_task_vectors
from hf_taujp.merging import FisherStatistics, merge_from_config, merge_streaming
from hf_taujp.task_vector import TaskVector, fingerprint
from tests.hub_server import _git
from tests.tiny_models import GPT2_MINI, tiny_gpt2


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def base():
    return tiny_gpt2(seed=0, **GPT2_MINI).eval()


def _tau(base, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(p.shape, generator=g) for k, p in base.named_parameters()}


@pytest.fixture(scope="module")
def vectors(base):
    """Three vectors of one base, as a recipe makes them: two methods, two tasks."""
    fp = fingerprint(base)
    meta = dict(base_model="org/base", base_fingerprint=fp)
    return {
        "nonlinear_ft/a": TaskVector(_tau(base, 1), task="a", training={"method": "nonlinear_ft"}, **meta),
        "nonlinear_ft/b": TaskVector(_tau(base, 2), task="b", training={"method": "nonlinear_ft"}, **meta),
        "linear_ft_taujp/a": TaskVector(_tau(base, 3), kind="linear", task="a",
                                        training={"method": "linear_ft_taujp", "taujp_lambda": 0.1}, **meta),
    }


def recipe_layout(root, vectors, base):
    """``root`` as the recipes leave ``output_dir/task_vectors``, plus a Fisher beside the vectors."""
    for sub, tv in vectors.items():
        tv.save_pretrained(os.path.join(root, *sub.split("/")))
    fisher = {k: t.abs() + 0.01 for k, t in _tau(base, 9).items()}
    FisherStatistics(fisher, num_examples=5, base_model="org/base", task="a").save_pretrained(
        os.path.join(root, "fisher", "a"))
    return fisher


def same(a: TaskVector, b: TaskVector) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a.keys()) and a.metadata() == b.metadata()


# ------------------------------------------------------------------------------------------ local folders
def test_subfolder_reads_each_vector_of_a_recipe_folder(tmp_path, vectors, base):
    recipe_layout(tmp_path / "tvs", vectors, base)
    for sub, tv in vectors.items():
        assert same(TaskVector.from_pretrained(tmp_path / "tvs", subfolder=sub), tv)
        # the same folder, given directly (the reference): identical
        assert same(TaskVector.from_pretrained(tmp_path / "tvs" / sub), tv)
    # transformers' spellings: "" is the root, "./x//y/" is x/y
    assert same(TaskVector.from_pretrained(tmp_path / "tvs", subfolder="./nonlinear_ft//a/"), vectors["nonlinear_ft/a"])
    assert same(TaskVector.from_pretrained(tmp_path / "tvs" / "nonlinear_ft" / "a", subfolder=""),
                vectors["nonlinear_ft/a"])


def test_root_of_a_recipe_folder_names_the_vectors_in_it(tmp_path, vectors, base):
    recipe_layout(tmp_path / "tvs", vectors, base)
    with pytest.raises(CorruptFileError) as e:
        TaskVector.from_pretrained(tmp_path / "tvs")
    msg = str(e.value)
    assert "not an hf-taujp task vector. It holds task vectors in sub-folders 'linear_ft_taujp/a', " \
           "'nonlinear_ft/a', 'nonlinear_ft/b': pass subfolder='linear_ft_taujp/a'" in msg
    assert "fisher/a" not in msg and "list_task_vectors" in msg
    # a sub-folder that is itself a level of the layout: only what is below it
    with pytest.raises(CorruptFileError, match=r"sub-folder 'nonlinear_ft'\) has no config.json.*"
                                               r"sub-folders 'nonlinear_ft/a', 'nonlinear_ft/b': pass") as e:
        TaskVector.from_pretrained(tmp_path / "tvs", subfolder="nonlinear_ft")
    assert "linear_ft_taujp" not in str(e.value)
    # a folder whose config.json is another artifact's
    with pytest.raises(HfTaujpError, match="declares format 'hf-taujp/fisher'"):
        TaskVector.from_pretrained(tmp_path / "tvs", subfolder="fisher/a")


def test_unknown_subfolder_is_named_with_what_exists(tmp_path, vectors, base):
    recipe_layout(tmp_path / "tvs", vectors, base)
    with pytest.raises(ArtifactNotFoundError) as e:
        TaskVector.from_pretrained(tmp_path / "tvs", subfolder="nonlinear_ft/c")
    msg = str(e.value)
    assert "has no sub-folder 'nonlinear_ft/c' (it does not exist)" in msg
    assert ("Sub-folders that hold artifacts: 'fisher/a' (Fisher statistics), 'linear_ft_taujp/a' (task vector), "
            "'nonlinear_ft/a' (task vector), 'nonlinear_ft/b' (task vector).") in msg
    with pytest.raises(ArtifactNotFoundError, match="has no sub-folder 'fisher/b'.*'fisher/a' \\(Fisher statistics\\)"):
        FisherStatistics.from_pretrained(tmp_path / "tvs", subfolder="fisher/b")
    (tmp_path / "tvs" / "notes.txt").write_text("x")
    with pytest.raises(ArtifactNotFoundError, match="no sub-folder 'notes.txt' \\(it is a file, not a folder\\)"):
        TaskVector.from_pretrained(tmp_path / "tvs", subfolder="notes.txt")


@pytest.mark.parametrize("bad", ["../tvs", "a/../../x", "/abs/path", "~/x", "a\\b", 3, ["a"]])
def test_subfolder_outside_the_folder_is_refused(tmp_path, vectors, base, bad):
    recipe_layout(tmp_path / "tvs", vectors, base)
    with pytest.raises(HfTaujpError, match="subfolder"):
        TaskVector.from_pretrained(tmp_path / "tvs", subfolder=bad)


def test_statistics_and_peft_adapters_take_subfolder_too(tmp_path, vectors, base):
    import peft

    fisher = recipe_layout(tmp_path / "tvs", vectors, base)
    f = FisherStatistics.from_pretrained(tmp_path / "tvs", subfolder="fisher/a")
    assert f.num_examples == 5 and all(torch.equal(f.tensors[k], fisher[k]) for k in fisher)
    with pytest.raises(CorruptFileError, match="not hf-taujp Fisher statistics. It holds Fisher statistics in "
                                               "sub-folders 'fisher/a': pass subfolder='fisher/a'"):
        FisherStatistics.from_pretrained(tmp_path / "tvs")
    pm = peft.get_peft_model(tiny_gpt2(seed=0, **GPT2_MINI), peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                                             init_lora_weights=False))
    pm.save_pretrained(tmp_path / "tvs" / "adapters" / "lora")
    via_sub = TaskVector.from_peft(tmp_path / "tvs", base=base, subfolder="adapters/lora")
    direct = TaskVector.from_peft(tmp_path / "tvs" / "adapters" / "lora", base=base)
    assert via_sub.keys() == direct.keys() and all(torch.equal(via_sub[k], direct[k]) for k in direct.keys())


def test_list_task_vectors_of_a_folder(tmp_path, vectors, base):
    recipe_layout(tmp_path / "tvs", vectors, base)
    vectors["nonlinear_ft/a"].save_pretrained(tmp_path / "tvs" / ".hidden" / "x")  # hidden: not listed
    found = list_task_vectors(tmp_path / "tvs")
    assert found == [
        TaskVectorInfo("linear_ft_taujp/a", kind="linear", task="a", method="linear_ft_taujp", base_model="org/base",
                       num_parameters=vectors["linear_ft_taujp/a"].num_parameters),
        TaskVectorInfo("nonlinear_ft/a", kind="nonlinear", task="a", method="nonlinear_ft", base_model="org/base",
                       num_parameters=vectors["nonlinear_ft/a"].num_parameters),
        TaskVectorInfo("nonlinear_ft/b", kind="nonlinear", task="b", method="nonlinear_ft", base_model="org/base",
                       num_parameters=vectors["nonlinear_ft/b"].num_parameters),
    ]
    # the independent reference: every visible config.json declaring the task-vector format
    ref = sorted(os.path.relpath(r, tmp_path / "tvs").replace(os.sep, "/") for r, ds, fs in os.walk(tmp_path / "tvs")
                 if not any(p.startswith(".") for p in os.path.relpath(r, tmp_path / "tvs").split(os.sep))
                 and "config.json" in fs
                 and json.load(open(os.path.join(r, "config.json")))["format"] == "hf-taujp/task_vector")
    assert [i.subfolder for i in found] == ref
    # each entry loads as it says
    for info in found:
        tv = TaskVector.from_pretrained(tmp_path / "tvs", subfolder=info.subfolder)
        assert (tv.kind, tv.task, tv.training["method"]) == (info.kind, info.task, info.method)
    # a vector at the root is listed as "" (what subfolder="" loads)
    vectors["nonlinear_ft/b"].save_pretrained(tmp_path / "tvs")
    assert list_task_vectors(tmp_path / "tvs")[0].subfolder == ""
    assert list_task_vectors(tmp_path / "tvs" / "fisher") == []
    with pytest.raises(ArtifactNotFoundError, match="No such folder"):
        list_task_vectors(tmp_path / "nope")
    assert hub.list_task_vectors is list_task_vectors and "list_task_vectors" in hub.__all__


# ------------------------------------------------------------------------------------------ merge recipes
def _recipe_merge_reference(base, taus, weights):
    """θ0 + Σ α_t τ_t by hand (task arithmetic, λ = 1)."""
    return {n: p.detach().double() + sum(w * t[n].double() for w, t in zip(weights, taus))
            for n, p in base.named_parameters()}


def test_recipe_reads_vectors_from_subfolders(tmp_path, vectors, base):
    import yaml

    recipe_layout(tmp_path / "tvs", vectors, base)
    base.save_pretrained(tmp_path / "base")
    rec = {"base_model": str(tmp_path / "base"), "method": "task_arithmetic",
           "vectors": [{"path": str(tmp_path / "tvs"), "subfolder": "nonlinear_ft/a"},
                       {"model": str(tmp_path / "tvs"), "subfolder": "nonlinear_ft/b", "weight": 0.5}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    out = merge_from_config(str(tmp_path / "r.yaml"), str(tmp_path / "out"), progress=False)
    # the reference: the same merge with each folder given directly
    merge_streaming(str(tmp_path / "base"), [str(tmp_path / "tvs" / "nonlinear_ft" / s) for s in "ab"],
                    str(tmp_path / "direct"), "task_arithmetic", weights=[1.0, 0.5], progress=False)
    got, want = load_file(os.path.join(out, "model.safetensors")), load_file(tmp_path / "direct" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    theta = dict(GPT2LMHeadModel.from_pretrained(out).named_parameters())
    ref = _recipe_merge_reference(base, [vectors["nonlinear_ft/a"], vectors["nonlinear_ft/b"]], [1.0, 0.5])
    for n, t in ref.items():
        torch.testing.assert_close(theta[n].double(), t, rtol=1e-6, atol=1e-6)
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert '"subfolder": "nonlinear_ft/b"' in card  # the recipe, as written, in the merged model's card


def test_recipe_statistics_and_base_given_as_mappings(tmp_path, vectors, base):
    recipe_layout(tmp_path / "tvs", vectors, base)
    FisherStatistics({k: t.abs() + 0.5 for k, t in _tau(base, 10).items()}, num_examples=7).save_pretrained(
        tmp_path / "tvs" / "fisher" / "b")
    base.save_pretrained(tmp_path / "models" / "base")
    vec = [{"path": str(tmp_path / "tvs"), "subfolder": f"nonlinear_ft/{t}",
            "fisher": {"path": str(tmp_path / "tvs"), "subfolder": f"fisher/{t}"}} for t in "ab"]
    out = merge_from_config({"base_model": {"path": str(tmp_path / "models"), "subfolder": "base"},
                             "method": "fisher_average", "vectors": vec}, str(tmp_path / "out"), progress=False)
    merge_streaming(str(tmp_path / "models" / "base"), [str(tmp_path / "tvs" / "nonlinear_ft" / t) for t in "ab"],
                    str(tmp_path / "direct"), "fisher_average",
                    fishers=[str(tmp_path / "tvs" / "fisher" / t) for t in "ab"], progress=False)
    got, want = load_file(os.path.join(out, "model.safetensors")), load_file(tmp_path / "direct" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_recipe_errors_name_the_vector_and_list_the_subfolders(tmp_path, vectors, base, capsys):
    import yaml

    from hf_taujp.merging.recipe import cli_merge, load_recipe

    recipe_layout(tmp_path / "tvs", vectors, base)
    base.save_pretrained(tmp_path / "base")
    tvs = str(tmp_path / "tvs")

    def rec(*vecs):
        return {"base_model": str(tmp_path / "base"), "vectors": list(vecs)}

    # a root holding vectors, no subfolder: named, with the vectors it holds (merge_streaming's check)
    with pytest.raises(CorruptFileError, match="vector 1 '.*tvs' has no config.json: not an hf-taujp task vector. "
                                               "It holds task vectors in sub-folders 'linear_ft_taujp/a', "
                                               "'nonlinear_ft/a', 'nonlinear_ft/b'"):
        merge_from_config(rec({"path": tvs, "subfolder": "nonlinear_ft/a"}, tvs), str(tmp_path / "o1"), progress=False)
    with pytest.raises(ArtifactNotFoundError, match="vector 1: Folder '.*tvs' has no sub-folder 'nonlinear_ft/c'.*"
                                                    "'nonlinear_ft/a' \\(task vector\\)"):
        merge_from_config(rec({"path": tvs, "subfolder": "nonlinear_ft/a"},
                              {"path": tvs, "subfolder": "nonlinear_ft/c"}), str(tmp_path / "o2"), progress=False)
    with pytest.raises(MergeConfigError, match="vector 0: subfolder '../x' leaves the folder"):
        load_recipe(rec({"path": tvs, "subfolder": "../x"}))
    with pytest.raises(MergeConfigError, match="vector 0 subfolder must be a string"):
        load_recipe(rec({"path": tvs, "subfolder": 3}))
    with pytest.raises(MergeConfigError, match="vector 0 'fisher': unknown keys \\['sub'\\]"):
        load_recipe(rec({"path": tvs, "fisher": {"path": tvs, "sub": "fisher/a"}}))
    with pytest.raises(MergeConfigError, match="base_model needs `path:`"):
        load_recipe({"base_model": {"subfolder": "x"}, "vectors": [tvs]})
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # the CLI: one line, exit 2
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec(tvs)))
    capsys.readouterr()
    assert cli_merge([str(tmp_path / "r.yaml"), str(tmp_path / "o3"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("hf-taujp merge: error: vector 0 ")
    assert "pass subfolder='linear_ft_taujp/a'" in err


# ------------------------------------------------------------------------------------------ push: the branch
def _branch_calls(monkeypatch, branch_error=None):
    """Record create_repo / create_branch / commits (upload_folder, create_commit) on HfApi, in order, with
    the token each would send (the call's own, else the HfApi instance's)."""
    from huggingface_hub import HfApi, RepoUrl

    calls = []

    def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kw):
        calls.append(("create_repo", dict(repo_id=repo_id, repo_type=repo_type or "model", exist_ok=exist_ok)))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, *, branch, revision=None, token=None, repo_type=None, exist_ok=False):
        calls.append(("create_branch", dict(repo_id=repo_id, branch=branch, revision=revision,
                                            repo_type=repo_type or "model", exist_ok=exist_ok,
                                            token=token or self.token)))
        if branch_error is not None:
            raise branch_error

    def commit(name):
        def f(self, *, repo_id, revision=None, create_pr=None, token=None, **kw):
            calls.append(("commit", dict(repo_id=repo_id, revision=revision, create_pr=bool(create_pr),
                                         token=token or self.token)))
            return "commit-info"
        return f

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", commit("upload_folder"))
    monkeypatch.setattr(HfApi, "create_commit", commit("create_commit"))
    return calls


def _httpx():
    """The HTTP client module huggingface_hub uses (``httpx2`` in huggingface_hub 2, ``httpx`` before)."""
    return importlib.import_module("httpx2" if importlib.util.find_spec("httpx2") else "httpx")


def _http_error(status):
    from huggingface_hub.errors import HfHubHTTPError

    httpx = _httpx()
    req = httpx.Request("POST", "https://huggingface.co/api/models/org/ref/branch/v2")
    return HfHubHTTPError(f"{status} error", response=httpx.Response(status, request=req))


def _push_transformers(revision, create_pr):
    """transformers' own push_to_hub (a config: no weights needed), the reference."""
    from transformers import GPT2Config

    return GPT2Config(n_layer=1).push_to_hub("org/ref", revision=revision, create_pr=create_pr, token="hf_x")


@pytest.mark.parametrize("revision,create_pr,status", [
    ("v2", False, None),            # a new branch: created from main before the commit
    (None, False, None),            # main: no branch call
    ("refs/pr/3", False, None),     # a PR ref: never created (the Hub answers 400)
    ("v2", True, 403),              # a PR from a repo one cannot write: the 403 of create_branch is let pass
    ("v2", False, 403),             # ... but not without create_pr
])
@pytest.mark.parametrize("artifact", ["task_vector", "fisher", "folder"])
def test_push_creates_the_branch_as_transformers_does(monkeypatch, tmp_path, vectors, revision, create_pr, status,
                                                      artifact):
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    def no_remote_card(*a, **k):  # transformers looks the card up on the Hub first; there is none
        raise EntryNotFoundError("no card")

    monkeypatch.setattr(ModelCard, "load", classmethod(no_remote_card))
    tv = vectors["nonlinear_ft/a"]

    def ours():
        if artifact == "task_vector":
            return tv.push_to_hub("org/ref", revision=revision, create_pr=create_pr, token="hf_x")
        if artifact == "fisher":
            return FisherStatistics({k: t.abs() for k, t in tv.items()}, num_examples=2).push_to_hub(
                "org/ref", revision=revision, create_pr=create_pr, token="hf_x")
        tv.save_pretrained(tmp_path / "f" / "a")
        return hub.push_folder_to_hub(tmp_path / "f", "org/ref", revision=revision, create_pr=create_pr, token="hf_x")

    results = []
    for push in (_push_transformers, ours):
        calls = _branch_calls(monkeypatch, None if status is None else _http_error(status))
        if status == 403 and not create_pr:
            with pytest.raises(HfHubHTTPError, match="403"):
                push(revision, create_pr) if push is _push_transformers else push()
        else:
            push(revision, create_pr) if push is _push_transformers else push()
        results.append(calls)
    ref, got = results
    assert [c[0] for c in got] == [c[0] for c in ref]  # create_repo, [create_branch,] commit — in that order
    assert [c[1] for c in got if c[0] == "create_branch"] == [c[1] for c in ref if c[0] == "create_branch"]
    assert [c[1] for c in got if c[0] == "commit"] == [c[1] for c in ref if c[0] == "commit"]
    if revision == "v2" and status is None:
        assert got[1] == ("create_branch", dict(repo_id="org/ref", branch="v2", revision=None, repo_type="model",
                                                exist_ok=True, token="hf_x"))


# ------------------------------------------------------------------------------------------ over HTTP
class FakeHubWrites:
    """The Hub's write side on the olah mirror's git repos, at huggingface_hub's client boundary.

    As the Hub: ``create_repo`` makes a repo with one commit on ``main``; ``create_branch`` branches from
    ``main`` (``exist_ok``); ``upload_folder`` to a ``revision`` that is not a branch fails as the Hub's API
    does (a 404 turned into ``RevisionNotFoundError`` by huggingface_hub's own ``hf_raise_for_status``),
    deletes the files matching ``delete_patterns`` below ``path_in_repo`` except those it uploads, puts the
    folder's files (sub-folders too) under ``path_in_repo`` and commits."""

    def __init__(self, server, monkeypatch):
        from huggingface_hub import HfApi, RepoUrl

        self.server, self.calls = server, []
        fake = self

        def create_repo(api, repo_id, *, exist_ok=False, **kw):
            fake.calls.append(("create_repo", repo_id))
            repo = fake.repo(repo_id)
            if not os.path.isdir(os.path.join(repo, ".git")):
                os.makedirs(repo, exist_ok=True)
                _git(repo, "init", "-q", "-b", "main")
                with open(os.path.join(repo, ".gitattributes"), "w") as f:
                    f.write("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
                _git(repo, "add", "-A")
                _git(repo, "commit", "-q", "-m", "initial commit")
            return RepoUrl(f"{server.endpoint}/{repo_id}", endpoint=server.endpoint)

        def create_branch(api, repo_id, *, branch, revision=None, exist_ok=False, **kw):
            fake.calls.append(("create_branch", repo_id, branch))
            repo = fake.repo(repo_id)
            if branch in fake.branches(repo):
                if not exist_ok:
                    raise AssertionError(f"branch {branch} exists")
                return
            _git(repo, "branch", branch, revision or "main")

        def upload_folder(api, *, repo_id, folder_path, path_in_repo=None, revision=None, delete_patterns=None,
                          commit_message=None, **kw):
            fake.calls.append(("upload_folder", repo_id, revision, path_in_repo))
            repo = fake.repo(repo_id)
            branch = revision or "main"
            if branch not in fake.branches(repo):
                fake.not_found(repo_id, branch)
            _git(repo, "checkout", "-q", branch)
            try:
                prefix = (path_in_repo or "").strip("/")
                target = os.path.join(repo, *prefix.split("/")) if prefix else repo
                new = {os.path.relpath(os.path.join(r, f), folder_path).replace(os.sep, "/")
                       for r, _, fs in os.walk(folder_path) for f in fs}
                for r, ds, fs in os.walk(target):
                    ds[:] = [d for d in ds if d != ".git"]
                    for f in fs:
                        rel = os.path.relpath(os.path.join(r, f), target).replace(os.sep, "/")
                        if rel != ".gitattributes" and rel not in new and any(
                                fnmatch.fnmatch(rel, p) for p in ([delete_patterns] if isinstance(delete_patterns, str)
                                                                  else delete_patterns or [])):
                            os.remove(os.path.join(r, f))
                for rel in new:
                    size = os.path.getsize(os.path.join(folder_path, *rel.split("/")))
                    if 121 <= size <= 149 and not rel.endswith((".json", ".md")):
                        raise RuntimeError(f"{rel}: olah returns 500 for binary files of ~121-149 bytes ({size})")
                    dst = os.path.join(target, *rel.split("/"))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copy2(os.path.join(folder_path, *rel.split("/")), dst)
                _git(repo, "add", "-A")
                _git(repo, "commit", "-q", "--allow-empty", "-m", commit_message or "upload")
                return _git(repo, "rev-parse", "HEAD")
            finally:
                _git(repo, "checkout", "-q", "main")

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    def repo(self, repo_id):
        return os.path.join(self.server.mirrors, "models", *repo_id.split("/"))

    @staticmethod
    def branches(repo):
        if not os.path.isdir(os.path.join(repo, ".git")):
            return set()
        return set(_git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads").split())

    def not_found(self, repo_id, branch):
        from huggingface_hub.utils import hf_raise_for_status

        httpx = _httpx()
        url = f"{self.server.endpoint}/api/models/{repo_id}/preupload/{branch}"
        hf_raise_for_status(httpx.Response(404, headers={"X-Error-Code": "RevisionNotFound"},
                                           request=httpx.Request("POST", url)))


PULL = """
import json
from safetensors.torch import save_file
from hf_taujp.task_vector import TaskVector
from hf_taujp.hub import list_task_vectors
out = {{}}
for name, (repo, sub, rev) in {cases!r}.items():
    tv = TaskVector.from_pretrained(repo, revision=rev, subfolder=sub)
    save_file({{k: v.contiguous() for k, v in tv.items()}}, {folder!r} + "/" + name + ".safetensors")
    out[name] = tv.metadata()
out["listed"] = {{str(r): [vars(i) for i in list_task_vectors("org/multi", revision=r)] for r in (None, "v2")}}
errors = {{}}
for name, kw in {errors!r}.items():
    try:
        TaskVector.from_pretrained("org/multi", **kw)
    except Exception as e:
        errors[name] = type(e).__name__ + ": " + str(e)
out["errors"] = errors
print(json.dumps(out))
"""


def test_push_to_new_branch_and_subfolders_then_pull_over_http(server, monkeypatch, tmp_path, vectors):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    fake = FakeHubWrites(server, monkeypatch)
    v_a, v_b, v_lin = vectors["nonlinear_ft/a"], vectors["nonlinear_ft/b"], vectors["linear_ft_taujp/a"]
    # the recipes' push: one folder with a sub-folder per method and task, at the root of the repo
    folder = tmp_path / "task_vectors"
    v_a.save_pretrained(folder / "nonlinear_ft" / "a", max_shard_size="1KB")  # sharded: an index and shards
    v_lin.save_pretrained(folder / "linear_ft_taujp" / "a")
    hub.push_folder_to_hub(folder, "org/multi")
    # the fake Hub refuses a commit to a branch that does not exist: the 404 users saw
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "x.json").write_text("{}")
    with pytest.raises(RevisionNotFoundError):
        HfApi().upload_folder(repo_id="org/multi", folder_path=str(tmp_path / "lone"), revision="v2")
    # one vector into a sub-folder of a new branch: the branch is created first
    v_b.push_to_hub("org/multi", revision="v2", subfolder="nonlinear_ft/b")
    assert fake.calls[-2:] == [("create_branch", "org/multi", "v2"),
                               ("upload_folder", "org/multi", "v2", "nonlinear_ft/b")]
    # on v2, a single-file save over the sharded one: its stale shards and index go in the same commit
    v_b.push_to_hub("org/multi", revision="v2", subfolder="nonlinear_ft/a")
    repo = fake.repo("org/multi")
    v2_files = _git(repo, "ls-tree", "-r", "--name-only", "v2").split()
    main_files = _git(repo, "ls-tree", "-r", "--name-only", "main").split()
    assert [f for f in v2_files if f.startswith("nonlinear_ft/a/")] == [
        "nonlinear_ft/a/README.md", "nonlinear_ft/a/config.json", "nonlinear_ft/a/task_vector.safetensors"]
    assert "nonlinear_ft/a/task_vector.safetensors.index.json" in main_files
    assert "nonlinear_ft/b/config.json" not in main_files

    cases = {"main_a": ("org/multi", "nonlinear_ft/a", None), "main_lin": ("org/multi", "linear_ft_taujp/a", None),
             "v2_b": ("org/multi", "nonlinear_ft/b", "v2"), "v2_a": ("org/multi", "nonlinear_ft/a", "v2")}
    errors = {"root": {}, "unknown": {"subfolder": "nonlinear_ft/zz", "revision": "v2"},
              "not_on_main": {"subfolder": "nonlinear_ft/b"}}
    hf_home = tmp_path / "hf"
    out = json.loads(server.run_client(PULL.format(cases=cases, errors=errors, folder=str(tmp_path)),
                                       hf_home=str(hf_home)).strip().splitlines()[-1])
    for name, want in {"main_a": v_a, "main_lin": v_lin, "v2_b": v_b, "v2_a": v_b}.items():
        got = load_file(tmp_path / f"{name}.safetensors")
        assert got.keys() == want.tensors.keys() and all(torch.equal(got[k], want[k]) for k in got), name
        assert out[name] == want.metadata(), name
    # list_task_vectors over HTTP: the folders per revision, with their metadata
    listed = {r: [(i["subfolder"], i["kind"], i["task"], i["method"]) for i in v] for r, v in out["listed"].items()}
    assert listed["None"] == [("linear_ft_taujp/a", "linear", "a", "linear_ft_taujp"),
                              ("nonlinear_ft/a", "nonlinear", "a", "nonlinear_ft")]
    assert listed["v2"] == [("linear_ft_taujp/a", "linear", "a", "linear_ft_taujp"),
                            ("nonlinear_ft/a", "nonlinear", "b", "nonlinear_ft"),
                            ("nonlinear_ft/b", "nonlinear", "b", "nonlinear_ft")]
    err = out["errors"]
    assert err["root"].startswith("CorruptFileError: 'org/multi' has no config.json: not an hf-taujp task vector. "
                                  "It holds task vectors in sub-folders 'linear_ft_taujp/a', 'nonlinear_ft/a': pass "
                                  "subfolder='linear_ft_taujp/a'")
    assert err["unknown"].startswith("ArtifactNotFoundError: Hub repo 'org/multi' (revision 'v2') has no sub-folder "
                                     "'nonlinear_ft/zz'")
    assert "'nonlinear_ft/b' (task vector)" in err["unknown"] and "'linear_ft_taujp/a' (task vector)" in err["unknown"]
    assert "has no sub-folder 'nonlinear_ft/b'" in err["not_on_main"]
    # one vector of a multi-vector repo downloads that vector's files only
    fresh = tmp_path / "hf-one"
    server.run_client("from hf_taujp import TaskVector\n"
                      "TaskVector.from_pretrained('org/multi', revision='v2', subfolder='nonlinear_ft/b')",
                      hf_home=str(fresh))
    snaps = fresh / "hub" / "models--org--multi" / "snapshots"
    fetched = sorted(os.path.relpath(os.path.join(r, f), snaps / os.listdir(snaps)[0]).replace(os.sep, "/")
                     for r, _, fs in os.walk(snaps) for f in fs)
    assert fetched == ["nonlinear_ft/b/README.md", "nonlinear_ft/b/config.json",
                       "nonlinear_ft/b/task_vector.safetensors"]


MERGE = """
from hf_taujp.merging import merge_from_config
print(merge_from_config({recipe!r}, {out!r}, progress=False))
"""


def test_recipe_merges_subfolders_of_a_hub_repo_at_a_revision(server, monkeypatch, tmp_path, vectors, base):
    FakeHubWrites(server, monkeypatch)
    base.save_pretrained(tmp_path / "base")
    server.commit_folder("org/base", str(tmp_path / "base"))
    for sub in ("nonlinear_ft/a", "nonlinear_ft/b"):
        vectors[sub].push_to_hub("org/recipe-vectors", revision="v2", subfolder=sub)
    recipe = {"base_model": "org/base", "method": "task_arithmetic",
              "vectors": [{"path": "org/recipe-vectors", "subfolder": "nonlinear_ft/a", "revision": "v2"},
                          {"path": "org/recipe-vectors", "subfolder": "nonlinear_ft/b", "revision": "v2",
                           "weight": -1.0}]}
    out = str(tmp_path / "merged")
    server.run_client(MERGE.format(recipe=recipe, out=out), hf_home=str(tmp_path / "hf"))
    theta = dict(GPT2LMHeadModel.from_pretrained(out).named_parameters())
    ref = _recipe_merge_reference(base, [vectors["nonlinear_ft/a"], vectors["nonlinear_ft/b"]], [1.0, -1.0])
    for n, t in ref.items():
        torch.testing.assert_close(theta[n].double(), t, rtol=1e-6, atol=1e-6)
    # without the revision, main has no vectors (the repo's initial commit only): named, not a raw 404
    recipe["vectors"][0].pop("revision")
    with pytest.raises(AssertionError,
                       match="vector 0: Hub repo 'org/recipe-vectors' has no sub-folder 'nonlinear_ft/a'"):
        server.run_client(MERGE.format(recipe=recipe, out=str(tmp_path / "m2")), hf_home=str(tmp_path / "hf"))
