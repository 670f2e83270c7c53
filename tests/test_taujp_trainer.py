"""τJp trainer: the penalty equals ‖J f(x'; θ0)·τ‖ (finite differences), it shrinks τJp on other tasks,
cyclic / strict scheduling, gradient accumulation, and named errors before training."""

import math

import pytest
import torch
from torch.func import functional_call

from hf_taujp.linearize import linearize
from hf_taujp.trainer import (
    MissingRegularizationDataError,
    RegularizationInputError,
    TauJpConfig,
    TauJpConfigError,
    TauJpTrainer,
    taujp_penalty,
)
from tests.tiny_models import tiny_bert as _tiny_bert
from tests.tiny_models import tiny_gpt2 as _tiny_gpt2

VOCAB = 60


def tiny_bert(seed=0, labels=3):
    return _tiny_bert(seed=seed, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_labels=labels,
                      dropout=0.0)


def tiny_gpt2(seed=0):
    return _tiny_gpt2(seed=seed, vocab_size=VOCAB, dropout=0.0)


def make_ds(n, seed, lo=0, hi=VOCAB, length=8, labels=3, pad_last=True):
    """Token-id 'task': ids from [lo, hi); label = first id mod labels; last example padded."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(lo, hi, (length,), generator=g)
        mask = torch.ones(length, dtype=torch.long)
        if pad_last and i == n - 1:
            mask[length // 2:] = 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": ids[0] % labels})
    return rows


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-3,
                max_steps=3, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True,
                disable_tqdm=True, seed=0, taujp_batch_ratio=1.0)
    base.update(kw)
    return TauJpConfig(**base)


def fd_taujp(base_model, tau, batch, h=1e-4):
    """Independent reference: float64 central finite differences of the logits along τ, then
    mean over examples of the unsquared L2 norm."""
    m = base_model.double().eval()
    p0 = {n: p.detach() for n, p in m.named_parameters()}
    plus = {n: p0[n] + h * tau[n].double() if n in tau else p0[n] for n in p0}
    minus = {n: p0[n] - h * tau[n].double() if n in tau else p0[n] for n in p0}
    with torch.no_grad():
        lp = functional_call(m, plus, args=(), kwargs=batch).logits
        lm = functional_call(m, minus, args=(), kwargs=batch).logits
    d = (lp - lm) / (2 * h)
    norms = d.norm(dim=-1)
    mask = batch.get("attention_mask")
    if norms.dim() == 2 and mask is not None:
        return float((norms * mask).sum() / mask.sum())
    return float(norms.mean())


def random_tau(model, names, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    return {n: scale * torch.randn(params[n].shape, generator=g) for n in names}


def batch_of(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask")}


# ------------------------------------------------------------------ config / bad input
@pytest.mark.parametrize("kw", [dict(taujp_lambda=-0.1), dict(taujp_mode="round_robin"), dict(taujp_norm="l1"),
                                dict(taujp_batch_ratio=0.0), dict(taujp_batch_ratio=1.5)])
def test_config_rejects_bad_values(tmp_path, kw):
    with pytest.raises(TauJpConfigError):
        cfg(tmp_path, **kw)


def test_config_defaults_are_the_papers(tmp_path):
    c = TauJpConfig(output_dir=str(tmp_path), per_device_train_batch_size=128, report_to="none")
    assert (c.taujp_lambda, c.taujp_mode, c.taujp_norm, c.taujp_start_step) == (0.1, "cyclic", "l2", 0)
    assert c.taujp_reg_batch_size == 16  # ceil(128 / 8)
    c.per_device_train_batch_size = 9
    assert c.taujp_reg_batch_size == 2  # ceil(9 / 8)


def test_missing_or_empty_reg_data_raise_before_training(tmp_path):
    model, train = tiny_bert(), make_ds(8, 0)
    with pytest.raises(MissingRegularizationDataError, match="no regularization_datasets"):
        TauJpTrainer(model=model, args=cfg(tmp_path), train_dataset=train)
    with pytest.raises(MissingRegularizationDataError, match="'b' is empty"):
        TauJpTrainer(model=model, args=cfg(tmp_path), train_dataset=train, regularization_datasets={"b": []})
    # λ = 0 needs none
    TauJpTrainer(model=model, args=cfg(tmp_path, taujp_lambda=0.0), train_dataset=train)


def test_reg_inputs_that_do_not_fit_raise_before_training(tmp_path):
    model, train = tiny_bert(), make_ds(8, 0)
    too_big = make_ds(4, 1, lo=VOCAB, hi=VOCAB + 50)  # ids outside the vocabulary
    with pytest.raises(RegularizationInputError, match="'other'"):
        TauJpTrainer(model=model, args=cfg(tmp_path), train_dataset=train, regularization_datasets={"other": too_big})
    wrong_keys = [{"pixel_values": torch.zeros(3, 4, 4)} for _ in range(4)]
    with pytest.raises(RegularizationInputError, match="'img'"):
        TauJpTrainer(model=model, args=cfg(tmp_path), train_dataset=train, regularization_datasets={"img": wrong_keys})


def test_unknown_output_name_is_a_named_error(tmp_path):
    with pytest.raises(RegularizationInputError, match="image_embeds"):
        TauJpTrainer(model=tiny_bert(), args=cfg(tmp_path, taujp_output="image_embeds"), train_dataset=make_ds(8, 0),
                     regularization_datasets={"b": make_ds(4, 1)})


# ------------------------------------------------------------------ the penalty itself
def test_penalty_helper_matches_hand_computation_with_mask():
    t = torch.tensor([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [6.0, 8.0]]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    assert math.isclose(float(taujp_penalty(t, mask)), (5 + 1 + 2) / 3, rel_tol=1e-9)
    assert math.isclose(float(taujp_penalty(t, mask, "sq_l2")), (25 + 1 + 4) / 3, rel_tol=1e-9)
    assert math.isclose(float(taujp_penalty(t)), (5 + 1 + 2 + 10) / 4, rel_tol=1e-9)


def test_linearized_penalty_equals_finite_difference_jtau(tmp_path):
    """Linearized model: penalty = mean ‖f_lin(x') − f(x'; θ0)‖ = mean ‖J f(x'; θ0)·τ‖ (FD reference)."""
    base = tiny_bert()
    names = [n for n, _ in base.named_parameters() if "encoder.layer.1" in n or "classifier" in n]
    tau = random_tau(base, names)
    ref_model = tiny_bert()
    lin = linearize(base, parameter_names=names, tangents=tau)
    reg = make_ds(6, 3)
    tr = TauJpTrainer(model=lin, args=cfg(tmp_path), train_dataset=make_ds(8, 0), regularization_datasets={"b": reg})
    batch = batch_of(reg)
    got = float(tr.taujp_penalty_on(lin, batch))
    want = fd_taujp(ref_model, tau, batch)
    assert got == pytest.approx(want, rel=1e-4)


def test_nonlinear_penalty_equals_finite_difference_jtau(tmp_path):
    """Non-linear model at θ = θ0 + τ: J f(x'; θ0)·(θ − θ0) from the frozen θ0 copy (FD reference)."""
    model = tiny_bert()
    tau = random_tau(model, [n for n, _ in model.named_parameters()], scale=0.02)
    reg = make_ds(6, 3)
    tr = TauJpTrainer(model=model, args=cfg(tmp_path, taujp_norm="sq_l2"), train_dataset=make_ds(8, 0),
                      regularization_datasets={"b": reg})
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(tau[n])
    batch = batch_of(reg)
    got = float(tr.taujp_penalty_on(model, batch))
    # sq_l2 reference
    m = tiny_bert().double().eval()
    p0 = {n: p.detach() for n, p in m.named_parameters()}
    h = 1e-4
    with torch.no_grad():
        lp = functional_call(m, {n: p0[n] + h * tau[n].double() for n in p0}, args=(), kwargs=batch).logits
        lm = functional_call(m, {n: p0[n] - h * tau[n].double() for n in p0}, args=(), kwargs=batch).logits
    want = float(((lp - lm) / (2 * h)).pow(2).sum(-1).mean())
    assert got == pytest.approx(want, rel=1e-4)


def test_peft_linearized_model_penalty_and_training(tmp_path):
    """PEFT `LinearizedConfig` model: J·τ is the tangent of the adapter's own jvp (no θ0 copy), equal to
    finite differences; the stock Trainer loop trains only τ and logs the penalty."""
    import peft

    from hf_taujp import LinearizedConfig

    base = tiny_bert()
    pm = peft.get_peft_model(base, LinearizedConfig(task_type="SEQ_CLS", target_modules=["value", "classifier"]))
    tau = {n: 0.05 * torch.randn_like(t) for n, t in pm.get_tangents().items()}
    pm.set_tangents(tau)
    reg = make_ds(6, 3)
    tr = TauJpTrainer(model=pm, args=cfg(tmp_path, max_steps=2, taujp_lambda=0.5), train_dataset=make_ds(8, 0),
                      regularization_datasets={"b": reg})
    assert tr._theta0 is None  # linearized: no frozen copy of θ0
    batch = batch_of(reg)
    assert tr.taujp_penalty_on(pm, batch).item() == pytest.approx(fd_taujp(tiny_bert(), tau, batch), rel=1e-4)
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    tr.train()
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(pm.get_tangents()[n], tau[n]) for n in tau)
    assert len([h for h in tr.state.log_history if "taujp_penalty" in h]) == 2


