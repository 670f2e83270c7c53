"""Both readings of any task vector, and the tangent reading saved as a LINEARIZED PEFT adapter.

References: the linear reading f(θ0) + J·ατ by central finite differences in float64; the weight
reading θ0 + ατ by hand; the reloaded adapter against apply_to(linear=True).
"""

import copy
import warnings

import pytest
import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

import hf_taujp  # noqa: F401  (registers LINEARIZED with PEFT)
from hf_taujp.hub import HfTaujpError
from hf_taujp.task_vector import TaskVector, fingerprint
from tests.tiny_models import tiny_gpt2

peft = pytest.importorskip("peft")
IDS = torch.tensor([[1, 5, 7, 11, 3, 2]])


def tiny(cls=GPT2LMHeadModel, seed=0):
    return tiny_gpt2(cls, seed=seed, n_embd=16, vocab_size=40, n_positions=16, pad_token_id=0, num_labels=3).eval()


def vector(base, kind, keys=("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight",
                             "transformer.h.1.mlp.c_fc.bias", "transformer.wte.weight"), scale=1e-2):
    g = torch.Generator().manual_seed(3)
    params = dict(base.named_parameters())
    return TaskVector({k: scale * torch.randn(params[k].shape, generator=g) for k in keys}, kind=kind,
                      base_fingerprint=fingerprint(base), base_model="org/tiny")


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def finite_difference_linear(base, tv, alpha, eps=1e-4):
    """f(θ0) + J·(ατ) by central differences of the float64 model along ατ."""
    b64 = copy.deepcopy(base).double()
    params = dict(b64.named_parameters())
    with torch.no_grad():
        f0 = b64(IDS).logits

        def shifted(sign):
            for k, t in tv.items():
                params[k].add_(sign * eps * alpha * t.double())
            out = b64(IDS).logits
            for k, t in tv.items():
                params[k].sub_(sign * eps * alpha * t.double())
            return out

        return f0 + (shifted(1) - shifted(-1)) / (2 * eps)


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_linear_reading_is_first_order_taylor(kind):
    base = tiny()
    tv = vector(base, kind)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        lin = tv.apply_to(base, alpha=0.7, linear=True)
    warned = [x for x in w if issubclass(x.category, UserWarning) and "Ortiz" in str(x.message)]
    assert len(warned) == (kind == "nonlinear")  # the diagnostic reading of a non-linear vector is named
    with torch.no_grad():
        got = logits(lin(input_ids=IDS)).double()
    torch.testing.assert_close(got, finite_difference_linear(base, tv, 0.7), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_weight_reading_is_theta0_plus_alpha_tau(kind):
    base = tiny()
    tv = vector(base, kind)
    ctx = pytest.warns(UserWarning, match="weight reading") if kind == "linear" else warnings.catch_warnings()
    with ctx:
        m = tv.apply_to(base, alpha=0.5, linear=False)
    p0, p = dict(base.named_parameters()), dict(m.named_parameters())
    for k in p0:
        want = p0[k].detach() + 0.5 * tv[k] if k in tv else p0[k].detach()
        torch.testing.assert_close(p[k].detach(), want, atol=1e-7, rtol=0)


def test_default_reading_follows_the_kind():
    base = tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin = vector(base, "linear").apply_to(base)
        nonlin = vector(base, "nonlinear").apply_to(base)
    assert hasattr(lin, "get_tangents") and not hasattr(nonlin, "get_tangents")
    with pytest.raises(HfTaujpError, match="linear must be"):
        vector(base, "linear").apply_to(base, linear="yes")


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2ForSequenceClassification])
def test_to_peft_saves_a_linearized_adapter_that_peft_reloads(cls, tmp_path):
    base = tiny(cls)
    tv = vector(base, "linear")
    pm = tv.to_peft(base, alpha=0.7)
    pm.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    lin = tv.apply_to(base, alpha=0.7, linear=True)
    with torch.no_grad():
        ref = logits(lin(input_ids=IDS))
        torch.testing.assert_close(logits(pm(input_ids=IDS)), ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(logits(reloaded(input_ids=IDS)), ref, atol=1e-6, rtol=1e-5)
    if cls is GPT2LMHeadModel:  # and it is the tangent model, not θ0 + ατ (checked against finite differences)
        torch.testing.assert_close(ref.double(), finite_difference_linear(base, tv, 0.7), atol=1e-5, rtol=1e-4)
    if cls is GPT2LMHeadModel:
        back = TaskVector.from_peft(tmp_path / "adapter")
        assert back.kind == "linear" and back.base_fingerprint is None
    else:  # SEQ_CLS saves its head (PEFT's modules_to_save) as full weights: read h − h0 from the loaded model
        with pytest.raises(HfTaujpError, match="full weights"):
            TaskVector.from_peft(tmp_path / "adapter")
        back = TaskVector.from_peft(reloaded)
        assert back.kind == "linear" and torch.count_nonzero(back["score.weight"]) == 0
    for k in tv.keys():
        torch.testing.assert_close(back[k], 0.7 * tv[k])
    # the rest of each linearized module has τ = 0 (c_fc.bias is in the vector, c_attn.bias is not)
    assert torch.count_nonzero(back["transformer.h.0.attn.c_attn.bias"]) == 0


def test_to_peft_refuses_another_base_and_warns_for_nonlinear():
    base = tiny()
    from hf_taujp.hub import BaseModelMismatchError

    with pytest.raises(BaseModelMismatchError):
        vector(base, "linear").to_peft(tiny(seed=9))
    with pytest.warns(UserWarning, match="tangent-space reading"):
        vector(base, "nonlinear").to_peft(base)


def test_readme_snippet_linear_reading_of_from_models_vector():
    """README: tv = TaskVector.from_models(base, finetuned); lin = tv.apply_to(base, alpha=1.0, linear=True)."""
    base = tiny()
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    tv = TaskVector.from_models(base, finetuned, task="sst2")
    with pytest.warns(UserWarning, match="Ortiz"):
        lin = tv.apply_to(base, alpha=1.0, linear=True)
    with torch.no_grad():
        got = logits(lin(input_ids=IDS)).double()
    torch.testing.assert_close(got, finite_difference_linear(base, tv, 1.0), atol=1e-5, rtol=1e-4)
