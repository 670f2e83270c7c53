"""TaskVector: math against hand computations, Hub folder round trips, LoRA / linearized adapters, errors."""

import copy
import json
import os

import pytest
import torch

from hf_taujp.hub import BaseModelMismatchError, CorruptFileError, HfTaujpError, UnsafeFileError
from hf_taujp.task_vector import TaskVector, cosine_matrix, fingerprint
from tests.tiny_models import tiny_gpt2 as _tiny_gpt2


def tiny_gpt2(seed=0):
    return _tiny_gpt2(seed=seed, vocab_size=101).eval()


def perturbed(model, seed=1, scale=0.01):
    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


@pytest.fixture(scope="module")
def models():
    base = tiny_gpt2(0)
    return base, perturbed(base, 1), perturbed(base, 2)


IDS = torch.tensor([[1, 5, 7, 11, 3, 2]])


def test_from_models_is_hand_subtraction(models):
    base, ft, _ = models
    tv = TaskVector.from_models(base, ft, task="a")
    bp = dict(base.named_parameters())
    fp = dict(ft.named_parameters())
    assert set(tv.keys()) == set(bp)  # tied lm_head appears once
    for k in bp:
        assert torch.equal(tv[k], fp[k].detach() - bp[k].detach())
    assert tv.base_fingerprint == fingerprint(base)


def test_alpha_zero_and_one(models):
    base, ft, _ = models
    tv = TaskVector.from_models(base, ft)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    m0 = tv.apply_to(base, alpha=0.0)
    for k, v in m0.state_dict().items():
        assert torch.equal(v, before[k])
    m1 = tv.apply_to(base, alpha=1.0)
    with torch.no_grad():
        assert torch.allclose(m1(IDS).logits, ft(IDS).logits, atol=1e-5)
    # the caller's base is untouched
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])


def test_arithmetic_norm_cosine_vs_float64(models):
    base, ft1, ft2 = models
    a, b = TaskVector.from_models(base, ft1), TaskVector.from_models(base, ft2)
    fa = torch.cat([t.double().flatten() for t in a.values()])
    fb = torch.cat([b[k].double().flatten() for k in a.keys()])
    assert a.norm() == pytest.approx(float(fa.norm()), rel=1e-12)
    cos = float(fa @ fb / (fa.norm() * fb.norm()))
    assert a.cosine(b) == pytest.approx(cos, rel=1e-10)
    c = cosine_matrix([a, b, -a])
    expected = torch.tensor([[1, cos, -1], [cos, 1, -cos], [-1, -cos, 1]], dtype=torch.float64)
    assert torch.allclose(c, expected, atol=1e-10)
    s = sum([a, b])
    d = a - b
    m = 0.5 * a + a * 2 - a
    for k in a.keys():
        assert torch.equal(s[k], a[k] + b[k])
        assert torch.equal(d[k], a[k] - b[k])
        assert torch.allclose(m[k], 1.5 * a[k], atol=1e-7)


def test_fingerprint_dtype_robust_and_discriminating(models):
    base, _, _ = models
    fp = fingerprint(base)
    assert fingerprint(base.state_dict()) == fp
    for dt in (torch.bfloat16, torch.float16):
        sd = {k: v.to(dt) for k, v in base.state_dict().items()}
        assert fingerprint(sd) == fp
    assert fingerprint(tiny_gpt2(seed=5)) != fp
    # the same weights however they are listed: no tied lm_head (as save_pretrained writes them),
    # parameters only (no buffers), other names
    sd = base.state_dict()
    assert "lm_head.weight" in sd and torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    assert fingerprint({k: v for k, v in sd.items() if k != "lm_head.weight"}) == fp
    assert fingerprint(dict(base.named_parameters())) == fp
    assert fingerprint({"renamed." + k: v for k, v in sd.items()}) == fp
    # one weight changed in sign pattern, or one dropped, changes it
    sd2 = dict(sd)
    sd2["transformer.h.0.attn.c_attn.weight"] = -sd2["transformer.h.0.attn.c_attn.weight"]
    assert fingerprint(sd2) != fp
    assert fingerprint({k: v for k, v in sd.items() if k != "transformer.h.0.mlp.c_fc.weight"}) != fp


