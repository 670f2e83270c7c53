"""The τJp weight options of every recipe (GLUE, toxicity, CLIP), in one place: ``--lambda`` (a number, a comma
list where the recipe trains one run per λ, or ``auto``), ``--lambda-grid`` (the grid of ``auto``) and
``--taujp-norm`` (the penalty's form); their check before any work (:func:`parse_lambdas`); λ as written in run
labels and folders (:func:`lambda_text`); and what a run's results record of the λ it trained with
(:func:`lambda_record`: per task, the λ an ``auto`` search chose and its curve).

``auto`` is :mod:`hf_taujp.trainer.lambda_search`'s rule — each task's λ is the largest of the grid whose
validation score (the recipe's own metric on its validation split, computed on the vector a pilot run trained)
stays within ``TauJpConfig.taujp_auto_tolerance`` of λ = 0's, else the grid's smallest.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..hub import HfTaujpError
from .common import float_list, weights_of

__all__ = ["LambdaPlan", "parse_lambdas", "add_lambda_arguments", "cli_lambda", "lambda_text", "lambda_record",
           "vector_score"]


@dataclass(frozen=True)
class LambdaPlan:
    """The checked λ options of a recipe: ``lambdas`` — ``["auto"]`` or distinct numbers ≥ 0 (one run each) —,
    ``auto``, and ``grid``, the grid of ``auto`` (sorted; None without ``auto``)."""

    lambdas: list
    auto: bool
    grid: list[float] | None


def parse_lambdas(lam, lambda_grid: Sequence[float] | None, norm: str, *, several: bool = True,
                  norms: Sequence[str] | None = None, recipe: str = "this recipe") -> LambdaPlan:
    """Check a recipe's ``taujp_lambda`` / ``lambda_grid`` / ``taujp_norm`` before any data or model is read.

    Args:
        lam: a number ≥ 0, a sequence of them (one run per λ; only where ``several``), ``"auto"`` or ``["auto"]``.
        lambda_grid: the grid of ``"auto"`` (None: ``DEFAULT_LAMBDA_GRIDS[norm]``); only with ``"auto"``.
        norm: the penalty form (``TauJpConfig.taujp_norm``); ``norms`` restricts it (default: every form).
        several: whether the recipe trains one run per λ of a list.
    Raises:
        HfTaujpError: an unknown norm; λ not "auto" nor distinct numbers ≥ 0 (or several where one is allowed);
            a grid without "auto", or a grid with a λ ≤ 0, repeated or not finite.
    """
    from ..trainer.lambda_search import lambda_grid as checked_grid
    from ..trainer.penalty import TAUJP_NORMS

    allowed = tuple(norms) if norms is not None else TAUJP_NORMS
    if norm not in allowed:
        raise HfTaujpError(f"taujp_norm must be one of {allowed} in {recipe}, got {norm!r}")
    if lam == "auto" or (isinstance(lam, (list, tuple)) and list(lam) == ["auto"]):
        return LambdaPlan(["auto"], True, checked_grid(norm, lambda_grid))
    values = list(lam) if isinstance(lam, (list, tuple)) else [lam]
    try:
        lams = [] if any(isinstance(x, bool) for x in values) else [float(x) for x in values]
    except (TypeError, ValueError):
        lams = []
    if not lams or any(not (x >= 0) or x == float("inf") for x in lams) or len(set(lams)) != len(lams):
        raise HfTaujpError(f"taujp_lambda must be 'auto' or {'one or more distinct numbers' if several else 'a number'}"
                           f" >= 0, got {lam!r}")
    if len(lams) > 1 and not several:
        raise HfTaujpError(f"{recipe} trains each method once: one taujp_lambda or 'auto', got {lams}")
    if lambda_grid is not None:
        raise HfTaujpError("lambda_grid is the grid of taujp_lambda='auto'; with fixed λ pass them as taujp_lambda")
    return LambdaPlan(lams, False, None)


def _lambda_values(text: str) -> list[float] | list[str]:
    return ["auto"] if text.strip() == "auto" else float_list(text)


def add_lambda_arguments(p: argparse.ArgumentParser, *, default: float, lambda_help: str, several: bool = True,
                         norms: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """``--lambda`` (``dest="taujp_lambda"``, a list: pass it through :func:`cli_lambda`), ``--lambda-grid`` and
    ``--taujp-norm`` on a recipe's parser; ``lambda_help`` says what ``default`` is and why."""
    from ..trainer.penalty import TAUJP_NORMS

    lists = "; a comma list trains τJp once per λ and marks the one chosen on validation" if several else ""
    p.add_argument("--lambda", dest="taujp_lambda", type=_lambda_values, default=[default],
                   help=f"τJp weight λ ({lambda_help}){lists}; 'auto': each task's λ chosen on its validation split "
                        "by pilot runs (the largest λ of --lambda-grid whose validation score is at most 0.03 below "
                        "λ = 0's, else the grid's smallest)")
    p.add_argument("--lambda-grid", type=float_list, default=None,
                   help="λ grid of --lambda auto (default per --taujp-norm: l2 1e-3,1e-2,0.1,1; sq_l2 1e-4..0.1; "
                        "kl/rms/relative 0.1..100)")
    p.add_argument("--taujp-norm", default="l2", choices=list(norms) if norms is not None else list(TAUJP_NORMS),
                   help="penalty form per position (t = J·τ): l2 ‖t‖ (authors), sq_l2, rms ‖t‖/√D, relative ‖t‖/‖f‖"
                        + (", kl ½Var_softmax(f)(t) (second-order KL of the predictions, in nats)"
                           if norms is None or "kl" in norms else ""))
    return p


