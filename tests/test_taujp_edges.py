"""τJp penalty at the edges (issue 10): the mask of the penalised output, one implementation for the
trainer and `taujp_matrix`, LoRA's ΔW, list-valued reg datasets, checkpointing before PEFT.

Expected values come from float64 central finite differences of the base model's outputs along τ.
"""

import copy

import peft
import pytest
import torch
from torch.func import functional_call

from hf_taujp.evaluation import taujp_matrix
from hf_taujp.hub import HfTaujpError
from hf_taujp.linearize import linearize
from hf_taujp.task_vector import TaskVector
from hf_taujp.trainer import (
    MissingRegularizationDataError,
    RegularizationInputError,
    TauJpConfig,
    TauJpTrainer,
    TauJpUnsupportedError,
    taujp_penalty,
)
from hf_taujp.tuners.linearized import LinearizedConfig
from tests.tiny_models import tiny_bert, tiny_gpt2, tiny_t5

VOCAB = 50


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=2,
                report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                taujp_batch_ratio=1.0)
    base.update(kw)
    return TauJpConfig(**base)


def t5(seed=0):
    return tiny_t5(seed=seed, vocab_size=VOCAB, num_layers=1, dropout=0.0).eval()


def gpt2(seed=0):
    return tiny_gpt2(seed=seed, vocab_size=VOCAB, dropout=0.0)


