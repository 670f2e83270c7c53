"""Statistics beside their task vector on the Hub, and merges that read everything from Hub repos.

Pull is real HTTP through an olah mirror on 127.0.0.1 (tests/hub_server.py); push is intercepted at
huggingface_hub's client boundary (HfApi.create_repo / upload_folder) and committed into the mirror,
as in tests/test_hub_server.py. The user story: pull someone's task vectors *and* their Fisher, run
gradient matching streamed from the repos, and compare with the formula computed here by hand.
"""
import json
import os

import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from hf_taujp import hub
from hf_taujp.merging import FisherStatistics, GramStatistics, merge_from_config
from hf_taujp.task_vector import TaskVector, fingerprint
from tests.tiny_models import GPT2_MINI, tiny_gpt2

CLIENT = """
import json
from safetensors.torch import save_file
from hf_taujp.merging import FisherStatistics, GramStatistics, merge_streaming
f = FisherStatistics.from_pretrained("org/fisher0")
g = GramStatistics.from_pretrained("org/gram0")
save_file({{k: v.contiguous() for k, v in f.tensors.items()}}, {fout!r})
save_file({{k: v.contiguous() for k, v in g.tensors.items()}}, {gout!r})
merge_streaming("org/base", ["org/tv0", "org/tv1"], {mout!r}, "gradient_matching",
                fishers=["org/fisher0", "org/fisher1"], base_fisher="org/fisherbase", progress=False)
print(json.dumps({{"fisher": f.config(), "gram": g.config()}}))
"""


def _intercept(monkeypatch, server, calls):
    from huggingface_hub import HfApi

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kw):
        calls.setdefault("create_repo", []).append(dict(repo_id=repo_id, exist_ok=exist_ok, repo_type=repo_type))
        return f"{server.endpoint}/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kw):
        card = open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()
        calls.setdefault("upload_folder", {})[repo_id] = dict(files=sorted(os.listdir(folder_path)), card=card)
        return server.commit_folder(repo_id, folder_path, message=commit_message or "upload")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_statistics_then_gradient_matching_streamed_from_hub(server, tmp_path, monkeypatch):
    base = tiny_gpt2(seed=0, n_layer=1, n_embd=16, vocab_size=40, n_positions=16)
    base.save_pretrained(tmp_path / "base")
    server.commit_folder("org/base", str(tmp_path / "base"))
    g = torch.Generator().manual_seed(1)
    names = [n for n, _ in base.named_parameters()]
    shapes = {n: p.shape for n, p in base.named_parameters()}
    taus = [{n: 0.01 * torch.randn(shapes[n], generator=g) for n in names} for _ in range(2)]
    fishers = [{n: torch.rand(shapes[n], generator=g) ** 2 for n in names} for _ in range(2)]
    sizes = [100, 300]
    h0, s0 = {n: torch.rand(shapes[n], generator=g) ** 2 for n in names}, 50
    calls: dict = {}
    _intercept(monkeypatch, server, calls)
    fp = fingerprint(base)
    for k in range(2):
        TaskVector(taus[k], base_model="org/base", base_fingerprint=fp, task=f"t{k}").push_to_hub(f"org/tv{k}")
        FisherStatistics(fishers[k], num_examples=sizes[k], base_model="org/base", base_fingerprint=fp,
                         task=f"t{k}").push_to_hub(f"org/fisher{k}")
    FisherStatistics(h0, num_examples=s0, base_model="org/base", base_fingerprint=fp).push_to_hub("org/fisherbase")
    gram = {"transformer.h.0.mlp.c_fc.weight": torch.eye(16, dtype=torch.float64) * 2.0}
    GramStatistics(gram, num_examples=7, base_model="org/base", task="t0",
                   extra={"weight_layout": {"transformer.h.0.mlp.c_fc.weight": "in_out"}}).push_to_hub("org/gram0")

    # the same Hub contract as a task vector: safetensors + config + a card naming the base
    up = calls["upload_folder"]
    assert up["org/fisher0"]["files"] == ["README.md", "config.json", "fisher.safetensors"]
    assert up["org/gram0"]["files"] == ["README.md", "config.json", "gram.safetensors"]
    for repo in ("org/fisher0", "org/gram0"):
        assert "library_name: hf-taujp" in up[repo]["card"] and "base_model: org/base" in up[repo]["card"]
    assert all(c["exist_ok"] and c["repo_type"] == "model" for c in calls["create_repo"])

    fout, gout, mout = (str(tmp_path / x) for x in ("f.safetensors", "g.safetensors", "merged"))
    meta = json.loads(server.run_client(CLIENT.format(fout=fout, gout=gout, mout=mout),
                                        hf_home=str(tmp_path / "hf")).strip().splitlines()[-1])
    pulled = load_file(fout)
    assert pulled.keys() == fishers[0].keys() and all(torch.equal(pulled[n], fishers[0][n]) for n in names)
    assert meta["fisher"]["num_examples"] == 100 and meta["fisher"]["base_fingerprint"] == fp
    assert torch.equal(load_file(gout)["transformer.h.0.mlp.c_fc.weight"], gram["transformer.h.0.mlp.c_fc.weight"])
    assert meta["gram"]["weight_layout"] == {"transformer.h.0.mlp.c_fc.weight": "in_out"}

    # Daheim et al., α = 1, δ = 1e-12, P = s0 H0 + δ: θ = θ0 + Σ_t (P + s_t H_t) / (P + Σ_s s_s H_s) ⊙ τ_t
    merged = GPT2LMHeadModel.from_pretrained(mout)
    theta = dict(merged.named_parameters())
    for n, p in base.named_parameters():
        prior = 1e-12 + s0 * h0[n].double()
        den = prior + sizes[0] * fishers[0][n].double() + sizes[1] * fishers[1][n].double()
        want = p.double() + sum((prior + s * f[n].double()) / den * t[n].double()
                                for s, f, t in zip(sizes, fishers, taus))
        torch.testing.assert_close(theta[n].double(), want, rtol=1e-5, atol=1e-6)


def test_merged_model_pushed_with_recipe_card(server, tmp_path, monkeypatch):
    base = tiny_gpt2(seed=2, **GPT2_MINI)
    base.save_pretrained(tmp_path / "base")
    with open(tmp_path / "base" / "tokenizer_config.json", "w") as f:
        json.dump({"model_max_length": 8}, f)
    g = torch.Generator().manual_seed(3)
    for k in range(2):
        TaskVector({n: 0.1 * torch.randn(p.shape, generator=g) for n, p in base.named_parameters()},
                   base_fingerprint=fingerprint(base)).save_pretrained(tmp_path / f"tv{k}")
    calls: dict = {}
    _intercept(monkeypatch, server, calls)
    recipe = {"base_model": str(tmp_path / "base"), "method": "ties",
              "vectors": [{"path": str(tmp_path / "tv0"), "weight": 1.0}, {"path": str(tmp_path / "tv1"), "weight": 0.5}],
              "parameters": {"density": 0.5}, "dtype": "bfloat16", "push_to_hub": "org/merged"}
    out = merge_from_config(recipe, str(tmp_path / "out"), progress=False)
    up = calls["upload_folder"]["org/merged"]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer_config.json"} <= set(up["files"])
    card = up["card"]
    assert "library_name: hf-taujp" in card and '"method": "ties"' in card and '"density": 0.5' in card
    assert "tv1" in card and '"weights": 0.5' in card  # the normalised recipe
    assert hub.read_json(os.path.join(out, "config.json"))["dtype"] == "bfloat16"
    assert GPT2LMHeadModel.from_pretrained(out).transformer.wte.weight.dtype == torch.bfloat16
