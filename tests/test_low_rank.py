"""Low-rank tangents (LinearizedConfig(r=...)): τ_W = s·B·A inside the forward-mode pass.

References: the full-rank jvp with τ_W = s·B·A materialised (torch.func.jvp over the weights), central finite
differences of f(θ0 + ε·τ), PEFT LoRA's own factor shapes and scaling (a LoRA model with the same factors,
merged, is θ0 + τ), float64 throughout unless the test is about bf16.
"""

import copy

import peft
import pytest
import torch
from torch.func import functional_call

from hf_taujp import LinearizedConfig
from hf_taujp.errors import HfTaujpError
from tests.tiny_models import tiny_gpt2, tiny_llama

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _randomize_factors(pm, scale=0.3, seed=3):
    g = torch.Generator().manual_seed(seed)
    lin = pm.base_model
    new = {n: (scale * torch.randn(A.shape, generator=g, dtype=A.dtype), scale * torch.randn(B.shape, generator=g, dtype=B.dtype))
           for n, (A, B, _) in lin.get_factors().items()}
    lin.set_factors(new)
    return new


def _full_rank_reference(base, tau, ids, mask=None):
    """(f(x; θ0), J f(x; θ0)·τ) by torch.func.jvp over the weights, τ given as full tensors."""
    params = {n: p for n, p in base.named_parameters() if n in tau}

    def f(p):
        return functional_call(base, p, (ids,), {"attention_mask": mask, "use_cache": False}).logits

    return torch.func.jvp(f, (params,), ({n: tau[n] for n in params},))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_low_rank_tangent_equals_full_rank_jvp_and_finite_differences(arch):
    base = (tiny_llama(attn="eager") if arch == "llama" else tiny_gpt2(attn="eager")).double().eval()
    targets = LLAMA_TARGETS if arch == "llama" else ["c_attn", "c_proj", "c_fc"]
    ref_base = copy.deepcopy(base)
    pm = peft.get_peft_model(base, LinearizedConfig(task_type="CAUSAL_LM", r=3, lora_alpha=6, target_modules=targets))
    _randomize_factors(pm, scale=0.1)
    tau = pm.base_model.get_tangents()
    # τ = s·B·A in the weight's layout (Conv1D: transposed), s = lora_alpha / r
    for n, (A, B, s) in pm.base_model.get_factors().items():
        expect = s * B @ A
        w = ref_base.get_parameter(n)
        assert s == 2.0
        assert torch.allclose(tau[n], expect if w.shape == expect.shape and arch == "llama" else expect.t())
    ids = torch.randint(0, 30, (2, 7))
    primal, tangent = pm.base_model.jvp(input_ids=ids)
    p_ref, t_ref = _full_rank_reference(ref_base, tau, ids)
    assert torch.allclose(primal.logits, p_ref, atol=1e-10)
    assert torch.allclose(tangent.logits, t_ref, atol=1e-10)
    # central finite differences of f(θ0 + ε τ); Llama's RMSNorm computes in float32 even for a float64
    # model, so there ε is kept large enough (1e-3) that its rounding stays below the O(ε²) truncation error
    eps = 1e-3 if arch == "llama" else 1e-6
    plus, minus = copy.deepcopy(ref_base), copy.deepcopy(ref_base)
    with torch.no_grad():
        for n, t in tau.items():
            plus.get_parameter(n).add_(eps * t)
            minus.get_parameter(n).sub_(eps * t)
    fd = (plus(ids).logits - minus(ids).logits) / (2 * eps)
    assert torch.allclose(tangent.logits, fd, atol=1e-4)
    # f_lin = primal + tangent is the model's forward
    assert torch.allclose(pm(input_ids=ids).logits, p_ref + t_ref, atol=1e-10)


def test_gradients_of_the_factors_equal_the_chain_rule_through_full_rank_tau():
    base = tiny_llama(attn="eager").double()
    ref_base = copy.deepcopy(base).eval()
    pm = peft.get_peft_model(base, LinearizedConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=LLAMA_TARGETS))
    _randomize_factors(pm)
    ids = torch.randint(0, 30, (2, 6))

    def ce(logits):  # float64 (transformers' own loss upcasts to float32 only)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    loss = ce(pm(input_ids=ids).logits)
    loss.backward()
    got = {n: (A.grad.clone(), B.grad.clone()) for n, (A, B) in
           ((n, __import__("hf_taujp.tuners.linearized.layer", fromlist=["x"]).factors_of(
               pm.base_model.model, n.rsplit(".", 1)[0], "default")) for n in pm.base_model.parameter_names())}
    # reference: A, B as leaves, τ = s·B·A materialised, loss of f(θ0) + J·τ by torch.func.jvp
    leaves = {n: (A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_(), s)
              for n, (A, B, s) in pm.base_model.get_factors().items()}
    tau = {n: s * B @ A for n, (A, B, s) in leaves.items()}
    p_ref, t_ref = _full_rank_reference(ref_base, tau, ids)
    ref_loss = ce(p_ref + t_ref)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-12)
    for n, (A, B, _) in leaves.items():
        assert torch.allclose(got[n][0], A.grad, atol=1e-10), n
        assert torch.allclose(got[n][1], B.grad, atol=1e-10), n


