"""Merges against real model structure: tied parameters (one rule, hf_taujp.tied), bases with custom
code, the one base-compatibility rule (hf_taujp.compat), linear (tangent) vectors, devices (meta),
and the Fisher of token classifiers / masked LMs. Expected values are hand computations, torch.func
jvp, or a per-example autograd loop."""
import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BertForMaskedLM, GPT2ForTokenClassification, GPT2LMHeadModel

from hf_taujp import hub
from hf_taujp.merging import merge, merge_streaming
from hf_taujp.merging import methods as M
from hf_taujp.merging.fisher import estimate_fisher, output_type_of
from hf_taujp.merging.methods import MergeConfigError
from hf_taujp.task_vector import TaskVector, fingerprint
from hf_taujp.tied import TiedWeightsError, canonical_tensors, tied_groups
from tests.references import loop_fisher
from tests.tiny_models import GPT2_MINI, tiny_bert, tiny_gpt2

WTE, HEAD = "transformer.wte.weight", "lm_head.weight"


def _gpt2(seed=0, tie=True):
    return tiny_gpt2(seed=seed, **GPT2_MINI, tie_word_embeddings=tie)


def _tau(model, seed=1, scale=0.1, names=None):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()
            if names is None or n in names}


# ------------------------------------------------------------------ 7. tied parameters
def test_tied_rule_in_memory():
    base = _gpt2()
    assert tied_groups(base) == [(WTE, HEAD)] and tied_groups(base.state_dict()) == [(WTE, HEAD)]
    tau = _tau(base)  # named_parameters: the tied pair once, as WTE
    sd = base.state_dict()
    # a checkpoint that carries the tied copy (equal entries): the same merge as without it
    carried = {**tau, HEAD: tau[WTE].clone()}
    out = merge(base, [carried], progress=False)
    torch.testing.assert_close(out.transformer.wte.weight, sd[WTE] + tau[WTE])
    assert out.lm_head.weight.data_ptr() == out.transformer.wte.weight.data_ptr()  # still tied
    # only the tied copy's name: the one parameter, wherever it is named
    only_head = {k: v for k, v in tau.items() if k != WTE}
    only_head[HEAD] = tau[WTE]
    out = merge(base, [only_head], progress=False)
    torch.testing.assert_close(out.transformer.wte.weight, sd[WTE] + tau[WTE])
    # a state-dict base: every name of the group gets the merged value
    new = merge(sd, [carried], progress=False)
    torch.testing.assert_close(new[WTE], sd[WTE] + tau[WTE])
    torch.testing.assert_close(new[HEAD], sd[WTE] + tau[WTE])
    # a fine-tune whose head was untied: different values for one tied parameter -> error, not a silent write
    untied = {**tau, HEAD: tau[WTE] + 1.0}
    with pytest.raises(TiedWeightsError, match="lm_head.weight"):
        merge(base, [untied], progress=False)
    with pytest.raises(TiedWeightsError):
        canonical_tensors(untied, tied_groups(base))


def test_untied_base_merges_each_name():
    base = _gpt2(tie=False)
    assert tied_groups(base) == []
    tau = _tau(base)
    assert not torch.equal(tau[WTE], tau[HEAD])
    out = merge(base, [tau, tau], weights=[0.5, 0.25], progress=False).state_dict()
    sd = base.state_dict()
    for n in (WTE, HEAD):
        torch.testing.assert_close(out[n], sd[n] + 0.75 * tau[n])