def test_save_load_apply_bit_for_bit(models, tmp_path):
    base, ft, _ = models
    tv = TaskVector.from_models(base, ft, task="toy", training={"taujp_lambda": 0.1, "taujp_mode": "cyclic"})
    tv.save_pretrained(tmp_path / "tv")
    files = sorted(os.listdir(tmp_path / "tv"))
    assert files == ["README.md", "config.json", "task_vector.safetensors"]
    cfg = json.loads((tmp_path / "tv" / "config.json").read_text())
    assert cfg["format"] == "hf-taujp/task_vector" and cfg["kind"] == "nonlinear" and cfg["task"] == "toy"
    card = (tmp_path / "tv" / "README.md").read_text()
    assert "library_name: hf-taujp" in card and "taujp" in card and "task-vector" in card
    back = TaskVector.from_pretrained(tmp_path / "tv")
    assert back.metadata() == tv.metadata()
    for k in tv.keys():
        assert torch.equal(back[k], tv[k])
    with torch.no_grad():
        assert torch.equal(back.apply_to(base)(IDS).logits, tv.apply_to(base)(IDS).logits)


def test_sharding_round_trip(models, tmp_path):
    base, ft, _ = models
    tv = TaskVector.from_models(base, ft)
    tv.save_pretrained(tmp_path / "tv", max_shard_size="20KB")
    files = os.listdir(tmp_path / "tv")
    shards = [f for f in files if f.startswith("task_vector-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and "task_vector.safetensors.index.json" in files
    back = TaskVector.from_pretrained(tmp_path / "tv")
    assert all(torch.equal(back[k], tv[k]) for k in tv.keys())


def test_bad_inputs(models, tmp_path):
    base, ft, _ = models
    tv = TaskVector.from_models(base, ft)
    other = TaskVector.from_models(tiny_gpt2(7), perturbed(tiny_gpt2(7)))
    with pytest.raises(BaseModelMismatchError, match="tjp2-"):
        tv + other
    assert len(tv.add(other, check_base=False)) == len(tv)
    with pytest.raises(BaseModelMismatchError):
        tv.apply_to(tiny_gpt2(7))
    named = TaskVector({"x": torch.ones(2)}, base_model="org/a")
    with pytest.raises(BaseModelMismatchError, match="org/a.*org/b"):
        named + TaskVector({"x": torch.ones(2)}, base_model="org/b")
    with pytest.raises(HfTaujpError, match="linear"):
        TaskVector({"x": torch.ones(2)}) + TaskVector({"x": torch.ones(2)}, kind="linear")
    k0 = next(iter(tv.keys()))
    extra = TaskVector({**tv.tensors, "nope.weight": torch.zeros(3)}, base_fingerprint=tv.base_fingerprint)
    with pytest.raises(HfTaujpError, match="nope.weight"):
        extra.apply_to(base)
    bad_shape = TaskVector({k0: torch.zeros(3, 3)}, base_fingerprint=tv.base_fingerprint)
    with pytest.raises(HfTaujpError, match=r"Shape mismatch.*\(3, 3\)"):
        bad_shape.apply_to(base)
    nan = TaskVector({k0: torch.full_like(tv[k0], float("nan"))})
    with pytest.raises(HfTaujpError, match="NaN"):
        nan.apply_to(base)
    with pytest.raises(HfTaujpError, match="NaN"):
        nan.save_pretrained(tmp_path / "nan")
    assert not (tmp_path / "nan").exists() and not [p for p in os.listdir(tmp_path) if "nan" in p]
    sd = dict(ft.state_dict())
    sd.pop(k0)
    with pytest.raises(HfTaujpError, match="lack"):
        TaskVector.from_state_dicts(base.state_dict(), sd)
    # bf16 vector on fp32 base: computed in fp32, cast to the parameter dtype
    m = tv.to(torch.bfloat16).apply_to(base)
    assert next(m.parameters()).dtype == torch.float32


def test_load_errors(models, tmp_path):
    base, ft, _ = models
    tv = TaskVector.from_models(base, ft)
    d = tmp_path / "tv"
    tv.save_pretrained(d)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptFileError, match="config.json"):
        TaskVector.from_pretrained(tmp_path / "empty")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "task_vector.bin").write_bytes(b"x" * 300)
    with pytest.raises(UnsafeFileError, match="pickle"):
        TaskVector.from_pretrained(tmp_path / "pickled")
    cfg = json.loads((d / "config.json").read_text())
    wrong = tmp_path / "wrong"
    tv.save_pretrained(wrong)
    (wrong / "config.json").write_text(json.dumps({**cfg, "format": "hf-taujp/fisher"}))
    with pytest.raises(HfTaujpError, match="format"):
        TaskVector.from_pretrained(wrong)
    st = d / "task_vector.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError):
        TaskVector.from_pretrained(d)


