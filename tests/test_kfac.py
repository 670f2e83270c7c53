"""The dataless KFAC regularizer (Porrello et al., ICLR 2026), checked against independent computations:
R_KFAC = Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ) equals the brute-force quadratic form vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃); with the
exact G on a linear model it equals the mean squared drift ‖J·τ‖² on the factors' inputs (finite
differences); the aggregation equals its formula; low-rank τ = s·B·A gives the materialised value; the
artifact round-trips and bad factors are named errors; compression's measured error."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.func import functional_call

from hf_taujp.errors import CorruptFileError, CurvatureValueError, HfTaujpError
from hf_taujp.trainer import KFACStatistics, aggregate_kfac, estimate_kfac, kfac_penalty, kfac_quadratic
from hf_taujp.trainer.curvature import Factor
from hf_taujp.trainer.tangents import LayerDelta, layer_deltas
from tests.tiny_models import tiny_gpt2

D = torch.float64
VOCAB = 30


def gpt2():
    return tiny_gpt2(n_layer=1, n_embd=8, vocab_size=VOCAB, n_positions=8, dropout=0.0).double().eval()


def token_batches(n_batches=3, b=4, length=6, seed=0):
    """Right-padded token batches (the last row of each batch is half padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        mask = torch.ones(b, length, dtype=torch.long)
        mask[-1, length // 2:] = 0
        out.append({"input_ids": torch.randint(0, VOCAB, (b, length), generator=g), "attention_mask": mask})
    return out


def psd(d, g, rank=None):
    x = torch.randn(d, rank or d, generator=g, dtype=D)
    return x @ x.T / (rank or d)


def stats_of(factors, n, task, fp="tjp2-x"):
    """KFACStatistics from {layer: (A, G)} (dense)."""
    tensors, layers = {}, {}
    for p, (a, g) in factors.items():
        tensors[f"{p}.A"], tensors[f"{p}.G"] = a, g
        layers[p] = {"in_features": a.shape[0] - 1, "out_features": g.shape[0], "layout": "out_in", "rows": n}
    return KFACStatistics(tensors, num_examples=n, base_fingerprint=fp, task=task, extra={"layers": layers})


def kfac_penalty_v(*a):
    return kfac_penalty(*a).item()


def kfac_quadratic_v(*a):
    return kfac_quadratic(*a).item()


def vec(m):
    """Column-major vec: vec(G·X·A) = (Aᵀ ⊗ G)·vec(X)."""
    return m.T.reshape(-1)


def brute_force(terms, tau, model):
    """Σ_layers Σ_terms vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃), ΔW̃ = [ΔW | Δb] built from τ by parameter name (Conv1D (in, out)
    weights transposed here), with the dense (A, G) given per layer."""
    total = 0.0
    name_of = {id(p): n for n, p in model.named_parameters()}  # tied weights: lm_head.weight is transformer.wte.weight
    for path, pairs in terms.items():
        module = model.get_submodule(path)
        w = tau[name_of[id(module.weight)]]
        w = w if isinstance(module, torch.nn.Linear) else w.T
        zero = torch.zeros(w.shape[0], dtype=D)
        b = tau.get(name_of[id(module.bias)], zero) if module.bias is not None else zero
        v = vec(torch.cat([w, b[:, None]], dim=1))
        for a, g in pairs:
            total = total + v @ torch.kron(a, g) @ v
    return float(total)


def perturbed(model, seed=1, scale=0.05):
    """(θ0 copy, τ) after adding scale·N(0, 1) to every parameter of ``model`` in place."""
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return theta0, {n: p.detach() - theta0[n] for n, p in model.named_parameters()}


# ------------------------------------------------------------------ the penalty vs (A ⊗ G)
@pytest.mark.parametrize("aggregation", ["merged", "per_task"])
def test_penalty_equals_the_kronecker_quadratic_form(aggregation):
    """Conv1D (c_attn, c_fc, c_proj: (in, out) weights with biases) and the bias-free Linear LM head, two tasks'
    estimated factors: R_KFAC = Σ vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) with the aggregated (A, G) multiplied out."""
    model = gpt2()
    st = [estimate_kfac(model, token_batches(seed=s), progress=False, task=f"t{s}", seed=s) for s in (0, 1)]
    assert st[0].layers["transformer.h.0.attn.c_attn"]["layout"] == "in_out"
    assert st[0].layers["lm_head"]["layout"] == "out_in" and st[0].tensors["lm_head.A"].shape == (9, 9)
    theta0, tau = perturbed(model)
    deltas, other = layer_deltas(model, theta0)
    assert set(deltas) == set(st[0].layers) and "transformer.wte.weight" in other
    terms = aggregate_kfac(st, aggregation, dtype=D)
    dense = {p: [(a.matrix(), g.matrix()) for a, g in pairs] for p, pairs in terms.items()}
    assert float(kfac_penalty_v(deltas, terms)) == pytest.approx(brute_force(dense, tau, model), rel=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_penalty_gradient_equals_the_brute_force_gradient(bias):
    """d/dΔW̃ of tr(G·ΔW̃·A·ΔW̃ᵀ) (the dense path's own backward, 2·G·ΔW̃·A) equals autograd of the brute-force
    vec(ΔW̃)ᵀ (A ⊗ G) vec(ΔW̃) in float64."""
    g = torch.Generator().manual_seed(3)
    out, inn = 5, 4
    a_f, g_f = psd(inn + 1, g), psd(out, g)
    w = torch.randn(out, inn, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(out, generator=g, dtype=D, requires_grad=True) if bias else None
    pen = kfac_quadratic(Factor(dense=a_f), Factor(dense=g_f), LayerDelta(out, inn, weight=w, bias=b))
    got = torch.autograd.grad(pen, [w] + ([b] if bias else []))
    w2 = w.detach().clone().requires_grad_(True)
    b2 = b.detach().clone().requires_grad_(True) if bias else None
    x = torch.cat([w2, b2[:, None]], dim=1) if bias else w2
    a_used = a_f if bias else a_f[:inn, :inn]
    ref = vec(x) @ torch.kron(a_used, g_f) @ vec(x)
    want = torch.autograd.grad(ref, [w2] + ([b2] if bias else []))
    assert float(pen) == pytest.approx(float(ref), rel=1e-12)
    for x_, y_ in zip(got, want):
        torch.testing.assert_close(x_, y_, rtol=1e-12, atol=1e-12)


def test_aggregation_equals_its_formula():
    """merged (Eq. 8): A = Σ (n_s/N)·A_s, G = Σ G_s; per_task (Eq. 7): the (A_s, G_s) themselves; compressed roots
    aggregate exactly (side by side: Σ w_s·F_s·F_sᵀ)."""
    g = torch.Generator().manual_seed(0)
    f1, f2 = {"l": (psd(5, g), psd(3, g))}, {"l": (psd(5, g), psd(3, g))}
    s1, s2 = stats_of(f1, 3, "a"), stats_of(f2, 7, "b")
    (a, gg), = aggregate_kfac([s1, s2], "merged", dtype=D)["l"]
    torch.testing.assert_close(a.matrix(), 0.3 * f1["l"][0] + 0.7 * f2["l"][0])
    torch.testing.assert_close(gg.matrix(), f1["l"][1] + f2["l"][1])
    per = aggregate_kfac([s1, s2], "per_task", dtype=D)["l"]
    for (pa, pg), f in zip(per, (f1, f2)):
        torch.testing.assert_close(pa.matrix(), f["l"][0])
        torch.testing.assert_close(pg.matrix(), f["l"][1])
    # low-rank factors (rank 1 each): roots side by side, the same sums
    r1 = stats_of({"l": (psd(5, g, 1), psd(3, g, 1))}, 2, "c").compress(rank=1)
    r2 = stats_of({"l": (psd(5, g, 1), psd(3, g, 1))}, 6, "d").compress(rank=1)
    assert "l.A_root" in r1.tensors and r1.tensors["l.A_root"].shape == (5, 1)
    (a, gg), = aggregate_kfac([r1, r2], dtype=D)["l"]
    assert a.root is not None and a.root.shape == (5, 2)
    want_a = 0.25 * r1.factors("l")[0].matrix() + 0.75 * r2.factors("l")[0].matrix()
    torch.testing.assert_close(a.matrix(), want_a)
    torch.testing.assert_close(gg.matrix(), r1.factors("l")[1].matrix() + r2.factors("l")[1].matrix())
    with pytest.raises(HfTaujpError, match="unknown KFAC aggregation"):
        aggregate_kfac([s1], "mean")


# ------------------------------------------------------------------ exact G on a linear model = ‖J·τ‖²
class Linear(torch.nn.Module):
    def __init__(self, i=4, o=3):
        super().__init__()
        self.lin = torch.nn.Linear(i, o)

    def forward(self, x, attention_mask=None):
        return {"logits": self.lin(x)}


def fd_sq_drift(model, tau, batches, h=1e-4):
    """Independent reference: mean over valid rows of ‖(f(θ0 + hτ) − f(θ0 − hτ)) / 2h‖² (float64)."""
    p0 = {n: p.detach() for n, p in model.named_parameters()}
    total, count = 0.0, 0.0
    for b in batches:
        plus = functional_call(model, {n: p0[n] + h * tau[n] for n in p0}, args=(), kwargs=b)["logits"]
        minus = functional_call(model, {n: p0[n] - h * tau[n] for n in p0}, args=(), kwargs=b)["logits"]
        sq = ((plus - minus) / (2 * h)).pow(2).sum(-1)
        m = b.get("attention_mask")
        m = torch.ones_like(sq) if m is None else m.to(D)
        total, count = total + float((sq * m).sum()), count + float(m.sum())
    return total / count


@pytest.mark.parametrize("tokens", [True, False])
def test_exact_g_on_a_linear_model_equals_the_squared_drift(tokens):
    """f = W·x + b: J·τ = ΔW·x + Δb, and with the exact G (a sum over output dimensions, no probe) G = I and
    tr(G·ΔW̃·A·ΔW̃ᵀ) = mean over the factors' (valid) input rows of ‖J·τ‖², to rounding."""
    g = torch.Generator().manual_seed(0)
    model = Linear().double()
    if tokens:  # (B, L, in) with padding: padded rows count in neither
        batches = [{"x": torch.randn(3, 5, 4, generator=g, dtype=D),
                    "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5])} for _ in range(2)]
    else:
        batches = [{"x": torch.randn(6, 4, generator=g, dtype=D)} for _ in range(2)]
    st = estimate_kfac(model, batches, probe="exact", progress=False)
    assert st.layers["lin"]["rows"] == (26 if tokens else 12)
    torch.testing.assert_close(st.tensors["lin.G"], torch.eye(3, dtype=D))
    theta0, tau = perturbed(model, scale=0.3)
    deltas, _ = layer_deltas(model, theta0)
    pen = float(kfac_penalty_v(deltas, aggregate_kfac([st], dtype=D)))
    assert pen == pytest.approx(fd_sq_drift(_at(model, theta0), tau, batches), rel=1e-7)


def _at(model, theta0):
    m = copy.deepcopy(model)
    m.load_state_dict(theta0)
    return m


def test_gaussian_probe_is_an_unbiased_estimate_of_the_exact_g():
    """E_ε[g gᵀ] = J_yᵀ J_y: on the tiny GPT-2 (token-level logits over 30 words) many Gaussian samples give the
    exact G (the reference's probe, averaged over samples) within Monte-Carlo error; A does not depend on ε."""
    model = gpt2()
    batches = token_batches(n_batches=1, length=4)
    layers = ["transformer.h.0.mlp.c_proj", "lm_head"]
    exact = estimate_kfac(model, batches, probe="exact", layers=layers, progress=False)
    mc = estimate_kfac(model, batches, probe="gaussian", samples=400, layers=layers, progress=False)
    for p in layers:
        torch.testing.assert_close(mc.tensors[f"{p}.A"], exact.tensors[f"{p}.A"])
        e, m = exact.tensors[f"{p}.G"], mc.tensors[f"{p}.G"]
        assert float((m - e).norm() / e.norm()) < 0.15
    assert mc.extra["samples"] == 400 and exact.extra["samples"] is None


def test_fisher_probe_is_an_unbiased_estimate_of_the_softmax_ggn():
    """probe="fisher" (y ∼ softmax(f), ε = onehot(y) − p): E[g gᵀ] = J_yᵀ (diag(p) − p pᵀ) J_y. Reference: the
    exact probe on f' = H^½·f per position, H = diag(p) − p pᵀ of the detached logits (float64 eigh), whose
    sum over output entries is exactly J_yᵀ H J_y; many Fisher samples agree within Monte-Carlo error."""
    model = gpt2()
    batches = token_batches(n_batches=1, length=4)
    layers = ["transformer.h.0.mlp.c_proj", "lm_head"]

    def rooted(outputs, batch):
        f = outputs.logits
        p = torch.softmax(f.detach(), -1)
        h = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
        w, v = torch.linalg.eigh(h)
        root = v @ torch.diag_embed(w.clamp_min(0).sqrt()) @ v.transpose(-1, -2)
        return (root @ f[..., None]).squeeze(-1)

    exact = estimate_kfac(model, batches, probe="exact", output_fn=rooted, layers=layers, progress=False)
    mc = estimate_kfac(model, batches, probe="fisher", samples=400, layers=layers, progress=False)
    for p in layers:
        torch.testing.assert_close(mc.tensors[f"{p}.A"], exact.tensors[f"{p}.A"])
        e, m = exact.tensors[f"{p}.G"], mc.tensors[f"{p}.G"]
        assert float((m - e).norm() / e.norm()) < 0.15
    assert mc.extra["probe"] == "fisher" and mc.extra["samples"] == 400


# ------------------------------------------------------------------ low-rank τ = s·B·A
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compressed", [False, True])
def test_low_rank_penalty_equals_the_materialised_one(bias, compressed):
    """ΔW = Σ_i s_i·B_i·A_i kept as factors (never formed) gives tr(G·ΔW̃·A·ΔW̃ᵀ) of the materialised ΔW, with dense
    factors and with roots (A = F·Fᵀ)."""
    g = torch.Generator().manual_seed(3)
    out, inn = 6, 5
    a, gg = Factor(dense=psd(inn + 1, g)), Factor(dense=psd(out, g))
    if compressed:
        a, gg = Factor(root=torch.randn(inn + 1, 2, generator=g, dtype=D)), Factor(root=torch.randn(out, 3, generator=g, dtype=D))
    parts = [(torch.randn(out, 2, generator=g, dtype=D), torch.randn(2, inn, generator=g, dtype=D), 0.7),
             (torch.randn(out, 1, generator=g, dtype=D), torch.randn(1, inn, generator=g, dtype=D), 2.0)]
    db = torch.randn(out, generator=g, dtype=D) if bias else None
    low = LayerDelta(out, inn, factors=parts, bias=db)
    dense = LayerDelta(out, inn, weight=sum(s * b @ x for b, x, s in parts), bias=db)
    w = torch.cat([dense.weight, (db if bias else torch.zeros(out, dtype=D))[:, None]], dim=1)
    want = float(vec(w) @ torch.kron(a.matrix(), gg.matrix()) @ vec(w))
    assert float(kfac_quadratic_v(a, gg, low)) == pytest.approx(want, rel=1e-10)
    assert float(kfac_quadratic_v(a, gg, dense)) == pytest.approx(want, rel=1e-10)
    only_bias = LayerDelta(out, inn, bias=torch.ones(out, dtype=D))
    wb = torch.cat([torch.zeros(out, inn, dtype=D), torch.ones(out, 1, dtype=D)], dim=1)
    assert float(kfac_quadratic_v(a, gg, only_bias)) == pytest.approx(float(vec(wb) @ torch.kron(a.matrix(), gg.matrix()) @ vec(wb)))


def test_peft_linearized_and_lora_deltas_are_the_weight_change():
    """layer_deltas reads τ where each PEFT method keeps it, in the (out, in) layout: a low-rank LINEARIZED adapter
    (factors on Conv1D) and LoRA (factors) give the penalty of the dense weight change PEFT itself reports
    (get_tangents / merge_and_unload), transposed from Conv1D's (in, out) by the test."""
    import peft

    from hf_taujp import LinearizedConfig

    base = gpt2()
    st = estimate_kfac(base, token_batches(), progress=False)
    terms = aggregate_kfac([st], dtype=D)
    dense = {p: [(a.matrix(), g.matrix()) for a, g in pairs] for p, pairs in terms.items()}
    g = torch.Generator().manual_seed(4)
    # low-rank linearized (τ = s·B·A on c_attn / c_fc)
    pm = peft.get_peft_model(copy.deepcopy(base), LinearizedConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                                   target_modules=["c_attn", "c_fc"]))
    pm.base_model.set_factors({n: (torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g))
                               for n, (A, B, _) in pm.base_model.get_factors().items()})
    deltas, _ = layer_deltas(pm, None, "LINEARIZED")
    assert set(deltas) == {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"}
    assert all(d.weight is None and len(d.factors) == 1 for d in deltas.values())
    tau = {n: t.double() for n, t in pm.base_model.get_tangents().items()}
    sub = {p: dense[p] for p in deltas}
    assert float(kfac_penalty_v(deltas, terms)) == pytest.approx(brute_force(sub, tau, base), rel=1e-6)
    # LoRA on the Conv1D c_attn and the Linear lm_head
    lm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4,
                                                                  target_modules=["c_attn", "lm_head"]))
    theta0 = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    deltas, _ = layer_deltas(lm, theta0, "LORA")
    assert set(deltas) == {"transformer.h.0.attn.c_attn", "lm_head"}
    merged = copy.deepcopy(lm).merge_and_unload()
    p0 = dict(base.named_parameters())
    tau = {n: (p - p0[n]).detach() for n, p in merged.named_parameters()}
    sub = {p: dense[p] for p in deltas}
    assert float(kfac_penalty_v(deltas, terms)) == pytest.approx(brute_force(sub, tau, base), rel=1e-6)


def test_linearized_head_in_modules_to_save_is_penalised_as_h_minus_h0():
    """A SEQ_CLS LinearizedConfig trains its head as modules_to_save (non-linearly): its change h − h0 (against the
    frozen original module) is that Linear layer's ΔW̃, keyed by the base path."""
    import peft

    from hf_taujp import LinearizedConfig
    from tests.tiny_models import tiny_bert

    pm = peft.get_peft_model(tiny_bert(dropout=0.0, num_labels=3), LinearizedConfig(task_type="SEQ_CLS",
                                                                                    target_modules=["value"]))
    head = pm.base_model.model.classifier
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    deltas, _ = layer_deltas(pm, None, "LINEARIZED")
    assert "classifier" in deltas and "bert.encoder.layer.0.attention.self.value" in deltas
    torch.testing.assert_close(deltas["classifier"].weight, torch.ones_like(head.original_module.weight))
    torch.testing.assert_close(deltas["classifier"].bias, torch.zeros_like(head.original_module.bias))


# ------------------------------------------------------------------ the artifact
def test_save_load_push_round_trip(tmp_path, monkeypatch):
    """save_pretrained / from_pretrained keep every tensor and the card (base fingerprint, task, examples,
    layers); push_to_hub uploads the same folder (intercepted at huggingface_hub's client boundary)."""
    from huggingface_hub import HfApi

    from hf_taujp import fingerprint

    model = gpt2()
    st = estimate_kfac(model, token_batches(), progress=False, task="sst2", max_examples=10,
                       layers=["transformer.h.0.attn.c_attn", "lm_head"])
    assert st.num_examples == 10 and st.base_fingerprint == fingerprint(model)
    st.save_pretrained(tmp_path / "k")
    assert sorted(os.listdir(tmp_path / "k")) == ["README.md", "config.json", "kfac.safetensors"]
    cfg = json.loads((tmp_path / "k" / "config.json").read_text())
    assert cfg["format"] == "hf-taujp/kfac" and cfg["task"] == "sst2" and cfg["num_examples"] == 10
    assert set(cfg["layers"]) == {"transformer.h.0.attn.c_attn", "lm_head"} and cfg["probe"] == "gaussian"
    card = (tmp_path / "k" / "README.md").read_text()
    assert st.base_fingerprint in card and "`sst2`" in card and "10" in card and "`lm_head`" in card
    back = KFACStatistics.from_pretrained(tmp_path / "k")
    assert (back.task, back.num_examples, back.base_fingerprint, back.layers) == ("sst2", 10, st.base_fingerprint, st.layers)
    for k, t in st.tensors.items():
        torch.testing.assert_close(back.tensors[k], t, rtol=0, atol=0)
    up = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://hub/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kw):
        up[repo_id] = sorted(os.listdir(folder_path))
        import shutil

        shutil.copytree(folder_path, tmp_path / "pushed")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    st.push_to_hub("org/kfac-sst2")
    assert up == {"org/kfac-sst2": ["README.md", "config.json", "kfac.safetensors"]}
    assert KFACStatistics.from_pretrained(tmp_path / "pushed").layers == st.layers


def test_bad_factors_are_named_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    good = {"l": (psd(5, g), psd(3, g))}
    bad = {"l": (good["l"][0].clone(), good["l"][1].clone())}
    bad["l"][1][0, 0] = float("nan")
    with pytest.raises(CurvatureValueError, match="NaN or inf"):
        stats_of(bad, 3, "a")
    # a folder whose factors were corrupted to inf after saving: refused on load
    stats_of(good, 3, "a").save_pretrained(tmp_path / "k")
    t = load_file(tmp_path / "k" / "kfac.safetensors")
    t["l.A"][1, 1] = float("inf")
    save_file(t, tmp_path / "k" / "kfac.safetensors")
    with pytest.raises(CurvatureValueError, match="l.A"):
        KFACStatistics.from_pretrained(tmp_path / "k")
    with pytest.raises(CorruptFileError, match="has \\(in \\+ 1, out\\)"):
        KFACStatistics({"l.A": psd(5, g), "l.G": psd(3, g)}, num_examples=1,
                       extra={"layers": {"l": {"in_features": 5, "out_features": 3, "layout": "out_in"}}})
    with pytest.raises(CorruptFileError, match="expected one of l.G"):
        KFACStatistics({"l.A": psd(5, g)}, num_examples=1,
                       extra={"layers": {"l": {"in_features": 4, "out_features": 3, "layout": "out_in"}}})
    model = gpt2()
    with pytest.raises(HfTaujpError, match="unknown probe"):
        estimate_kfac(model, token_batches(), probe="hutchinson", progress=False)
    with pytest.raises(HfTaujpError, match="samples"):
        estimate_kfac(model, token_batches(), samples=0, progress=False)
    with pytest.raises(HfTaujpError, match="not Linear / Conv1D"):
        estimate_kfac(model, token_batches(), layers=["transformer.wte"], progress=False)


# ------------------------------------------------------------------ compression, measured
def test_compression_error_is_measured():
    """Truncated eigendecompositions (roots F, A ≈ F·Fᵀ) and 16-bit storage of the factors of a 2-layer GPT-2
    (n_embd 32, vocab 100; 64 sequences of 16 tokens), relative error of the penalty for 5 random τ (every
    direction excited: the worst case for truncation) and bytes against the float32 factors. Measured (worst
    of 5): energy 0.999 → 8e-4 at 0.64×; energy 0.99 → 2.5e-2 at 0.42×; energy 0.9 → 0.19 at 0.24×; float16 →
    3e-5 and bfloat16 → 4e-4 at 0.5×; energy 0.99 + bfloat16 → 2.5e-2 at 0.21×. A truncation only removes PSD
    energy, so it never raises the penalty (rank 4 keeps 0.04× of the bytes and under-estimates it by 87%)."""
    model = tiny_gpt2(n_layer=2, n_embd=32, vocab_size=100, n_positions=32, dropout=0.0).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 100, (8, 16), generator=g)} for _ in range(8)]
    st = estimate_kfac(model, batches, progress=False)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    exact_terms = aggregate_kfac([st])
    variants = {"energy=0.999": st.compress(energy=0.999), "energy=0.99": st.compress(energy=0.99),
                "float16": st.compress(dtype=torch.float16), "bfloat16": st.compress(dtype=torch.bfloat16),
                "rank=4": st.compress(rank=4)}
    errors = {k: [] for k in variants}
    for seed in range(5):
        m = copy.deepcopy(model)
        perturbed(m, seed=seed + 10, scale=0.02)
        deltas, _ = layer_deltas(m, theta0)
        exact = kfac_penalty_v(deltas, exact_terms)
        for k, v in variants.items():
            errors[k].append((kfac_penalty_v(deltas, aggregate_kfac([v])) - exact) / exact)
    worst = {k: max(abs(e) for e in v) for k, v in errors.items()}
    sizes = {k: v.nbytes() / st.nbytes() for k, v in variants.items()}
    print("relative penalty error (worst of 5 τ):", worst, "bytes / float32 factors:", sizes)
    assert worst["energy=0.999"] < 5e-3 and sizes["energy=0.999"] < 0.7
    assert worst["energy=0.99"] < 5e-2 and sizes["energy=0.99"] < 0.5
    assert worst["float16"] < 1e-3 and worst["bfloat16"] < 5e-3 and sizes["float16"] == pytest.approx(0.5)
    assert all(e <= 1e-6 for k in ("energy=0.999", "energy=0.99", "rank=4") for e in errors[k])
    assert sizes["rank=4"] < 0.05
    with pytest.raises(HfTaujpError, match="needs rank"):
        st.compress()
    with pytest.raises(HfTaujpError, match="energy"):
        st.compress(energy=1.5)