def test_low_rank_linearized_penalty_and_training(tmp_path):
    """Low-rank tangent (LinearizedConfig(r=...)): the penalty is ‖J f(x'; θ0)·s·B·A‖ from the same forward-mode
    pass (FD reference with τ = s·B·A materialised); training moves only A and B and lowers the penalty's share."""
    import peft

    from hf_taujp import LinearizedConfig

    pm = peft.get_peft_model(tiny_bert(), LinearizedConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                           target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(5)
    pm.base_model.set_factors({n: (0.3 * torch.randn(A.shape, generator=g), 0.3 * torch.randn(B.shape, generator=g))
                               for n, (A, B, _) in pm.base_model.get_factors().items()})
    tau = pm.base_model.get_tangents()
    reg = make_ds(6, 3)
    tr = TauJpTrainer(model=pm, args=cfg(tmp_path, max_steps=2, taujp_lambda=0.5), train_dataset=make_ds(8, 0),
                      regularization_datasets={"b": reg})
    batch = batch_of(reg)
    ref = tiny_bert()
    ref.classifier.load_state_dict(pm.base_model.model.classifier.original_module.state_dict())
    assert tr.taujp_penalty_on(pm, batch).item() == pytest.approx(fd_taujp(ref, tau, batch), rel=1e-4)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    tr.train()
    moved = {n for n, p in pm.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".lora_A" in n or ".lora_B" in n or "modules_to_save" in n for n in moved)


def test_named_hidden_output_is_penalised(tmp_path):
    """taujp_output="hidden_states[-1]": R = masked token mean of ‖J h_L(x'; θ0)·τ‖ (float64 FD reference)."""
    base = tiny_bert()
    names = [n for n, _ in base.named_parameters() if "encoder.layer.1" in n]
    tau = random_tau(base, names)
    lin = linearize(base, parameter_names=names, tangents=tau)
    reg = make_ds(6, 3)  # the last example is half padding
    tr = TauJpTrainer(model=lin, args=cfg(tmp_path, taujp_output="hidden_states[-1]"), train_dataset=make_ds(8, 0),
                      regularization_datasets={"b": reg})
    batch = batch_of(reg)
    m = tiny_bert().double().eval()
    p0 = {n: p.detach() for n, p in m.named_parameters()}
    h = 1e-4
    with torch.no_grad():
        hs = [functional_call(m, {n: p0[n] + s * h * tau[n].double() if n in tau else p0[n] for n in p0}, args=(),
                              kwargs={**batch, "output_hidden_states": True}).hidden_states[-1] for s in (1, -1)]
    norms = ((hs[0] - hs[1]) / (2 * h)).norm(dim=-1)
    mask = batch["attention_mask"].double()
    want = float((norms * mask).sum() / mask.sum())
    assert tr.taujp_penalty_on(lin, batch).item() == pytest.approx(want, rel=1e-4)
    with pytest.raises(TauJpConfigError, match="taujp_output"):
        cfg(tmp_path, taujp_output="hidden states")


def test_token_level_penalty_uses_valid_tokens_only(tmp_path):
    base = tiny_gpt2()
    names = [n for n, _ in base.named_parameters() if ".h.1." in n]
    tau = random_tau(base, names)
    ref = tiny_gpt2()
    lin = linearize(base, parameter_names=names, tangents=tau)
    reg = [{k: v for k, v in r.items() if k != "labels"} for r in make_ds(4, 5)]
    tr = TauJpTrainer(model=lin, args=cfg(tmp_path), train_dataset=[dict(r, labels=r["input_ids"]) for r in make_ds(8, 0)],
                      regularization_datasets={"b": reg})
    batch = batch_of(reg)
    assert float(tr.taujp_penalty_on(lin, batch)) == pytest.approx(fd_taujp(ref, tau, batch), rel=1e-4)


# ------------------------------------------------------------------ scheduling
def _lin_trainer(tmp_path, mode, n_tasks=3, **kw):
    base = tiny_bert()
    names = [n for n, _ in base.named_parameters() if "classifier" in n or "layer.1.output" in n]
    tau = random_tau(base, names)
    lin = linearize(base, parameter_names=names, tangents=tau)
    regs = {f"t{i}": make_ds(4, 10 + i, pad_last=False) for i in range(n_tasks)}
    args = cfg(tmp_path, taujp_mode=mode, per_device_train_batch_size=4, taujp_lambda=0.5, **kw)
    return TauJpTrainer(model=lin, args=args, train_dataset=make_ds(8, 0), regularization_datasets=regs), regs, tau


def test_cyclic_mode_visits_every_other_task_in_turn(tmp_path):
    tr, regs, _ = _lin_trainer(tmp_path, "cyclic", max_steps=6)
    tr.train()
    assert list(tr.taujp_visits) == [("t0",), ("t1",), ("t2",), ("t0",), ("t1",), ("t2",)]
    logged = [h["taujp_penalty"] for h in tr.state.log_history if "taujp_penalty" in h]
    assert len(logged) == 6 and all(v > 0 for v in logged)


def test_strict_mode_averages_all_tasks(tmp_path):
    tr, regs, tau = _lin_trainer(tmp_path, "strict")
    model = tr.model
    model.train()
    inputs = {k: torch.stack([r[k] for r in make_ds(4, 0)]) for k in ("input_ids", "attention_mask", "labels")}
    task = float(super(TauJpTrainer, tr).compute_loss(model, dict(inputs)))
    total = float(tr.compute_loss(model, dict(inputs)))
    assert list(tr.taujp_visits) == [("t0", "t1", "t2")]
    want = sum(fd_taujp(tiny_bert(), tau, batch_of(regs[t])) for t in regs) / 3
    assert (total - task) / 0.5 == pytest.approx(want, rel=1e-4)


def test_strict_mode_with_differently_shaped_reg_batches(tmp_path):
    """Reg sets of different sequence lengths cannot share one jvp: each batch gets its own, same mean."""
    tr, regs, tau = _lin_trainer(tmp_path, "strict")
    regs["t1"] = make_ds(4, 11, length=5)
    batches = [batch_of(regs[t]) for t in regs]
    got = tr.taujp_penalties_on(tr.model, batches)
    want = [fd_taujp(tiny_bert(), tau, b) for b in batches]
    assert got.shape == (3,) and got.tolist() == pytest.approx(want, rel=1e-4)


def test_start_step_delays_the_penalty(tmp_path):
    tr, _, _ = _lin_trainer(tmp_path, "cyclic", max_steps=3, taujp_start_step=2)
    tr.train()
    assert len(tr.taujp_visits) == 1
    assert [("taujp_penalty" in h) for h in tr.state.log_history if "loss" in h] == [False, False, True]


# ------------------------------------------------------------------ gradient accumulation
def _ga_run(tmp_path, bs, ga, lam, loss_kwargs=True):
    base = tiny_gpt2()
    names = [n for n, _ in base.named_parameters() if ".h.1." in n or "ln_f" in n]
    lin = linearize(base, parameter_names=names, tangents=random_tau(base, names))
    if not loss_kwargs:  # the Trainer then does not pass num_items_in_batch and divides the loss by GA itself
        lin.accepts_loss_kwargs = False
    train = [{"input_ids": r["input_ids"], "attention_mask": torch.ones(8, dtype=torch.long), "labels": r["input_ids"]}
             for r in make_ds(8, 0, pad_last=False)]
    reg = [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in make_ds(8, 7, pad_last=False)]
    args = cfg(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
               taujp_lambda=lam, optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0)
    tr = TauJpTrainer(model=lin, args=args, train_dataset=train,
                      regularization_datasets={"b": reg} if lam > 0 else None)
    tr.train()
    assert tr.model_accepts_loss_kwargs is loss_kwargs
    return lin.get_tangents()


@pytest.mark.parametrize("loss_kwargs", [True, False])
def test_gradient_accumulation_is_equivalent_to_a_big_batch(tmp_path, loss_kwargs):
    """2 × 4 with GA == 1 × 8 (one SGD step, float32). When the model accepts loss kwargs, transformers 5
    gets num_items_in_batch, does not divide the loss by the GA steps (`loss_is_scaled_for_ga`), and the
    per-batch-mean penalty must be divided by us; otherwise the Trainer divides the whole loss."""
    big = _ga_run(tmp_path, 8, 1, 1.0, loss_kwargs)
    acc = _ga_run(tmp_path, 4, 2, 1.0, loss_kwargs)
    no_pen = _ga_run(tmp_path, 8, 1, 0.0, loss_kwargs)
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-6)
    assert max(float((big[n] - no_pen[n]).abs().max()) for n in big) > 1e-4  # the penalty did act