def test_save_failure_keeps_previous(models, tmp_path, monkeypatch):
    base, ft, _ = models
    tv = TaskVector.from_models(base, ft)
    d = tmp_path / "tv"
    tv.save_pretrained(d)
    before = sorted(os.listdir(d))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(TaskVector, "model_card", boom)
    with pytest.raises(RuntimeError):
        (2 * tv).save_pretrained(d)
    assert sorted(os.listdir(d)) == before
    assert sorted(os.listdir(tmp_path)) == ["tv"]
    assert torch.equal(TaskVector.from_pretrained(d)[next(iter(tv.keys()))], tv[next(iter(tv.keys()))])


# ------------------------------------------------------------------------------------- PEFT
def _lora_model(base, **kw):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, **kw)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return pm.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_vector_equals_hand_BA_and_merge(models, tmp_path, rslora):
    base, _, _ = models
    pm = _lora_model(base, use_rslora=rslora)
    tv = TaskVector.from_peft(pm, base=base)
    scale = 8 / (4 ** 0.5 if rslora else 4)
    sd = dict(pm.named_parameters())
    key = "transformer.h.0.attn.c_attn.weight"
    a = sd["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"].double()
    b = sd["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"].double()
    assert torch.allclose(tv[key].double(), (b @ a).T * scale, atol=1e-7)
    assert len(tv) == 4 and tv.kind == "nonlinear"
    with torch.no_grad():
        ref = pm(IDS).logits
        out = tv.apply_to(base)(IDS).logits
        merged = copy.deepcopy(pm).merge_and_unload()(IDS).logits
    assert torch.allclose(out, merged, atol=1e-5)
    assert torch.allclose(out, ref, atol=1e-5)
    # same vector from the saved adapter folder (which needs the base: the layer types decide the layout)
    pm.save_pretrained(tmp_path / "lora")
    with pytest.raises(HfTaujpError, match="needs base=.*Conv1D"):
        TaskVector.from_peft(tmp_path / "lora")
    tv2 = TaskVector.from_peft(tmp_path / "lora", base=base)
    assert all(torch.allclose(tv2[k], tv[k]) for k in tv.keys())


def test_linearized_adapter_dir(tmp_path):
    from safetensors.torch import save_file

    tau = torch.randn(8, 4)
    d = tmp_path / "lin"
    d.mkdir()
    save_file({"base_model.model.transformer.h.0.mlp.c_fc.linearized_tau.weight": tau}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LINEARIZED", "base_model_name_or_path": "org/base", "revision": "abc"})
    )
    tv = TaskVector.from_peft(d)
    assert tv.kind == "linear" and tv.base_model == "org/base" and tv.base_model_revision == "abc"
    assert list(tv.keys()) == ["transformer.h.0.mlp.c_fc.weight"] and torch.equal(tv["transformer.h.0.mlp.c_fc.weight"], tau)


