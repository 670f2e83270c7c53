"""Coefficient search (task-arithmetic protocol of Ilharco et al. / Ortiz-Jiménez et al.: α chosen on a
validation split from linspace(0, 1, 21))."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from .merge import merge
from .methods import MergeConfigError

# The α grid of the task-arithmetic protocol (0.00…1.00 step 0.05), the one definition in the package:
# `hf_taujp.evaluation.DEFAULT_ALPHAS` is this tuple.
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))


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
    Works with any method (α is passed as ``weights``). Returns ``{"table": [{"weights": [...],
    "score": s}, ...], "best_weights": [...], "best_score": s}``.
    """
    if not vectors:
        raise MergeConfigError("empty list of task vectors: nothing to search")
    if mode not in ("shared", "per_vector"):
        raise MergeConfigError(f'mode must be "shared" or "per_vector", got {mode!r}')
    grid = list(DEFAULT_GRID if grid is None else grid)
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

    better = (lambda a, b: a > b) if maximize else (lambda a, b: a < b)
    best_w, best_s = None, None
    for a in tqdm(grid, desc="search (shared)", disable=not progress):
        s = score([a] * T)
        if best_s is None or better(s, best_s):
            best_w, best_s = [a] * T, s
    if mode == "per_vector":
        for _ in range(rounds):
            for t in tqdm(range(T), desc="search (per vector)", disable=not progress):
                for a in grid:
                    w = list(best_w)
                    w[t] = a
                    s = score(w)
                    if better(s, best_s):
                        best_w, best_s = w, s
    return {"table": table, "best_weights": [float(x) for x in best_w], "best_score": best_s}
