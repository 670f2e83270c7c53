"""Low-rank (factored) task vectors: ``TaskVector.from_peft(..., factored=True)``.

The factored vector stores τ_W = s·B·A as its factors and gives the full tensor wherever code needs it.
References, each independent of the code under test: the full τ computed by hand as s·B·A in float64 from
the adapter's own factors (``get_factors()`` / the LoRA layers' ``lora_A`` / ``lora_B``); PEFT's own
``merge_and_unload`` for LoRA; the adapter's own forward pass for the linear reading; and, for merges, the
in-memory merge of the same vectors materialised (``to_dense()``).
"""

import copy
import json
import os
import shutil
import warnings

import peft
import pytest
import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from hf_taujp import LinearizedConfig, TaskVector, hub
from hf_taujp.errors import CorruptFileError, HfTaujpError
from hf_taujp.low_rank_tau import LowRankTau, LowRankVectorReader, low_rank_sum
from hf_taujp.merging import merge
from hf_taujp.merging.streaming import merge_streaming
from hf_taujp.task_vector import cosine_matrix
from tests.tiny_models import tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens"]


# ------------------------------------------------------------------------------------------ builders
def _lowrank(base, seed=3, r=2, lora_alpha=4, targets=("c_attn", "c_fc"), task_type="CAUSAL_LM", **kw):
    """A low-rank LINEARIZED PEFT model with random factors (B ≠ 0, so τ ≠ 0)."""
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type=task_type, r=r, lora_alpha=lora_alpha,
                                                                   target_modules=list(targets), **kw))
    g = torch.Generator().manual_seed(seed)
    lin = pm.base_model
    lin.set_factors({n: (0.3 * torch.randn(A.shape, generator=g), 0.3 * torch.randn(B.shape, generator=g))
                     for n, (A, B, _) in lin.get_factors().items()})
    return pm.eval()


def _hand_tau(pm) -> dict[str, torch.Tensor]:
    """s·B·A in float64 from the adapter's own factors, in each weight's stored layout (the reference)."""
    out = {}
    inner = pm.get_base_model()
    for n, (A, B, s) in pm.base_model.get_factors().items():
        d = s * (B.double() @ A.double())
        w = inner.get_parameter(n)
        out[n] = d if tuple(w.shape) == tuple(d.shape) and not isinstance(
            inner.get_submodule(n.rsplit(".", 1)[0]), torch.nn.Embedding) else d.t()
    return out


def _tiny_cls(seed=0):
    return tiny_gpt2(GPT2ForSequenceClassification, seed=seed, n_embd=16, vocab_size=40, n_positions=16, pad_token_id=0,
                     bos_token_id=1, eos_token_id=1, num_labels=3).eval()


