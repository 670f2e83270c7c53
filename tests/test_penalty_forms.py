"""The scale-free forms of the τJp penalty (issue 21): each equals its formula applied to a float64
finite-difference tangent of the real model, the "kl" form equals the KL divergence of the base and the
moved model's predictions to second order, and every path (linearized, non-linear, low-rank, strict
stacking, the τJp matrix) hands the base output to the forms that need it."""

import math

import pytest
import torch
from torch.func import functional_call

from hf_taujp.errors import HfTaujpError
from hf_taujp.evaluation import taujp_matrix
from hf_taujp.linearize import linearize
from hf_taujp.trainer import TauJpConfig, TauJpConfigError, TauJpTrainer, taujp_penalty
from hf_taujp.trainer.penalty import TAUJP_NORMS, per_position
from tests.test_taujp_trainer import batch_of, cfg, make_ds, random_tau, tiny_bert, tiny_gpt2


def _outputs(model, tau, batch, eps):
    """float64 logits at θ0 + eps·τ (eps may be 0)."""
    m = model.double().eval()
    p0 = {n: p.detach() for n, p in m.named_parameters()}
    params = {n: p0[n] + eps * tau[n].double() if n in tau else p0[n] for n in p0}
    with torch.no_grad():
        return functional_call(m, params, args=(), kwargs=batch).logits


def _reference(model_fn, tau, batch, norm, h=1e-4):
    """Independent reference: the form's formula (written out here) on a central-difference tangent."""
    f0 = _outputs(model_fn(), tau, batch, 0.0)
    t = (_outputs(model_fn(), tau, batch, h) - _outputs(model_fn(), tau, batch, -h)) / (2 * h)
    d = t.shape[-1]
    if norm == "l2":
        per = t.norm(dim=-1)
    elif norm == "sq_l2":
        per = (t ** 2).sum(-1)
    elif norm == "rms":
        per = (t ** 2).mean(-1).sqrt()
    elif norm == "relative":
        per = t.norm(dim=-1) / f0.norm(dim=-1)
    else:  # kl: ½ tᵀ (diag p − p pᵀ) t with p = softmax(f0), as a matrix product
        p = torch.softmax(f0, -1)
        fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
        per = 0.5 * torch.einsum("...i,...ij,...j->...", t, fisher, t)
    assert per.shape == t.shape[:-1] and d == t.shape[-1]
    mask = batch.get("attention_mask")
    if per.dim() == 2 and mask is not None:
        return float((per * mask).sum() / mask.sum())
    return float(per.mean())


