"""Losses, heads, dropout and checkpointing of linearized models (issue 10).

References are independent of our loss code: the base model's *own* loss, computed by the model's
forward on the linearized logits (a forward hook on its head returns f_lin's head output), or
transformers' own loss function (CLIP's ``clip_loss``).
"""

import copy

import peft
import pytest
import torch
from torch import nn
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)

from hf_taujp.hub import HfTaujpError
from hf_taujp.linearize import LOSS_KEYS, linearize
from hf_taujp.task_vector import TaskVector
from hf_taujp.tuners.linearized import LinearizedConfig
from tests.tiny_models import random_tau, tiny_bert, tiny_clip, tiny_gpt2, tiny_t5


def gpt2(**kw):
    return tiny_gpt2(bos_token_id=0, eos_token_id=0, **kw).eval()


def t5():
    return tiny_t5().eval()


def own_loss(model, head: str, head_out, **inputs):
    """The model's own loss when its head module returns ``head_out`` (the linearized head output)."""
    handle = model.get_submodule(head).register_forward_hook(lambda mod, args, out: head_out)
    try:
        with torch.no_grad():
            return model(**inputs).loss
    finally:
        handle.remove()


X = torch.randint(1, 60, (3, 7), generator=torch.Generator().manual_seed(3))
MASK = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 7])

# (model class, task type, head module, loss inputs, how the head output is rebuilt from f_lin outputs)
HEADS = [
    (BertForSequenceClassification, "SEQ_CLS", "classifier", {"labels": torch.tensor([0, 2, 1])},
     lambda o: o.logits),
    (BertForTokenClassification, "TOKEN_CLS", "classifier", {"labels": torch.tensor([[0, 1, 2, 0, 1, -100, -100]] * 3)},
     lambda o: o.logits),
    (BertForQuestionAnswering, "QUESTION_ANS", "qa_outputs",
     {"start_positions": torch.tensor([1, 2, 9]), "end_positions": torch.tensor([3, 4, 5])},  # 9: outside, ignored
     lambda o: torch.stack([o.start_logits, o.end_logits], -1)),
]


@pytest.mark.parametrize("cls,task,head,loss_inputs,head_out", HEADS, ids=[h[1] for h in HEADS])
def test_bert_heads_loss_is_the_models_own_loss_of_linearized_outputs(cls, task, head, loss_inputs, head_out):
    base = tiny_bert(cls, num_labels=2 if task == "QUESTION_ANS" else 3).eval()  # a QA head has 2 outputs
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type=task))
    with torch.no_grad():
        out0 = pm(input_ids=X, attention_mask=MASK, **loss_inputs)
    ref0 = base(input_ids=X, attention_mask=MASK, **loss_inputs).loss  # τ = 0: the base model and its loss
    torch.testing.assert_close(out0.loss, ref0, atol=1e-6, rtol=1e-6)
    random_tau(pm, scale=0.3)
    with torch.no_grad():
        lin = pm(input_ids=X, attention_mask=MASK)
        out = pm(input_ids=X, attention_mask=MASK, **loss_inputs)
    ref = own_loss(base, head, head_out(lin), input_ids=X, attention_mask=MASK, **loss_inputs)
    assert abs(out.loss.item() - ref0.item()) > 1e-3  # τ moved the loss: the comparison below is not vacuous
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)


def test_qa_loss_is_not_the_linearization_of_the_loss():
    """Passing start/end positions into the jvp gave L(θ0) + ∇L·τ, unbounded below: with τ and −τ the
    losses of the linearized outputs are both above that linear function's values, which average to L(θ0)."""
    base = tiny_bert(BertForQuestionAnswering).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="QUESTION_ANS"))
    pos = {"start_positions": torch.tensor([1, 2, 3]), "end_positions": torch.tensor([3, 4, 5])}
    l0 = base(input_ids=X, **pos).loss.item()
    tau = random_tau(pm, scale=1.0)
    with torch.no_grad():
        plus = pm(input_ids=X, **pos).loss.item()
        pm.base_model.set_tangents({k: -v for k, v in tau.items()})
        minus = pm(input_ids=X, **pos).loss.item()
    # CE of logits linear in τ is convex in τ: (L(τ) + L(−τ)) / 2 ≥ L(0), strictly for a random τ
    assert (plus + minus) / 2 > l0 + 1e-3


