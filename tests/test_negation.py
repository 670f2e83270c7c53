"""Task negation (Ilharco et al. 2023, §3; the τJp paper's toxicity setting): θ0 − α·τ for a weight-space
vector, f(x; θ0) − α·J f(x; θ0)·τ for a linear (tangent) one. References: the weights computed by hand
in float64, and float64 central finite differences of the base model along τ."""

import copy

import pytest
import torch

from hf_taujp.task_vector import TaskVector
from tests.tiny_models import tiny_gpt2 as _tiny_gpt2

V = 100


def tiny_gpt2():
    return _tiny_gpt2(seed=None, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=1, pad_token_id=1).eval()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_negated_weight_space_vector_gives_theta0_minus_alpha_tau(alpha):
    base = tiny_gpt2()
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        for n, p in finetuned.named_parameters():
            if n.startswith("transformer.h.1."):  # a partial vector: only the last block moved
                p.add_(0.1 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    tv = TaskVector.from_models(base, finetuned)
    negated = (-tv).apply_to(base, alpha)
    ft = dict(finetuned.named_parameters())
    for n, p in negated.named_parameters():
        t0 = before[n].double()
        want = t0 - alpha * (ft[n].detach().double() - t0)  # θ0 − α (θ_ft − θ0), by hand
        torch.testing.assert_close(p.detach().double(), want, atol=1e-6, rtol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # the base is untouched
    moved = [n for n, p in negated.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(n.startswith("transformer.h.1.") for n in moved)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_negated_linear_vector_gives_f_minus_alpha_jvp(alpha):
    base = tiny_gpt2().double()
    tau = {n: 0.05 * torch.randn_like(p) for n, p in base.named_parameters() if ".attn." in n or ".mlp." in n}
    tv = TaskVector(tau, kind="linear")
    negated = (-tv).apply_to(base, alpha, linear=True)
    x = torch.randint(2, V, (2, 6))
    params, eps = dict(base.named_parameters()), 1e-5

    def f(sign):  # logits at θ0 + sign·ε·τ, float64
        with torch.no_grad():
            for n, t in tau.items():
                params[n].add_(sign * eps * t)
            y = base(input_ids=x).logits
            for n, t in tau.items():
                params[n].sub_(sign * eps * t)
        return y

    f0, jvp = f(0), (f(1) - f(-1)) / (2 * eps)
    want = f0 - alpha * jvp
    with torch.no_grad():
        got = negated(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-7)
    assert (got - f0).abs().max() > 1e-3  # the negation moved the outputs
    # Decoding from the negated linearized model reads the same f(θ0) − α J·τ (first generated step).
    out = negated.generate(input_ids=x, max_new_tokens=1, return_dict_in_generate=True, output_logits=True)
    torch.testing.assert_close(out.logits[0].double(), want[:, -1], atol=1e-7, rtol=1e-7)
