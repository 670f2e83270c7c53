"""Coefficient search (task-arithmetic protocol of Ilharco et al. / Ortiz-Jiménez et al.: α chosen on a
validation split from linspace(0, 1, 21)), and the one rule that picks α from a grid of validation scores."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from .merge import merge
from .methods import MergeConfigError

# The α grid of the task-arithmetic protocol (0.00…1.00 step 0.05), the one definition in the package:
# `hf_taujp.evaluation.DEFAULT_ALPHAS` is this tuple.
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))

# Scores (and distances to the preferred α) are compared after rounding to this many decimals, so float
# noise in a mean of ratios (1e-16) decides nothing: a difference below 1e-9 is a tie.
TIE_DECIMALS = 9


def _undefined(score) -> bool:
    return score is None or math.isnan(score)


def select_coefficient(
    alphas: Sequence[float],
    scores: Sequence[float | None],
    *,
    maximize: bool = True,
    prefer: float = 1.0,
) -> int:
    """Index of the coefficient to choose from a grid of validation scores: the one selection rule of the
    package (task addition, task negation, :func:`search_coefficients`).

    ``scores[i]`` is the validation score of ``alphas[i]``. The chosen index has the best score (highest
    with ``maximize``, else lowest) after rounding to 1e-9 (``TIE_DECIMALS``); ties go to the α nearest
    ``prefer`` (distance also rounded to 1e-9): with the default 1.0 a flat curve reports the one-shot
    α = 1, where task arithmetic needs no coefficient search. α equally far below and above ``prefer``:
    the smaller (the one extrapolating less). An undefined score (``None`` or NaN, e.g. a normalized
    accuracy over a task whose single-task score is 0) is never chosen.

    Raises:
        MergeConfigError: empty grid, ``len(alphas) != len(scores)``, a NaN α, or no defined score.
    """
    alphas = [float(a) for a in alphas]
    if not alphas:
        raise MergeConfigError("empty coefficient grid")
    if len(scores) != len(alphas):
        raise MergeConfigError(f"{len(scores)} scores for a grid of {len(alphas)} coefficients")
    if any(math.isnan(a) for a in alphas):
        raise MergeConfigError(f"the coefficient grid holds NaN: {alphas}")
    best, best_key = None, None
    for i, (a, s) in enumerate(zip(alphas, scores)):
        if _undefined(s):
            continue
        r = round(float(s), TIE_DECIMALS)
        key = (r if maximize else -r, -round(abs(a - prefer), TIE_DECIMALS), -a)
        if best_key is None or key > best_key:
            best, best_key = i, key
    if best is None:
        raise MergeConfigError(f"no defined score (all None or NaN) on the coefficient grid {alphas}")
    return best


def search_coefficients(
    base: Any,
    vectors: Sequence[Any],
    eval_fn: Callable[[Any], float],
    grid: Sequence[float] | None = None,
    *,
    mode: str = "shared",
    method: str = "task_arithmetic",
    maximize: bool = True,
    rounds: int = 1,
    progress: bool = True,
    **params,
) -> dict:
    """Score merges over a coefficient grid with ``eval_fn(merged_model) -> float``.

    ``mode="shared"``: one α for all vectors (``weights=[α]*T``), every α in ``grid`` (default
    0.00…1.00 step 0.05). ``mode="per_vector"``: coordinate search, starting from the best shared α,
    then for each vector in turn the grid value that scores best with the others fixed (``rounds`` passes).
    Each choice follows :func:`select_coefficient` (ties to 1e-9 → the α nearest 1; NaN scores never
    chosen). Works with any method (α is passed as ``weights``). Returns ``{"table": [{"weights": [...],
    "score": s}, ...], "best_weights": [...], "best_score": s}``.

    Raises:
        MergeConfigError: no vectors, unknown ``mode``, empty grid, every score NaN.
    """
    if not vectors:
        raise MergeConfigError("empty list of task vectors: nothing to search")
    if mode not in ("shared", "per_vector"):
        raise MergeConfigError(f'mode must be "shared" or "per_vector", got {mode!r}')
    grid = [float(a) for a in (DEFAULT_GRID if grid is None else grid)]
    if not grid:
        raise MergeConfigError("empty coefficient grid")
    T = len(vectors)
    table: list[dict] = []
    cache: dict[tuple, float] = {}

    def score(w):
        key = tuple(float(x) for x in w)
        if key not in cache:
            model = merge(base, vectors, method, weights=list(key), progress=False, **params)
            cache[key] = float(eval_fn(model))
            table.append({"weights": list(key), "score": cache[key]})
        return cache[key]

    scores = [score([a] * T) for a in tqdm(grid, desc="search (shared)", disable=not progress)]
    i = select_coefficient(grid, scores, maximize=maximize)
    best_w, best_s = [grid[i]] * T, scores[i]
    if mode == "per_vector":
        for _ in range(rounds):
            for t in tqdm(range(T), desc="search (per vector)", disable=not progress):
                scores = [score(best_w[:t] + [a] + best_w[t + 1:]) for a in grid]
                i = select_coefficient(grid, scores, maximize=maximize)
                best_w, best_s = best_w[:t] + [grid[i]] + best_w[t + 1:], scores[i]
    return {"table": table, "best_weights": [float(x) for x in best_w], "best_score": best_s}