def test_primal_path_is_not_differentiated():
    """Only the tangent path reaches the factors: the primal f(x; θ0) carries no autograd graph."""
    pm = peft.get_peft_model(tiny_llama(), LinearizedConfig(task_type="CAUSAL_LM", r=2, target_modules=LLAMA_TARGETS))
    _randomize_factors(pm)
    primal, tangent = pm.base_model.jvp(input_ids=torch.randint(0, 30, (1, 5)))
    assert not primal.logits.requires_grad and tangent.logits.requires_grad


def test_trainable_parameters_equal_peft_lora_and_tau_starts_at_zero():
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    lin = peft.get_peft_model(tiny_llama(), LinearizedConfig(**cfg))
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    n_lin = sum(p.numel() for p in lin.parameters() if p.requires_grad)
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert n_lin == n_lora
    assert all(float(t.abs().max()) == 0.0 for t in lin.base_model.get_tangents().values())
    ids = torch.randint(0, 30, (1, 5))
    lin.eval()
    with torch.no_grad():
        assert torch.allclose(lin(input_ids=ids).logits, tiny_llama().eval()(input_ids=ids).logits, atol=1e-6)


def test_merge_and_unload_equals_peft_lora_with_the_same_factors():
    """The non-linear reading θ0 + s·B·A: PEFT LoRA merged with the same A, B (PEFT's own get_delta_weight)."""
    cfg = dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM")
    lin = peft.get_peft_model(tiny_gpt2(), LinearizedConfig(**cfg))
    factors = _randomize_factors(lin, scale=0.1)
    lora = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(fan_in_fan_out=True, **cfg))
    with torch.no_grad():
        for n, (A, B) in factors.items():
            mod = lora.base_model.model.get_submodule(n.rsplit(".", 1)[0])
            mod.lora_A["default"].weight.copy_(A)
            mod.lora_B["default"].weight.copy_(B)
    merged_lin = lin.merge_and_unload()
    merged_lora = lora.merge_and_unload()
    for (n, a), (_, b) in zip(merged_lin.state_dict().items(), merged_lora.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_save_holds_the_factors_only_and_reloads(tmp_path):
    pm = peft.get_peft_model(tiny_gpt2(), LinearizedConfig(task_type="CAUSAL_LM", r=2, target_modules=["c_attn"]))
    _randomize_factors(pm)
    ids = torch.randint(0, 30, (2, 6))
    pm.eval()
    with torch.no_grad():
        before = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted({k.rsplit(".", 1)[1] for k in sd}) == ["lora_A", "lora_B"]
    n_saved = sum(t.numel() for t in sd.values())
    assert n_saved == 2 * (2 * 32 + 2 * 96)  # per layer: A (2 × 32) + B (96 × 2)
    re = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "a").eval()
    assert re.base_model.is_low_rank()
    with torch.no_grad():
        assert torch.allclose(re(input_ids=ids).logits, before, atol=1e-6)


def test_embedding_target_and_rslora_scaling():
    base = tiny_llama(attn="eager", tie_word_embeddings=False).double().eval()
    ref = copy.deepcopy(base)
    pm = peft.get_peft_model(base, LinearizedConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, use_rslora=True,
                                                    target_modules=["embed_tokens", "q_proj"]))
    assert pm.base_model.get_factors()["model.embed_tokens.weight"][2] == pytest.approx(4 / 2 ** 0.5)
    # PEFT's embedding initialisation: A = 0, B normal, so τ = 0
    A, B, _ = pm.base_model.get_factors()["model.embed_tokens.weight"]
    assert float(A.abs().max()) == 0.0 and float(B.abs().max()) > 0
    _randomize_factors(pm)
    tau = pm.base_model.get_tangents()
    assert tau["model.embed_tokens.weight"].shape == ref.model.embed_tokens.weight.shape
    ids = torch.randint(0, 30, (2, 5))
    _, tangent = pm.base_model.jvp(input_ids=ids)
    _, t_ref = _full_rank_reference(ref, tau, ids)
    assert torch.allclose(tangent.logits, t_ref, atol=1e-10)


