"""Merge parameters are declared per method (unknown names raise, in Python and YAML), per-vector
parameters from mergekit-style recipes are honoured, negative weights follow one rule (−τ_t with
weight |α_t|), and the command line turns every user error into one line and exit status 2.
Expected values come from PEFT's own merge_utils, or from the formulas written out by hand."""
import subprocess
import sys

import pytest
import torch
from peft.utils import merge_utils as pm
from transformers import GPT2LMHeadModel

import hf_taujp
from hf_taujp.cli import main as cli_main
from hf_taujp.merging import FisherStatistics, GramStatistics, merge, merge_from_config, merge_streaming
from hf_taujp.merging import methods as M
from hf_taujp.merging.methods import MergeConfigError
from hf_taujp.task_vector import TaskVector, fingerprint
from tests.tiny_models import GPT2_MINI, tiny_gpt2


def _model(seed=0):
    return tiny_gpt2(seed=seed, **GPT2_MINI)


def _taus(model, n=2, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return [{k: scale * torch.randn(p.shape, generator=g) for k, p in model.named_parameters()} for _ in range(n)]


@pytest.fixture()
def folders(tmp_path):
    base = _model()
    base.save_pretrained(tmp_path / "base")
    taus = _taus(base)
    for k, t in enumerate(taus):
        TaskVector(t, base_model="tiny", base_fingerprint=fingerprint(base)).save_pretrained(tmp_path / f"tv{k}")
    return base, taus, tmp_path


# ------------------------------------------------------------------ 1. declared parameters
@pytest.mark.parametrize("method, bad, valid", [
    ("ties", {"densty": 0.25}, "density"),
    ("dare_linear", {"drop_rate": 0.5}, "p"),
    ("task_arithmetic", {"fishers": [{}]}, None),
    ("magnitude_prune", {"seed": 1}, "density"),
    ("fisher_average", {"lambda_": 0.5}, "fisher_floor"),
    ("regmean", {"density": 0.5}, "reduce_non_diagonal_ratio"),
])
def test_unknown_parameters_are_errors_naming_method_and_parameters(method, bad, valid):
    base = _model()
    tv = TaskVector(_taus(base, 1)[0])
    with pytest.raises(MergeConfigError, match=repr(method)) as e:
        merge(base, [tv], method, progress=False, **bad)
    if valid:
        assert repr(next(iter(bad))) in str(e.value) and valid in str(e.value)
    # statistics a method does not use are refused too
    with pytest.raises(MergeConfigError, match="takes no grams"):
        merge(base, [tv], "ties", grams=[{}], progress=False)
    with pytest.raises(MergeConfigError, match="num_examples"):
        merge(base, [tv], "fisher_average", fishers=[{}], num_examples=[3], progress=False)
    # the plain functions are Python functions with declared keywords
    with pytest.raises(TypeError, match="densty"):
        M.ties(None, [torch.ones(3)], densty=0.2)


def test_unknown_parameters_in_streaming_and_yaml(folders, tmp_path):
    base, _, _ = folders
    vecs = [str(tmp_path / "tv0"), str(tmp_path / "tv1")]
    with pytest.raises(MergeConfigError, match=r"'densty'.*'ties'.*density"):
        merge_streaming(str(tmp_path / "base"), vecs, str(tmp_path / "o"), "ties", densty=0.3, progress=False)
    rec = {"base_model": str(tmp_path / "base"), "method": "ties", "vectors": vecs, "parameters": {"densty": 0.3}}
    with pytest.raises(MergeConfigError, match=r"'densty'.*'ties'.*density"):
        merge_from_config(rec, str(tmp_path / "o"), progress=False)
    rec = {"base_model": str(tmp_path / "base"), "method": "task_arithmetic",
           "vectors": [{"path": vecs[0], "density": 0.3}, vecs[1]]}
    with pytest.raises(MergeConfigError, match=r"'density'.*'task_arithmetic' \(vector 0\)"):
        merge_from_config(rec, str(tmp_path / "o"), progress=False)
    rec = {"base_model": str(tmp_path / "base"), "method": "ties",
           "vectors": [{"path": vecs[0], "majority_sign_method": "total"}, vecs[1]]}
    with pytest.raises(MergeConfigError, match="one value for all vectors"):
        merge_from_config(rec, str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 2. per-vector parameters
def _peft_ties_per_density(taus, weights, densities):
    """PEFT's TIES pieces with one density per vector: prune each, elect on the unweighted stack,
    disjoint merge of the weighted stack."""
    pruned = torch.stack([pm.prune(t, d, method="magnitude") for t, d in zip(taus, densities)], 0)
    sign = pm.calculate_majority_sign_mask(pruned, method="total")
    w = torch.tensor(weights).reshape((-1,) + (1,) * (pruned.dim() - 1))
    return pm.disjoint_merge(pruned * w, sign)


def test_mergekit_per_model_parameters_are_honoured(folders, tmp_path):
    base, taus, _ = folders
    yaml_text = f"""
base_model: {tmp_path / 'base'}
merge_method: ties
models:
  - model: {tmp_path / 'tv0'}
    parameters: {{density: 0.5, weight: 1.0}}
  - model: {tmp_path / 'tv1'}
    parameters: {{density: 0.2, weight: 0.5}}
parameters: {{lambda: 1.0}}
"""
    (tmp_path / "r.yaml").write_text(yaml_text)
    out = merge_from_config(str(tmp_path / "r.yaml"), str(tmp_path / "out"), progress=False)
    got = GPT2LMHeadModel.from_pretrained(out).state_dict()
    sd = base.state_dict()
    for n in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_proj.bias"):
        want = sd[n] + _peft_ties_per_density([taus[0][n], taus[1][n]], [1.0, 0.5], [0.5, 0.2])
        torch.testing.assert_close(got[n], want)
    # a global density applies where a vector gives none; the per-vector one overrides it
    rec = {"base_model": str(tmp_path / "base"), "method": "magnitude_prune", "parameters": {"density": 0.3},
           "vectors": [{"path": str(tmp_path / "tv0"), "density": 0.6}, str(tmp_path / "tv1")]}
    out = merge_from_config(rec, str(tmp_path / "out2"), progress=False)
    got = GPT2LMHeadModel.from_pretrained(out).state_dict()
    n = "transformer.h.0.attn.c_attn.weight"
    want = sd[n] + pm.prune(taus[0][n], 0.6, "magnitude") + pm.prune(taus[1][n], 0.3, "magnitude")
    torch.testing.assert_close(got[n], want)


@pytest.mark.parametrize("entry, match", [
    ("parameters: {weight: [0.0, 0.5, 1.0]}", "per-layer gradients"),
    ("weight: [0.0, 1.0]", "per-layer gradients"),
    ("parameters: {weight: one}", "must be a number"),
])
def test_list_and_bad_values_are_refused_by_name(folders, tmp_path, entry, match):
    (tmp_path / "r.yaml").write_text(f"base_model: {tmp_path / 'base'}\nmethod: task_arithmetic\n"
                                     f"vectors:\n  - path: {tmp_path / 'tv0'}\n    {entry}\n")
    with pytest.raises(MergeConfigError, match=match):
        merge_from_config(str(tmp_path / "r.yaml"), str(tmp_path / "o"), progress=False)
    (tmp_path / "g.yaml").write_text(f"base_model: {tmp_path / 'base'}\nmethod: ties\nvectors: [{tmp_path / 'tv0'}]\n"
                                     "parameters: {density: [0.1, 0.9]}\n")
    with pytest.raises(MergeConfigError, match="per-layer gradients"):
        merge_from_config(str(tmp_path / "g.yaml"), str(tmp_path / "o"), progress=False)


# ------------------------------------------------------------------ 3. negation
def _rand(n=3, shape=(6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_negative_weight_is_the_negated_vector_in_ties_and_dare_ties():
    taus = _rand()
    w = [0.7, -0.3, 1.2]
    neg = [taus[0], -taus[1], taus[2]]
    absw = torch.tensor([abs(x) for x in w])
    torch.testing.assert_close(M.ties(None, taus, weights=w, density=0.4), pm.ties(neg, absw, 0.4, "total"))
    torch.testing.assert_close(M.ties(None, taus, weights=w, density=0.4, majority_sign_method="frequency"),
                               pm.ties(neg, absw, 0.4, "frequency"))
    torch.manual_seed(5)
    ref = pm.dare_ties(neg, absw, 0.6)
    torch.testing.assert_close(M.dare_ties(None, taus, weights=w, density=0.6, seed=5), ref)


@pytest.mark.parametrize("call", [
    lambda t: M.task_arithmetic(None, [t], weights=[-1]),
    lambda t: M.magnitude_prune(None, [t], weights=[-1]),
    lambda t: M.ties(None, [t], weights=[-1]),
    lambda t: M.ties(None, [t], weights=[-1], definition="mergekit"),  # mergekit's Σα_t normaliser gives +τ
    lambda t: M.dare_linear(None, [t], weights=[-1]),
    lambda t: M.dare_ties(None, [t], weights=[-1]),
    lambda t: M.fisher_average(None, [t], weights=[-1], fishers=[torch.rand(t.shape) + 0.1]),
    lambda t: M.gradient_matching(None, [t], weights=[-1], fishers=[torch.rand(t.shape)],
                                  base_fisher=torch.rand(t.shape)),
    lambda t: M.regmean(None, [t], weights=[-1], grams=[torch.eye(7) * 2.0]),
    lambda t: M.regmean(None, [t], weights=[-1]),
], ids=["ta", "magnitude", "ties", "ties_mergekit", "dare_linear", "dare_ties", "fisher", "gm", "regmean",
        "regmean_nonlinear"])
def test_alpha_minus_one_negates_for_every_method(call):
    t = _rand(1)[0]
    torch.testing.assert_close(call(t), -t)


def test_fisher_average_and_regmean_with_weights_one_minus_one_are_finite_and_defined():
    t1, t2 = _rand(2)
    f1, f2 = torch.rand(6, 7) + 0.1, torch.rand(6, 7) + 0.1
    out = M.fisher_average(None, [t1, t2], weights=[1, -1], fishers=[f1, f2])
    torch.testing.assert_close(out, (f1 * t1 - f2 * t2) / (f1 + f2))  # −τ_2 with weight 1
    g = torch.Generator().manual_seed(3)
    X = [torch.randn(20, 7, generator=g, dtype=torch.float64) for _ in range(2)]
    G = [x.T @ x for x in X]
    out = M.regmean(None, [t1, t2], weights=[1, -1], grams=G, reduce_non_diagonal_ratio=1.0)
    t1d, t2d = t1.double(), t2.double()  # out_in layout: Δ = (Σ σ_t τ_t G_t)(Σ G_t)⁻¹
    want = (t1d @ G[0] - t2d @ G[1]) @ torch.linalg.inv(G[0] + G[1])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


def test_in_memory_and_streaming_agree_on_negation_and_check_finiteness(folders, tmp_path):
    base, taus, _ = folders
    fishers = []
    g = torch.Generator().manual_seed(8)
    for k, t in enumerate(taus):
        f = FisherStatistics({n: torch.rand(v.shape, generator=g) + 0.05 for n, v in t.items()}, num_examples=4)
        f.save_pretrained(tmp_path / f"f{k}")
        fishers.append(f)
    mem = merge(base, [str(tmp_path / "tv0"), str(tmp_path / "tv1")], "fisher_average", fishers=fishers,
                weights=[1, -1], progress=False).state_dict()
    out = merge_streaming(str(tmp_path / "base"), [str(tmp_path / "tv0"), str(tmp_path / "tv1")], str(tmp_path / "o"),
                          "fisher_average", fishers=[str(tmp_path / "f0"), str(tmp_path / "f1")], weights=[1, -1],
                          progress=False)
    got = GPT2LMHeadModel.from_pretrained(out).state_dict()
    for n, p in base.named_parameters():
        assert torch.isfinite(mem[n]).all()
        torch.testing.assert_close(got[n], mem[n])
    # overflow to inf in float32 is an error in memory, as it is in streaming
    huge = {n: torch.full(p.shape, 3e38) for n, p in base.named_parameters()}
    with pytest.raises(hf_taujp.hub.HfTaujpError, match="NaN/inf"):
        merge(base, [huge, huge], "task_arithmetic", progress=False)


def test_streaming_gradient_matching_refuses_a_base_fisher_without_the_parameter(folders, tmp_path):
    base, taus, _ = folders
    for k, t in enumerate(taus):
        FisherStatistics({n: torch.rand(v.shape) for n, v in t.items()}, num_examples=4).save_pretrained(tmp_path / f"f{k}")
    names = [n for n, _ in base.named_parameters()]
    FisherStatistics({n: torch.rand(taus[0][n].shape) for n in names[1:]}, num_examples=4).save_pretrained(tmp_path / "fb")
    kw = dict(fishers=[str(tmp_path / "f0"), str(tmp_path / "f1")], progress=False)
    vecs = [str(tmp_path / "tv0"), str(tmp_path / "tv1")]
    with pytest.raises(M.MissingStatisticsError, match="base model's Fisher"):
        merge_streaming(str(tmp_path / "base"), vecs, str(tmp_path / "o"), "gradient_matching", **kw)
    with pytest.raises(M.MissingStatisticsError, match=f"base fisher.*no entry for {names[0]}"):
        merge_streaming(str(tmp_path / "base"), vecs, str(tmp_path / "o"), "gradient_matching",
                        base_fisher=str(tmp_path / "fb"), **kw)
    fb = FisherStatistics.from_pretrained(str(tmp_path / "fb"))
    with pytest.raises(M.MissingStatisticsError, match=f"base fisher has no entry for {names[0]}"):
        merge(base, vecs, "gradient_matching", fishers=kw["fishers"], base_fisher=fb, progress=False)
    # statistics with and without dataset sizes are not mixed silently (s_t = 1)
    plain = {n: torch.rand(taus[0][n].shape) for n in names}
    with pytest.raises(M.MissingStatisticsError, match="num_examples"):
        merge(base, vecs, "gradient_matching", fishers=[str(tmp_path / "f0"), plain], base_fisher=plain,
              progress=False)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 12. command line
def _recipe(tmp_path, body):
    p = tmp_path / "r.yaml"
    p.write_text(body)
    return str(p)


@pytest.mark.parametrize("body, match", [
    ("base_model: x\nvectors: [a\n", "not valid YAML at line"),
    ("base_model: BASE\nvectors:\n  - path: TV\n    weight: one\n", "must be a number"),
    ("base_model: BASE\nvectors: {path: TV}\n", "must be a list"),
    ("base_model: BASE\nvectors: [TV]\nparameters: [1, 2]\n", "parameters must be a mapping"),
    ("- base_model\n", "must be a YAML mapping"),
    ("base_model: BASE\nvectors: [TV]\nmethod: nope\n", "unknown merge method"),
    ("base_model: BASE\nvectors: [TV]\nmethod: ties\nparameters: {densty: 0.2}\n", "'densty'"),
    ("base_model: BASE\nvectors: [TV]\ndtype: float8\n", "unknown dtype"),
    ("base_model: BASE\nvectors: [NOSUCH]\n", "."),
])
def test_cli_user_errors_are_one_line_and_exit_2(folders, tmp_path, capsys, body, match):
    body = body.replace("BASE", str(tmp_path / "base")).replace("NOSUCH", str(tmp_path / "nope")).replace(
        "TV", str(tmp_path / "tv0"))
    rc = cli_main(["merge", _recipe(tmp_path, body), str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("hf-taujp merge: error:")
    assert "Traceback" not in err and __import__("re").search(match, err), err
    assert not (tmp_path / "o").exists()


def test_cli_version_help_and_dispatch(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hf-taujp {hf_taujp.__version__}"
    with pytest.raises(SystemExit) as e:
        cli_main(["merge", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for needle in ("base_model:", "vectors:", "parameters:", "per-layer gradients", "ties:", "density*"):
        assert needle in help_text, needle
    assert cli_main(["nope"]) == 2
    r = subprocess.run([sys.executable, "-m", "hf_taujp", "--version"], capture_output=True, text=True,
                       cwd=str(__import__("pathlib").Path(hf_taujp.__file__).parent.parent))
    assert r.returncode == 0 and r.stdout.strip() == f"hf-taujp {hf_taujp.__version__}"