def test_tied_rule_streaming(tmp_path):
    base = _gpt2()
    base.save_pretrained(tmp_path / "base")  # transformers drops the tied copy (lm_head)
    sd = base.state_dict()
    tau = _tau(base)
    fp = fingerprint(base)
    TaskVector({**tau, HEAD: tau[WTE].clone()}, base_fingerprint=fp).save_pretrained(tmp_path / "carried")
    TaskVector({**{k: v for k, v in tau.items() if k != WTE}, HEAD: tau[WTE]}, base_fingerprint=fp
               ).save_pretrained(tmp_path / "head_only")
    TaskVector({**tau, HEAD: tau[WTE] + 1.0}, base_fingerprint=fp).save_pretrained(tmp_path / "untied")
    for v in ("carried", "head_only"):
        out = merge_streaming(str(tmp_path / "base"), [str(tmp_path / v)], str(tmp_path / f"o_{v}"), progress=False)
        m = GPT2LMHeadModel.from_pretrained(out)
        torch.testing.assert_close(m.transformer.wte.weight, sd[WTE] + tau[WTE])
        torch.testing.assert_close(m.lm_head.weight, sd[WTE] + tau[WTE])
    with pytest.raises(TiedWeightsError, match="lm_head.weight"):
        merge_streaming(str(tmp_path / "base"), [str(tmp_path / "untied")], str(tmp_path / "o_u"), progress=False)
    assert not (tmp_path / "o_u").exists()
    # a base checkpoint that stores the tied copy too: both stored names get the merged value
    (tmp_path / "base2").mkdir()
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(tmp_path / "base2" / "model.safetensors"))
    (tmp_path / "base2" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    out = merge_streaming(str(tmp_path / "base2"), [str(tmp_path / "head_only")], str(tmp_path / "o2"),
                          output_kind="model", progress=False)
    from safetensors.torch import load_file

    got = load_file(os.path.join(out, "model.safetensors"))
    torch.testing.assert_close(got[WTE], sd[WTE] + tau[WTE])
    torch.testing.assert_close(got[HEAD], sd[WTE] + tau[WTE])


# ------------------------------------------------------------------ 8. custom code
_CONFIG_PY = """
from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny-custom-hftaujp"

    def __init__(self, width=4, **kw):
        self.width = width
        super().__init__(**kw)
"""
_MODEL_PY = """
import torch
from transformers import PreTrainedModel

from .configuration_tiny import TinyCustomConfig


class TinyCustomModel(PreTrainedModel):
    config_class = TinyCustomConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.width, config.width)
        self.post_init()

    def forward(self, x):
        return self.proj(x)
"""


def _custom_base(tmp_path):
    d = tmp_path / "custom"
    d.mkdir()
    (d / "configuration_tiny.py").write_text(textwrap.dedent(_CONFIG_PY))
    (d / "modeling_tiny.py").write_text(textwrap.dedent(_MODEL_PY))
    torch.manual_seed(0)
    w, b = torch.randn(4, 4), torch.randn(4)
    save_file({"proj.weight": w, "proj.bias": b}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "model_type": "tiny-custom-hftaujp", "width": 4, "architectures": ["TinyCustomModel"],
        "auto_map": {"AutoConfig": "configuration_tiny.TinyCustomConfig",
                     "AutoModelForCausalLM": "modeling_tiny.TinyCustomModel"}}))
    return d, {"proj.weight": w, "proj.bias": b}


def test_base_with_custom_code(tmp_path):
    d, sd = _custom_base(tmp_path)
    tau = {"proj.weight": torch.full((4, 4), 0.5), "proj.bias": torch.full((4,), -0.25)}
    TaskVector(tau).save_pretrained(tmp_path / "tv")
    # no interactive prompt: an error that names trust_remote_code
    with pytest.raises(hub.HfTaujpError, match="trust_remote_code"):
        merge(str(d), [str(tmp_path / "tv")], progress=False)
    with pytest.raises(hub.HfTaujpError, match="trust_remote_code"):
        merge_streaming(str(d), [str(tmp_path / "tv")], str(tmp_path / "o"), progress=False)
    m = merge(str(d), [str(tmp_path / "tv")], trust_remote_code=True, progress=False)
    torch.testing.assert_close(m.proj.weight, sd["proj.weight"] + 0.5)
    out = merge_streaming(str(d), [str(tmp_path / "tv")], str(tmp_path / "o"), trust_remote_code=True, progress=False)
    assert {"configuration_tiny.py", "modeling_tiny.py", "config.json"} <= set(os.listdir(out))
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(loaded.proj.weight, sd["proj.weight"] + 0.5)
    torch.testing.assert_close(loaded.proj.bias, sd["proj.bias"] - 0.25)