def test_bf16_base_with_float32_factors_matches_float64_within_bf16_tolerance():
    ref = tiny_llama(attn="eager").double().eval()
    pm = peft.get_peft_model(tiny_llama(attn="eager").to(torch.bfloat16),
                             LinearizedConfig(task_type="CAUSAL_LM", r=4, target_modules=LLAMA_TARGETS))
    A, B, _ = next(iter(pm.base_model.get_factors().values()))
    assert A.dtype == torch.float32 and B.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    _randomize_factors(pm, scale=0.2)
    tau = {n: t.double() for n, t in pm.base_model.get_tangents().items()}
    ids = torch.randint(0, 30, (2, 6))
    primal, tangent = pm.base_model.jvp(input_ids=ids)
    assert tangent.logits.dtype == torch.bfloat16  # the tangent is carried in the base dtype
    p_ref, t_ref = _full_rank_reference(ref, tau, ids)
    rel = (tangent.logits.double() - t_ref).norm() / t_ref.norm()
    assert rel < 3e-2, float(rel)
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in pm.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-2), "r must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(r=4, lora_alpha=0), "lora_alpha must be a positive"),
    (dict(r=4, lora_alpha=-1.0), "lora_alpha must be a positive"),
    (dict(r=4, use_dora=True), "use_dora"),
    (dict(r=4, lora_bias=True), "lora_bias"),
    (dict(r=4, init_lora_weights=False), "init_lora_weights"),
    (dict(r=4, lora_dropout=1.0), "lora_dropout"),
    (dict(lora_alpha=16), "only apply to a low-rank tangent"),
])
def test_bad_low_rank_config_is_a_named_error(kwargs, message):
    kwargs = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(HfTaujpError, match=message):
        LinearizedConfig(task_type="CAUSAL_LM", **kwargs)


def test_low_rank_needs_target_modules():
    with pytest.raises(HfTaujpError, match="needs target_modules"):
        LinearizedConfig(task_type="CAUSAL_LM", r=4)


@pytest.mark.parametrize("targets, message", [
    (["self_attn"], "LlamaAttention cannot take a low-rank tangent"),
    (["input_layernorm"], "cannot take a low-rank tangent"),
    (["no_such_module"], "matches no nn.Linear"),
])
def test_bad_targets_are_named_errors(targets, message):
    with pytest.raises(HfTaujpError, match=message):
        peft.get_peft_model(tiny_llama(), LinearizedConfig(task_type="CAUSAL_LM", r=2, target_modules=targets))


def test_rank_above_a_targets_smaller_dimension_is_refused():
    # tiny Llama: k_proj is 8 × 16 (one KV head of 8)
    with pytest.raises(HfTaujpError, match=r"r=9 exceeds min\(out, in\) = 8 of model.layers.0.self_attn.k_proj"):
        peft.get_peft_model(tiny_llama(), LinearizedConfig(task_type="CAUSAL_LM", r=9, target_modules=["k_proj"]))


def test_tied_weight_target_is_refused():
    with pytest.raises(HfTaujpError, match="tied"):
        peft.get_peft_model(tiny_gpt2(), LinearizedConfig(task_type="CAUSAL_LM", r=2, target_modules=["wte"]))


def test_all_linear_skips_the_output_layer():
    pm = peft.get_peft_model(tiny_llama(tie_word_embeddings=False),
                             LinearizedConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear"))
    names = pm.base_model.parameter_names()
    assert "lm_head.weight" not in names and len(names) == 2 * 7


def test_set_tangents_on_a_low_rank_adapter_is_refused():
    pm = peft.get_peft_model(tiny_llama(), LinearizedConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))
    with pytest.raises(HfTaujpError, match="low-rank"):
        pm.base_model.set_tangents(pm.base_model.get_tangents())


def test_unknown_tangent_name_in_linearized_forward_is_an_error():
    from hf_taujp.linearize import linearized_forward

    m = tiny_llama()
    w = m.model.layers[0].self_attn.q_proj.weight
    with pytest.raises(HfTaujpError, match="not parameters of"):
        linearized_forward(m, {"model.layers.0.self_attn.q_projj.weight": w}, {"model.layers.0.self_attn.q_projj.weight": w},
                           kwargs={"input_ids": torch.ones(1, 3, dtype=torch.long)})