def _lora(base, seed=5, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when it flips fan_in_fan_out per layer
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{"r": 2, "lora_alpha": 8, **kw}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return pm.eval()


def _merged_minus_base(pm, base):
    """PEFT's own merge_and_unload, minus θ0, in float64 (the LoRA reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = dict(copy.deepcopy(pm).merge_and_unload().named_parameters())
    return {n: merged[n].detach().double() - p.detach().double() for n, p in base.named_parameters()}


def _size(folder) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def _st_size(folder) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


# ------------------------------------------------------------------------------------------ from_peft
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_factored_linearized_vector_is_s_B_A_and_equals_the_full_conversion(arch, tmp_path):
    """τ_W = s·B·A (Conv1D / Embedding: transposed) from the adapter's own factors; the factored vector's
    full tensors are bit for bit those of factored=False, in memory and from the saved adapter."""
    if arch == "gpt2":
        base, pm = tiny_gpt2(), None
        pm = _lowrank(base)
    else:
        base = tiny_llama()
        pm = _lowrank(base, targets=LLAMA_TARGETS, use_rslora=True)
    want = _hand_tau(pm)
    pm.save_pretrained(tmp_path / "a")
    for src, kw in ((pm, {}), (str(tmp_path / "a"), {"base": base})):
        fac = TaskVector.from_peft(src, factored=True, **kw)
        full = TaskVector.from_peft(src, **kw)
        assert fac.kind == full.kind == "linear" and fac.is_low_rank and not full.is_low_rank
        assert sorted(fac) == sorted(full) == sorted(want)
        assert fac.ranks == {n: 2 for n in want} and all(isinstance(e, LowRankTau) for e in fac.entries.values())
        for n, ref in want.items():
            assert torch.equal(fac[n], full[n]), n
            torch.testing.assert_close(fac[n].double(), ref, atol=1e-7, rtol=1e-6)
        assert fac.num_dense_parameters == full.num_parameters == sum(t.numel() for t in want.values())
        assert fac.num_parameters == sum(2 * sum(t.shape) for t in want.values())  # r·(in + out) per weight
        assert fac.base_fingerprint == full.base_fingerprint is not None


def test_factored_lora_vector_equals_peft_merge_and_unload(tmp_path):
    """LoRA on GPT-2's Conv1D, an nn.Linear head and the (tied) embedding, rsLoRA and rank / alpha patterns:
    the factored entries give PEFT's own merge_and_unload change; lora_bias stays a full tensor beside them."""
    base = _tiny_cls()
    cases = [dict(target_modules=["c_attn", "c_proj", "score", "wte"], use_rslora=True,
                  rank_pattern={"h.0.attn.c_attn": 3}, alpha_pattern={"score": 3}),
             dict(target_modules=["c_attn", "c_fc"], lora_bias=True)]
    for i, kw in enumerate(cases):
        pm = _lora(base, **kw)
        want = _merged_minus_base(pm, base)
        pm.save_pretrained(tmp_path / f"a{i}")
        for src in (pm, tmp_path / f"a{i}"):
            fac = TaskVector.from_peft(src, base=base, factored=True)
            full = TaskVector.from_peft(src, base=base)
            assert sorted(fac) == sorted(full) and fac.kind == "nonlinear"
            for n in fac:
                assert torch.equal(fac[n], full[n]), n
                torch.testing.assert_close(fac[n].double(), want[n], atol=2e-6, rtol=1e-5)
            biases = [n for n in fac if n.endswith(".bias")]
            assert bool(biases) == bool(kw.get("lora_bias"))
            assert all(fac.ranks[n] is None for n in biases)
            assert all(fac.ranks[n] is not None for n in fac if n.endswith(".weight"))
            if i == 0:
                assert fac.ranks["transformer.h.0.attn.c_attn.weight"] == 3
                assert fac.entries["transformer.wte.weight"].transposed  # Embedding: (s·B_e·A_e)ᵀ
                assert not fac.entries["score.weight"].transposed  # nn.Linear: s·B·A


def test_dora_and_a_full_rank_adapter_are_refused_with_factored_true():
    base = _tiny_cls()
    with pytest.raises(HfTaujpError, match="DoRA.*factored=False"):
        TaskVector.from_peft(_lora(base, target_modules=["c_attn"], use_dora=True), factored=True)
    full_rank = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="SEQ_CLS", target_modules=["c_attn"]))
    with pytest.raises(HfTaujpError, match="low-rank LINEARIZED adapter"):
        TaskVector.from_peft(full_rank, factored=True)
    with pytest.raises(HfTaujpError, match="factored must be"):
        TaskVector.from_peft(full_rank, factored="yes")


def test_a_factored_vector_does_not_move_with_the_adapter_it_came_from():
    pm = _lowrank(tiny_gpt2())
    fac = TaskVector.from_peft(pm, factored=True)
    before = {n: fac[n].clone() for n in fac}
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(torch.equal(fac[n], before[n]) for n in fac)


