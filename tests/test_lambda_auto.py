"""taujp_lambda="auto" (issue 21): the rule, the pilots (each equals an independent fixed-λ run of the same
length from the same start), the full run at the chosen λ (equals a fresh fixed-λ run), and named errors."""

import pytest
import torch

from hf_taujp.errors import HfTaujpError
from hf_taujp.linearize import linearize
from hf_taujp.trainer import TauJpConfigError, TauJpTrainer
from hf_taujp.trainer.lambda_search import DEFAULT_LAMBDA_GRIDS, choose_lambda, lambda_grid, within_tolerance
from tests.test_taujp_trainer import cfg, make_ds, tiny_bert

NAMES = ("bert.encoder.layer.1.output.dense.weight", "classifier.weight")


def _trainer(tmp_path, sub, **kw):
    lin = linearize(tiny_bert(), parameter_names=list(NAMES))
    args = cfg(tmp_path / sub, **{"max_steps": 8, "learning_rate": 3e-2, **kw})
    return TauJpTrainer(model=lin, args=args, train_dataset=make_ds(16, 0), eval_dataset=make_ds(8, 5),
                        regularization_datasets={"b": make_ds(8, 3, lo=30), "c": make_ds(8, 4, lo=10, hi=40)})


def _tau(tr):
    return {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}


def test_the_rule_is_the_largest_lambda_within_tolerance():
    curve = [{"lambda": 0.0, "score": 0.80}, {"lambda": 0.01, "score": 0.79}, {"lambda": 0.1, "score": 0.70},
             {"lambda": 1.0, "score": 0.77}]
    # tolerance 0.04 below 0.80: 0.79 and 0.77 pass, 0.70 does not; the largest passing λ wins
    assert choose_lambda(curve, 0.04, greater_is_better=True) == 1.0
    # none within: the grid's smallest λ, never λ = 0 (the reference run, not a τJp run)
    assert choose_lambda(curve, 0.0, greater_is_better=True) == 0.01
    assert choose_lambda([curve[0], {"lambda": 1.0, "score": 0.1}, {"lambda": 0.5, "score": 0.2}], 0.03, True) == 0.5
    loss = [{"lambda": 0.0, "score": 0.50}, {"lambda": 0.1, "score": 0.52}, {"lambda": 1.0, "score": 0.60}]
    assert choose_lambda(loss, 0.025, greater_is_better=False) == 0.1  # 0.52 ≤ 0.525 < 0.60
    assert within_tolerance(0.525, 0.5, 0.025, False) and not within_tolerance(0.526, 0.5, 0.025, False)
    # absolute, so a metric near 0 keeps its slack (a relative one would vanish): MCC −0.10 → −0.12 passes at 0.03
    assert within_tolerance(-0.12, -0.10, 0.03, True)
    with pytest.raises(HfTaujpError, match="λ = 0"):
        choose_lambda(curve[1:], 0.05, True)
    with pytest.raises(HfTaujpError, match="not finite"):
        choose_lambda([{"lambda": 0.0, "score": float("nan")}, {"lambda": 1.0, "score": 0.5}], 0.05, True)
    with pytest.raises(HfTaujpError, match="no λ > 0"):
        choose_lambda(curve[:1], 0.05, True)
    assert lambda_grid("kl") == list(DEFAULT_LAMBDA_GRIDS["kl"]) and lambda_grid("l2", [1, 0.1]) == [0.1, 1.0]


def test_pilots_and_the_full_run_equal_independent_fixed_lambda_runs(tmp_path):
    tr = _trainer(tmp_path, "auto", taujp_lambda="auto", taujp_lambda_grid=[0.1, 10.0], taujp_auto_pilot=0.5,
                  taujp_auto_tolerance=0.5)
    tr.train()
    rec = tr.taujp_lambda_search
    assert rec["pilot_steps"] == 4 and rec["metric"] == "eval_loss" and rec["greater_is_better"] is False
    assert [c["lambda"] for c in rec["curve"]][:2] == [0.0, 0.1]
    for i, c in enumerate(rec["curve"]):  # each pilot = a fresh 4-step run at that λ
        ref = _trainer(tmp_path, f"ref{i}", taujp_lambda=c["lambda"], max_steps=4)
        ref.train()
        assert c["score"] == pytest.approx(ref.evaluate()["eval_loss"], rel=1e-5)
    assert rec["chosen"] == choose_lambda(rec["curve"], 0.5, False)
    full = _trainer(tmp_path, "full", taujp_lambda=rec["chosen"])
    full.train()
    got, want = _tau(tr), _tau(full)
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    assert tr.state.max_steps == 8  # the final run has the configured length


