"""f_lin(x; θ0+τ) = f(x; θ0) + J f(x; θ0)·τ, checked against float64 finite differences."""

import copy
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_taujp.hub import HfTaujpError
from hf_taujp.linearize import contiguous_head_input, linearize, linearized_forward


def tiny_gpt2(attn="sdpa", dropout=0.0):
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)


def tiny_bert():
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification._from_config(cfg, attn_implementation="sdpa")


def random_tau(names_params, scale=1e-2):
    return {n: scale * torch.randn_like(p) for n, p in names_params}


def fd_reference(model, tau, kwargs, key="logits", eps=1e-4):
    """f(θ0) and the float64 central difference (f(θ0+ετ) − f(θ0−ετ)) / 2ε."""
    m64 = copy.deepcopy(model).double()
    params = dict(m64.named_parameters())

    def f(sign):
        with torch.no_grad():
            for n, t in tau.items():
                params[n].add_(sign * eps * t.double())
            out = m64(**kwargs)[key]
            for n, t in tau.items():
                params[n].sub_(sign * eps * t.double())
        return out

    with torch.no_grad():
        base = m64(**kwargs)[key]
    return base, (f(1) - f(-1)) / (2 * eps)


def test_gpt2_linearized_equals_base_plus_finite_difference():
    model = tiny_gpt2().eval()  # eval + sdpa: the fused kernel would be chosen without routing
    x = torch.randint(0, 100, (2, 7))
    tau = random_tau(model.named_parameters())
    base64, dir64 = fd_reference(model, tau, {"input_ids": x})
    lin = linearize(model, tangents=tau)
    out = lin(input_ids=x)
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"
    torch.testing.assert_close(out.logits.double(), base64 + dir64, atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"


def test_tau_zero_is_base_exactly_and_loss_is_ce_of_linearized_logits():
    model = tiny_gpt2(attn="eager").eval()
    x = torch.randint(0, 100, (3, 6))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    lin = linearize(model)
    primal, tangent = lin.jvp(input_ids=x)
    assert torch.count_nonzero(tangent.logits) == 0  # τ = 0 → J·τ = 0 exactly
    assert torch.equal(lin(input_ids=x).logits, primal.logits)
    # forward-AD mode may pick other (equally valid) float kernels: equal to rounding, not bitwise
    torch.testing.assert_close(primal.logits, ref, atol=1e-6, rtol=1e-6)
    lin.set_tangents(random_tau(model.named_parameters()))
    out = lin(input_ids=x, labels=x)
    logits = out.logits.detach().double()
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), x[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss.double(), by_hand, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in lin.tau)
    assert all(p.grad is None for p in model.parameters())


def test_partial_linearization_only_targets_trainable():
    model = tiny_gpt2().eval()
    lin = linearize(model, ["c_attn"])
    assert lin.parameter_names == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                                   "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias"]
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == [f"tau.{i}" for i in range(4)]
    tau = random_tau((n, dict(model.named_parameters())[n]) for n in lin.parameter_names)
    lin.set_tangents(tau)
    x = torch.randint(0, 100, (2, 5))
    base64, dir64 = fd_reference(model, tau, {"input_ids": x})
    torch.testing.assert_close(lin(input_ids=x).logits.double(), base64 + dir64, atol=1e-4, rtol=1e-4)


def test_train_mode_dropout_same_mask_for_primal_and_tangent():
    model = tiny_gpt2(attn="eager", dropout=0.3).train()
    x = torch.randint(0, 100, (2, 6))
    params = dict(model.named_parameters())
    tau = random_tau(params.items())
    m64 = copy.deepcopy(model).double()
    p64 = dict(m64.named_parameters())

    def f(eps):
        torch.manual_seed(123)
        with torch.no_grad():
            for n, t in tau.items():
                p64[n].add_(eps * t.double())
            out = m64(input_ids=x).logits
            for n, t in tau.items():
                p64[n].sub_(eps * t.double())
        return out

    ref_primal, ref_tangent = f(0.0), (f(1e-4) - f(-1e-4)) / 2e-4
    torch.manual_seed(123)
    # mode="train" keeps dropout inside the jvp (the default, "eval", linearizes without it)
    primal, tangent = linearized_forward(model, {n: p.detach() for n, p in params.items()}, tau, (), {"input_ids": x},
                                         mode="train")
    torch.testing.assert_close(primal.logits.double(), ref_primal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tangent.logits.double(), ref_tangent, atol=1e-4, rtol=1e-4)


