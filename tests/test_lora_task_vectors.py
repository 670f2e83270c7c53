"""LoRA adapters as task vectors: τ equals what PEFT's own ``merge_and_unload`` writes into the base.

For every LoRA variant PEFT 0.21 saves and from_peft converts, the reference is
merge_and_unload(peft_model).state − base.state, computed by PEFT itself; the vector is read from
the live model and from the saved folder.
"""

import copy
import warnings

import pytest
import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from hf_taujp.hub import HfTaujpError
from hf_taujp.task_vector import TaskVector, fingerprint
from tests.tiny_models import tiny_gpt2

peft = pytest.importorskip("peft")


def tiny(cls=GPT2ForSequenceClassification, seed=0):
    return tiny_gpt2(cls, seed=seed, n_embd=16, vocab_size=40, n_positions=16, pad_token_id=0, bos_token_id=1,
                     eos_token_id=1, num_labels=3).eval()


def lora(base, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when it flips fan_in_fan_out per layer
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **kw}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.requires_grad:  # the LoRA factors, and the biases that bias="all" / "lora_only" train
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return pm.eval()


def merged_minus_base(pm, base):
    """The reference: PEFT's merge_and_unload, minus θ0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = dict(copy.deepcopy(pm).merge_and_unload().named_parameters())
    return {n: merged[n].detach().double() - p.detach().double() for n, p in base.named_parameters()}


VARIANTS = {
    # GPT-2's Conv1D (weight (in, out)) and the nn.Linear score head in one adapter, either config flag
    "conv1d+linear, fan_in_fan_out=True": dict(target_modules=["c_attn", "c_proj", "score"], fan_in_fan_out=True),
    "conv1d+linear, fan_in_fan_out=False": dict(target_modules=["c_attn", "c_proj", "score"]),
    "lora_bias": dict(target_modules=["c_attn", "c_fc", "score"], lora_bias=True, exclude_modules=["score"]),
    "lora_bias + fan_in_fan_out": dict(target_modules=["c_attn", "c_proj"], lora_bias=True, fan_in_fan_out=True),
    "rslora": dict(target_modules=["c_attn", "c_fc", "score"], use_rslora=True),
    "rank / alpha patterns": dict(target_modules=["c_attn", "c_fc", "score"], rank_pattern={"h.0.attn.c_attn": 2},
                                  alpha_pattern={"score": 3, "c_fc": 5}),
    "dora": dict(target_modules=["c_attn", "c_proj", "score"], use_dora=True),
    "dora + rslora + pattern": dict(target_modules=["c_attn", "score"], use_dora=True, use_rslora=True, rank_pattern={"score": 2}),
    "embedding": dict(target_modules=["wte", "c_fc"]),
    "embedding dora": dict(target_modules=["wte", "wpe"], use_dora=True),
    "bias=all": dict(target_modules=["c_fc"], bias="all"),
    "bias=lora_only": dict(target_modules=["c_attn", "score"], bias="lora_only"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_vector_equals_peft_merge_and_unload(variant, tmp_path):
    base = tiny()
    pm = lora(base, **VARIANTS[variant])
    want = merged_minus_base(pm, base)
    changed = {n for n, d in want.items() if d.abs().max() > 0}
    assert changed  # the variant does move the base
    if VARIANTS[variant].get("bias", "none") != "none":
        # trained base biases: the PEFT model no longer holds their θ0, so the base is required
        with pytest.raises(HfTaujpError, match="pass base="):
            TaskVector.from_peft(pm)
        live = TaskVector.from_peft(pm, base=base)
    else:
        live = TaskVector.from_peft(pm)
    pm.save_pretrained(tmp_path / "adapter")
    saved = TaskVector.from_peft(tmp_path / "adapter", base=base)
    for tv in (live, saved):
        assert set(tv.keys()) >= changed and tv.kind == "nonlinear" and tv.base_fingerprint == fingerprint(base)
        for n, d in want.items():
            got = tv[n].double() if n in tv else torch.zeros_like(d)
            torch.testing.assert_close(got, d, atol=2e-6, rtol=1e-5, msg=f"{variant}: {n}")


def test_dora_from_a_folder_with_a_meta_base_is_refused_by_name(tmp_path):
    base = tiny()
    lora(base, target_modules=["c_attn"], use_dora=True).save_pretrained(tmp_path / "a")
    with torch.device("meta"):
        meta_base = GPT2ForSequenceClassification(base.config)
    with pytest.raises(HfTaujpError, match="DoRA module.*meta device"):
        TaskVector.from_peft(tmp_path / "a", base=meta_base)
    # plain LoRA only needs the layer types: a meta-device base is enough, and no fingerprint is invented
    lora(base, target_modules=["c_attn", "score"]).save_pretrained(tmp_path / "b")
    tv = TaskVector.from_peft(tmp_path / "b", base=meta_base)
    assert tv.base_fingerprint is None
    assert torch.allclose(tv["score.weight"], TaskVector.from_peft(tmp_path / "b", base=base)["score.weight"])


@pytest.mark.parametrize("kw, name", [
    (dict(target_modules=["c_attn"], modules_to_save=["score"]), "modules_to_save"),
    (dict(target_modules=["c_attn"], trainable_token_indices=[1, 2]), "trainable tokens"),
])
def test_unsupported_lora_variants_are_refused_by_name(kw, name):
    base = tiny()
    pm = lora(base, **kw)
    with pytest.raises(HfTaujpError, match=name):
        TaskVector.from_peft(pm)


def test_conv_lora_is_refused_by_name():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["conv"]))
    with pytest.raises(HfTaujpError, match="Conv2d layer"):
        TaskVector.from_peft(pm)


def test_tied_embedding_lora_applies_like_peft(tmp_path):
    """GPT-2 LM: wte is tied to lm_head; the vector applied by apply_to gives PEFT's merged logits."""
    base = tiny(GPT2LMHeadModel)
    pm = lora(base, target_modules=["wte", "c_attn"])
    tv = TaskVector.from_peft(pm)
    ids = torch.tensor([[1, 5, 7, 11]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = copy.deepcopy(pm).merge_and_unload()(ids).logits
        out = tv.apply_to(base)(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