def test_apply_linear_is_first_order_taylor(models):
    linearize_mod = pytest.importorskip("hf_taujp.linearize", reason="hf_taujp/linearize.py not written yet")
    del linearize_mod
    base, ft, _ = models
    key = "transformer.h.1.mlp.c_fc.weight"
    tau = 1e-3 * torch.randn_like(dict(base.named_parameters())[key])
    tv = TaskVector({key: tau}, kind="linear", base_fingerprint=fingerprint(base))
    lin = tv.apply_to(base, alpha=2.0, linear=True)
    # reference: f(θ0) + J·(2τ) by central finite differences in float64
    b64 = copy.deepcopy(base).double()
    p = dict(b64.named_parameters())[key]
    eps = 1e-4
    with torch.no_grad():
        p0 = p.detach().clone()
        p.copy_(p0 + eps * 2 * tau.double())
        up = b64(IDS).logits
        p.copy_(p0 - eps * 2 * tau.double())
        down = b64(IDS).logits
        p.copy_(p0)
        f0 = b64(IDS).logits
        expected = f0 + (up - down) / (2 * eps)
        out = lin(input_ids=IDS)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    assert torch.allclose(logits.double(), expected, atol=1e-4)


def test_from_state_dicts_is_hand_subtraction_and_rejects_extra_keys(models):
    base, ft, _ = models
    bsd, fsd = base.state_dict(), ft.state_dict()
    tv = TaskVector.from_state_dicts(bsd, fsd, task="sd")
    assert tv.base_fingerprint == fingerprint(base) and tv.task == "sd"
    for k, t in bsd.items():
        if t.is_floating_point():
            assert torch.equal(tv[k], fsd[k] - t)
    with pytest.raises(HfTaujpError, match="base lacks.*'extra.weight'"):
        TaskVector.from_state_dicts(bsd, {**fsd, "extra.weight": torch.zeros(2)})
    with pytest.raises(HfTaujpError, match=r"Shape mismatch.*\(2,\)"):
        TaskVector.from_state_dicts({"w": torch.zeros(3)}, {"w": torch.zeros(2)})


def test_sum_of_three_and_scalar_forms(models):
    base, ft1, ft2 = models
    a, b = TaskVector.from_models(base, ft1), TaskVector.from_models(base, ft2)
    c = 0.5 * b
    s = sum([a, b, c])
    for k in a.keys():
        torch.testing.assert_close(s[k], a[k] + b[k] + 0.5 * b[k], atol=1e-7, rtol=0)
        torch.testing.assert_close((a / 4)[k], a[k] * 0.25, atol=0, rtol=0)
    assert s.base_fingerprint == a.base_fingerprint


def test_apply_never_mutates_base_unless_inplace(models):
    base, ft, _ = models
    key = "transformer.h.1.mlp.c_fc.weight"
    before = {k: v.clone() for k, v in base.state_dict().items()}
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    tv = TaskVector.from_models(base, ft)
    lin_tv = TaskVector({key: 1e-3 * torch.ones_like(tv[key])}, kind="linear", base_fingerprint=fingerprint(base))
    lin = lin_tv.apply_to(base, alpha=0.5, linear=True)
    assert lin.base_model is not base and torch.equal(lin.get_tangents()[key], 0.5e-3 * torch.ones_like(tv[key]))
    nonlin = tv.apply_to(base, alpha=0.3)
    assert nonlin is not base
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert {n: p.requires_grad for n, p in base.named_parameters()} == grads
    # inplace=True: the caller's model itself becomes θ0 + α·τ
    target = copy.deepcopy(base)
    out = tv.apply_to(target, alpha=0.3, inplace=True)
    assert out is target
    assert all(torch.equal(out.state_dict()[k], v) for k, v in nonlin.state_dict().items())
    target = copy.deepcopy(base)
    assert lin_tv.apply_to(target, alpha=0.5, linear=True, inplace=True).base_model is target
    # the other reading of each kind is allowed, with a warning naming it (tests/test_linear_readings.py)
    with pytest.warns(UserWarning, match="weight reading"):
        lin_tv.apply_to(base, linear=False)
    with pytest.warns(UserWarning, match="tangent-space reading"):
        tv.apply_to(base, linear=True)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_base_check_can_be_overridden_explicitly(models):
    base, ft, _ = models
    tv = TaskVector.from_models(base, ft)
    other = tiny_gpt2(seed=7)
    with pytest.raises(BaseModelMismatchError, match="tjp2-"):
        tv.apply_to(other)
    moved = tv.apply_to(other, check_base=False)
    k = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(moved.state_dict()[k], other.state_dict()[k] + tv[k])