def cli_lambda(values: Sequence):
    """``--lambda``'s parsed list as the recipe function takes it: one value alone (a number or ``"auto"``)."""
    return values[0] if len(values) == 1 else list(values)


def lambda_text(lam: float | str) -> str:
    """λ as it appears in run labels and folder names: ``%g`` (``0.01``, ``1e-05``) when that text reads back
    as the same number, else ``repr`` (the shortest text that does, ``0.1000001``), so that two distinct λ never
    share a label or a folder (``%g`` alone writes 0.1 and 0.1000001 both as ``0.1``)."""
    if lam == "auto":
        return "auto"
    text = f"{lam:g}"
    return text if float(text) == lam else repr(float(lam))


def vector_score(method, model, linear_score: Callable[[Mapping], float], model_score: Callable[[], float]):
    """``fn(τ tensors) -> score`` for taujp_lambda="auto" (``finetune(lambda_score=)``), one rule for every recipe:
    a linear method's τ is read linearly, ``linear_score(τ)`` (the recipe's f(x; θ0) + J f·τ); any other is written
    into ``model`` as θ0 + τ for ``model_score()`` and θ0 restored after (:func:`~.common.weights_of`)."""
    if method.linear:
        return linear_score

    def score(tensors):
        with weights_of(model) as set_weights:
            set_weights(1.0, tensors)
            return model_score()

    return score


def lambda_record(regularized: bool, lam, stats: Mapping[str, dict]) -> dict:
    """What a run's results say of its λ: ``{"taujp_lambda": λ}`` — the run's λ, 0.0 for a method without a
    penalty, or with ``auto`` ``{task: chosen λ}`` — and, with ``auto``, ``"lambda_search"``: per task the
    search's record (:func:`hf_taujp.trainer.lambda_search.search_lambda`: grid, curve of validation scores,
    pilot steps) and the seconds that task's pilots and full run took. ``stats``: :func:`finetune`'s per task
    (empty for a loaded vector)."""
    searches = {n: {**st["lambda_search"], "seconds": round(st["seconds"], 1)}
                for n, st in stats.items() if st and st.get("lambda_search") is not None}
    out = {"taujp_lambda": ({n: r["chosen"] for n, r in searches.items()} if searches else lam)
           if regularized else 0.0}
    if searches:
        out["lambda_search"] = searches
    return out