# ------------------------------------------------------------------ the point of τJp
@pytest.mark.parametrize("linear", [False, True])
def test_lambda_shrinks_taujp_on_other_tasks(tmp_path, linear):
    """Same seed and data: fine-tuning on task A with λ > 0 yields a τ with a smaller ‖J f(x'; θ0)·τ‖ on
    another task's inputs than λ = 0 (measured independently by float64 finite differences), for the
    non-linear model (τ = θ − θ0) and the linearized one (τ = its tangent)."""
    train = make_ds(32, 0, lo=0, hi=30)
    other = make_ds(16, 1, lo=30, hi=VOCAB)
    results = {}
    for lam in (0.0, 1.0):
        model = linearize(tiny_bert()) if linear else tiny_bert()
        args = cfg(tmp_path, taujp_lambda=lam, max_steps=25, per_device_train_batch_size=8, learning_rate=3e-3,
                   logging_steps=5)
        tr = TauJpTrainer(model=model, args=args, train_dataset=train,
                          regularization_datasets={"other": other} if lam > 0 else None)
        tr.train()
        if linear:
            tau = model.get_tangents()
        else:
            theta0 = dict(tiny_bert().named_parameters())
            tau = {n: (p.detach() - theta0[n].detach()) for n, p in model.named_parameters()}
        results[lam] = fd_taujp(tiny_bert(), tau, batch_of(other))
    assert results[1.0] < 0.7 * results[0.0], results