def test_dtype_and_finiteness_errors(models, tmp_path):
    base, ft, _ = models
    with pytest.raises(HfTaujpError, match="non-floating dtype torch.int64"):
        TaskVector({"w": torch.ones(2, dtype=torch.int64)})
    tv = TaskVector.from_models(base, ft)
    k0 = next(iter(tv.keys()))
    inf = TaskVector({k0: torch.full_like(tv[k0], float("inf"))})
    with pytest.raises(HfTaujpError, match=f"NaN or inf.*{k0}"):
        inf.apply_to(base, check_base=False)
    quantized = copy.deepcopy(base)
    quantized.transformer.wpe.weight = torch.nn.Parameter(torch.zeros(32, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(HfTaujpError, match="non-floating dtype torch.int8"):
        TaskVector({"transformer.wpe.weight": torch.zeros(32, 32)}).apply_to(quantized)
    d = tmp_path / "tv"
    tv.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    with pytest.raises(CorruptFileError, match="dtype.*bfloat16.*float32"):
        TaskVector.from_pretrained(d)
    # a file written by another tool with NaN inside is reported on load, naming the tensor
    from safetensors.torch import save_file

    (d / "config.json").write_text(json.dumps(cfg))
    bad = {k: v.clone() for k, v in tv.items()}
    bad[k0][0] = float("nan")
    save_file(bad, str(d / "task_vector.safetensors"))
    with pytest.raises(HfTaujpError, match=f"NaN or inf.*{k0}"):
        TaskVector.from_pretrained(d)


def test_model_card_summary(models, tmp_path):
    base, ft, _ = models
    plain = TaskVector.from_models(base, ft, task="sst2")
    card = plain.model_card().content
    assert "- task-vector" in card and "- task-arithmetic" in card and "- taujp" not in card
    assert f"{plain.norm():.6g}" in card and "`transformer.h.0.attn.c_attn`" in card and "(not recorded)" in card
    trained = TaskVector(plain.tensors, base_model="org/gpt2", base_model_revision="abc123", task="sst2",
                         training={"taujp_lambda": 0.1, "taujp_mode": "cyclic"})
    card = trained.model_card().content
    assert "base_model: org/gpt2" in card and "library_name: hf-taujp" in card and "- taujp" in card
    assert "`taujp_lambda`: 0.1" in card and "`taujp_mode`: cyclic" in card and "revision `abc123`" in card


def test_in_memory_peft_models_record_the_base_fingerprint(models):
    import peft

    from hf_taujp.tuners.linearized import LinearizedConfig

    base, _, _ = models
    lora = _lora_model(base)
    assert TaskVector.from_peft(lora).base_fingerprint == fingerprint(base)
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM", target_modules=["c_fc"]))
    tv = TaskVector.from_peft(pm)
    assert tv.kind == "linear" and tv.base_fingerprint == fingerprint(base)
    with pytest.raises(BaseModelMismatchError):
        tv.apply_to(tiny_gpt2(seed=7), linear=True)
