"""Merge methods against hand computations (numbers written out, float64) and PEFT's merge_utils."""
import warnings

import pytest
import torch
from peft.utils import merge_utils as pm

from hf_taujp.hub import HfTaujpError
from hf_taujp.merging import methods as M

D = torch.float64
t1 = torch.tensor([[0.5, -2.0], [1.0, 0.1]], dtype=D)
t2 = torch.tensor([[-1.0, 1.0], [3.0, -0.2]], dtype=D)
t3 = torch.tensor([[0.2, -0.5], [-4.0, 0.3]], dtype=D)
base = torch.zeros(2, 2, dtype=D)


def test_task_arithmetic_hand():
    out = M.task_arithmetic(base, [t1, t2], weights=[0.5, -1.0])
    # 0.5*t1 - t2, entry by entry
    want = torch.tensor([[0.25 + 1.0, -1.0 - 1.0], [0.5 - 3.0, 0.05 + 0.2]], dtype=D)
    torch.testing.assert_close(out, want)


def test_magnitude_prune_hand():
    # density 0.5 of 4 entries keeps 2 largest |.|: t1 -> -2.0, 1.0 ; t2 -> 3.0, -1.0 (|1.0| tie: topk)
    out = M.magnitude_prune(base, [t1, t3], density=0.5)
    want = torch.tensor([[0.0, -2.0 - 0.5], [1.0 - 4.0, 0.0]], dtype=D)
    torch.testing.assert_close(out, want)


def test_ties_hand():
    # density 0.5: t1 -> [[0,-2],[1,0]]; t2 -> [[0,0],[3,0]] (|-1|,|1| tie broken by topk: check below)
    a = torch.tensor([[0.0, -2.0], [1.0, 0.0]], dtype=D)
    b = torch.tensor([[0.0, 0.0], [3.0, -0.5]], dtype=D)
    c = torch.tensor([[0.5, 1.0], [-4.0, 0.0]], dtype=D)
    out = M.ties(base, [a, b, c], density=1.0, weights=[1.0, 2.0, 1.0])
    # sign (total, unweighted): [0.5 -> +, -1 -> -, 0 -> +, -0.5 -> -]
    # (0,0): only c agrees (+): 1*0.5/1 ; (0,1): a agrees: -2/1 ; (1,0): a,b agree (+): (1 + 2*3)/2
    # (1,1): b agrees (-): 2*-0.5/1
    want = torch.tensor([[0.5, -2.0], [3.5, -1.0]], dtype=D)
    torch.testing.assert_close(out, want)
    # frequency: (1,0) signs +,+,- -> +; same here. (0,1): -,0,+ -> sum 0 -> + : c only -> 1.0
    out_f = M.ties(base, [a, b, c], density=1.0, weights=[1.0, 2.0, 1.0], majority_sign_method="frequency")
    torch.testing.assert_close(out_f, torch.tensor([[0.5, 1.0], [3.5, -1.0]], dtype=D))


def test_ties_mergekit_definition_hand():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    b = torch.tensor([-3.0, 1.0, 0.25], dtype=D)
    # density 2/3 -> k = 2: a keeps [1,-2,0], b keeps [-3,1,0]; weights 1, 0.5
    # delta: a [1,-2,0], b [-1.5,0.5,0]; sum [-0.5,-1.5,0] -> sign [-,-,+]
    # entry0: b only: -1.5 / 0.5 = -3; entry1: a only: -2/1 = -2; entry2: both 0 -> sign + : 0 ; div = 1+0.5? masks
    out = M.ties(base[0, :1].new_zeros(3), [a, b], density=2 / 3, weights=[1.0, 0.5], definition="mergekit")
    torch.testing.assert_close(out, torch.tensor([-3.0, -2.0, 0.0], dtype=D))


def test_dare_linear_hand_and_density_one():
    out = M.dare_linear(base, [t1, t2], weights=[1.0, 1.0], density=1.0, seed=0)
    torch.testing.assert_close(out, t1 + t2)
    # density 0.5 rescales kept entries by 2 and drops the rest: every entry is 0 or 2*tau
    out = M.dare_linear(base, [t1], density=0.5, seed=3)
    ok = (out == 0) | torch.isclose(out, 2 * t1)
    assert bool(ok.all())