def test_causal_lm_and_seq2seq_losses_are_the_models_own():
    base = gpt2()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM"))
    random_tau(pm, scale=0.2)
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        lin, out = pm(input_ids=x), pm(input_ids=x, labels=x)
    torch.testing.assert_close(out.loss, own_loss(base, "lm_head", lin.logits, input_ids=x, labels=x))
    base = t5()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="SEQ_2_SEQ_LM"))
    random_tau(pm, scale=0.2)
    src, y = torch.randint(1, 50, (2, 6)), torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    with torch.no_grad():
        out = pm(input_ids=src, labels=y)
        dec = base.prepare_decoder_input_ids_from_labels(labels=y)
        lin = pm(input_ids=src, decoder_input_ids=dec)
    torch.testing.assert_close(out.loss, own_loss(base, "lm_head", lin.logits, input_ids=src, labels=y))


def test_clip_contrastive_loss_is_transformers_own_of_linearized_logits():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss

    lin = linearize(tiny_clip().eval(), ["q_proj", "v_proj"])
    with torch.no_grad():
        for t in lin.tau:
            t.normal_(0, 0.2)
    batch = {"input_ids": torch.randint(1, 40, (3, 5)), "pixel_values": torch.randn(3, 3, 8, 8)}
    with torch.no_grad():
        out = lin(**batch, return_loss=True)
    torch.testing.assert_close(out.loss, image_text_contrastive_loss(out.logits_per_text))


def test_unsupported_loss_inputs_are_named_and_one_key_list():
    lin = linearize(gpt2(), ["c_attn"])
    x = torch.randint(0, 100, (2, 5))
    with pytest.raises(HfTaujpError, match="mc_labels"):
        lin(input_ids=x, mc_labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(HfTaujpError, match="labels"):
        lin(input_ids=x, label=x)
    with pytest.raises(HfTaujpError, match="start_positions and end_positions"):
        linearize(tiny_bert(BertForQuestionAnswering, seed=None).eval(), ["query"])(input_ids=X, start_positions=X[:, 0])
    # the trainer and evaluation strip the same keys the linearized forward pops
    from hf_taujp import evaluation
    from hf_taujp.trainer.penalty import prepare_reg_batch

    assert evaluation._LABEL_KEYS is LOSS_KEYS
    batch = {k: torch.zeros(2, dtype=torch.long) for k in LOSS_KEYS}
    assert prepare_reg_batch(gpt2(), {**batch, "input_ids": x}).keys() == {"input_ids"}


# ---------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("cls,task,head", [(BertForSequenceClassification, "SEQ_CLS", "classifier"),
                                           (BertForTokenClassification, "TOKEN_CLS", "classifier"),
                                           (BertForQuestionAnswering, "QUESTION_ANS", "qa_outputs")])
def test_head_is_trained_saved_reloaded_and_carried_into_the_task_vector(tmp_path, cls, task, head):
    base = tiny_bert(cls, num_labels=2 if task == "QUESTION_ANS" else 3).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type=task, target_modules=["query", "value"]))
    assert not any(n.startswith(head) for n in pm.base_model.parameter_names())  # the head is not linearized
    out = pm(input_ids=X, attention_mask=MASK)
    first = out.start_logits if task == "QUESTION_ANS" else out.logits
    first.pow(2).sum().backward()
    head_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad and f"{head}.modules_to_save" in n}
    assert head_grads and all(g is not None and g.abs().sum() > 0 for g in head_grads.values())
    random_tau(pm, scale=0.2)
    with torch.no_grad():  # a trained head
        for n, p in pm.named_parameters():
            if f"{head}.modules_to_save" in n:
                p.add_(0.5)
        want = pm(input_ids=X, attention_mask=MASK)
    pm.save_pretrained(tmp_path)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        got = again(input_ids=X, attention_mask=MASK)
    for k in want.keys():
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
    tv = TaskVector.from_peft(pm)
    h0 = dict(base.named_parameters())
    for n, p in base.named_parameters():
        if n.startswith(head + "."):
            torch.testing.assert_close(tv[n], torch.full_like(p, 0.5))  # h − h0
    assert set(tv.keys()) == set(pm.base_model.parameter_names()) | {n for n in h0 if n.startswith(head + ".")}
    assert set(TaskVector.from_peft(again).keys()) == set(tv.keys())
    with pytest.raises(HfTaujpError, match="modules_to_save"):  # a folder has h, not h − h0
        TaskVector.from_peft(str(tmp_path))


