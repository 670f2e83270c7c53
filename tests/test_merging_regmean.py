"""RegMean: Gram matrices from forward hooks (padding masked, Linear and GPT-2 Conv1D) and the merged
linear weight equal the least-squares solution min_W Σ_t ‖X_t W − X_t W_t‖² computed by lstsq (float64)."""
import pytest
import torch

from hf_taujp.merging import estimate_gram, merge
from hf_taujp.merging.methods import MissingStatisticsError, regmean
from hf_taujp.merging.statistics import GramStatistics
from tests.tiny_models import GPT2_MINI, tiny_gpt2

D = torch.float64


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


def test_linear_merge_is_least_squares():
    g = torch.Generator().manual_seed(0)
    base = Tiny().double()
    X = [torch.randn(30, 4, generator=g, dtype=D), 2 * torch.randn(20, 4, generator=g, dtype=D)]
    models, grams = [], []
    for t in range(2):
        m = Tiny().double()
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            m.lin.weight.add_(torch.randn(3, 4, generator=g, dtype=D))
            m.lin.bias.add_(torch.randn(3, generator=g, dtype=D))
        models.append(m)
        grams.append(estimate_gram(m, [{"x": X[t][:16]}, {"x": X[t][16:]}], progress=False))
    assert grams[0].num_examples == 30 and grams[0].extra["weight_layout"] == {"lin.weight": "out_in"}
    torch.testing.assert_close(grams[1].tensors["lin.weight"], X[1].T @ X[1] / 20)
    taus = [{n: p.detach() - base.state_dict()[n] for n, p in m.named_parameters()} for m in models]
    out = merge(base, taus, "regmean", grams=grams, reduce_non_diagonal_ratio=1.0, progress=False)
    # per-row means (here one row per example) make task t's rows count with weight 1/n_t: rows scaled by 1/sqrt(n_t)
    A = torch.cat([X[t] / len(X[t]) ** 0.5 for t in range(2)])
    B = torch.cat([X[t] / len(X[t]) ** 0.5 @ models[t].lin.weight.detach().T for t in range(2)])
    W = torch.linalg.lstsq(A, B).solution.T  # (out, in)
    torch.testing.assert_close(out.lin.weight, W, rtol=1e-9, atol=1e-10)
    bias = (models[0].lin.bias + models[1].lin.bias) / 2  # non-linear weights: averaged
    torch.testing.assert_close(out.lin.bias, bias.detach())


def test_off_diagonal_scaling_and_conv1d_layout():
    g = torch.Generator().manual_seed(1)
    G = [torch.randn(5, 5, generator=g, dtype=D) for _ in range(2)]
    G = [x @ x.T + torch.eye(5, dtype=D) for x in G]
    taus = [torch.randn(5, 3, generator=g, dtype=D) for _ in range(2)]  # Conv1D: (in, out)
    a = 0.3
    out = regmean(None, taus, grams=G, reduce_non_diagonal_ratio=a, layout="in_out")
    Gt = [a * x + (1 - a) * torch.diag(torch.diag(x)) for x in G]
    want = torch.linalg.inv(Gt[0] + Gt[1]) @ (Gt[0] @ taus[0] + Gt[1] @ taus[1])
    torch.testing.assert_close(out, want)
    # ratio 0: diagonal Grams -> per-input-row weighted mean
    out0 = regmean(None, taus, grams=G, reduce_non_diagonal_ratio=0.0, layout="in_out")
    d0, d1 = torch.diag(G[0])[:, None], torch.diag(G[1])[:, None]
    torch.testing.assert_close(out0, (d0 * taus[0] + d1 * taus[1]) / (d0 + d1))


def test_gpt2_conv1d_grams_mask_padding(tmp_path):
    m = tiny_gpt2(seed=0, **{**GPT2_MINI, "n_positions": 16}).double().eval()
    ids = torch.randint(0, 30, (3, 5))
    am = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    st = estimate_gram(m, [{"input_ids": ids, "attention_mask": am}], progress=False, base=m)
    assert st.extra["weight_layout"]["transformer.h.0.attn.c_attn.weight"] == "in_out"
    with torch.no_grad():  # input of c_attn = ln_1(wte + wpe), real tokens only, one sequence at a time
        rows = []
        for i in range(3):
            L = int(am[i].sum())
            h = m.transformer.wte(ids[i, :L]) + m.transformer.wpe(torch.arange(L))
            rows.append(m.transformer.h[0].ln_1(h))
        X = torch.cat(rows)
    # RegMean's reference code: the mean over rows (tokens), x.view(-1, h); xᵀx / x.size(0) — here the
    # 10 real tokens (padding rows are left out), not the 3 examples
    assert X.shape[0] == 10 and st.extra["gram_rows"]["transformer.h.0.attn.c_attn.weight"] == 10
    torch.testing.assert_close(st.tensors["transformer.h.0.attn.c_attn.weight"], X.T @ X / 10)
    st.save_pretrained(tmp_path / "g")
    back = GramStatistics.from_pretrained(str(tmp_path / "g"))
    assert back.num_examples == 3 and back.extra["weight_layout"] == st.extra["weight_layout"]
    tau = {n: 0.01 * torch.ones_like(p) for n, p in m.named_parameters()}
    out = merge(m, [tau, tau], "regmean", grams=[str(tmp_path / "g"), back], progress=False)
    n = "transformer.h.0.mlp.c_fc.weight"  # equal vectors: any weighted mean returns them
    torch.testing.assert_close(out.state_dict()[n], m.state_dict()[n] + 0.01)
    with pytest.raises(MissingStatisticsError, match="grams"):
        merge(m, [tau, tau], "regmean", progress=False)
    with pytest.raises(MissingStatisticsError, match="no entry"):
        partial = {k: v for k, v in back.tensors.items() if "c_fc" not in k}
        merge(m, [tau, tau], "regmean", grams=[back, partial], progress=False)


def test_gram_reads_a_list_of_examples_like_fisher_batches_it():
    """A list of un-batched examples (plain values, no batched tensor) is batched here, the one data rule of
    merging.statistics.example_batches: the Gram equals XᵀX / R over all rows, and max_examples cuts inside
    a batch."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(7, 4, generator=g, dtype=D)
    m = Tiny()
    st = estimate_gram(m, [{"x": x.tolist(), "labels": 0} for x in X], batch_size=3, progress=False)
    Xf = X.float().double()  # the collator builds float32 inputs
    assert st.num_examples == 7
    torch.testing.assert_close(st.tensors["lin.weight"].double(), Xf.T @ Xf / 7, rtol=1e-5, atol=1e-6)
    st = estimate_gram(m, [{"x": x.tolist()} for x in X], batch_size=3, max_examples=4, progress=False)
    assert st.num_examples == 4
    torch.testing.assert_close(st.tensors["lin.weight"].double(), Xf[:4].T @ Xf[:4] / 4, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="needs dict batches"):
        estimate_gram(m, [X], progress=False)


@pytest.mark.parametrize("estimate", ["gram", "fisher"])
def test_estimators_without_examples_raise_by_name(estimate):
    from functools import partial

    from hf_taujp.merging import estimate_fisher

    m = Tiny()
    fn = estimate_gram if estimate == "gram" else partial(estimate_fisher, output_type="sequence_classification")
    with pytest.raises(Exception, match=f"estimate_{estimate} got no examples"):
        fn(m, [], progress=False)
    with pytest.raises(Exception, match=f"estimate_{estimate} got no examples"):
        fn(m, [{"x": torch.zeros(2, 4)}], max_examples=0, progress=False)