def test_the_forms_by_hand_on_small_vectors():
    t = torch.tensor([[3.0, 4.0, 0.0, 0.0]], dtype=torch.float64)
    f = torch.tensor([[1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert float(per_position(t, "rms")) == pytest.approx(5 / 2)
    assert float(per_position(t, "relative", f)) == pytest.approx(5 / 2)
    # uniform p = 1/4: Var_p(t) = mean(t²) − mean(t)² = 25/4 − (7/4)² → kl = half of it
    assert float(per_position(t, "kl", f)) == pytest.approx(0.5 * (25 / 4 - (7 / 4) ** 2))
    # softmax ignores the logits' mean: a constant shift of the tangent costs nothing under "kl"
    assert float(per_position(torch.full((1, 4), 3.0), "kl", torch.randn(1, 4))) == pytest.approx(0.0, abs=1e-7)


def test_kl_form_is_the_second_order_kl_of_the_predictions():
    """kl = lim KL(softmax(f0) ‖ softmax(f(θ0 + ε τ))) / ε² on a real model (float64, two ε for the limit)."""
    base = tiny_gpt2()
    tau = random_tau(base, [n for n, _ in base.named_parameters() if ".h.1." in n])
    batch = batch_of(make_ds(4, 3, pad_last=False))
    f0 = _outputs(tiny_gpt2(), tau, batch, 0.0)
    t = (_outputs(tiny_gpt2(), tau, batch, 1e-4) - _outputs(tiny_gpt2(), tau, batch, -1e-4)) / 2e-4
    form = float(per_position(t, "kl", f0).mean())

    def kl(eps):
        lp0, lp = torch.log_softmax(f0, -1), torch.log_softmax(_outputs(tiny_gpt2(), tau, batch, eps), -1)
        return float((lp0.exp() * (lp0 - lp)).sum(-1).mean()) / eps ** 2

    # KL(ε)/ε² = form + O(ε): Richardson extrapolation of two step sizes removes the O(ε) term
    assert 2 * kl(1e-3) - kl(2e-3) == pytest.approx(form, rel=1e-4)


@pytest.mark.parametrize("norm", TAUJP_NORMS)
def test_linearized_penalty_forms_equal_finite_differences(tmp_path, norm):
    base = tiny_bert()
    names = [n for n, _ in base.named_parameters() if "encoder.layer.1" in n or "classifier" in n]
    tau = random_tau(base, names)
    lin = linearize(base, parameter_names=names, tangents=tau)
    reg = make_ds(6, 3)
    tr = TauJpTrainer(model=lin, args=cfg(tmp_path, taujp_norm=norm), train_dataset=make_ds(8, 0),
                      regularization_datasets={"b": reg})
    batch = batch_of(reg)
    assert float(tr.taujp_penalty_on(lin, batch)) == pytest.approx(_reference(tiny_bert, tau, batch, norm), rel=1e-4)


@pytest.mark.parametrize("norm", ["relative", "kl"])
def test_nonlinear_token_level_forms_use_the_base_output_and_the_mask(tmp_path, norm):
    """Non-linear GPT-2 at θ0 + τ, token-level logits with a padded row: the primal of the jvp is f(x'; θ0)."""
    model = tiny_gpt2()
    tau = random_tau(model, [n for n, _ in model.named_parameters()], scale=0.02)
    reg = make_ds(6, 3)
    tr = TauJpTrainer(model=model, args=cfg(tmp_path, taujp_norm=norm), train_dataset=make_ds(8, 0),
                      regularization_datasets={"b": reg})
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(tau[n])
    batch = batch_of(reg)
    assert float(tr.taujp_penalty_on(model, batch)) == pytest.approx(_reference(tiny_gpt2, tau, batch, norm), rel=1e-4)


def test_low_rank_and_strict_stacking_pass_the_base_output(tmp_path):
    """Low-rank linearized model in strict mode (stacked reg batches): each task's kl equals its own reference."""
    import peft

    from hf_taujp import LinearizedConfig

    pm = peft.get_peft_model(tiny_bert(), LinearizedConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                           target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(5)
    pm.base_model.set_factors({n: (0.3 * torch.randn(A.shape, generator=g), 0.3 * torch.randn(B.shape, generator=g))
                               for n, (A, B, _) in pm.base_model.get_factors().items()})
    tau = pm.base_model.get_tangents()  # the materialised s·B·A
    regs = {"b": make_ds(4, 3), "c": make_ds(4, 4)}
    tr = TauJpTrainer(model=pm, args=cfg(tmp_path, taujp_norm="kl", taujp_mode="strict"), train_dataset=make_ds(8, 0),
                      regularization_datasets=regs)
    got = tr.taujp_penalties_on(pm, [batch_of(regs["b"]), batch_of(regs["c"])])

    def ref():  # θ0 with the adapter's own (randomly initialised, saved) classifier head
        m = tiny_bert()
        m.classifier.load_state_dict(pm.base_model.model.classifier.original_module.state_dict())
        return m

    want = [_reference(ref, tau, batch_of(regs[k]), "kl") for k in ("b", "c")]
    assert [float(x) for x in got] == pytest.approx(want, rel=1e-4)


def test_taujp_matrix_takes_every_form():
    base = tiny_bert()
    names = [n for n, _ in base.named_parameters() if "classifier" in n or "encoder.layer.1.output" in n]
    tau = random_tau(base, names, scale=0.1)
    data = make_ds(5, 7)
    for norm in ("rms", "kl"):
        m = taujp_matrix(tiny_bert(), {"t": tau}, {"d": [{k: r[k] for k in ("input_ids", "attention_mask")} for r in data]},
                         norm=norm, batch_size=2)
        assert m["norm"] == norm
        assert m["matrix"][0][0] == pytest.approx(_reference(tiny_bert, tau, batch_of(data), norm), rel=1e-4)


def test_bad_forms_are_named_errors(tmp_path):
    with pytest.raises(TauJpConfigError, match="taujp_norm"):
        cfg(tmp_path, taujp_norm="fisher")
    with pytest.raises(HfTaujpError, match="needs the base output"):
        taujp_penalty(torch.randn(2, 3), norm="kl")
    with pytest.raises(HfTaujpError, match="shape"):
        taujp_penalty(torch.randn(2, 3), norm="relative", primal=torch.randn(2, 4))
    with pytest.raises(HfTaujpError, match="unknown taujp norm"):
        taujp_matrix(tiny_bert(), {}, {}, norm="L2")
    assert math.isfinite(float(taujp_penalty(torch.zeros(2, 3), norm="relative", primal=torch.zeros(2, 3))))