def seq2seq_rows(n=4, seed=3):
    """Encoder length 8 (last two padded in one row), targets of length 5 padded with -100."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        mask = torch.ones(8, dtype=torch.long)
        if i == 1:
            mask[6:] = 0
        labels = torch.randint(1, VOCAB, (5,), generator=g)
        labels[5 - i:] = -100  # 5, 4, 3, 2 valid target tokens
        rows.append({"input_ids": torch.randint(1, VOCAB, (8,), generator=g), "attention_mask": mask, "labels": labels})
    return rows


def stack(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def fd_tangent(model, tau, kwargs, output="logits", h=1e-4):
    m = copy.deepcopy(model).double().eval()
    p0 = {n: p.detach() for n, p in m.named_parameters()}
    with torch.no_grad():
        outs = [functional_call(m, {n: p0[n] + s * h * tau[n].double() if n in tau else p0[n] for n in p0}, args=(),
                                kwargs=kwargs)[output] for s in (1, -1)]
    return (outs[0] - outs[1]) / (2 * h)


def test_seq2seq_penalty_averages_over_valid_decoder_tokens(tmp_path):
    base = t5()
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="SEQ_2_SEQ_LM"))
    g = torch.Generator().manual_seed(1)
    tau = {n: 0.05 * torch.randn(t.shape, generator=g) for n, t in pm.base_model.get_tangents().items()}
    pm.base_model.set_tangents(tau)
    rows = seq2seq_rows()
    tr = TauJpTrainer(model=pm, args=cfg(tmp_path), train_dataset=rows, regularization_datasets={"b": rows})
    batch = stack(rows)
    dec = base.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    norms = fd_tangent(base, tau, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                   "decoder_input_ids": dec}).norm(dim=-1)
    valid = (batch["labels"] != -100).double()
    want = float((norms * valid).sum() / valid.sum())  # the labels' own positions, not the encoder's mask
    got = float(tr.taujp_penalty_on(pm, tr._taujp_clean(batch)))
    assert got == pytest.approx(want, rel=1e-4)
    assert abs(got - float(norms.mean())) > 1e-3 * want  # padding would change the value: the check has teeth
    # decoder inputs without their mask: no mask belongs to the decoder logits -> an error, not the encoder's mask
    bad = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "decoder_input_ids": dec}
    with pytest.raises(HfTaujpError, match="decoder_attention_mask"):
        tr.taujp_penalty_on(pm, bad)
    # the same rule in taujp_matrix (rows without labels: they would give the decoder inputs)
    res = taujp_matrix(base, {"t": TaskVector(tau, kind="linear")}, {"b": rows}, batch_size=3)
    assert res["matrix"][0][0] == pytest.approx(want, rel=1e-4)


def test_a_mask_that_does_not_fit_raises():
    t = torch.randn(2, 5, 3)
    with pytest.raises(HfTaujpError, match="mask"):
        taujp_penalty(t, torch.ones(2, 7))
    with pytest.raises(HfTaujpError, match="mask"):
        taujp_penalty(torch.randn(2, 3), torch.ones(2, 3))  # a per-example output has no token mask
    with pytest.raises(HfTaujpError, match="norm"):
        taujp_penalty(t, norm="L2")


@pytest.mark.parametrize("norm", ["L2", "l1", "fro"])
def test_taujp_matrix_refuses_unknown_norms(norm):
    base = gpt2()
    tv = TaskVector({"transformer.h.0.attn.c_attn.weight": torch.ones(32, 96)}, kind="linear")
    rows = [{"input_ids": torch.arange(6)}]
    with pytest.raises(HfTaujpError, match="norm"):
        taujp_matrix(base, [tv], [rows], norm=norm)


@pytest.mark.parametrize("norm", ["l2", "sq_l2"])
def test_taujp_matrix_equals_the_trainers_penalty(tmp_path, norm):
    base = gpt2()
    names = [n for n, _ in base.named_parameters() if ".h.1." in n]
    g = torch.Generator().manual_seed(2)
    tau = {n: 0.05 * torch.randn(base.get_parameter(n).shape, generator=g) for n in names}
    rows = [{"input_ids": torch.randint(0, VOCAB, (6,), generator=g), "attention_mask": torch.tensor([1, 1, 1, 1, 0, 0])},
            {"input_ids": torch.randint(0, VOCAB, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long)}]
    lin = linearize(copy.deepcopy(base), parameter_names=names, tangents=tau)
    tr = TauJpTrainer(model=lin, args=cfg(tmp_path, taujp_norm=norm),
                      train_dataset=[dict(r, labels=r["input_ids"]) for r in rows], regularization_datasets=[rows])
    assert tr._taujp_names == ["task0"]  # a list is named task0, task1, ...
    got = float(tr.taujp_penalty_on(lin, stack(rows)))
    per = fd_tangent(base, tau, stack(rows)).pow(2).sum(-1)
    per = per.sqrt() if norm == "l2" else per
    mask = stack(rows)["attention_mask"].double()
    want = float((per * mask).sum() / mask.sum())
    assert got == pytest.approx(want, rel=1e-4)
    res = taujp_matrix(base, [TaskVector(tau, kind="linear")], [rows], norm=norm, batch_size=2)
    assert res["matrix"][0][0] == pytest.approx(want, rel=1e-4)


def test_reg_datasets_list_dict_or_a_clear_error(tmp_path):
    rows = [{"input_ids": torch.arange(6), "labels": torch.arange(6)}] * 4
    model = gpt2()
    tr = TauJpTrainer(model=model, args=cfg(tmp_path), train_dataset=rows, regularization_datasets=[rows, rows])
    assert tr._taujp_names == ["task0", "task1"]
    with pytest.raises(MissingRegularizationDataError, match="dict"):
        TauJpTrainer(model=model, args=cfg(tmp_path), train_dataset=rows, regularization_datasets=42)


@pytest.mark.parametrize("kind", ["gpt2_conv1d", "bert_linear_with_head"])
def test_lora_penalty_is_taujp_of_the_weight_change(tmp_path, kind):
    """On LoRA the penalty is ‖J f(x'; θ0)·ΔW‖ with ΔW read off PEFT's own merge_and_unload (the head in
    modules_to_save moves too), not J_(A,B) f·(θ − θ0) of the adapter's own parameters."""
    if kind == "gpt2_conv1d":
        base, conf = gpt2(), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj"], r=2, lora_alpha=4)
        rows = [{"input_ids": torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i))} for i in range(4)]
        train = [dict(r, labels=r["input_ids"]) for r in rows]
    else:
        base = tiny_bert(vocab_size=VOCAB, max_position_embeddings=512, num_labels=3, dropout=0.0).eval()
        conf = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2, lora_alpha=8, use_rslora=True)
        rows = [{"input_ids": torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i)),
                 "attention_mask": torch.ones(6, dtype=torch.long)} for i in range(4)]
        train = [dict(r, labels=torch.tensor(i % 3)) for i, r in enumerate(rows)]
    pm = peft.get_peft_model(copy.deepcopy(base), conf)
    tr = TauJpTrainer(model=pm, args=cfg(tmp_path), train_dataset=train, regularization_datasets={"b": rows})
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a trained adapter: B ≠ 0 (and a moved head)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    merged = copy.deepcopy(pm).merge_and_unload()
    p0 = dict(base.named_parameters())
    delta = {n: (p - p0[n]).detach() for n, p in merged.named_parameters() if not torch.equal(p, p0[n])}
    assert delta
    batch = stack(rows)
    per = fd_tangent(base, delta, batch).norm(dim=-1)
    want = float(per.mean())
    pen = tr.taujp_penalty_on(pm, tr._taujp_clean(batch))
    assert float(pen) == pytest.approx(want, rel=1e-4)
    pen.backward()  # the penalty trains A and B (through ΔW = s·B·A)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pm.named_parameters() if "lora_" in n)
    # the old reading, θ − θ0 over (A, B) from the same θ0 copy: J_W f·(s·ΔB·A0 + ...), a different number
    if kind == "gpt2_conv1d":  # (with a moved head, the head's identical term dominates both readings)
        tr._adapter = None
        assert abs(float(tr.taujp_penalty_on(pm, tr._taujp_clean(batch))) - want) > 1e-2 * want
        tr._adapter = "LORA"
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    tr.train()  # PEFT's disable_adapter inside the penalty leaves the adapter trainable
    assert len([h for h in tr.state.log_history if "taujp_penalty" in h]) == 2
    assert all(p.requires_grad and not torch.equal(p, before[n]) for n, p in pm.named_parameters() if n in before)