def test_frozen_head_with_feature_extraction_and_explicit_modules_to_save():
    """CLIP-style zero-shot head: neither linearized nor trained (FEATURE_EXTRACTION adds no head)."""
    base = tiny_bert(seed=None, num_labels=2).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="FEATURE_EXTRACTION",
                                                                   exclude_modules=["classifier"]))
    assert not any("classifier" in n for n, p in pm.named_parameters() if p.requires_grad)
    with pytest.raises(HfTaujpError, match="string"):
        LinearizedConfig(task_type="SEQ_CLS", modules_to_save="classifier")


# ---------------------------------------------------------------------------------------- dropout
def test_default_linearization_point_is_the_eval_mode_model():
    model = gpt2(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    lin = linearize(copy.deepcopy(model), ["c_attn"])
    with torch.no_grad():
        for t in lin.tau:
            t.normal_(0, 0.05)
    x = torch.randint(0, 100, (2, 6))
    lin.train()
    with torch.no_grad():
        a, b = lin(input_ids=x).logits, lin(input_ids=x).logits
        evaluated = lin.eval()(input_ids=x).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # no dropout inside the jvp in train mode
    torch.testing.assert_close(a, evaluated, atol=0, rtol=0)
    assert all(m.training for m in lin.train().modules())  # the mode is restored after each call
    lin(input_ids=x)
    assert all(m.training for m in lin.modules())
    old = linearize(copy.deepcopy(model), ["c_attn"], mode="train").train()
    with torch.no_grad():
        assert not torch.equal(old(input_ids=x).logits, old(input_ids=x).logits)  # the option: dropout active
    pm = peft.get_peft_model(copy.deepcopy(model), LinearizedConfig(task_type="CAUSAL_LM", linearization_mode="train"))
    pm.train()
    with torch.no_grad():
        assert not torch.equal(pm(input_ids=x).logits, pm(input_ids=x).logits)
    with pytest.raises(HfTaujpError, match="linearization_mode"):
        LinearizedConfig(task_type="CAUSAL_LM", linearization_mode="dropout")


# ---------------------------------------------------------------------------------------- signatures
def test_strict_forward_gets_no_use_cache():
    class Strict(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x)

    class Catchall(Strict):
        def forward(self, x, **kwargs):  # **kwargs does not mean "understands use_cache"
            assert not kwargs, kwargs
            return self.lin(x)

    for cls in (Strict, Catchall):
        m = cls()
        lin = linearize(m)
        with torch.no_grad():
            lin.tau[0].fill_(0.1)
        x = torch.randn(4, 3)
        want = m.lin(x) + x @ torch.full((2, 3), 0.1).T  # f(θ0) + J·τ, J·τ = τ_W x for a linear map
        torch.testing.assert_close(lin(x), want)
        torch.testing.assert_close(lin(x=x), want)


# ---------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gradient_checkpointing_enabled_before_get_peft_model(mode):
    ref = gpt2()
    model = copy.deepcopy(ref)
    model.gradient_checkpointing_enable()
    pm = peft.get_peft_model(model, LinearizedConfig(task_type="CAUSAL_LM", target_modules=["c_attn"],
                                                     linearization_mode=mode)).train()
    plain = peft.get_peft_model(copy.deepcopy(ref), LinearizedConfig(task_type="CAUSAL_LM", target_modules=["c_attn"],
                                                                      linearization_mode=mode)).train()
    x = torch.randint(0, 100, (2, 8))
    losses = []
    for m in (pm, plain):
        random_tau(m)
        torch.manual_seed(5)
        out = m(input_ids=x, labels=x)
        out.loss.backward()
        losses.append((out.loss.detach(), [p.grad for p in m.parameters() if p.requires_grad]))
    torch.testing.assert_close(losses[0][0], losses[1][0])
    for a, b in zip(losses[0][1], losses[1][1]):
        torch.testing.assert_close(a, b)
    # checkpointing and the embedding hooks are back after the call
    assert any(getattr(m, "gradient_checkpointing", False) for m in pm.modules())
    assert pm.get_base_model().transformer.wte._forward_hooks
