"""One rule picks α from a grid of validation scores (merging.search.select_coefficient), and every caller
(task addition, task negation, search_coefficients) follows it: checked on fixed score tables, by hand."""
import math

import pytest
import torch

from hf_taujp.errors import HfTaujpError
from hf_taujp.evaluation import _addition_protocol, evaluate_task_negation
from hf_taujp.merging import search_coefficients, select_coefficient
from hf_taujp.task_vector import TaskVector
from tests.tiny_models import Scalar

NAN = float("nan")


# ------------------------------------------------------------------------------- the rule itself
def test_best_score_wins():
    assert select_coefficient([0.0, 0.5, 1.0], [0.2, 0.9, 0.4]) == 1
    assert select_coefficient([0.0, 0.5, 1.0], [0.2, 0.9, 0.4], maximize=False) == 0


def test_ties_go_to_the_alpha_nearest_one():
    # 0.25 and 0.75 score the same (0.8): 0.75 is nearer 1.
    assert select_coefficient([0.0, 0.25, 0.5, 0.75], [0.1, 0.8, 0.3, 0.8]) == 3
    # A flat curve reports one-shot α = 1.
    assert select_coefficient([0.0, 0.5, 1.0], [0.5, 0.5, 0.5]) == 2


def test_scores_within_1e9_are_a_tie_and_1e8_is_not():
    # 0.3 beats 0.9 by 1e-12 only (float noise in a mean of ratios): a tie, 0.9 is nearer 1.
    assert select_coefficient([0.3, 0.9], [0.7 + 1e-12, 0.7]) == 1
    # 1e-8 is a real difference.
    assert select_coefficient([0.3, 0.9], [0.7 + 1e-8, 0.7]) == 0


def test_tie_between_alpha_below_and_above_one_goes_to_the_smaller():
    # 1 − 0.85 = 0.15000000000000002 > 1.15 − 1 = 0.1499999999999999 in floats: the distance is rounded too,
    # so this is a tie, and the smaller α (less extrapolation) wins, whatever the grid order.
    assert select_coefficient([0.85, 1.15], [0.6, 0.6]) == 0
    assert select_coefficient([1.15, 0.85], [0.6, 0.6]) == 1
    assert select_coefficient([0.5, 1.5, 0.0], [0.6, 0.6, 0.1]) == 0


def test_undefined_scores_are_never_chosen_wherever_they_stand():
    # max() over tuples with a NaN first kept the NaN; the rule skips it.
    assert select_coefficient([0.0, 0.5, 1.0], [NAN, 0.4, 0.3]) == 1
    assert select_coefficient([0.0, 0.5, 1.0], [0.2, NAN, 0.3]) == 2
    assert select_coefficient([0.0, 0.5, 1.0], [None, 0.4, None]) == 1
    assert select_coefficient([0.0, 0.5, 1.0], [NAN, 0.4, 0.9], maximize=False) == 1


def test_single_point():
    assert select_coefficient([0.35], [0.0]) == 0
    assert select_coefficient([0.35], [-2.5], maximize=False) == 0


def test_prefer_moves_the_tie_break():
    # Negation prefers the smallest edit: ties go to the α nearest 0.
    assert select_coefficient([0.0, 0.5, 1.0], [0.3, 0.1, 0.1], maximize=False, prefer=0.0) == 1
    assert select_coefficient([-0.5, 0.25, 1.0], [0.1, 0.1, 0.1], prefer=0.0) == 1


@pytest.mark.parametrize("alphas, scores, match", [
    ([], [], "empty coefficient grid"),
    ([0.0, 1.0], [0.5], "1 scores for a grid of 2"),
    ([0.0, NAN], [0.5, 0.6], "NaN"),
    ([0.0, 1.0], [NAN, None], "no defined score"),
])
def test_bad_grids_raise_a_named_error(alphas, scores, match):
    with pytest.raises(HfTaujpError, match=match):
        select_coefficient(alphas, scores)


# --------------------------------------------------------------------------- task addition follows it
def _addition(table, single=None, alphas=None):
    """_addition_protocol on a fixed table {α: {task: accuracy}} (same on val and test)."""
    single = single or {"val": {"a": 1.0, "b": 0.5}, "test": {"a": 1.0, "b": 0.5}}
    alphas = sorted(table) if alphas is None else alphas
    return _addition_protocol(["a", "b"], single, alphas, False, lambda a, t, s, _m: table[a][t])


def test_addition_ties_go_to_the_alpha_nearest_one():
    # mean normalized accuracy: α=0.25 → (0.6 + 0.4/0.5)/2 = 0.7, α=0.5 → (0.8 + 0.3/0.5)/2 = 0.7, α=1 → 0.5.
    table = {0.25: {"a": 0.6, "b": 0.4}, 0.5: {"a": 0.8, "b": 0.3}, 1.0: {"a": 0.5, "b": 0.25}}
    assert _addition(table)["best_alpha"] == 0.5


def test_addition_never_chooses_a_nan_score():
    table = {0.0: {"a": NAN, "b": 0.5}, 0.5: {"a": 0.4, "b": 0.2}, 1.0: {"a": 0.2, "b": 0.1}}
    r = _addition(table)
    assert math.isnan(r["curve"][0]["avg_norm"])
    assert r["best_alpha"] == 0.5  # (0.4 + 0.4)/2 = 0.4 > (0.2 + 0.2)/2


