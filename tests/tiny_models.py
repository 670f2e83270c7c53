"""Tiny randomly initialised models for the tests: one builder per architecture, one place for their configs.

Each builder seeds the global RNG with ``seed`` (``None``: leaves it as it is, e.g. under conftest's per-test
seed), builds ``cls`` from the architecture's default tiny config updated with ``**config`` (transformers'
own config field names), and returns it in train mode as transformers does. ``attn`` picks the attention
implementation (``_from_config``); ``dropout=0.0`` zeroes every dropout probability of the config.
Tests that need another size say so at the call (``tiny_gpt2(n_layer=1, n_embd=8, vocab_size=30)``).
"""
from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    CLIPConfig,
    CLIPModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

GPT2 = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
BERT = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32)
T5 = dict(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0,
          pad_token_id=0)
LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32)
# the smallest GPT-2 the merge tests use (merges see every tensor: fewer and smaller is faster)
GPT2_MINI = dict(n_layer=1, n_embd=8, vocab_size=30, n_positions=8)
CLIP_TEXT = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=16)
CLIP_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                   patch_size=4)

# the config fields that hold a dropout probability, per architecture
_DROPOUT = {
    "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    "bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
    "t5": ("dropout_rate",),
    "llama": ("attention_dropout",),
}


class Scalar(torch.nn.Module):
    """The smallest model: one parameter ``w`` = [0.0] (protocol tests read their scores off ``w``)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def random_tau(peft_model, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """Set every τ of a LINEARIZED PEFT model to ``scale`` × N(0, 1) (a generator seeded with ``seed``, in
    the order of ``get_tangents()``) and return them."""
    g = torch.Generator().manual_seed(seed)
    tau = {n: scale * torch.randn(t.shape, generator=g) for n, t in peft_model.base_model.get_tangents().items()}
    peft_model.base_model.set_tangents(tau)
    return tau


def _build(cls, config, seed, attn):
    if seed is not None:
        torch.manual_seed(seed)
    return cls(config) if attn is None else cls._from_config(config, attn_implementation=attn)


def _fields(arch, defaults, dropout, config):
    fields = dict(defaults)
    if dropout is not None:
        fields.update({k: dropout for k in _DROPOUT[arch]})
    fields.update(config)
    return fields


def tiny_gpt2(cls=GPT2LMHeadModel, *, seed: int | None = 0, attn: str | None = None, dropout: float | None = None,
              **config):
    """GPT-2 (Conv1D layers, tied embeddings): 2 layers, width 32, 2 heads, vocabulary 100, 32 positions."""
    return _build(cls, GPT2Config(**_fields("gpt2", GPT2, dropout, config)), seed, attn)


def tiny_bert(cls=BertForSequenceClassification, *, seed: int | None = 0, attn: str | None = None,
              dropout: float | None = None, **config):
    """BERT: 2 layers, width 16, 2 heads, MLP 32, vocabulary 60, 32 positions."""
    return _build(cls, BertConfig(**_fields("bert", BERT, dropout, config)), seed, attn)


def tiny_t5(cls=T5ForConditionalGeneration, *, seed: int | None = 0, attn: str | None = None,
            dropout: float | None = None, **config):
    """T5 encoder-decoder: 2 + 2 layers, d_model 16, 2 heads of 8, MLP 32, vocabulary 50, pad = start = 0."""
    return _build(cls, T5Config(**_fields("t5", T5, dropout, config)), seed, attn)


def tiny_llama(cls=LlamaForCausalLM, *, seed: int | None = 0, attn: str | None = None, dropout: float | None = None,
               **config):
    """Llama (RoPE, grouped-query attention): 2 layers, width 16, 2 query heads / 1 KV head, vocabulary 64."""
    return _build(cls, LlamaConfig(**_fields("llama", LLAMA, dropout, config)), seed, attn)


def tiny_clip(cls=CLIPModel, *, seed: int | None = 0, attn: str | None = None, text: dict | None = None,
              vision: dict | None = None, projection_dim: int = 8, **config):
    """CLIP: 1-layer text and vision towers of width 16 (8×8 images, 4×4 patches), projection 8; ``text`` /
    ``vision`` update the towers' configs."""
    cfg = CLIPConfig(text_config={**CLIP_TEXT, **(text or {})}, vision_config={**CLIP_VISION, **(vision or {})},
                     projection_dim=projection_dim, **config)
    return _build(cls, cfg, seed, attn)