# ------------------------------------------------------------------------------------------ readings
def test_both_readings_of_a_factored_vector():
    """linear: f(θ0) + J·τ equals the adapter's own forward; θ0 + τ equals its merge_and_unload."""
    base = tiny_gpt2(dropout=0.0).eval()
    pm = _lowrank(base)
    fac = TaskVector.from_peft(pm, factored=True)
    ids = torch.tensor([[1, 5, 7, 11, 3]])
    with torch.no_grad():
        lin = fac.apply_to(base)(input_ids=ids).logits
        torch.testing.assert_close(lin, pm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        with pytest.warns(UserWarning, match="weight reading"):
            weights = fac.apply_to(base, linear=False)
        ref = copy.deepcopy(pm).merge_and_unload()
    for (k, a), (_, b) in zip(weights.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=k)


# ------------------------------------------------------------------------------------------ arithmetic
def test_arithmetic_stays_factored_and_exact():
    base = tiny_gpt2()
    a = TaskVector.from_peft(_lowrank(base, seed=1), factored=True)
    b = TaskVector.from_peft(_lowrank(base, seed=2, lora_alpha=6), factored=True)
    da, db = a.to_dense(), b.to_dense()
    n0 = next(iter(a))
    # α·τ and −τ change only the scale: the factors are the same tensors
    for v, c in ((0.3 * a, 0.3), (-a, -1.0), (a / 4, 0.25)):
        assert v.entries[n0].A.data_ptr() == a.entries[n0].A.data_ptr() and v.entries[n0].scale == a.entries[n0].scale * c
        for n in a:
            torch.testing.assert_close(v[n], c * da[n], atol=1e-7, rtol=1e-6)
    # τa + τb: factors concatenated, rank 2 + 2, equal to the full sum
    for s, ref in ((a + b, {n: da[n] + db[n] for n in a}), (a - 0.5 * b, {n: da[n] - 0.5 * db[n] for n in a}),
                   (sum([a, b]), {n: da[n] + db[n] for n in a})):
        assert s.is_low_rank and set(s.ranks.values()) == {4}
        for n in a:
            torch.testing.assert_close(s[n], ref[n], atol=1e-6, rtol=1e-6)
    # factored + full is full for those names
    mixed = a + db
    assert not mixed.is_low_rank and all(torch.allclose(mixed[n], da[n] + db[n], atol=1e-7) for n in a)
    # to(): the factors are cast; the full tensor follows
    a64 = a.to(torch.float64)
    assert a64.entries[n0].A.dtype == torch.float64 and a64[n0].dtype == torch.float64
    e = a.entries[n0]
    assert torch.equal(a64[n0], (e.scale * (e.B.double() @ e.A.double())).t())


def test_dot_norm_cosine_of_factored_vectors_equal_the_float64_reference():
    base = tiny_gpt2()
    pa, pb = _lowrank(base, seed=1), _lowrank(base, seed=2)
    ra, rb = _hand_tau(pa), _hand_tau(pb)
    a, b = TaskVector.from_peft(pa, factored=True), TaskVector.from_peft(pb, factored=True)
    dot = sum(float((ra[n] * rb[n]).sum()) for n in ra)
    na = sum(float(ra[n].pow(2).sum()) for n in ra) ** 0.5
    nb = sum(float(rb[n].pow(2).sum()) for n in rb) ** 0.5
    assert a.dot(b) == pytest.approx(dot, rel=1e-10)  # trace identities on the factors, float64
    assert a.dot(b.to_dense()) == pytest.approx(dot, rel=1e-6)  # factored · full
    assert a.norm() == pytest.approx(na, rel=1e-10) and (a + b).norm() == pytest.approx(
        sum(float((ra[n] + rb[n]).pow(2).sum()) for n in ra) ** 0.5, rel=1e-10)
    assert a.cosine(b) == pytest.approx(dot / (na * nb), rel=1e-9)
    torch.testing.assert_close(cosine_matrix([a, b]), cosine_matrix([a.to_dense(), b.to_dense()]), atol=1e-6, rtol=0)


def test_low_rank_tau_layouts_rows_and_flat_reads():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    for transposed in (False, True):
        e = LowRankTau(A, B, 0.7, transposed)
        ref = 0.7 * (B.double() @ A.double())
        ref = (ref.t() if transposed else ref).float()
        assert tuple(e.shape) == tuple(ref.shape) and torch.equal(e.full(), ref)
        assert torch.equal(e.as_layout(not transposed).full(), ref)  # (s·B·A)ᵀ = s·Aᵀ·Bᵀ
        for start, n in ((0, 35), (4, 9), (13, 1), (6, 29)):
            out = torch.empty(n)
            torch.testing.assert_close(e.read_flat_into(start, out), ref.reshape(-1)[start:start + n], atol=0, rtol=1e-7)
    # different |c·s|: folded into B (scale 1); equal |c·s|: exact, signs in B
    x, y = LowRankTau(A, B, 2.0), LowRankTau(A * 2, B, 0.5)
    same = low_rank_sum([(1.0, x), (-4.0, y)])
    assert same.scale == 2.0 and same.rank == 6 and torch.equal(same.B[:, 3:], -B)
    folded = low_rank_sum([(1.0, x), (1.0, y)])
    assert folded.scale == 1.0
    torch.testing.assert_close(folded.full(), x.full() + y.full(), atol=1e-6, rtol=1e-6)
    with pytest.raises(HfTaujpError, match="A \\(r, in\\) and B \\(out, r\\)"):
        LowRankTau(A, B.t())
    with pytest.raises(HfTaujpError, match="finite"):
        LowRankTau(A, B, float("nan"))


# ------------------------------------------------------------------------------------------ Hub
def test_save_reload_is_bit_exact_and_the_folder_is_small(tmp_path):
    base = tiny_gpt2(n_embd=64, n_head=2)
    pm = _lowrank(base, r=2)
    fac = TaskVector.from_peft(pm, factored=True, task="sst2")
    full = fac.to_dense()
    fac.save_pretrained(tmp_path / "fac")
    full.save_pretrained(tmp_path / "full")
    back = TaskVector.from_pretrained(tmp_path / "fac")
    assert back.is_low_rank and back.ranks == fac.ranks and back.kind == "linear" and back.task == "sst2"
    for n, e in fac.entries.items():
        g = back.entries[n]
        assert torch.equal(g.A, e.A) and torch.equal(g.B, e.B) and g.scale == e.scale and g.transposed == e.transposed
        assert torch.equal(back[n], full[n])
    # size ∝ r: r·(in + out) values per weight instead of in·out
    assert _st_size(tmp_path / "fac") < 0.1 * _st_size(tmp_path / "full")
    assert _size(tmp_path / "fac") < 0.2 * _size(tmp_path / "full")
    fac4 = TaskVector.from_peft(_lowrank(base, r=4), factored=True)
    fac4.save_pretrained(tmp_path / "fac4")
    ratio = (_st_size(tmp_path / "fac4") - 1000) / (_st_size(tmp_path / "fac") - 1000)  # minus ~the header
    assert 1.7 < ratio < 2.3
    cfg = json.loads((tmp_path / "fac" / "config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["num_parameters"] == fac.num_parameters
    assert cfg["num_dense_parameters"] == full.num_parameters
    assert cfg["low_rank"]["transformer.h.0.attn.c_attn.weight"] == {"rank": 2, "scale": 2.0, "layout": "transposed",
                                                                     "shape": [64, 192]}
    with hub.SafetensorsReader(tmp_path / "fac", "task_vector") as r:
        assert set(r.keys()) == {f"{n}.{k}" for n in fac for k in ("lora_A", "lora_B")}
        assert r.shape("transformer.h.0.attn.c_attn.weight.lora_A") == (2, 64)
    card = (tmp_path / "fac" / "README.md").read_text()
    assert "low-rank, rank 2" in card and "low-rank" in card.split("---")[1]  # the summary and the tags
    # a full vector still writes version 1 (older hf-taujp reads it)
    assert json.loads((tmp_path / "full" / "config.json").read_text())["format_version"] == 1
    assert not TaskVector.from_pretrained(tmp_path / "full").is_low_rank


def test_push_to_hub_uploads_the_factors_into_a_subfolder(monkeypatch, tmp_path):
    from huggingface_hub import HfApi, RepoUrl

    remote = tmp_path / "remote"

    def create_repo(self, repo_id, **kw):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, **kw):
        shutil.copytree(folder_path, remote / (path_in_repo or ""), dirs_exist_ok=True)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    fac = TaskVector.from_peft(_lowrank(tiny_gpt2()), factored=True)
    fac.push_to_hub("me/vectors", subfolder="lowrank/sst2", token="hf_x")
    assert (remote / "lowrank" / "sst2" / "config.json").is_file()
    back = TaskVector.from_pretrained(remote, subfolder="lowrank/sst2")
    assert back.is_low_rank and all(torch.equal(back[n], fac[n]) for n in fac)
    assert [i.subfolder for i in hub.list_task_vectors(remote)] == ["lowrank/sst2"]


def test_corrupt_or_newer_factored_folders_are_named(tmp_path):
    fac = TaskVector.from_peft(_lowrank(tiny_gpt2()), factored=True)
    fac.save_pretrained(tmp_path / "ok")
    n0 = next(iter(fac))

    def variant(name, edit_cfg=None, drop=None):
        d = tmp_path / name
        shutil.copytree(tmp_path / "ok", d)
        cfg = json.loads((d / "config.json").read_text())
        if edit_cfg:
            edit_cfg(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        if drop:
            t = hub.load_safetensors(d, "task_vector")
            del t[drop]
            os.remove(d / "task_vector.safetensors")
            hub.save_safetensors_sharded(t, d, "task_vector")
            cfg["num_parameters"] = sum(x.numel() for x in t.values())
            (d / "config.json").write_text(json.dumps(cfg))
        return d

    with pytest.raises(CorruptFileError, match="says rank 3"):
        TaskVector.from_pretrained(variant("rank", lambda c: c["low_rank"][n0].update(rank=3)))
    with pytest.raises(CorruptFileError, match="lack"):
        TaskVector.from_pretrained(variant("missing", drop=f"{n0}.lora_B"))
    with pytest.raises(CorruptFileError, match="shape"):
        TaskVector.from_pretrained(variant("layout", lambda c: c["low_rank"][n0].update(layout="direct")))
    with pytest.raises(CorruptFileError, match="format_version 1"):
        TaskVector.from_pretrained(variant("old", lambda c: c.update(format_version=1)))
    with pytest.raises(HfTaujpError, match="newer"):
        TaskVector.from_pretrained(variant("new", lambda c: c.update(format_version=3)))
    with pytest.raises(HfTaujpError, match="NaN or inf"):
        TaskVector({n0: LowRankTau(torch.full((2, 3), float("inf")), torch.ones(4, 2))}).save_pretrained(tmp_path / "x")


# ------------------------------------------------------------------------------------------ merges
def _stats(base, names, seed):
    g = torch.Generator().manual_seed(seed)
    params = dict(base.named_parameters())
    return {n: torch.rand(params[n].shape, generator=g) + 0.1 for n in names}


def _grams(base, names, seed):
    """(in, in) PSD Grams for the 2-D weights (Conv1D (in, out): in = shape[0]; nn.Linear: shape[1])."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        mod = base.get_submodule(n.rsplit(".", 1)[0])
        if n.endswith(".weight") and isinstance(mod, (Conv1D, torch.nn.Linear)):
            d = mod.weight.shape[0] if isinstance(mod, Conv1D) else mod.weight.shape[1]
            x = torch.randn(3 * d, d, generator=g)
            out[n] = x.t() @ x
    return out


METHODS = {
    "task_arithmetic": dict(weights=[1.0, -0.5]),
    "ties": dict(density=0.5, weights=[1.0, 0.7]),
    "dare_linear": dict(density=0.5, seed=3),
    "dare_ties": dict(density=0.5, seed=3),
    "magnitude_prune": dict(density=0.4),
    "fisher_average": "fishers",
    "gradient_matching": "fishers+base",
    "regmean": "grams",
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_merge_method_gets_the_full_tensors_of_factored_vectors(method):
    """Each registered method with factored LoRA vectors (Conv1D, Linear and Embedding layers) equals the
    merge of the same vectors materialised: bit for bit (no tensor is truncated to its rank)."""
    base = _tiny_cls()
    tvs = [TaskVector.from_peft(_lora(base, seed=s, target_modules=["c_attn", "c_fc", "score", "wte"]), factored=True)
           for s in (1, 2)]
    dense = [t.to_dense() for t in tvs]
    names = sorted(tvs[0])
    kw = METHODS[method]
    if kw == "fishers":
        kw = dict(fishers=[_stats(base, names, 1), _stats(base, names, 2)])
    elif kw == "fishers+base":
        kw = dict(fishers=[_stats(base, names, 1), _stats(base, names, 2)], base_fisher=_stats(base, names, 3))
    elif kw == "grams":
        kw = dict(grams=[_grams(base, names, 1), _grams(base, names, 2)])
    got = merge(base, tvs, method, progress=False, **kw)
    want = merge(base, dense, method, progress=False, **kw)
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), k
    if method != "task_arithmetic":  # every other method returns the full tensor per tensor
        tv = merge(base, tvs, method, progress=False, return_task_vector=True, **kw)
        assert not tv.is_low_rank


def test_task_arithmetic_of_factored_vectors_keeps_the_factored_sum():
    """Δ = λ Σ α_t τ_t of factored τ_t is the factored sum (rank Σ r_t), equal to the full merge; linear vectors
    too. A vector holding a name as a full tensor makes that name full."""
    base = tiny_gpt2()
    tvs = [TaskVector.from_peft(_lowrank(base, seed=s), factored=True) for s in (1, 2, 3)]
    dense = [t.to_dense() for t in tvs]
    kw = dict(weights=[1.0, -0.5, 0.25], lambda_=0.8, return_task_vector=True, progress=False)
    got = merge(base, tvs, "task_arithmetic", **kw)
    want = merge(base, dense, "task_arithmetic", **kw)
    assert got.kind == "linear" and got.is_low_rank and set(got.ranks.values()) == {6}
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6)
    mixed = merge(base, [tvs[0], dense[1]], "task_arithmetic", return_task_vector=True, progress=False)
    assert not mixed.is_low_rank
    # the linear result applied (the tangent reading) equals the full merge's
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a = merge(base, tvs, "task_arithmetic", weights=[1.0, -0.5, 0.25], progress=False)(input_ids=ids).logits
        b = merge(base, dense, "task_arithmetic", weights=[1.0, -0.5, 0.25], progress=False)(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # TIES on linear factored vectors: the full tensors, bit for bit the dense merge
    t1 = merge(base, tvs, "ties", density=0.3, return_task_vector=True, progress=False)
    t2 = merge(base, dense, "ties", density=0.3, return_task_vector=True, progress=False)
    assert not t1.is_low_rank and all(torch.equal(t1[n], t2[n]) for n in t2)


@pytest.mark.parametrize("method, kw", [("task_arithmetic", dict(weights=[1.0, -0.5])), ("ties", dict(density=0.5)),
                                        ("dare_ties", dict(density=0.5, seed=3))])
def test_streaming_reads_factored_vector_folders(tmp_path, method, kw):
    """merge_streaming over factored folders (the full τ materialised tensor by tensor; slices that cut rows)
    equals the in-memory merge of the materialised vectors."""
    base = tiny_gpt2(GPT2LMHeadModel, seed=0, n_embd=16, vocab_size=50).eval()
    base.save_pretrained(tmp_path / "base")
    tvs = [TaskVector.from_peft(_lora(base, seed=s, target_modules=["c_attn", "c_proj", "wte"]), factored=True)
           for s in (1, 2)]
    dirs = []
    for k, tv in enumerate(tvs):
        tv.save_pretrained(tmp_path / f"tv{k}")
        dirs.append(str(tmp_path / f"tv{k}"))
    want = merge(base, [t.to_dense() for t in tvs], method, progress=False, **kw).state_dict()
    out = merge_streaming(str(tmp_path / "base"), dirs, str(tmp_path / "out"), method, chunk_elements=37,
                          progress=False, **kw)
    got = GPT2LMHeadModel.from_pretrained(out).state_dict()
    for n, p in want.items():
        torch.testing.assert_close(got[n], p, atol=1e-6, rtol=1e-6, msg=n)


def test_streaming_a_factored_linear_vector_gives_a_task_vector(tmp_path):
    base = tiny_gpt2(seed=0).eval()
    base.save_pretrained(tmp_path / "base")
    tvs = [TaskVector.from_peft(_lowrank(base, seed=s), factored=True) for s in (1, 2)]
    for k, tv in enumerate(tvs):
        tv.save_pretrained(tmp_path / f"tv{k}")
    out = merge_streaming(str(tmp_path / "base"), [str(tmp_path / "tv0"), str(tmp_path / "tv1")], str(tmp_path / "o"),
                          "task_arithmetic", weights=[0.5, 0.5], progress=False)
    got = TaskVector.from_pretrained(out)
    want = merge(base, [t.to_dense() for t in tvs], "task_arithmetic", weights=[0.5, 0.5], return_task_vector=True,
                 progress=False)
    assert got.kind == "linear" and sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-6)
    with LowRankVectorReader(str(tmp_path / "tv0"), json.loads((tmp_path / "tv0" / "config.json").read_text())) as r:
        n0 = sorted(tvs[0])[0]
        assert sorted(r.keys()) == sorted(tvs[0]) and r.shape(n0) == tuple(tvs[0][n0].shape)
        assert torch.equal(r.get(n0), tvs[0][n0])


# ------------------------------------------------------------------------------------------ to_peft
def test_to_peft_of_a_factored_vector_is_a_low_rank_adapter_with_its_factors():
    base = tiny_llama()
    pm = _lowrank(base, targets=LLAMA_TARGETS)
    fac = TaskVector.from_peft(pm, factored=True)
    for alpha in (1.0, -0.5):
        back = fac.to_peft(base, alpha=alpha)
        assert back.base_model.is_low_rank() and back.peft_config["default"].r == 2
        again = TaskVector.from_peft(back)
        for n in fac:  # exact: the same factors, the scale carried by lora_alpha, the sign by B
            assert torch.equal(again[n], (fac * alpha)[n]), n
    ids = torch.tensor([[1, 5, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(fac.to_peft(base)(input_ids=ids).logits, pm(input_ids=ids).logits, atol=1e-6, rtol=1e-6)
    # ranks and scales that differ: zero-padded to the largest rank, scales folded into B
    other = TaskVector.from_peft(_lowrank(base, seed=9, targets=LLAMA_TARGETS, lora_alpha=3), factored=True)
    s = fac + 0.5 * other
    mix = TaskVector({**dict(s.entries), "model.layers.0.self_attn.q_proj.weight": fac.entries[
        "model.layers.0.self_attn.q_proj.weight"]}, kind="linear")
    back = TaskVector.from_peft(mix.to_peft(base), factored=True)
    assert back.ranks == {n: 4 for n in mix}
    for n in mix:
        torch.testing.assert_close(back[n], mix[n], atol=1e-6, rtol=1e-6)
    # full-rank on request
    assert not fac.to_peft(base, low_rank=False).base_model.is_low_rank()
    assert all(torch.equal(TaskVector.from_peft(fac.to_peft(base, low_rank=False))[n], fac[n]) for n in fac)


def test_to_peft_refuses_what_a_low_rank_adapter_cannot_hold():
    base = tiny_llama()
    fac = TaskVector.from_peft(_lowrank(base, targets=["q_proj", "v_proj"]), factored=True)
    head = {"lm_head.weight": torch.ones_like(base.lm_head.weight)}
    with pytest.raises(HfTaujpError, match="stored as full tensors.*low_rank=False"):
        (fac + TaskVector(head, kind="linear", base_fingerprint=fac.base_fingerprint)).to_peft(base)
    big = sum([fac] * 9)  # rank 18 > 16 = min(out, in) of q_proj
    with pytest.raises(HfTaujpError, match="exceeds min\\(out, in\\).*low_rank=False"):
        big.to_peft(base)
    assert big.to_peft(base, low_rank=False) is not None  # the full path holds it
