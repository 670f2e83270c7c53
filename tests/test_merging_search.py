"""Coefficient search finds the α of a known quadratic optimum."""
import torch

from hf_taujp.merging.search import DEFAULT_GRID, search_coefficients


def test_shared_and_per_vector():
    base = {"w": torch.zeros(2)}
    t1, t2 = {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}
    target = torch.tensor([0.3, 0.8])
    eval_fn = lambda sd: -float(((sd["w"] - target) ** 2).sum())  # noqa: E731
    r = search_coefficients(base, [t1, t2], eval_fn, progress=False)
    assert len(r["table"]) == 21 and DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 1.0
    assert r["best_weights"] == [0.55, 0.55]  # argmin of (a-0.3)^2 + (a-0.8)^2 on the grid
    r = search_coefficients(base, [t1, t2], eval_fn, mode="per_vector", progress=False)
    torch.testing.assert_close(torch.tensor(r["best_weights"]), torch.tensor([0.3, 0.8]))
