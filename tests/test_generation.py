"""Decoding from f_lin(x) = f(x; θ0) + J f(x; θ0)·τ through transformers' own ``generate``.

References, none of them the code under test: the cache-free path (every step re-reads the prefix),
the jvp forward of :class:`LinearizedModule` (``torch.func.jvp``) on the generated sequence, the base
model's own ``generate`` at τ = 0, float64 central finite differences, and ``torch.func.jvp`` for
the forward-AD fast paths.
"""

import copy

import peft
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_taujp import generation
from hf_taujp.generation import FastForwardAD, linearized_generate
from hf_taujp.hub import HfTaujpError
from hf_taujp.linearize import linearize
from hf_taujp.tuners.linearized import LinearizedConfig

V = 100


def tiny_gpt2():
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=1,
                     pad_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama():
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                      pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def tiny_t5():
    cfg = T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def random_tau(model, scale=0.05):
    return {n: scale * torch.randn_like(p) for n, p in model.named_parameters()}


def run(lin, seed=1, **kw):
    torch.manual_seed(seed)
    return lin.generate(return_dict_in_generate=True, output_logits=True, **kw)


def step_logits(out):
    return torch.stack(out.logits, 1)  # (batch, new tokens, vocab)


# ---------------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("sampling", [False, True])
def test_cached_generation_gives_the_cache_free_tokens_and_logits(arch, sampling):
    base = MODELS[arch]()
    lin = linearize(base, tangents=random_tau(base))
    x = torch.randint(2, V, (2, 5))
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10, min_new_tokens=4, do_sample=sampling,
              top_k=20, top_p=0.9, temperature=0.8, repetition_penalty=1.3)
    cached, free = run(lin, use_cache=True, **kw), run(lin, use_cache=False, **kw)
    assert torch.equal(cached.sequences, free.sequences)
    assert cached.sequences.shape[0] == 2 and 9 <= cached.sequences.shape[1] <= 15  # min_new_tokens honoured
    torch.testing.assert_close(step_logits(cached), step_logits(free), atol=1e-5, rtol=1e-5)
    assert cached.past_key_values is None  # its tangents end with the call: not handed out


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_generated_logits_are_the_jvp_linearization_of_the_generated_prefixes(arch):
    base = MODELS[arch]()
    lin = linearize(base, tangents=random_tau(base))
    x = torch.randint(2, V, (2, 5))
    out = run(lin, input_ids=x, max_new_tokens=8, do_sample=True)
    # f_lin at every prefix, from one torch.func.jvp pass over the whole generated sequence.
    ref = lin(input_ids=out.sequences[:, :-1]).logits[:, 4:]
    torch.testing.assert_close(step_logits(out), ref, atol=2e-5, rtol=1e-5)
    # and it is not the base model: τ moves the logits
    assert (step_logits(out) - base(input_ids=out.sequences[:, :-1]).logits[:, 4:]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_zero_tau_generates_what_the_base_model_generates(arch):
    base = MODELS[arch]()
    lin = linearize(copy.deepcopy(base))  # τ = 0
    x = torch.randint(2, V, (2, 6))
    for sampling in (False, True):
        kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=sampling, top_k=10)
        got = run(lin, **kw)
        torch.manual_seed(1)
        want = base.generate(return_dict_in_generate=True, output_logits=True, **kw)
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(step_logits(got), step_logits(want), atol=1e-5, rtol=1e-5)


def test_first_step_logits_equal_base_plus_finite_difference_jvp():
    base = tiny_gpt2().double()
    tau = random_tau(base)
    x = torch.randint(2, V, (2, 5))
    out = run(linearize(copy.deepcopy(base), tangents=tau), input_ids=x, max_new_tokens=1)
    params, eps = dict(base.named_parameters()), 1e-5

    def f(sign):  # f(x; θ0 + sign·ε·τ), float64
        with torch.no_grad():
            for n, t in tau.items():
                params[n].add_(sign * eps * t)
            y = base(input_ids=x).logits[:, -1]
            for n, t in tau.items():
                params[n].sub_(sign * eps * t)
        return y

    want = f(0) + (f(1) - f(-1)) / (2 * eps)
    torch.testing.assert_close(out.logits[0].double(), want, atol=1e-7, rtol=1e-7)