def test_bert_sequence_classification_loss_and_fd():
    model = tiny_bert().eval()
    x = torch.randint(0, 100, (4, 6))
    y = torch.tensor([0, 2, 1, 2])
    tau = random_tau(model.named_parameters())
    base64, dir64 = fd_reference(model, tau, {"input_ids": x})
    lin = linearize(model, tangents=tau)
    out = lin(input_ids=x, labels=y)
    torch.testing.assert_close(out.logits.double(), base64 + dir64, atol=1e-4, rtol=1e-4)
    by_hand = torch.nn.functional.cross_entropy(base64 + dir64, y)
    torch.testing.assert_close(out.loss.double(), by_hand, atol=1e-4, rtol=1e-4)


def test_config_restored_for_non_sdpa_implementation_even_on_error():
    model = tiny_gpt2().eval()
    model.config._attn_implementation_internal = "flex_attention"  # pretend: routed to sdpa inside
    lin = linearize(model)
    lin(input_ids=torch.randint(0, 100, (1, 4)))
    assert model.config._attn_implementation_internal == "flex_attention"
    with pytest.raises(Exception):
        lin(input_ids=torch.randint(0, 100, (1, 100)))  # beyond n_positions
    assert model.config._attn_implementation_internal == "flex_attention"


def test_set_tangents_errors_and_merge():
    model = tiny_gpt2().eval()
    lin = linearize(model, ["c_fc"])
    names = lin.parameter_names
    with pytest.raises(HfTaujpError, match="Missing"):
        lin.set_tangents({names[0]: torch.zeros_like(lin.tau[0])})
    with pytest.raises(HfTaujpError, match="Unexpected"):
        lin.set_tangents({"nope": torch.zeros(1)}, strict=False)
    with pytest.raises(HfTaujpError, match="shape"):
        lin.set_tangents({n: torch.zeros(3) for n in names})
    with pytest.raises(HfTaujpError, match="matches no parameter"):
        linearize(tiny_gpt2(), ["does_not_exist"])
    tau = {n: torch.ones_like(t) for n, t in zip(names, lin.tau)}
    lin.set_tangents(tau)
    before = dict(model.named_parameters())[names[0]].detach().clone()
    merged = lin.merge_and_unload()
    torch.testing.assert_close(dict(merged.named_parameters())[names[0]].detach(), before + 1)


def test_t5_labels_build_decoder_inputs_and_ce_of_linearized_logits():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0,
                   pad_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    x = torch.randint(1, 50, (2, 5))
    y = torch.randint(1, 50, (2, 4))
    y[1, -1] = -100
    dec = model._shift_right(y)
    tau = random_tau(model.named_parameters())
    # T5LayerNorm computes in float32 even in a float64 model, which ruins finite differences: the
    # reference is autograd's double-backward jvp on a float64 copy (independent of torch.func).
    m64 = copy.deepcopy(model).double()
    names = list(tau)

    def f(*ps):
        out = torch.func.functional_call(m64, dict(zip(names, ps)), (), {"input_ids": x, "decoder_input_ids": dec})
        return out.logits

    p64 = dict(m64.named_parameters())
    with sdpa_kernel([SDPBackend.MATH]):  # double backward needs the math kernel too
        base64, dir64 = torch.autograd.functional.jvp(f, tuple(p64[n] for n in names), tuple(tau[n].double() for n in names))
    out = linearize(model, tangents=tau)(input_ids=x, labels=y)
    torch.testing.assert_close(out.logits.double(), base64 + dir64, atol=1e-4, rtol=1e-4)
    by_hand = torch.nn.functional.cross_entropy((base64 + dir64).reshape(-1, 50), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss.double(), by_hand, atol=1e-4, rtol=1e-4)