def test_a_lambda_that_breaks_the_tolerance_ends_the_search(tmp_path, monkeypatch):
    """Scripted validation losses: λ = 0.1 is within 0.03 of λ = 0, λ = 1 is not, so λ = 10 is never piloted."""
    tr = _trainer(tmp_path, "stop", taujp_lambda="auto", taujp_lambda_grid=[0.1, 1.0, 10.0], taujp_auto_pilot=0.25)
    scores = iter([0.50, 0.52, 0.60, 0.40])
    piloted = []
    monkeypatch.setattr(tr, "evaluate", lambda *a, **k: (piloted.append(tr._taujp_lambda), {"eval_loss": next(scores)})[1])
    tr.train()
    rec = tr.taujp_lambda_search
    assert piloted == [0.0, 0.1, 1.0] and [c["lambda"] for c in rec["curve"]] == [0.0, 0.1, 1.0]
    assert rec["chosen"] == 0.1 and tr._taujp_lambda == 0.1 and rec["pilot_steps"] == 2


@pytest.mark.parametrize("kw,match", [(dict(taujp_lambda="big"), "taujp_lambda"),
                                      (dict(taujp_lambda="auto", taujp_lambda_grid=[0.0, 1.0]), "grid"),
                                      (dict(taujp_lambda="auto", taujp_lambda_grid=[]), "grid"),
                                      (dict(taujp_lambda="auto", taujp_auto_pilot=0.0), "pilot"),
                                      (dict(taujp_lambda="auto", taujp_auto_tolerance=-0.1), "tolerance"),
                                      (dict(taujp_lambda=True), "taujp_lambda")])
def test_bad_auto_settings_are_named_errors(tmp_path, kw, match):
    with pytest.raises(TauJpConfigError, match=match):
        cfg(tmp_path, **kw)


def test_auto_needs_validation_data_and_no_resume(tmp_path):
    lin = linearize(tiny_bert(), parameter_names=list(NAMES))
    with pytest.raises(TauJpConfigError, match="eval_dataset"):
        TauJpTrainer(model=lin, args=cfg(tmp_path, taujp_lambda="auto"), train_dataset=make_ds(8, 0),
                     regularization_datasets={"b": make_ds(8, 3)})
    tr = _trainer(tmp_path, "resume", taujp_lambda="auto")
    with pytest.raises(TauJpConfigError, match="resume"):
        tr.train(resume_from_checkpoint=True)
    assert cfg(tmp_path, taujp_lambda="0.5").taujp_lambda == 0.5  # a number from the command line


def test_pilots_scale_the_penalty_start_step(tmp_path, monkeypatch):
    """A run whose penalty starts at step 4 of 8: a 2-step pilot starts it at step 1 (round(4·2/8)), not never —
    with the start step kept, every pilot would be λ = 0's run and the search would pick the largest λ blindly."""
    tr = _trainer(tmp_path, "start", taujp_lambda="auto", taujp_lambda_grid=[0.1], taujp_auto_pilot=0.25,
                  taujp_auto_tolerance=10.0, taujp_start_step=4)
    penalised = []
    orig = TauJpTrainer.compute_loss

    def spy(self, model, inputs, *a, **k):
        out = orig(self, model, inputs, *a, **k)
        penalised.append((self._taujp_lambda, self.state.global_step, self.args.taujp_start_step))
        return out

    monkeypatch.setattr(TauJpTrainer, "compute_loss", spy)
    tr.train()
    rec = tr.taujp_lambda_search
    assert rec["pilot_steps"] == 2 and rec["pilot_start_step"] == 1
    pilot = [(s, st) for lam, s, st in penalised if lam == 0.1 and st == 1]
    assert pilot and max(s for s, _ in pilot) >= 1  # the λ = 0.1 pilot reached its (scaled) first penalized step
    assert rec["curve"][1]["taujp_penalty"] is not None  # and logged a penalty
    assert tr.args.taujp_start_step == 4  # the full run keeps its own start