def test_beam_search_and_num_return_sequences_reorder_the_tangent_cache():
    base = tiny_llama()
    lin = linearize(base, tangents=random_tau(base))
    x = torch.randint(2, V, (2, 5))
    kw = dict(input_ids=x, max_new_tokens=6, num_beams=3, num_return_sequences=2, output_scores=True,
              return_dict_in_generate=True)
    cached, free = lin.generate(**kw), lin.generate(use_cache=False, **kw)
    assert cached.sequences.shape == (4, 11)
    assert torch.equal(cached.sequences, free.sequences)
    torch.testing.assert_close(cached.sequences_scores, free.sequences_scores, atol=1e-5, rtol=1e-5)


class SoftCappedGPT2(GPT2LMHeadModel):
    """Logits soft-capped after the output layer (as Gemma 2 does): f_lin must linearize the tanh too."""

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out


@pytest.mark.parametrize("capped", [False, True])
def test_output_layer_sums_primal_and_tangent_only_when_its_result_is_the_logits(capped, monkeypatch):
    base = SoftCappedGPT2(tiny_gpt2().config).eval() if capped else tiny_gpt2()
    lin = linearize(base, tangents=random_tau(base, scale=0.2))
    calls = []
    fused = generation._LinearizedOutputs._fused_head
    monkeypatch.setattr(generation._LinearizedOutputs, "_fused_head", lambda self, x: calls.append(1) or fused(self, x))
    x = torch.randint(2, V, (2, 5))
    out = run(lin, input_ids=x, max_new_tokens=5, min_new_tokens=5)
    assert len(calls) == (0 if capped else 4)  # every step after the checking first one
    ref = lin(input_ids=out.sequences[:, :-1]).logits[:, 4:]
    torch.testing.assert_close(step_logits(out), ref, atol=2e-5, rtol=1e-5)
    assert "forward" not in vars(base.lm_head)  # the head's own forward is back


@pytest.mark.parametrize("linearized", ["weight_only", "left_out"])
def test_fused_output_layer_with_a_partially_linearized_head(linearized):
    base = tiny_llama()  # untied lm_head
    tau = {n: t for n, t in random_tau(base).items() if (n == "lm_head.weight") == (linearized == "weight_only")}
    lin = linearize(base, tangents=tau)
    x = torch.randint(2, V, (2, 5))
    out = run(lin, input_ids=x, max_new_tokens=4, min_new_tokens=4)
    ref = lin(input_ids=out.sequences[:, :-1]).logits[:, 4:]
    torch.testing.assert_close(step_logits(out), ref, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- PEFT and T5
def test_peft_causal_lm_generate_takes_generation_config_and_logits_processors():
    base = tiny_gpt2()
    tau = random_tau(base)
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM"))
    pm.set_tangents(tau)
    lin = linearize(copy.deepcopy(base), tangents=tau)
    x = torch.randint(2, V, (1, 4))
    banned = [[7], [8]]
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=30, num_return_sequences=3, pad_token_id=1,
                           eos_token_id=1)
    procs = LogitsProcessorList([NoBadWordsLogitsProcessor(banned, eos_token_id=1)])
    torch.manual_seed(3)
    got = pm.generate(input_ids=x, generation_config=cfg, logits_processor=procs)
    torch.manual_seed(3)
    want = lin.generate(input_ids=x, generation_config=cfg, logits_processor=procs)
    assert got.shape[0] == 3 and torch.equal(got, want)  # the PEFT tuner and LinearizedModule agree
    assert not torch.isin(got[:, 4:], torch.tensor([7, 8])).any()
    with pm.disable_adapter():  # adapters off: the base model's own generate
        torch.manual_seed(3)
        plain = pm.generate(input_ids=x, generation_config=cfg)
    torch.manual_seed(3)
    assert torch.equal(plain, base.generate(input_ids=x, generation_config=cfg))