def test_clip_image_features_method_and_contrastive_loss():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4),
        projection_dim=8,
    )
    model = CLIPModel._from_config(cfg, attn_implementation="sdpa").eval()
    pix = torch.randn(3, 3, 8, 8)
    ids = torch.randint(1, 60, (3, 5))
    tau = random_tau(model.named_parameters())
    lin = linearize(model, tangents=tau)
    primal, tangent = lin.jvp(pixel_values=pix, method="get_image_features")
    m64 = copy.deepcopy(model).double()
    p64 = dict(m64.named_parameters())

    def feats(eps):
        with torch.no_grad():
            for n, t in tau.items():
                p64[n].add_(eps * t.double())
            out = m64.get_image_features(pixel_values=pix.double())
            for n, t in tau.items():
                p64[n].sub_(eps * t.double())
        return out.pooler_output if hasattr(out, "pooler_output") else out

    get = lambda o: o.pooler_output if hasattr(o, "pooler_output") else o  # noqa: E731
    torch.testing.assert_close(get(primal).double(), feats(0.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(get(tangent).double(), (feats(1e-4) - feats(-1e-4)) / 2e-4, atol=1e-4, rtol=1e-4)
    def text_feats(eps):
        with torch.no_grad():
            for n, t in tau.items():
                p64[n].add_(eps * t.double())
            out = m64.get_text_features(input_ids=ids)
            for n, t in tau.items():
                p64[n].sub_(eps * t.double())
        return get(out)

    tp, tt = lin.jvp(input_ids=ids, method="get_text_features")
    torch.testing.assert_close(get(tp).double() + get(tt).double(),
                               text_feats(0.0) + (text_feats(1e-4) - text_feats(-1e-4)) / 2e-4, atol=1e-4, rtol=1e-4)
    out = lin(input_ids=ids, pixel_values=pix, return_loss=True)
    assert type(out) is type(model(input_ids=ids, pixel_values=pix))
    lt = out.logits_per_text.detach().double()
    target = torch.arange(3)
    by_hand = (torch.nn.functional.cross_entropy(lt, target) + torch.nn.functional.cross_entropy(lt.t(), target)) / 2
    torch.testing.assert_close(out.loss.double(), by_hand, atol=1e-5, rtol=1e-5)


def test_plain_pytorch_module_matches_closed_form_and_gradient():
    # f(x) = W2·tanh(W1·x + b1) + b2, so J·τ = W2·((1 − a²) ⊙ (τ_W1·x + τ_b1)) + τ_W2·a + τ_b2 by hand.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    w1, b1, w2, b2 = (p.detach().clone() for p in net.parameters())
    lin = linearize(net)
    assert lin.base_model is net and all(torch.count_nonzero(t) == 0 for t in lin.tau)  # τ = 0, θ0 not copied
    assert torch.equal(lin(x), net(x).detach())
    tau = {n: 0.1 * torch.randn_like(p) for n, p in net.named_parameters()}
    lin.set_tangents(tau)
    a = torch.tanh(x @ w1.T + b1)
    dh = x @ tau["0.weight"].T + tau["0.bias"]
    expected = a @ w2.T + b2 + (dh * (1 - a**2)) @ w2.T + a @ tau["2.weight"].T + tau["2.bias"]
    out = lin(x)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    g = torch.randn(4, 3, dtype=torch.float64)
    (out * g).sum().backward()
    # d/dτ_W2 ⟨g, f_lin⟩ = gᵀ·a and d/dτ_b1 = Σ_batch (1 − a²) ⊙ (g·W2): f_lin is linear in τ
    torch.testing.assert_close(lin.tau[2].grad, g.T @ a)
    torch.testing.assert_close(lin.tau[1].grad, ((g @ w2) * (1 - a**2)).sum(0))
    assert all(p.grad is None for p in net.parameters())


def _cpu_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A user-registered fused attention: the CPU flash kernel, which has no forward-AD formula."""
    _cpu_flash_attention.calls += 1
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


_cpu_flash_attention.calls = 0


def test_any_attn_implementation_is_routed_for_jvp():
    from transformers import AttentionInterface

    AttentionInterface.register("hf_taujp_test_fused_cpu", _cpu_flash_attention)
    model = tiny_gpt2(attn="hf_taujp_test_fused_cpu").eval()
    x = torch.randint(0, 100, (2, 7))
    before = _cpu_flash_attention.calls
    with torch.no_grad():
        plain = model(input_ids=x).logits
    assert _cpu_flash_attention.calls == before + 2  # the model really runs the fused kernel
    params = dict(model.named_parameters())
    with pytest.raises(NotImplementedError, match="forward AD"):  # without routing, jvp cannot go through it
        torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x,)).logits, (params,),
                       ({k: torch.zeros_like(v) for k, v in params.items()},))
    tau = random_tau(model.named_parameters())
    base64, dir64 = fd_reference(model, tau, {"input_ids": x})
    torch.testing.assert_close(plain.double(), base64, atol=1e-5, rtol=1e-5)
    calls = _cpu_flash_attention.calls
    out = linearize(model, tangents=tau)(input_ids=x)
    assert _cpu_flash_attention.calls == calls  # routed to a forward-AD-capable path inside the jvp
    torch.testing.assert_close(out.logits.double(), base64 + dir64, atol=1e-4, rtol=1e-4)
    assert model.config._attn_implementation == "hf_taujp_test_fused_cpu"


@pytest.mark.parametrize("supports_sdpa, expected", [(True, "sdpa"), (False, "eager")])
def test_routing_falls_back_to_eager_for_models_without_sdpa(supports_sdpa, expected):
    cls = type("GPT2NoSdpa" if not supports_sdpa else "GPT2Sdpa", (GPT2LMHeadModel,), {"_supports_sdpa": supports_sdpa})
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    model = cls._from_config(cfg, attn_implementation="eager").eval()
    model.config._attn_implementation_internal = "flash_attention_2"  # as if loaded with it on a GPU
    seen = []
    model.transformer.h[0].attn.register_forward_pre_hook(lambda m, a: seen.append(m.config._attn_implementation))
    linearize(model)(input_ids=torch.randint(0, 50, (1, 5)))
    assert seen == [expected] and model.config._attn_implementation_internal == "flash_attention_2"


# ---------------------------------------------------------------------------------- logits_to_keep
def test_logits_to_keep_slice_reaches_the_head_contiguous_with_unchanged_linearized_logits(monkeypatch):
    # SmolLM2's layout in miniature: Llama, grouped-query attention, output layer tied to the embeddings.
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    x = torch.randint(0, 100, (3, 6))
    tau = random_tau(model.named_parameters())
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(input_ids=x, logits_to_keep=2)
    assert seen == [False]  # the unpatched forward hands the head a strided (3, 2, 32) view
    # reference: the unpatched float64 forward, f(θ0) + central difference, on the same slice (ε = 1e-3:
    # Llama's RMSNorm computes in float32 even in a float64 model, so a smaller ε drowns in its rounding)
    base64, dir64 = fd_reference(model, tau, {"input_ids": x, "logits_to_keep": 2}, eps=1e-3)
    seen.clear()
    lin = linearize(model, tangents=tau)
    out = lin(input_ids=x, logits_to_keep=2)
    assert seen == [True]  # inside the linearized pass the head got a contiguous copy
    assert out.logits.shape == (3, 2, 100)
    torch.testing.assert_close(out.logits.double(), base64 + dir64, atol=1e-4, rtol=1e-4)
    with monkeypatch.context() as mp:  # and the linearized pass without the hook (the strided slow path)
        mp.setattr(sys.modules["hf_taujp.jvp_context"], "contiguous_head_input", lambda model: None)
        seen.clear()
        strided = lin(input_ids=x, logits_to_keep=2).logits
        assert seen == [False]
    torch.testing.assert_close(out.logits, strided, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.logits, lin(input_ids=x).logits[:, -2:], atol=1e-5, rtol=1e-5)
    assert not model.lm_head._forward_pre_hooks  # the pass took its hook off again
    # kept on a model (the recipes): once only, ordinary forwards unchanged
    handle = contiguous_head_input(model)
    assert handle is not None and contiguous_head_input(model) is None
    seen.clear()
    with torch.no_grad():
        kept = model(input_ids=x, logits_to_keep=2).logits
    assert seen == [True]
    torch.testing.assert_close(kept.double(), base64, atol=1e-5, rtol=1e-5)
    lin(input_ids=x, logits_to_keep=2)
    assert len(model.lm_head._forward_pre_hooks) == 1  # the pass did not add or remove a second one
    handle.remove()
    assert contiguous_head_input(tiny_bert()) is None  # no output layer: nothing to do