def test_fisher_average_hand():
    F1 = torch.tensor([1.0, 0.0, 2.0], dtype=D)
    F2 = torch.tensor([3.0, 0.0, 2.0], dtype=D)
    a = torch.tensor([4.0, 1.0, -1.0], dtype=D)
    b = torch.tensor([0.0, 3.0, 1.0], dtype=D)
    out = M.fisher_average(torch.zeros(3, dtype=D), [a, b], fishers=[F1, F2])
    # (1*4 + 3*0)/4 = 1 ; floor only -> plain mean 2 ; (2*-1 + 2*1)/4 = 0
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 0.0], dtype=D))


def test_fisher_average_all_zero_warns():
    z = torch.zeros(3, dtype=D)
    with pytest.warns(UserWarning, match="all zero"):
        out = M.fisher_average(z, [torch.ones(3, dtype=D), 3 * torch.ones(3, dtype=D)], fishers=[z, z])
    torch.testing.assert_close(out, 2 * torch.ones(3, dtype=D))


def test_gradient_matching_hand():
    a = torch.tensor([1.0, 2.0], dtype=D)
    b = torch.tensor([3.0, -1.0], dtype=D)
    H1 = torch.tensor([1.0, 0.5], dtype=D)
    H2 = torch.tensor([2.0, 0.0], dtype=D)
    H0 = torch.tensor([4.0, 1.0], dtype=D)
    out = M.gradient_matching(torch.zeros(2, dtype=D), [a, b], fishers=[H1, H2], num_examples=[10, 20],
                              base_fisher=H0, base_num_examples=5, lambda_=0.5, delta=0.0)
    # entry 0: prior 20; denom 20 + 0.5*(10+40)=45; 0.5*[(30/45)*1 + (60/45)*3] = 0.5*(210/45)
    # entry 1: prior 5; denom 5 + 0.5*5 = 7.5; 0.5*[(10/7.5)*2 + (5/7.5)*(-1)] = 0.5*(15/7.5)
    torch.testing.assert_close(out, torch.tensor([0.5 * 210 / 45, 0.5 * 15 / 7.5], dtype=D))


def test_gradient_matching_reduces_to_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(5, 3, generator=g, dtype=D) for _ in range(3)]
    c = 0.7
    H = [torch.full((5, 3), c, dtype=D) for _ in taus]
    alpha, s = 0.3, 100.0
    out = M.gradient_matching(torch.zeros(5, 3, dtype=D), taus, fishers=H, num_examples=[s] * 3,
                              base_fisher=torch.full((5, 3), c, dtype=D), base_num_examples=s,
                              lambda_=alpha, delta=0.0)
    # every factor is (s c + s c)/(s c + alpha*3 s c) = 2/(1+3 alpha): task arithmetic with that scale
    scale = alpha * 2 / (1 + 3 * alpha)
    torch.testing.assert_close(out, scale * sum(taus))