def test_encoder_decoder_rows_follow_their_side():
    """T5 with labels (decoder inputs = shifted labels, decoder mask = labels ≠ −100, as the τJp reg batches): every
    layer counts the valid rows of its own side — encoder layers and the cross-attention keys / values (they read
    the encoder's output) the encoder's valid tokens, decoder layers and the LM head the valid answer tokens."""
    from tests.tiny_models import tiny_t5

    model = tiny_t5(dropout=0.0).eval()
    ids = torch.tensor([[5, 6, 7, 8, 1], [5, 6, 1, 0, 0]])
    labels = torch.tensor([[9, 10, 1], [9, 1, -100]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    st = estimate_kfac(model, [batch], progress=False, output="logits",
                       layers=["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.1.EncDecAttention.k",
                               "decoder.block.0.layer.1.EncDecAttention.q", "lm_head"])
    rows = {p: v["rows"] for p, v in st.layers.items()}
    assert rows == {"encoder.block.0.layer.0.SelfAttention.q": 8, "decoder.block.0.layer.1.EncDecAttention.k": 8,
                    "decoder.block.0.layer.1.EncDecAttention.q": 5, "lm_head": 5}
    assert float(st.tensors["lm_head.G"].abs().sum()) > 0 and float(st.tensors["encoder.block.0.layer.0.SelfAttention.q.G"].abs().sum()) > 0


def test_rows_of_tensors_with_a_collate_fn_are_examples_and_bad_values_are_named():
    """A list of example dicts holding 1-D tensors (tokenizer rows) with collate_fn is batched by it (the same
    factors as the pre-batched list); an output_fn that returns no tensor, compressing twice, num_examples < 1
    and a factor with a negative diagonal (not PSD) are named errors."""
    from transformers import default_data_collator

    model = gpt2()
    batches = token_batches(n_batches=2, b=4)
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(4)]
    kw = dict(probe="exact", progress=False, layers=["transformer.h.0.mlp.c_proj"])
    ref = estimate_kfac(model, batches, **kw)
    got = estimate_kfac(model, rows, collate_fn=default_data_collator, batch_size=4, **kw)
    for k in ref.tensors:
        torch.testing.assert_close(got.tensors[k], ref.tensors[k])
    assert got.num_examples == 8
    with pytest.raises(HfTaujpError, match="must be a tensor"):
        estimate_kfac(model, batches, output_fn=lambda o, b: (o.logits,), progress=False)
    with pytest.raises(HfTaujpError, match="layers is empty"):
        estimate_kfac(model, batches, layers=[], progress=False)
    small = ref.compress(rank=2)
    with pytest.raises(HfTaujpError, match="already compressed"):
        small.compress(rank=1)
    with pytest.raises(CurvatureValueError, match="num_examples"):
        KFACStatistics(ref.tensors, num_examples=0, extra=ref.extra)
    bad = dict(ref.tensors)
    bad["transformer.h.0.mlp.c_proj.A"] = -bad["transformer.h.0.mlp.c_proj.A"]
    with pytest.raises(CurvatureValueError, match="positive semi-definite"):
        KFACStatistics(bad, num_examples=8, extra=ref.extra)