def test_two_low_rank_adapters_add_in_the_tangent_space():
    # GPT-2: float64 end to end (Llama's RMSNorm rounds through float32, which breaks exact additivity at 1e-8)
    base = tiny_gpt2(attn="eager").double().eval()
    cfg = dict(task_type="CAUSAL_LM", r=2, target_modules=["c_attn", "c_fc"])
    pm = peft.get_peft_model(base, LinearizedConfig(**cfg), adapter_name="a")
    pm.add_adapter("b", LinearizedConfig(**cfg))
    pm.base_model.set_adapter("a")
    _randomize_factors(pm, seed=1)
    ta = pm.base_model.get_tangents("a")
    pm.base_model.set_adapter("b")
    _randomize_factors(pm, seed=2)
    tb = pm.base_model.get_tangents("b")
    pm.base_model.set_adapter(["a", "b"])
    ids = torch.randint(0, 30, (1, 5))
    _, both = pm.base_model.jvp(input_ids=ids)
    pm.base_model.set_adapter("a")
    _, one = pm.base_model.jvp(input_ids=ids)
    pm.base_model.set_adapter("b")
    _, two = pm.base_model.jvp(input_ids=ids)
    assert torch.allclose(both.logits, one.logits + two.logits, atol=1e-10)
    assert set(ta) == set(tb)


def test_task_vector_from_a_low_rank_adapter_in_memory_and_saved(tmp_path):
    from hf_taujp import TaskVector

    base = tiny_gpt2()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                                   target_modules=["c_attn", "c_fc"]))
    factors = _randomize_factors(pm, scale=0.1)
    live = TaskVector.from_peft(pm)
    pm.save_pretrained(tmp_path / "a")
    saved = TaskVector.from_peft(str(tmp_path / "a"), base=base)
    assert live.kind == saved.kind == "linear"
    assert sorted(live) == sorted(saved) == sorted(factors)
    for n, (A, B) in factors.items():
        expect = (2.0 * B @ A).t()  # Conv1D weight (in, out)
        assert torch.allclose(live[n], expect, atol=1e-7) and torch.allclose(saved[n], expect, atol=1e-7)
        assert torch.linalg.matrix_rank(saved[n].double(), rtol=1e-5) <= 2
    # θ0 + τ (the non-linear reading) equals the adapter's merge_and_unload
    merged = saved.apply_to(base, linear=False)
    ref = pm.merge_and_unload()
    for (k, a), (_, b) in zip(merged.state_dict().items(), ref.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_deepspeed_zero3_partitioned_parameters_are_refused_by_name():
    """ZeRO-3 marks the parameters it partitions (``ds_id`` / ``ds_status``): refused before any τ exists."""
    m = tiny_llama()
    m.model.layers[0].self_attn.q_proj.weight.ds_id = 0
    with pytest.raises(HfTaujpError, match="DeepSpeed ZeRO-3"):
        peft.get_peft_model(m, LinearizedConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("method", ["nonlinear", "linear", "taujp"])
def test_recipe_finetune_with_rank_trains_lora_or_the_low_rank_tangent(tmp_path, method):
    """The recipes' `--rank R`: LoRA (non-linear) or the low-rank tangent (linear, τJp) on the Linear / Conv1D
    layers of the trained parameters; the task vector is τ = s·B·A of rank ≤ R, only those weights."""
    from hf_taujp.recipes.runner import METHODS, finetune
    from hf_taujp.trainer import TauJpConfig

    base = tiny_gpt2(dropout=0.0)
    names = [n for n, _ in base.named_parameters() if ".h.1." in n]
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (x := torch.randint(0, 60, (8,), generator=g)), "labels": x} for _ in range(8)]
    reg = {"other": [{"input_ids": torch.randint(0, 60, (8,), generator=g)} for _ in range(4)]}
    args = TauJpConfig(output_dir=str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                       report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, taujp_lambda=0.1,
                       taujp_batch_ratio=0.5, remove_unused_columns=False)
    tv, stats = finetune(base, names, METHODS[method], rows, args, regularization_datasets=reg, rank=2)
    assert sorted(tv) == ["transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight",
                          "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight"]
    assert tv.kind == ("nonlinear" if method == "nonlinear" else "linear")
    assert tv.training["rank"] == 2 and tv.training["lora_alpha"] == 4
    for n, t in tv.items():
        assert t.shape == base.get_parameter(n).shape
        assert float(t.abs().max()) > 0 and torch.linalg.matrix_rank(t.double(), rtol=1e-5) <= 2