def test_other_adapters_and_dora_are_refused(tmp_path):
    rows = [{"input_ids": torch.arange(6), "labels": torch.arange(6)}] * 4
    dora = peft.get_peft_model(gpt2(), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], r=2, use_dora=True))
    with pytest.raises(TauJpUnsupportedError, match="use_dora"):
        TauJpTrainer(model=dora, args=cfg(tmp_path), train_dataset=rows, regularization_datasets={"b": rows})
    ia3 = peft.get_peft_model(gpt2(), peft.IA3Config(task_type="CAUSAL_LM", target_modules=["c_attn"],
                                                     feedforward_modules=[]))
    with pytest.raises(TauJpUnsupportedError, match="IA3"):
        TauJpTrainer(model=ia3, args=cfg(tmp_path), train_dataset=rows, regularization_datasets={"b": rows})
    TauJpTrainer(model=ia3, args=cfg(tmp_path, taujp_lambda=0.0), train_dataset=rows)  # no penalty: plain training


def test_gradient_checkpointing_before_get_peft_model_trains_like_without(tmp_path):
    rows = [{"input_ids": torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(i))} for i in range(8)]
    train = [dict(r, labels=r["input_ids"]) for r in rows]
    results = []
    for ckpt in (True, False):
        model = gpt2()
        if ckpt:
            model.gradient_checkpointing_enable()
        pm = peft.get_peft_model(model, LinearizedConfig(task_type="CAUSAL_LM", target_modules=["c_attn"]))
        try:
            tr = TauJpTrainer(model=pm, args=cfg(tmp_path / str(ckpt), taujp_lambda=1.0, optim="sgd", learning_rate=0.1),
                              train_dataset=train, regularization_datasets={"b": rows})
        except RegularizationInputError as e:  # the old misdiagnosis
            pytest.fail(f"checkpointing reported as a data problem: {e}")
        tr.train()
        results.append(([h["taujp_penalty"] for h in tr.state.log_history if "taujp_penalty" in h], pm.get_tangents()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5) and len(results[0][0]) == 2
    for n, t in results[0][1].items():
        torch.testing.assert_close(t, results[1][1][n], rtol=1e-5, atol=1e-7)
