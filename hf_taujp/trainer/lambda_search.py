"""`taujp_lambda="auto"`: λ chosen on the validation split by short pilot runs (issue 21).

The rule (one place, used by the trainer and the recipes): **the largest λ of the grid whose validation
score stays within a tolerance of λ = 0's, and the grid's smallest λ when none does** (λ = 0 is plain —
linearized — fine-tuning of the same task: the reference, never the answer, since a τJp run that came back
unpenalized would be a different method under τJp's name; measured, README "A λ that transfers": one task
of four at λ = 0 was enough to sink the merge). More λ means less interference with the other tasks
(smaller ‖J·τ‖ on their inputs, the quantity τJp trades against the task loss), so among the λ that keep
the task's own accuracy, the largest is the most disentangled; the grid's lower end is the weakest penalty
the user accepts. It needs nothing but the task's own validation data — the author of one task vector
never needs the other tasks' labels or the merged model (the Hub setting), and the same rule gives each
task its own λ.

Cost sharing: every λ is a pilot of ``taujp_auto_pilot`` × the run's steps (its own LR schedule), taken
in increasing λ from λ = 0 and stopped at the first λ that breaks the tolerance (larger λ only fit the
task worse), then one full run at the chosen λ: at most (1 + |grid|)·pilot + 1 runs, ≈ 2 runs for the
default grid and pilot 1/4 instead of |grid| + 1.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

from transformers import Trainer
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.utils import logging

from ..errors import HfTaujpError

logger = logging.get_logger(__name__)

# Default grids per penalty form (``taujp_norm``), each a decade apart: "l2" spans the paper's grid
# (1e-3 … 1e-1, Yoshida et al. 2025) and one decade more; the size-free forms are in the task loss's units.
DEFAULT_LAMBDA_GRIDS = {
    "l2": (1e-3, 1e-2, 1e-1, 1.0),
    "sq_l2": (1e-4, 1e-3, 1e-2, 1e-1),
    "rms": (1e-1, 1.0, 10.0, 100.0),
    "relative": (1e-1, 1.0, 10.0, 100.0),
    "kl": (1e-1, 1.0, 10.0, 100.0),
    # taujp_regularizer="kfac": a decade either side of the reference's λ = 500 (Porrello et al. 2026)
    "kfac": (5.0, 50.0, 500.0, 5000.0),
}


def lambda_grid(norm: str, grid: Sequence[float] | None = None) -> list[float]:
    """The λ grid of ``taujp_lambda="auto"``: ``grid`` (sorted) or the default of the norm; all > 0, distinct.

    Raises:
        HfTaujpError: an empty grid, a λ ≤ 0, NaN or repeated.
    """
    g = list(DEFAULT_LAMBDA_GRIDS[norm] if grid is None else grid)
    if not g or any(not isinstance(x, (int, float)) or not x > 0 or math.isinf(x) for x in g) or len(set(g)) != len(g):
        raise HfTaujpError(f"taujp_lambda_grid must be distinct finite numbers > 0, got {grid!r}")
    return sorted(float(x) for x in g)


def check_auto_settings(pilot, tolerance, names: tuple[str, str] = ("taujp_auto_pilot", "taujp_auto_tolerance")) -> None:
    """Check ``taujp_lambda="auto"``'s pilot length (a fraction of the run's steps, in (0, 1]) and tolerance (a
    finite number ≥ 0, the score's units); ``names`` are the option names the errors give.

    Raises:
        HfTaujpError: either out of range, or not a number (bool included).
    """
    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not (number(pilot) and 0 < pilot <= 1):
        raise HfTaujpError(f"{names[0]} must lie in (0, 1], got {pilot!r}")
    if not (number(tolerance) and 0 <= tolerance < math.inf):
        raise HfTaujpError(f"{names[1]} must be a finite number >= 0, got {tolerance!r}")


def within_tolerance(score: float, reference: float, tolerance: float, greater_is_better: bool) -> bool:
    """True when ``score`` is at most ``tolerance`` worse than ``reference``, in the metric's own units (accuracy
    or correlation points, nats of eval loss), in the direction that is worse (lower score, higher loss).
    Absolute, not relative: a relative slack vanishes for metrics near 0 (a Matthews correlation of −0.1)."""
    return score >= reference - tolerance if greater_is_better else score <= reference + tolerance


def choose_lambda(curve: Sequence[dict], tolerance: float, greater_is_better: bool) -> float:
    """The largest λ > 0 of ``curve`` (``[{"lambda": λ, "score": s}, ...]``, λ = 0 first) whose score is within
    ``tolerance`` of λ = 0's (see :func:`within_tolerance`); the smallest λ > 0 of the curve when none is.

    Raises:
        HfTaujpError: the curve has no λ = 0 entry first or no λ > 0, or a score is NaN.
    """
    if not curve or curve[0]["lambda"] != 0:
        raise HfTaujpError("the λ curve must start with λ = 0 (the reference run)")
    if len(curve) < 2:
        raise HfTaujpError("the λ curve has no λ > 0 to choose")
    if any(not math.isfinite(c["score"]) for c in curve):
        raise HfTaujpError(f"a validation score is not finite: {[c['score'] for c in curve]}")
    ref = curve[0]["score"]
    ok = [c["lambda"] for c in curve[1:] if within_tolerance(c["score"], ref, tolerance, greater_is_better)]
    return max(ok) if ok else min(c["lambda"] for c in curve[1:])


def _total_steps(trainer) -> int:
    """The full run's optimizer steps (``max_steps``, else epochs × batches per epoch)."""
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    per_epoch = math.ceil(len(trainer.get_train_dataloader()) / max(1, args.gradient_accumulation_steps))
    return math.ceil(args.num_train_epochs * per_epoch)