def test_addition_single_point_grid_adds_one_and_a_tie_below_and_above_one_goes_below():
    table = {0.85: {"a": 0.5, "b": 0.25}, 1.0: {"a": 0.4, "b": 0.2}, 1.15: {"a": 0.5, "b": 0.25}}
    assert _addition(table, alphas=[0.85])["best_alpha"] == 0.85  # grid [0.85] + the one-shot α = 1
    assert _addition(table, alphas=[1.15, 0.85])["best_alpha"] == 0.85


def test_addition_falls_back_to_the_absolute_mean_when_no_normalized_score_exists():
    single = {"val": {"a": 0.0, "b": -0.1}, "test": {"a": 0.0, "b": -0.1}}  # e.g. Matthews correlations
    table = {0.0: {"a": 0.1, "b": 0.1}, 0.5: {"a": 0.3, "b": 0.1}, 1.0: {"a": 0.1, "b": 0.3}}
    assert _addition(table, single=single)["best_alpha"] == 1.0  # avg_abs 0.2 at 0.5 and 1: tie → 1


# ------------------------------------------------------------------------------ negation follows it
def _negation(target, control, alphas):
    """evaluate_task_negation on fixed tables {α: accuracy}; θ0 − α τ with τ = 1 puts w = −α."""
    def eval_fn(model, task, split):
        a = round(-float(model.w.detach()), 6) + 0.0
        return (target if task == "target" else control)[a]
    return evaluate_task_negation(Scalar(), TaskVector({"w": torch.tensor([1.0])}), eval_fn, alphas=alphas)


def test_negation_lowest_target_under_the_control_constraint_ties_to_the_smallest_edit():
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    target = {0.0: 0.9, 0.25: 0.5, 0.5: 0.2, 0.75: 0.2, 1.0: 0.1}
    control = {0.0: 0.8, 0.25: 0.8, 0.5: 0.79, 0.75: 0.77, 1.0: 0.5}  # ≥ 0.95 · 0.8 = 0.76 up to 0.75
    assert _negation(target, control, alphas)["alpha"] == 0.5  # 0.5 and 0.75 tie at 0.2 → nearer 0


def test_negation_never_chooses_a_nan_target_and_keeps_theta0_when_no_alpha_is_admissible():
    alphas = [0.0, 0.5, 1.0]
    target = {0.0: 0.9, 0.5: NAN, 1.0: 0.6}
    assert _negation(target, {0.0: 0.8, 0.5: 0.8, 1.0: 0.8}, alphas)["alpha"] == 1.0
    assert _negation(target, {0.0: 0.8, 0.5: 0.1, 1.0: 0.1}, [0.5, 1.0])["alpha"] == 0.0


def test_negation_on_an_empty_grid_raises():
    with pytest.raises(HfTaujpError, match="empty coefficient grid"):
        _negation({0.0: 0.9}, {0.0: 0.8}, [])


# ------------------------------------------------------------------- search_coefficients follows it
def _search(table, grid, **kw):
    """search_coefficients over one vector τ = 1 on w = 0: the merged w is α, scored from `table`."""
    eval_fn = lambda sd: table[round(float(sd["w"]), 2)]  # noqa: E731
    return search_coefficients({"w": torch.zeros(1)}, [{"w": torch.ones(1)}], eval_fn, grid, progress=False, **kw)


def test_search_ties_go_to_the_alpha_nearest_one_like_task_addition():
    # Before the one rule, search kept the first grid point of a tie (α = 0 on a flat curve) while task
    # addition reported α = 1 on the same scores.
    assert _search({0.0: 0.5, 0.5: 0.5, 1.0: 0.5}, [0.0, 0.5, 1.0])["best_weights"] == [1.0]
    assert _search({0.0: 0.2, 0.25: 0.7, 0.75: 0.7}, [0.0, 0.25, 0.75])["best_weights"] == [0.75]
    assert _search({0.85: 0.6, 1.15: 0.6}, [1.15, 0.85])["best_weights"] == [0.85]


def test_search_never_chooses_a_nan_score():
    # Before, a NaN at the first grid point stayed "best" (nothing compares greater than NaN).
    r = _search({0.0: NAN, 0.5: 0.4, 1.0: 0.3}, [0.0, 0.5, 1.0])
    assert r["best_weights"] == [0.5] and r["best_score"] == 0.4
    r = _search({0.0: NAN, 0.5: 0.4, 1.0: 0.3}, [0.0, 0.5, 1.0], maximize=False)
    assert r["best_weights"] == [1.0] and r["best_score"] == 0.3


def test_search_single_point_and_bad_grids():
    assert _search({0.3: -1.0}, [0.3])["best_weights"] == [0.3]
    with pytest.raises(HfTaujpError, match="empty coefficient grid"):
        _search({}, [])
    with pytest.raises(HfTaujpError, match="no defined score"):
        _search({0.0: NAN, 1.0: NAN}, [0.0, 1.0])


def test_per_vector_ties_follow_the_rule_too():
    base = {"w": torch.zeros(2)}
    t1, t2 = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    # score depends on the first coefficient only, flat in the second: the second goes to 1.
    eval_fn = lambda sd: -abs(float(sd["w"][0]) - 0.5)  # noqa: E731
    r = search_coefficients(base, [t1, t2], eval_fn, [0.0, 0.5, 1.0], mode="per_vector", progress=False)
    assert r["best_weights"] == [0.5, 1.0] and r["best_score"] == 0.0
