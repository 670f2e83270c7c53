"""The recipes' causal LMs run SDPA attention, i.e. hf-taujp's fused linearized attention inside every jvp.

The recipes left-pad causal batches, so the pad rows of a sequence see no key at all. The reference for the
τ-gradient there is the same model with eager attention (finite additive mask, the recipes' former choice):
on a left-padded batch whose loss reads only the real positions, both give the same f_lin and the same
∂loss/∂τ. GPT-2 is compared in float64; Llama in float32 (the recipes' dtype), because Llama's eager attention
is NaN on left-padded float64 batches: it adds float64's most negative number to the scores of a pad row and
takes the softmax in float32, where that number is −inf (softmax of a row of −inf: NaN).
"""

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_taujp.attention as attention
import hf_taujp.attention_jvp as attention_jvp
from hf_taujp.attention import MathAttentionWarning
from hf_taujp.linearize import linearize

V = 64


DTYPE = {"llama": torch.float32, "gpt2": torch.float64}  # see the module docstring
TOL = {torch.float32: dict(atol=2e-6, rtol=1e-4), torch.float64: {}}


def _tiny(arch, attn):
    torch.manual_seed(0)
    if arch == "llama":  # grouped-query attention, rotary positions
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0,
                          bos_token_id=1, eos_token_id=1)
        return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).to(DTYPE[arch]).eval()
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=32, attn_pdrop=0.0, resid_pdrop=0.0,
                     embd_pdrop=0.0, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn).to(DTYPE[arch]).eval()


def _left_padded_batch():
    """Three sequences of length 9: unpadded, a padded prefix of 4, and only the last 2 tokens real; explicit
    position ids counted from the first real token (as the recipes' collate does). Labels -100 on padding and on
    each first real token: its prediction would come from a pad row (the recipes label only answer tokens)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (3, 9), generator=g)
    am = torch.ones_like(ids)
    am[1, :4] = 0
    am[2, :7] = 0
    ids = ids.masked_fill(am == 0, 0)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    return dict(input_ids=ids, attention_mask=am, position_ids=pos, labels=ids.masked_fill(pos == 0, -100))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_tau_gradient_of_the_fused_path_is_finite_and_equals_eager(arch, monkeypatch):
    batch = _left_padded_batch()
    tau = {n: 0.05 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(5))
           for n, p in _tiny(arch, "eager").named_parameters()}
    results = {}
    for attn in ("sdpa", "eager"):
        model = _tiny(arch, attn)
        calls = []
        real = attention_jvp.linearized_sdpa
        monkeypatch.setattr(attention_jvp, "linearized_sdpa", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(attention, "_SAID", set())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lin = linearize(model, tangents=tau)
            out = lin(**batch)
            grads = torch.autograd.grad(out.loss, [p for p in lin.parameters() if p.requires_grad])
        monkeypatch.undo()
        assert bool(calls) == (attn == "sdpa")  # the sdpa model really ran the fused linearized op
        assert not [w for w in caught if issubclass(w.category, MathAttentionWarning)]
        results[attn] = out.loss.detach(), out.logits.detach(), grads
    (loss, logits, grads), (loss_e, logits_e, grads_e) = results["sdpa"], results["eager"]
    real_rows = batch["attention_mask"].bool()[..., None]
    tol = TOL[DTYPE[arch]]
    torch.testing.assert_close(logits * real_rows, logits_e * real_rows, **tol)
    torch.testing.assert_close(loss, loss_e, **tol)
    for a, b in zip(grads, grads_e, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)


def _model_folder(tmp_path, kind):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(V - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if kind == "llama":
        model = _tiny("llama", "eager")
    else:
        model = T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                    num_heads=2, pad_token_id=0, eos_token_id=1,
                                                    decoder_start_token_id=0))
    model.save_pretrained(tmp_path / kind)
    tok.save_pretrained(tmp_path / kind)
    return str(tmp_path / kind)


def test_recipes_load_causal_lms_with_sdpa_and_its_left_padded_gradient_equals_eager(tmp_path):
    from hf_taujp.recipes.models import load_text_model

    model, _, family = load_text_model(_model_folder(tmp_path, "llama"))
    assert family == "causal" and model.config._attn_implementation == "sdpa"
    t5, _, family = load_text_model(_model_folder(tmp_path, "t5"))
    assert family == "seq2seq" and t5.config._attn_implementation == "eager"  # unchanged for encoder-decoders
    eager = _tiny("llama", "eager")  # float32, as the recipe loads it
    eager.load_state_dict(model.state_dict())
    batch = _left_padded_batch()
    names = [n for n, _ in model.named_parameters() if ".layers.1." in n]  # the recipes' partial linearization
    grads = {}
    for key, m in (("recipe", model), ("eager", eager)):
        lin = linearize(m, parameter_names=names)
        with torch.no_grad():
            for t in lin.tau:
                t.normal_(0, 0.1, generator=torch.Generator().manual_seed(6))
        grads[key] = torch.autograd.grad(lin(**batch).loss, list(lin.tau))
    for a, b in zip(grads["recipe"], grads["eager"], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **TOL[torch.float32])