def _rand(seed, n=3, shape=(6, 7)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("method", ["task_arithmetic", "magnitude_prune", "ties", "ties_frequency"])
def test_matches_peft_deterministic(method):
    taus = _rand(1)
    w = [0.7, 0.3, 1.2]  # negative weights: test_negation_is_merging_the_negated_vector
    wt = torch.tensor(w)
    if method == "task_arithmetic":
        ref, out = pm.task_arithmetic(taus, wt), M.task_arithmetic(None, taus, weights=w)
    elif method == "magnitude_prune":
        ref, out = pm.magnitude_prune(taus, wt, 0.3), M.magnitude_prune(None, taus, weights=w, density=0.3)
    else:
        msm = "frequency" if method.endswith("frequency") else "total"
        ref = pm.ties(taus, wt, 0.4, msm)
        out = M.ties(None, taus, weights=w, density=0.4, majority_sign_method=msm)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_matches_peft_dare_seeded(method):
    taus = _rand(2)
    w = [0.7, 0.3, 1.2]
    torch.manual_seed(123)  # PEFT draws from the global RNG, tensor by tensor in order
    ref = getattr(pm, method)(taus, torch.tensor(w), 0.6)
    out = M.get_merge_method(method)(None, taus, weights=w, density=0.6, seed=123)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_bad_density(density):
    with pytest.raises(HfTaujpError, match="density"):
        M.ties(None, _rand(0), density=density)


def test_empty_and_missing_stats_and_nan():
    with pytest.raises(HfTaujpError, match="empty"):
        M.task_arithmetic(None, [])
    with pytest.raises(M.MissingStatisticsError):
        M.fisher_average(None, _rand(0))
    with pytest.raises(M.MissingStatisticsError):
        M.gradient_matching(None, _rand(0), fishers=[torch.ones(6, 7)])
    bad = torch.ones(6, 7)
    bad[0, 0] = float("nan")
    with pytest.raises(HfTaujpError, match="NaN"):
        M.fisher_average(None, _rand(0, n=2), fishers=[bad, torch.ones(6, 7)])
    with pytest.raises(HfTaujpError, match="unknown merge method"):
        M.get_merge_method("nope")


def test_kth_largest_and_mergekit_mask_match_a_sort():
    g = torch.Generator().manual_seed(5)
    for n in (7, 3000, (1 << 20) + 12345):  # the last one takes the sampled-bracket path
        a = torch.randn(n, generator=g).abs()
        srt = torch.sort(a, descending=True).values
        for k in (1, n // 5, n // 2, n):
            k = max(1, k)
            assert M.kth_largest(a, k).item() == srt[k - 1].item()
    # mergekit's rule: the k = max(1, int(density·n)) entries first in argsort(|t|, descending)
    t = torch.randn(1100, 1000, generator=g)
    k = max(1, int(0.2 * t.numel()))
    want = torch.zeros(t.numel(), dtype=torch.bool)
    want[torch.argsort(t.abs().reshape(-1), descending=True)[:k]] = True
    assert torch.equal(M._magnitude_mask_mergekit(t, 0.2), want.reshape(t.shape))
    # ties at the threshold keep every tied entry (documented difference from argsort's arbitrary pick)
    assert int(M._magnitude_mask_mergekit(torch.tensor([3.0, 1.0, 1.0, 1.0]), 0.5).sum()) == 4


def test_ties_mergekit_loop_equals_stacked_formula():
    taus = _rand(4, n=4, shape=(30, 20))
    w = [0.5, 1.0, -0.7, 2.0]
    for msm in ("total", "frequency"):
        out = M.ties(None, taus, weights=w, density=0.3, majority_sign_method=msm, definition="mergekit")
        # mergekit's formula written with (T, *S) stacks, argsort trim
        k = int(0.3 * 600)
        tr = []
        for t in taus:
            m = torch.zeros(600)
            m[torch.argsort(t.abs().reshape(-1), descending=True)[:k]] = 1
            tr.append(t * m.reshape(t.shape))
        wt = torch.tensor(w).reshape(4, 1, 1)
        d = torch.stack(tr) * wt
        el = d.sum(0) if msm == "total" else d.sign().sum(0)
        sign = (el >= 0).float() * 2 - 1
        mask = d.sign() == sign
        div = (wt.abs() * mask).sum(0)  # mergekit sums α_t; |α_t| is our negation rule (same for α ≥ 0)
        div[div == 0] = 1
        torch.testing.assert_close(out, (d * mask).sum(0) / div)


def test_ties_mergekit_blocked_kernel_on_a_large_tensor():
    # 300k entries: many blocks of methods.BLOCK and the sampled-bracket threshold of kth_largest
    g = torch.Generator().manual_seed(11)
    taus = [torch.randn(600, 500, generator=g) * s for s in (1.0, 0.5, 2.0)]
    w = [1.0, -0.5, 0.8]
    out = M.ties(None, taus, weights=w, density=0.2, lambda_=0.7, definition="mergekit")
    n, k = 300_000, int(0.2 * 300_000)
    d = []
    for t, a in zip(taus, w):
        m = torch.zeros(n)
        m[torch.argsort(t.abs().reshape(-1), descending=True)[:k]] = 1
        d.append(a * t.reshape(-1) * m)
    d = torch.stack(d)
    sign = (d.sum(0) >= 0).float() * 2 - 1
    mask = d.sign() == sign
    div = (torch.tensor(w).abs()[:, None] * mask).sum(0)
    div[div == 0] = 1
    torch.testing.assert_close(out.reshape(-1), 0.7 * (d * mask).sum(0) / div)