def test_t5_greedy_decoding_with_the_decoder_cache():
    base = tiny_t5()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="SEQ_2_SEQ_LM"))
    pm.set_tangents(random_tau(base, scale=0.1))
    x = torch.randint(2, V, (2, 7))
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, min_new_tokens=6,
              return_dict_in_generate=True, output_logits=True)
    cached, free = pm.generate(**kw), pm.generate(use_cache=False, **kw)
    assert torch.equal(cached.sequences, free.sequences)
    # The encoder ran with dual parameters too: each step's logits are f_lin of the decoder prefix.
    ref = pm(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=cached.sequences[:, :-1]).logits
    torch.testing.assert_close(step_logits(cached), ref, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- bad input
def test_bad_generation_arguments_are_named():
    base = tiny_gpt2()
    lin = linearize(base, tangents=random_tau(base))
    x = torch.randint(2, V, (1, 4))
    cache = base(input_ids=x, use_cache=True).past_key_values
    with pytest.raises(HfTaujpError, match="holds no tangents"):
        lin.generate(input_ids=x, past_key_values=cache, max_new_tokens=2)
    with pytest.raises(HfTaujpError, match="cache_implementation='static'"):
        lin.generate(input_ids=x, cache_implementation="static", max_new_tokens=2)
    params = dict(base.named_parameters())
    with pytest.raises(HfTaujpError, match="shape"):
        linearized_generate(base, {"lm_head.weight": params["transformer.wte.weight"]},
                            {"lm_head.weight": torch.zeros(3)}, input_ids=x)
    with pytest.raises(HfTaujpError, match="missing"):
        linearized_generate(base, params, {}, input_ids=x)
    with pytest.raises(ValueError, match="max_new_tokens"):  # transformers' own validation still runs
        lin.generate(input_ids=x, max_new_tokens=-1)


def test_a_tangent_name_the_model_does_not_have_is_an_error_not_a_silent_f():
    """Swapped in with strict=False, an unknown name used to be ignored: generate decoded f(x; θ0), not f_lin."""
    base = tiny_gpt2()
    params = dict(base.named_parameters())
    x = torch.randint(2, V, (1, 4))
    typo = "transformer.h.0.attn.c_atn.weight"
    with pytest.raises(HfTaujpError, match=r"Unknown tangent key\(s\) \['transformer.h.0.attn.c_atn.weight'\]") as info:
        linearized_generate(base, {typo: params["transformer.h.0.attn.c_attn.weight"]},
                            {typo: torch.ones_like(params["transformer.h.0.attn.c_attn.weight"])}, input_ids=x)
    assert "\n" not in str(info.value) and "GPT2LMHeadModel" in str(info.value)
    llama = tiny_llama()
    buffer = "model.rotary_emb.inv_freq"  # a buffer, not a parameter: τ is defined on parameters only
    inv_freq = dict(llama.named_buffers())[buffer]
    with pytest.raises(HfTaujpError, match="Unknown tangent key.*inv_freq.*LlamaForCausalLM"):
        linearized_generate(llama, {buffer: inv_freq}, {buffer: torch.ones_like(inv_freq)}, input_ids=x)
    with pytest.raises(HfTaujpError, match="is a list, not a tensor"):
        linearized_generate(base, {"lm_head.weight": params["transformer.wte.weight"]}, {"lm_head.weight": [0.0]},
                            input_ids=x)
    wte = params["transformer.wte.weight"]
    with pytest.raises(HfTaujpError, match="name one tied parameter"):
        linearized_generate(base, {"transformer.wte.weight": wte, "lm_head.weight": wte},
                            {"transformer.wte.weight": torch.zeros_like(wte), "lm_head.weight": torch.ones_like(wte)},
                            input_ids=x)


def test_a_tied_alias_is_a_known_name_and_decodes_like_the_canonical_one():
    """``lm_head.weight`` is GPT-2's tied alias of ``transformer.wte.weight``: either name linearizes the one tensor.
    Reference: the cache-free decoding of LinearizedModule with the canonical name."""
    base = tiny_gpt2()
    wte = dict(base.named_parameters())["transformer.wte.weight"]
    tau = 0.2 * torch.randn_like(wte)
    x = torch.randint(2, V, (2, 5))
    kw = dict(input_ids=x, max_new_tokens=5, return_dict_in_generate=True, output_logits=True)
    got = linearized_generate(base, {"lm_head.weight": wte}, {"lm_head.weight": tau}, **kw)
    want = linearize(base, tangents={"transformer.wte.weight": tau}).generate(use_cache=False, **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(step_logits(got), step_logits(want), atol=1e-5, rtol=1e-5)
    assert (got.logits[0] - base.generate(**kw).logits[0]).abs().max() > 1e-3  # τ moved the first step's logits


# ---------------------------------------------------------------------------------- fast paths
@pytest.mark.parametrize("case", ["scalar", "broadcast", "reversed", "linear", "linear_no_bias", "addmm"])
def test_fast_forward_ad_rules_equal_torch_func_jvp(case):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, tx, w, tw, b, tb = r(3, 4), r(3, 4), r(5, 4), r(5, 4), r(5), r(5)
    y, xp, wp = r(1, 4), r(3, 4), r(5, 4)  # plain operands (no tangent): inputs, a layer left out
    fn = {
        "scalar": lambda x, w, b: [0.5 * x, x + 1.0, x - 2, x / 4.0, 3 - x, 2.0 + x, torch.mul(x, 0.3)],
        "broadcast": lambda x, w, b: [x * y, x + y, x - y, x / (y.abs() + 1), torch.add(x, y), y * x, b[:, None] * y],
        "reversed": lambda x, w, b: [y - x, y + x, y * x, torch.sub(y, x)],
        "linear": lambda x, w, b: [nn.functional.linear(x, w, b), nn.functional.linear(xp, w, b),
                                   nn.functional.linear(x, wp, b), nn.functional.linear(x, wp)],
        "linear_no_bias": lambda x, w, b: [nn.functional.linear(x[None], w), nn.functional.linear(xp, w)],
        "addmm": lambda x, w, b: [torch.addmm(b, x, w.t()), torch.addmm(b, xp, w.t()), torch.addmm(b, x, wp.t())],
    }[case]
    want_p, want_t = torch.func.jvp(fn, (x, w, b), (tx, tw, tb))
    with fwAD.dual_level():
        with FastForwardAD():
            got = fn(fwAD.make_dual(x, tx), fwAD.make_dual(w, tw), fwAD.make_dual(b, tb))
        pairs = [fwAD.unpack_dual(o) for o in got]
    for (p, t), ref_p, ref_t in zip(pairs, want_p, want_t, strict=True):
        torch.testing.assert_close(p, ref_p)
        torch.testing.assert_close(t, ref_t)


def test_fast_rules_take_over_mixed_dual_plain_ops_and_leave_the_rest():
    rules = generation._RULES
    with fwAD.dual_level():
        d = fwAD.make_dual(torch.ones(2), torch.ones(2))
        assert rules[torch.Tensor.__mul__](0, (d, 0.5), {}) is not NotImplemented  # one dual side: explicit rule
        assert rules[torch.Tensor.__mul__](0, (d, d), {}) is NotImplemented  # product rule: PyTorch's own
        assert rules[torch.add](0, (d, 1.0), {"alpha": 2}) is NotImplemented  # unknown keyword: PyTorch's own
        assert rules[torch.Tensor.__mul__](0, (torch.ones(2), 0.5), {}) is NotImplemented  # no dual at all