def test_regmean_layout_of_a_square_weight_is_never_guessed():
    base = _gpt2()
    n = "transformer.h.0.attn.c_proj.weight"  # Conv1D (in, out) = (8, 8): square
    g = torch.Generator().manual_seed(0)
    taus = [{n: torch.randn(8, 8, generator=g, dtype=torch.float64)} for _ in range(2)]
    X = [torch.randn(12, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [{n: x.T @ x} for x in X]  # plain dicts: no recorded layout
    with pytest.raises(M.MissingStatisticsError, match="Conv1D"):
        merge({k: v.double() for k, v in base.state_dict().items()}, taus, "regmean", grams=grams,
              reduce_non_diagonal_ratio=1.0, progress=False)
    out = merge(base.double(), taus, "regmean", grams=grams, reduce_non_diagonal_ratio=1.0, progress=False)
    G0, G1 = grams[0][n], grams[1][n]  # y = xW: Δ = (ΣG)⁻¹ Σ G τ (the module says Conv1D)
    want = base.state_dict()[n] + torch.linalg.solve(G0 + G1, G0 @ taus[0][n] + G1 @ taus[1][n])
    torch.testing.assert_close(out.state_dict()[n], want)


# ------------------------------------------------------------------ 9. one compatibility rule
def test_one_compatibility_rule_for_plus_and_merge():
    base, other = _gpt2(0), _gpt2(1)
    fp, fo = fingerprint(base), fingerprint(other)
    a = TaskVector(_tau(base, 1), base_model="gpt2", base_fingerprint=fp)
    b = TaskVector(_tau(base, 2), base_model="/models/gpt2", base_fingerprint=fp)  # same weights, other id
    s = a + b  # fingerprints decide: accepted by `+` ...
    torch.testing.assert_close(s[WTE], a[WTE] + b[WTE])
    merged = merge(base, [a, b], progress=False)  # ... and by merge
    torch.testing.assert_close(merged.transformer.wte.weight, base.transformer.wte.weight + a[WTE] + b[WTE])
    c = TaskVector(_tau(other, 3), base_model="gpt2", base_fingerprint=fo)  # same id, other weights
    with pytest.raises(hub.BaseModelMismatchError):
        a + c
    with pytest.raises(hub.BaseModelMismatchError):
        merge(base, [a, c], check_base_model=False, progress=False)
    d = TaskVector(_tau(base, 4), base_model="distilgpt2")  # no fingerprint: the ids decide, on both paths
    with pytest.raises(hub.BaseModelMismatchError, match="distilgpt2"):
        a + d
    with pytest.raises(hub.BaseModelMismatchError, match="distilgpt2"):
        merge(base, [a, d], progress=False)
    e = TaskVector(_tau(base, 5), base_fingerprint=fp)  # no id: "a model without a Hub id"
    with pytest.raises(hub.BaseModelMismatchError, match="a model without a Hub id"):
        TaskVector(_tau(other, 6), base_fingerprint=fo) + e


# ------------------------------------------------------------------ 11. linear vectors
def test_linear_vectors_merge_into_a_tangent(tmp_path):
    base = _gpt2().eval()
    names = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.attn.c_attn.weight"]
    fp = fingerprint(base)
    t1, t2 = _tau(base, 1, 0.05, names), _tau(base, 2, 0.05, names)
    l1 = TaskVector(t1, kind="linear", base_fingerprint=fp)
    l2 = TaskVector(t2, kind="linear", base_fingerprint=fp)
    tv = merge(base, [l1, l2], "ties", density=0.5, return_task_vector=True, progress=False)
    assert tv.kind == "linear"
    from peft.utils import merge_utils as pm

    for n in names:
        torch.testing.assert_close(tv[n], pm.ties([t1[n], t2[n]], torch.ones(2), 0.5, "total"))
    # applied in the tangent space: f(x; θ0) + J f(x; θ0)·Δ, by torch.func.jvp on the base
    model = merge(base, [l1, l2], "ties", density=0.5, progress=False)
    ids = torch.randint(0, 30, (2, 5))
    params = {k: p.detach() for k, p in base.named_parameters()}
    tangents = {k: (tv[k] if k in names else torch.zeros_like(p)) for k, p in params.items()}

    def f(p):
        return torch.func.functional_call(base, p, args=(ids,), kwargs={"use_cache": False}).logits

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        y0, jt = torch.func.jvp(f, (params,), (tangents,))
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, y0 + jt, rtol=1e-4, atol=1e-5)
    # RegMean is defined on the weights: refused by name; kinds never mix
    with pytest.raises(MergeConfigError, match="'regmean'.*linear"):
        merge(base, [l1, l2], "regmean", grams=[{}, {}], progress=False)
    with pytest.raises(MergeConfigError, match="linear"):
        merge(base, [l1, TaskVector(t2, base_fingerprint=fp)], progress=False)
    # streaming / CLI: a linear TaskVector folder, not a refusal
    base.save_pretrained(tmp_path / "base")
    l1.save_pretrained(tmp_path / "l1")
    l2.save_pretrained(tmp_path / "l2")
    out = merge_streaming(str(tmp_path / "base"), [str(tmp_path / "l1"), str(tmp_path / "l2")], str(tmp_path / "o"),
                          "ties", density=0.5, progress=False)
    back = TaskVector.from_pretrained(out)
    assert back.kind == "linear"
    for n in names:
        torch.testing.assert_close(back[n], tv[n])
    with pytest.raises(MergeConfigError, match="tangent"):
        merge_streaming(str(tmp_path / "base"), [str(tmp_path / "l1")], str(tmp_path / "o2"), output_kind="model",
                        progress=False)
    from hf_taujp.merging import merge_from_config  # `hf-taujp merge` on linear vectors: a linear folder

    rec = {"base_model": str(tmp_path / "base"), "method": "ties", "parameters": {"density": 0.5},
           "vectors": [str(tmp_path / "l1"), str(tmp_path / "l2")]}
    back = TaskVector.from_pretrained(merge_from_config(rec, str(tmp_path / "o3"), progress=False))
    assert back.kind == "linear" and torch.equal(back[names[0]], tv[names[0]])


# ------------------------------------------------------------------ 10. devices
@pytest.mark.parametrize("method, extra", [
    ("task_arithmetic", {}), ("magnitude_prune", {"density": 0.5}), ("ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.5, "seed": 1}), ("dare_ties", {"density": 0.5, "seed": 1}),
    ("fisher_average", {"fishers": "F"}), ("gradient_matching", {"fishers": "F", "base_fisher": "H"}),
    ("regmean", {"grams": "G"}),
])
def test_methods_follow_the_input_device(method, extra):
    meta = torch.device("meta")
    taus = [torch.empty(5, 4, device=meta) for _ in range(2)]
    kw = dict(extra)
    if kw.get("fishers") == "F":
        kw["fishers"] = [torch.empty(5, 4, device=meta) for _ in range(2)]
    if kw.get("base_fisher") == "H":
        kw["base_fisher"] = torch.empty(5, 4, device=meta)
    if kw.get("grams") == "G":
        kw["grams"] = [torch.empty(4, 4, device=meta) for _ in range(2)]
    # weights and per-vector values are built on the inputs' device (a CPU tensor would fail on meta)
    out = M.get_merge_method(method)(None, taus, weights=[0.5, -1.0], **kw)
    assert out.device.type == "meta" and tuple(out.shape) == (5, 4)


def test_estimators_move_batches_to_the_model_device(monkeypatch):
    # a model on `meta` with CPU batches: every tensor the estimators make must follow the model
    from hf_taujp.merging import regmean as R
    from hf_taujp.merging import statistics as S

    monkeypatch.setattr(S.hub, "check_finite", lambda *a, **k: [])  # values do not exist on meta
    m = tiny_gpt2(GPT2ForTokenClassification, seed=None, **{**GPT2_MINI, "vocab_size": 20}, num_labels=3,
                  attn_implementation="eager").to("meta")
    ids = torch.randint(0, 20, (2, 4))
    f = estimate_fisher(m, [{"input_ids": ids, "labels": torch.zeros(2, 4, dtype=torch.long)}], progress=False)
    assert all(t.device.type == "meta" for t in f.tensors.values())
    g = R.estimate_gram(m, [{"input_ids": ids}], progress=False)
    assert all(t.device.type == "meta" for t in g.tensors.values())


# ------------------------------------------------------------------ 6. Fisher by task, not by shape
def test_token_classification_fisher_is_not_shifted():
    m = tiny_gpt2(GPT2ForTokenClassification, seed=0, **{**GPT2_MINI, "vocab_size": 20}, num_labels=3,
                  attn_implementation="eager").double().eval()
    assert output_type_of(m) == "token_classification"
    ids = torch.randint(1, 20, (3, 5))
    labels = torch.randint(0, 3, (3, 5))
    labels[1, 3:] = -100  # ignored positions
    am = torch.ones_like(ids)
    am[2, 4:] = 0
    f = estimate_fisher(m, [{"input_ids": ids, "attention_mask": am, "labels": labels}], empirical=True,
                        progress=False)

    def loglik(i):  # Σ_j log p(label_j | x) over labelled, non-padded positions j (no shift)
        L = int(am[i].sum())
        lp = torch.log_softmax(m(input_ids=ids[i:i + 1, :L]).logits[0], -1)
        y = labels[i, :L]
        keep = y != -100
        return lp[keep].gather(-1, y[keep, None]).sum()

    ref = loop_fisher(m, range(3), loglik)
    for n in ref:
        torch.testing.assert_close(f.tensors[n], ref[n], rtol=1e-9, atol=1e-12)
    # a list of examples (as the docstring says) gives the same Fisher as the batch
    examples = [{"input_ids": ids[i].tolist(), "attention_mask": am[i].tolist(), "labels": labels[i].tolist()}
                for i in range(3)]
    f2 = estimate_fisher(m, examples, empirical=True, batch_size=2, progress=False)
    for n in ref:
        torch.testing.assert_close(f2.tensors[n], ref[n], rtol=1e-9, atol=1e-12)
    with pytest.raises(hub.HfTaujpError, match="dict batches"):
        estimate_fisher(m, [ids], progress=False)
    with pytest.raises(hub.HfTaujpError, match="output_type"):
        estimate_fisher(torch.nn.Linear(2, 2), [{"input_ids": ids}], progress=False)


def test_masked_lm_fisher_scores_the_masked_positions():
    m = tiny_bert(BertForMaskedLM, seed=1, vocab_size=20, hidden_size=8, num_hidden_layers=1, intermediate_size=16,
                  max_position_embeddings=8, attn_implementation="eager").double().eval()
    assert output_type_of(m) == "masked_lm"
    ids = torch.randint(1, 20, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 4], labels[1, 1] = 5, 7, 3
    f = estimate_fisher(m, [{"input_ids": ids, "labels": labels}], empirical=True, progress=False)

    def loglik(i):
        lp = torch.log_softmax(m(input_ids=ids[i:i + 1]).logits[0], -1)
        keep = labels[i] != -100
        return lp[keep].gather(-1, labels[i][keep, None]).sum()

    ref = loop_fisher(m, range(2), loglik)
    for n in ref:
        torch.testing.assert_close(f.tensors[n], ref[n], rtol=1e-9, atol=1e-12)