# ------------------------------------------------------------------ checkpointing, resume, bf16
def _bert_run(tmp_path, sub, **kw):
    model = tiny_bert()
    kw = {"max_steps": 4, **kw}
    args = cfg(tmp_path / sub, per_device_train_batch_size=4, taujp_lambda=1.0, optim="sgd",
               learning_rate=0.1, lr_scheduler_type="constant", **kw)
    tr = TauJpTrainer(model=model, args=args, train_dataset=make_ds(16, 0),
                      regularization_datasets={"b": make_ds(4, 1), "c": make_ds(4, 2)})
    return model, tr


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    """Checkpointing is switched off around the jvp; the result equals a run without it."""
    plain, tr = _bert_run(tmp_path, "a")
    tr.train()
    ckpt, tr2 = _bert_run(tmp_path, "b", gradient_checkpointing=True)
    tr2.train()
    assert ckpt.is_gradient_checkpointing  # restored after each jvp
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    """θ0 is the model given to the trainer (the base), so a resumed run reproduces the full run
    (reg sets of exactly one reg batch make the penalty batches order-independent)."""
    full, tr = _bert_run(tmp_path, "full")
    tr.train()
    part, tr2 = _bert_run(tmp_path, "part", save_strategy="steps", save_steps=2)
    tr2.args.max_steps = 2
    tr2.train()
    resumed, tr3 = _bert_run(tmp_path, "part", save_strategy="steps", save_steps=2)
    tr3.train(resume_from_checkpoint=str(tmp_path / "part" / "out" / "checkpoint-2"))
    for (n, p), (_, q) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_is_applied_to_the_penalty(tmp_path):
    """bf16=True: the jvp runs under autocast (the penalty differs from the fp32 one at bf16 precision,
    stays within bf16 tolerance of the float64 reference) and training runs and logs."""
    base = tiny_bert()
    names = [n for n, _ in base.named_parameters() if "encoder.layer.1" in n or "classifier" in n]
    tau = random_tau(base, names)
    lin = linearize(base, parameter_names=names, tangents=tau)
    reg = make_ds(6, 3)
    batch = batch_of(reg)
    want = fd_taujp(tiny_bert(), tau, batch)
    got = {}
    for bf16 in (False, True):
        tr = TauJpTrainer(model=lin, args=cfg(tmp_path / str(bf16), bf16=bf16, max_steps=2), train_dataset=make_ds(8, 0),
                          regularization_datasets={"b": reg})
        got[bf16] = tr.taujp_penalty_on(lin, batch).item()
    assert got[False] == pytest.approx(want, rel=1e-4)
    assert got[True] == pytest.approx(want, rel=3e-2) and abs(got[True] - want) > 1e-4 * want  # bf16 matmuls ran
    tr.train()
    pens = [h["taujp_penalty"] for h in tr.state.log_history if "taujp_penalty" in h]
    assert len(pens) == 2 and all(math.isfinite(v) and v > 0 for v in pens)


def test_fsdp_and_deepspeed_are_refused_before_training(tmp_path, monkeypatch):
    from hf_taujp.trainer import TauJpUnsupportedError

    reg = {"b": make_ds(4, 1)}
    with pytest.raises(TauJpUnsupportedError, match="FSDP"):
        TauJpTrainer(model=tiny_bert(), args=cfg(tmp_path, fsdp="full_shard"), train_dataset=make_ds(8, 0),
                     regularization_datasets=reg)
    args = cfg(tmp_path)
    args.deepspeed = {"zero_optimization": {"stage": 3}}  # deepspeed itself is not installed here
    with pytest.raises(TauJpUnsupportedError, match="ZeRO-3"):
        TauJpTrainer(model=tiny_bert(), args=args, train_dataset=make_ds(8, 0), regularization_datasets=reg)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    with pytest.raises(TauJpUnsupportedError, match="FSDP"):
        TauJpTrainer(model=tiny_bert(), args=cfg(tmp_path), train_dataset=make_ds(8, 0), regularization_datasets=reg)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(TauJpConfigError, match="TauJpConfig"):
        from transformers import TrainingArguments

        TauJpTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
                     train_dataset=make_ds(8, 0))
