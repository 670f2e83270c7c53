"""The issue's bad inputs, for streaming merges from folders (the in-memory ones are in
test_merging_merge.py / test_merging_methods.py): each is a clear error naming the problem, and the
output folder is never half-written (an existing one is left exactly as it was)."""
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

from hf_taujp import hub
from hf_taujp.merging import FisherStatistics, merge_streaming
from hf_taujp.merging import methods as M
from hf_taujp.task_vector import TaskVector, fingerprint
from tests.tiny_models import GPT2_MINI, tiny_gpt2


def _model(seed):
    return tiny_gpt2(seed=seed, **GPT2_MINI)


@pytest.fixture()
def setup(tmp_path):
    base = _model(0)
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    taus = []
    for k in range(2):
        t = {n: 0.1 * torch.randn(p.shape, generator=g) for n, p in base.named_parameters()}
        TaskVector(t, base_model="tiny", base_fingerprint=fingerprint(base)).save_pretrained(tmp_path / f"tv{k}")
        taus.append(t)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")  # must survive every failed merge below
    return base, taus, tmp_path


def _untouched(tmp_path):
    return sorted(os.listdir(tmp_path / "out")) == ["keep.txt"] and not any(
        n.startswith(".out.tmp") for n in os.listdir(tmp_path))


def _run(tmp_path, method="task_arithmetic", vectors=("tv0", "tv1"), **kw):
    return merge_streaming(str(tmp_path / "base"), [str(tmp_path / v) for v in vectors], str(tmp_path / "out"),
                           method, progress=False, **kw)


def test_vectors_of_other_bases(setup):
    _, _, tmp_path = setup
    other = _model(5)
    TaskVector({n: torch.zeros(p.shape) for n, p in other.named_parameters()}, base_model="other",
               base_fingerprint=fingerprint(other)).save_pretrained(tmp_path / "tv_other")
    with pytest.raises(hub.BaseModelMismatchError, match="different base models"):
        _run(tmp_path, vectors=("tv0", "tv_other"))
    with pytest.raises(hub.BaseModelMismatchError, match="fingerprint"):  # made from another base than `base`
        _run(tmp_path, vectors=("tv_other",))
    assert _untouched(tmp_path)


def test_missing_statistics_and_bad_parameters(setup):
    _, _, tmp_path = setup
    with pytest.raises(hub.HfTaujpError, match="needs one fisher"):
        _run(tmp_path, "gradient_matching")
    with pytest.raises(hub.HfTaujpError, match="needs one gram"):
        _run(tmp_path, "regmean")
    with pytest.raises(hub.HfTaujpError, match="density must be in"):
        _run(tmp_path, "ties", density=0.0)
    with pytest.raises(hub.HfTaujpError, match="density must be in"):
        _run(tmp_path, "dare_linear", density=1.5)
    with pytest.raises(hub.HfTaujpError, match="drop rate"):
        _run(tmp_path, "dare_ties", p=1.0)
    with pytest.raises(hub.HfTaujpError, match="empty"):
        _run(tmp_path, vectors=())
    assert _untouched(tmp_path)


def test_nan_in_statistic_mid_merge_leaves_nothing(setup):
    base, _, tmp_path = setup
    names = [n for n, _ in base.named_parameters()]
    good = {n: torch.ones(p.shape) for n, p in base.named_parameters()}
    FisherStatistics(good, num_examples=3).save_pretrained(tmp_path / "f0")
    FisherStatistics(good, num_examples=3).save_pretrained(tmp_path / "f1")
    bad = dict(good)
    bad[names[-1]] = bad[names[-1]].clone()
    bad[names[-1]].view(-1)[0] = float("nan")  # the last tensor: the merge is well under way when it fails
    save_file(bad, str(tmp_path / "f1" / "fisher.safetensors"))  # a corrupt file, not through the class
    with pytest.raises(hub.HfTaujpError, match="NaN"):
        _run(tmp_path, "fisher_average", fishers=[str(tmp_path / "f0"), str(tmp_path / "f1")])
    assert _untouched(tmp_path)


def test_all_zero_fisher_warns_and_floors(setup):
    base, taus, tmp_path = setup
    zero = {n: torch.zeros(p.shape) for n, p in base.named_parameters()}
    for k in range(2):
        FisherStatistics(zero, num_examples=1).save_pretrained(tmp_path / f"z{k}")
    with pytest.warns(UserWarning, match="all zero"):
        _run(tmp_path, "fisher_average", fishers=[str(tmp_path / "z0"), str(tmp_path / "z1")], weights=[1.0, 3.0])
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    n = "transformer.h.0.attn.c_attn.weight"  # equal floors: the α-weighted average (τ0 + 3 τ1) / 4
    want = base.state_dict()[n] + (taus[0][n] + 3 * taus[1][n]) / 4
    torch.testing.assert_close(merged.state_dict()[n], want)


def test_dtype_mismatch_merges_in_float32_writes_requested(setup):
    base, taus, tmp_path = setup
    half = [{n: t.to(torch.bfloat16) for n, t in tau.items()} for tau in taus]
    for k in range(2):
        TaskVector(half[k], base_fingerprint=fingerprint(base)).save_pretrained(tmp_path / f"bf{k}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(tmp_path, vectors=("bf0", "bf1"), weights=[0.5, 0.25], dtype="float16")
    got = hub.load_safetensors(str(tmp_path / "out"), "model")
    n = "transformer.h.0.mlp.c_fc.weight"
    want = (base.state_dict()[n] + (0.5 * half[0][n].float() + 0.25 * half[1][n].float())).to(torch.float16)
    assert got[n].dtype == torch.float16 and torch.equal(got[n], want)
    assert hub.read_json(os.path.join(tmp_path, "out", "config.json"))["dtype"] == "float16"


def test_dare_drop_rate_p_is_one_minus_density():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(40, 30, generator=g) for _ in range(3)]
    for fn in (M.dare_linear, M.dare_ties):
        a = fn(None, taus, p=0.75, seed=4)
        b = fn(None, taus, density=0.25, seed=4)
        assert torch.equal(a, b)
        with pytest.raises(M.MergeConfigError, match="give one of them"):
            fn(None, taus, p=0.5, density=0.25)
        with pytest.raises(M.MergeConfigError, match="drop rate"):
            fn(None, taus, p=-0.1)