def pilot_steps(trainer) -> int:
    """Steps of one pilot: ``taujp_auto_pilot`` × the full run's optimizer steps (at least 1)."""
    return max(1, round(trainer.args.taujp_auto_pilot * _total_steps(trainer)))


def pilot_start_step(trainer, steps: int) -> int:
    """The first penalized step of a pilot of ``steps`` steps: ``taujp_start_step`` scaled like the run
    (round(start × steps / total)), so that a pilot is the full run shortened — a pilot shorter than the
    full run's start step would otherwise never apply the penalty, and every λ would score as λ = 0."""
    start = trainer.args.taujp_start_step
    return min(steps - 1, round(start * steps / _total_steps(trainer))) if start else 0


def search_lambda(trainer) -> dict:
    """Run the pilots of ``taujp_lambda="auto"`` on ``trainer`` and return the record
    ``{"chosen", "grid", "curve": [{"lambda", "score", "taujp_penalty"}], "metric", "greater_is_better",
    "tolerance", "pilot_steps", "pilot_start_step"}`` (the pilots' first penalized step, :func:`pilot_start_step`);
    the trainer's trainable parameters, optimizer and scheduler are back at their initial state afterwards (the
    full run starts from θ0 as without the search).

    The score is ``metric_for_best_model`` of ``trainer.evaluate()`` on its ``eval_dataset`` (default
    ``eval_loss``, lower is better; ``greater_is_better`` as the TrainingArguments say), or
    ``trainer.taujp_auto_score(trainer)`` when the trainer was given one (greater is better unless
    ``greater_is_better=False``).
    """
    args = trainer.args
    model = trainer.model
    custom = getattr(trainer, "taujp_auto_score", None)
    metric = args.metric_for_best_model or "loss"
    key = "taujp_auto_score" if custom is not None else metric if metric.startswith("eval_") else f"eval_{metric}"
    if custom is not None:
        greater = args.greater_is_better is not False
    else:
        greater = bool(args.greater_is_better) if args.greater_is_better is not None else not key.endswith("loss")
    grid = lambda_grid(args.taujp_grid_key, args.taujp_lambda_grid)
    steps = pilot_steps(trainer)
    # Initial state: what a pilot changes (trainable parameters, the optimizer / scheduler the caller gave).
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    given_opt, given_sched = trainer.optimizer, trainer.lr_scheduler
    opt_state = given_opt.state_dict() if given_opt is not None else None
    sched_state = given_sched.state_dict() if given_sched is not None else None
    opt_state = copy.deepcopy(opt_state)
    # A shallow copy, not dataclasses.replace: __post_init__ again would reset the accelerator state.
    pilot_args = copy.copy(args)
    pilot_args.max_steps, pilot_args.save_strategy, pilot_args.eval_strategy = steps, SaveStrategy.NO, IntervalStrategy.NO
    pilot_args.taujp_start_step = start_step = pilot_start_step(trainer, steps)
    pilot_args.load_best_model_at_end, pilot_args.push_to_hub = False, False

    def reset():
        params = dict(model.named_parameters())
        for n, t in start.items():
            params[n].data.copy_(t)
        trainer.optimizer, trainer.lr_scheduler = given_opt, given_sched
        if given_opt is not None:
            given_opt.load_state_dict(copy.deepcopy(opt_state))
        if given_sched is not None:
            given_sched.load_state_dict(sched_state)
        trainer._taujp_loaders, trainer._taujp_iters, trainer._taujp_epochs = None, {}, {}

    curve = []
    full_args = trainer.args
    try:
        trainer.args = pilot_args
        for lam in [0.0, *grid]:
            reset()
            trainer._taujp_lambda = lam
            logger.info(f"taujp_lambda=auto: pilot λ={lam:g} ({steps} steps)")
            Trainer.train(trainer)  # the stock loop (TauJpTrainer.train would start another search)
            pens = [h["taujp_penalty"] for h in trainer.state.log_history if "taujp_penalty" in h]
            res = {key: float(custom(trainer))} if custom is not None else trainer.evaluate()
            if key not in res:
                raise HfTaujpError(f"taujp_lambda=auto: evaluate() gave no {key!r} (metrics: {sorted(res)}); set "
                                   "metric_for_best_model to one of them")
            curve.append({"lambda": lam, "score": float(res[key]), "taujp_penalty": pens[-1] if pens else None})
            if lam > 0 and not within_tolerance(curve[-1]["score"], curve[0]["score"], args.taujp_auto_tolerance, greater):
                break  # larger λ fit the task worse still: not worth their pilots
    finally:
        trainer.args = full_args
        reset()
    chosen = choose_lambda(curve, args.taujp_auto_tolerance, greater)
    trainer._taujp_lambda = chosen
    record = {"chosen": chosen, "grid": grid, "curve": curve, "metric": key, "greater_is_better": greater,
              "tolerance": args.taujp_auto_tolerance, "pilot_steps": steps,
              "pilot_start_step": start_step}
    logger.info(f"taujp_lambda=auto: chose λ={chosen:g} from {curve}")
    return record
