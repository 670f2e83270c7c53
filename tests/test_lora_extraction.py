"""LoRA-native results: ``TaskVector.to_lora`` (a task vector as a PEFT LoRA adapter) and ``merge_lora_adapters``.

References, each independent of the code under test: the truncated SVD written out here in float64
(``torch.linalg.svd`` of τ_W, U_k·diag(σ_k)·V_kᵀ — Eckart–Young), the fine-tuned model itself (θ0 + τ = θ_ft),
PEFT's own ``merge_and_unload`` / ``get_delta_weight`` for what an adapter changes, and PEFT's own
``add_weighted_adapter`` for merges. Everything in float64, so "equal" means to ~1e-12.
"""

import copy
import math
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hf_taujp import TaskVector, low_rank_approximation, merge_lora_adapters
from hf_taujp.errors import BaseModelMismatchError, HfTaujpError, MergeConfigError
from hf_taujp.lora_extraction import truncated_factors
from tests.tiny_models import tiny_gpt2, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore:.*tie_word_embeddings"),
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing"),
              pytest.mark.filterwarnings("ignore:.*embeddings are no longer tied"),
              pytest.mark.filterwarnings("ignore:.*fan_in_fan_out is set to"),
              pytest.mark.filterwarnings("ignore:.*invalid shape")]  # PEFT on lora_B.bias, read by from_peft

TOL = dict(atol=1e-11, rtol=1e-11)


# ------------------------------------------------------------------------------------------ builders
def _lm():
    """GPT-2 LM (Conv1D layers, wte tied to lm_head), float64."""
    return tiny_gpt2(GPT2LMHeadModel, n_layer=1, n_embd=8, vocab_size=30, n_positions=8, dropout=0.0).double().eval()


def _cls():
    """GPT-2 classifier: Conv1D layers, the nn.Linear head `score` (3 × 8), untied nn.Embedding wte / wpe; float64."""
    return tiny_gpt2(GPT2ForSequenceClassification, n_layer=1, n_embd=8, vocab_size=30, n_positions=8, dropout=0.0,
                     num_labels=3, pad_token_id=0).double().eval()


def _finetuned(base, seed=0, scale=0.1):
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return ft


def _weights_2d(base):
    """The weights of base's nn.Linear / Conv1D / nn.Embedding modules (the LoRA targets)."""
    mods = dict(base.named_modules())
    return lambda n, p: n.endswith(".weight") and isinstance(mods[n[:-7]], (torch.nn.Linear, Conv1D, torch.nn.Embedding))


def _hand_truncation(M, k):
    """The reference: U_k·diag(σ_1..k)·V_kᵀ of M in float64 (the transpose of M's truncation is Mᵀ's)."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def _merged_delta(pm, base):
    """PEFT's own merge_and_unload, minus θ0 (float64), per base parameter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = dict(copy.deepcopy(pm).merge_and_unload().named_parameters())
    return {n: merged[n].detach().double() - p.detach().double() for n, p in base.named_parameters()}


def _lora_layers(pm, adapter="default"):
    return {n: m for n, m in pm.get_base_model().named_modules()
            if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 7, 11, 2, 29], [3, 3, 8, 0, 14, 21]])


# ------------------------------------------------------------------------------------------ to_lora: exactness
def test_full_rank_adapter_is_the_finetuned_model_in_float64(tmp_path):
    """Every parameter moved (tied wte / lm_head, LayerNorms, biases): at full rank with rest='save', the unmerged,
    the merged and the saved-and-reloaded adapter all compute θ0 + τ = θ_ft."""
    base = _lm()
    ft = _finetuned(base)
    tv = TaskVector.from_models(base, ft)
    pm = tv.to_lora(base, r=1000, rest="save")
    cfg = pm.peft_config["default"]
    assert cfg.bias == "lora_only" and cfg.use_rslora is False
    assert {"transformer.wte", "lm_head", "transformer.h.0.ln_1", "transformer.ln_f"} <= set(cfg.modules_to_save)
    assert set(_lora_layers(pm)) == {"transformer.wpe", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    ref = _logits(ft, IDS)
    torch.testing.assert_close(_logits(pm, IDS), ref, **TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(pm).merge_and_unload()
    torch.testing.assert_close(_logits(merged, IDS), ref, **TOL)
    pm.save_pretrained(tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(_logits(again, IDS), ref, **TOL)
    assert base.transformer.h[0].attn.c_attn.bias.equal(_lm().transformer.h[0].attn.c_attn.bias)  # base untouched


def test_llama_adapter_at_full_rank_and_its_norms_in_modules_to_save():
    """An LLM layout (nn.Linear projections, untied embed_tokens / lm_head, RMSNorm): CAUSAL_LM implied."""
    base = tiny_llama(num_hidden_layers=1, tie_word_embeddings=False).double().eval()
    ft = _finetuned(base)
    tv = TaskVector.from_models(base, ft)
    with pytest.raises(HfTaujpError, match=r"model\.norm\.weight: 1-D parameter 'weight' of a LlamaRMSNorm"):
        tv.to_lora(base, r=4)
    pm = tv.to_lora(base, r=1000, rest="save")
    cfg = pm.peft_config["default"]
    assert isinstance(pm, peft.PeftModelForCausalLM) and cfg.bias == "none"
    assert {"model.embed_tokens", "lm_head", "model.layers.0.self_attn.k_proj"} <= set(_lora_layers(pm))
    assert set(cfg.modules_to_save) == {"model.norm", "model.layers.0.input_layernorm",
                                        "model.layers.0.post_attention_layernorm"}
    assert cfg.rank_pattern["model.layers.0.self_attn.k_proj"] == 8  # 8 × 16 (one KV head): clamped to 8
    torch.testing.assert_close(_logits(pm, IDS[:, :4] % 64), _logits(ft, IDS[:, :4] % 64), **TOL)


def test_rank_r_adapter_is_the_truncated_svd_of_each_weight():
    """ΔW of each layer (PEFT's merge_and_unload) = U_k·diag(σ_k)·V_kᵀ of τ_W, for Conv1D, nn.Linear and nn.Embedding;
    the error is Σ_{i>k} σ_i² (Eckart–Young); the factors are balanced (‖A‖ = ‖B‖); the unmerged forward is θ0 + that."""
    base = _cls()
    tv = TaskVector.from_state_dicts(dict(base.named_parameters()), dict(_finetuned(base).named_parameters()),
                                     keys=[n for n, p in base.named_parameters() if _weights_2d(base)(n, p)])
    pm = tv.to_lora(base, r=2, task_type=None)
    assert type(pm) is peft.PeftModel and pm.peft_config["default"].r == 2
    layers = _lora_layers(pm)
    assert {"transformer.wte", "transformer.wpe", "score", "transformer.h.0.attn.c_attn"} <= set(layers)
    got = _merged_delta(pm, base)
    ref_model = copy.deepcopy(base)
    for n, tau in tv.items():
        want = _hand_truncation(tau, 2)
        torch.testing.assert_close(got[n], want, **TOL, msg=n)
        S = torch.linalg.svdvals(tau)
        assert math.isclose(float((tau - got[n]).pow(2).sum()), float(S[2:].pow(2).sum()), rel_tol=1e-9)
        with torch.no_grad():
            ref_model.get_parameter(n).add_(want)
    for m, layer in layers.items():
        A = layer.lora_embedding_A["default"] if m.endswith(("wte", "wpe")) else layer.lora_A["default"].weight
        B = layer.lora_embedding_B["default"] if m.endswith(("wte", "wpe")) else layer.lora_B["default"].weight
        assert layer.scaling["default"] == 1.0
        assert math.isclose(float(A.detach().norm()), float(B.detach().norm()), rel_tol=1e-9)
    torch.testing.assert_close(_logits(pm, IDS), _logits(ref_model, IDS), **TOL)


@pytest.mark.parametrize("energy", [0.5, 0.9, 1.0])
def test_energy_rule_picks_the_smallest_rank_per_tensor(energy):
    base = _cls()
    keys = [n for n, p in base.named_parameters() if _weights_2d(base)(n, p)]
    g = torch.Generator().manual_seed(3)
    # spectra that decay at different rates, so the ranks differ per tensor
    tensors = {}
    for i, n in enumerate(keys):
        shape = base.get_parameter(n).shape
        U, _ = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=g, dtype=torch.float64))
        sig = torch.tensor([(0.3 + 0.15 * i) ** j for j in range(min(shape))], dtype=torch.float64)
        tensors[n] = U @ torch.diag(sig) @ V.t()
    tv = TaskVector(tensors)
    pm = tv.to_lora(base, energy=energy, task_type=None, check_base=False)
    cfg = pm.peft_config["default"]
    layers = _lora_layers(pm)
    got = _merged_delta(pm, base)
    for n, tau in tensors.items():
        S2 = torch.linalg.svdvals(tau).pow(2)
        frac = torch.cumsum(S2, 0) / S2.sum()
        k = int((frac < energy).sum()) + 1  # the smallest k with Σ_{i≤k} σ² ≥ energy·Σ σ² (float64 here)
        k = min(k, S2.numel())
        m = n[: -len(".weight")]
        assert layers[m].r["default"] == k, n
        assert cfg.rank_pattern.get(m, cfg.r) == k and cfg.alpha_pattern.get(m, cfg.lora_alpha) == k  # s = 1
        assert frac[k - 1] >= energy - 1e-12 and (k == 1 or frac[k - 2] < energy)
        torch.testing.assert_close(got[n], _hand_truncation(tau, k), **TOL, msg=n)
    assert cfg.r == max(layer.r["default"] for layer in layers.values())
    if energy == 1.0:
        for n, tau in tensors.items():
            torch.testing.assert_close(got[n], tau, **TOL)


def test_rank_above_min_dimension_is_clamped_to_full_rank_and_recorded():
    base = _cls()
    keys = ["score.weight", "transformer.h.0.attn.c_attn.weight"]
    tv = TaskVector.from_state_dicts(dict(base.named_parameters()), dict(_finetuned(base).named_parameters()), keys=keys)
    pm = tv.to_lora(base, r=5, task_type=None)
    cfg = pm.peft_config["default"]
    assert cfg.r == 5 and cfg.lora_alpha == 5
    assert cfg.rank_pattern == {"score": 3} and cfg.alpha_pattern == {"score": 3}  # score is 3 × 8: rank 3 at most
    got = _merged_delta(pm, base)
    torch.testing.assert_close(got["score.weight"], tv["score.weight"], **TOL)  # full rank: exact
    torch.testing.assert_close(got[keys[1]], _hand_truncation(tv[keys[1]], 5), **TOL)


# ------------------------------------------------------------------------------------------ factored vectors
def _random_lora(base, seed=5, adapter="default", pm=None, **kw):
    cfg = peft.LoraConfig(**{"r": 2, "lora_alpha": 8, **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=adapter)
        else:
            pm.add_adapter(adapter, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if f".{adapter}" in n and ("lora_" in n):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm.eval()


def test_factored_vector_of_rank_at_most_r_keeps_its_factors_bit_for_bit():
    base = _cls()
    src = _random_lora(base, target_modules=["c_attn", "c_fc", "score", "wte"])
    tv = TaskVector.from_peft(src, factored=True)
    for kwargs in (dict(r=4), dict()):  # r ≥ the stored rank, or no rank rule: the stored factors as they are
        pm = tv.to_lora(base, task_type=None, **kwargs)
        cfg = pm.peft_config["default"]
        assert cfg.r == 2 and cfg.lora_alpha == 8 and cfg.rank_pattern == {}  # s = 8 / 2 as in the source
        for m, layer in _lora_layers(pm).items():
            old = _lora_layers(src)[m]
            if m.endswith("wte"):
                assert layer.lora_embedding_A["default"].equal(old.lora_embedding_A["default"])
                assert layer.lora_embedding_B["default"].equal(old.lora_embedding_B["default"])
            else:
                assert layer.lora_A["default"].weight.equal(old.lora_A["default"].weight)
                assert layer.lora_B["default"].weight.equal(old.lora_B["default"].weight)
        want = _merged_delta(src, base)
        for n, d in _merged_delta(pm, base).items():
            torch.testing.assert_close(d, want[n], **TOL)


def test_factored_vector_above_r_is_truncated_from_its_factors():
    """τ_1 + τ_2 of two rank-2 factored vectors (stored rank 4), truncated to rank 2: equal to the hand SVD of the
    full sum (the QR route never forms it)."""
    base = _cls()
    t = ["c_attn", "c_proj", "wpe", "score"]
    a = TaskVector.from_peft(_random_lora(base, seed=1, target_modules=t), factored=True)
    b = TaskVector.from_peft(_random_lora(base, seed=2, target_modules=t), factored=True)
    s = a + b
    assert set(s.ranks.values()) == {4}
    pm = s.to_lora(base, r=2, task_type=None)
    got = _merged_delta(pm, base)
    for n in s.keys():
        torch.testing.assert_close(got[n], _hand_truncation(s.to_dense()[n], 2), **TOL, msg=n)
    approx = low_rank_approximation(s, r=2)
    assert set(approx.ranks.values()) == {2}
    for n in s.keys():
        torch.testing.assert_close(approx[n].double(), _hand_truncation(s.to_dense()[n], 2), **TOL)


def test_truncated_factors_of_a_zero_tensor_have_rank_zero_and_get_no_layer():
    base = _cls()
    tensors = {"transformer.h.0.attn.c_attn.weight": torch.zeros(8, 24, dtype=torch.float64),
               "score.weight": torch.randn(3, 8, dtype=torch.float64)}
    assert truncated_factors(tensors["transformer.h.0.attn.c_attn.weight"], 4).rank == 0
    pm = TaskVector(tensors).to_lora(base, r=4, task_type=None, check_base=False)
    assert set(_lora_layers(pm)) == {"score"}
    with pytest.raises(HfTaujpError, match="No LoRA layer.*zero"):
        TaskVector({"score.weight": torch.zeros(3, 8, dtype=torch.float64)}).to_lora(base, r=1, task_type=None,
                                                                                   check_base=False)


# ------------------------------------------------------------------------------------------ what is no LoRA factor
def test_entries_that_are_no_lora_factor_are_named():
    base = _lm()
    tv = TaskVector.from_models(base, _finetuned(base))
    with pytest.raises(HfTaujpError) as err:
        tv.to_lora(base, r=2)
    msg = str(err.value)
    for name, why in [("transformer.wte.weight", "tied to 'lm_head.weight'"), ("transformer.h.0.ln_1.weight", "LayerNorm"),
                      ("transformer.h.0.attn.c_attn.bias", "bias of LoRA layer"), ("transformer.ln_f.bias", "LayerNorm")]:
        assert f"{name}: " in msg and why in msg, name
    assert "rest='save'" in msg and "rest='drop'" in msg
    with pytest.raises(HfTaujpError, match="rest must be one of"):
        tv.to_lora(base, r=2, rest="ignore")


def test_rest_drop_leaves_exactly_the_named_entries_out():
    base = _cls()
    ft = _finetuned(base)
    tv = TaskVector.from_models(base, ft)
    pm = tv.to_lora(base, r=1000, rest="drop", task_type=None)
    cfg = pm.peft_config["default"]
    assert cfg.bias == "none" and not cfg.modules_to_save
    got = _merged_delta(pm, base)
    lora_keys = {n for n, p in base.named_parameters() if _weights_2d(base)(n, p)}
    for n, d in got.items():
        torch.testing.assert_close(d, tv[n] if n in lora_keys else torch.zeros_like(d), **TOL, msg=n)


def test_rest_save_keeps_biases_and_norms_exactly(tmp_path):
    base = _cls()
    ft = _finetuned(base)
    pm = TaskVector.from_models(base, ft).to_lora(base, r=1000, rest="save", task_type=None)
    cfg = pm.peft_config["default"]
    assert cfg.bias == "lora_only"
    assert set(cfg.modules_to_save) == {"transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.ln_f"}
    assert "score" in _lora_layers(pm)
    torch.testing.assert_close(_logits(pm, IDS), _logits(ft, IDS), **TOL)
    pm.save_pretrained(tmp_path / "a")
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a"), IDS),
                               _logits(ft, IDS), **TOL)


def test_target_modules_restrict_the_layers_and_the_others_are_named():
    base = _cls()
    tv = TaskVector.from_state_dicts(dict(base.named_parameters()), dict(_finetuned(base).named_parameters()),
                                     keys=[n for n, p in base.named_parameters() if _weights_2d(base)(n, p)])
    with pytest.raises(HfTaujpError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight: not matched by target_modules"):
        tv.to_lora(base, r=2, target_modules=["c_attn"], task_type=None)
    pm = tv.to_lora(base, r=2, target_modules=["c_attn"], rest="drop", task_type=None)
    assert set(_lora_layers(pm)) == {"transformer.h.0.attn.c_attn"}
    pm = tv.to_lora(base, r=2, target_modules=r".*\.c_(attn|fc)", rest="drop", task_type=None)
    assert set(_lora_layers(pm)) == {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"}
    with pytest.raises(HfTaujpError, match="target_modules must be"):
        tv.to_lora(base, r=2, target_modules=5)


def test_the_task_types_head_is_saved_whole_by_peft():
    """SEQ_CLS (implied by the class): PEFT always keeps `score` in modules_to_save; its τ goes there, exactly."""
    base = _cls()
    ft = _finetuned(base)
    pm = TaskVector.from_models(base, ft).to_lora(base, r=1000, rest="save")
    assert pm.peft_config["default"].task_type == "SEQ_CLS" and "score" in pm.peft_config["default"].modules_to_save
    assert "score" not in _lora_layers(pm)
    torch.testing.assert_close(_logits(pm, IDS), _logits(ft, IDS), **TOL)


def test_a_linear_vector_needs_allow_linear():
    base = _cls()
    tv = TaskVector({"score.weight": 0.1 * torch.randn(3, 8, dtype=torch.float64)}, kind="linear")
    with pytest.raises(HfTaujpError, match="'linear' task vector.*to_peft.*allow_linear=True"):
        tv.to_lora(base, r=2, task_type=None, check_base=False)
    pm = tv.to_lora(base, r=3, task_type=None, check_base=False, allow_linear=True)  # the weight reading
    torch.testing.assert_close(_merged_delta(pm, base)["score.weight"], tv["score.weight"], **TOL)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-2), "r must be a positive integer"),
    (dict(r=1.5), "r must be a positive integer"),
    (dict(r=True), "r must be a positive integer"),
    (dict(r="4"), "r must be a positive integer"),
    (dict(energy=0), r"energy must be a number in \(0, 1\]"),
    (dict(energy=1.5), r"energy must be a number in \(0, 1\]"),
    (dict(energy=float("nan")), r"energy must be a number in \(0, 1\]"),
    (dict(energy=True), r"energy must be a number in \(0, 1\]"),
    (dict(r=2, energy=0.9), "not both"),
    (dict(), r"Give a rank rule.*full tensors"),
    (dict(r=2, adapter_name=""), "adapter_name"),
])
def test_bad_rank_rules_are_named(kwargs, match):
    base = _cls()
    tv = TaskVector({"score.weight": torch.randn(3, 8, dtype=torch.float64)}, base_fingerprint=None)
    with pytest.raises(HfTaujpError, match=match):
        tv.to_lora(base, task_type=None, **kwargs)


def test_a_vector_that_does_not_fit_the_base_is_refused():
    base = _cls()
    tv = TaskVector.from_models(base, _finetuned(base))
    other = tiny_gpt2(GPT2ForSequenceClassification, seed=7, n_layer=1, n_embd=8, vocab_size=30, n_positions=8,
                      num_labels=3, pad_token_id=0).double()
    with pytest.raises(BaseModelMismatchError):
        tv.to_lora(other, r=2, rest="drop")
    with pytest.raises(HfTaujpError, match="not parameters of the base"):
        TaskVector({"nope.weight": torch.zeros(2, 2)}).to_lora(base, r=1)
    with pytest.raises(HfTaujpError, match="Shape mismatch"):
        TaskVector({"score.weight": torch.zeros(8, 3)}).to_lora(base, r=1)
    with pytest.raises(HfTaujpError, match="NaN or inf"):
        TaskVector({"score.weight": torch.full((3, 8), float("nan"))}).to_lora(base, r=1)
    with pytest.raises(HfTaujpError, match="torch.nn.Module"):
        tv.to_lora("gpt2", r=1)
    with pytest.raises(HfTaujpError, match="2-D"):
        truncated_factors(torch.zeros(3), r=1)


# ------------------------------------------------------------------------------------------ merging LoRA adapters
TARGETS_A = ["c_attn", "c_fc", "wpe", "score"]
TARGETS_B = ["c_attn", "c_proj", "wpe", "score"]


def _two_adapters(base):
    pm = _random_lora(base, seed=1, adapter="a", r=2, lora_alpha=4, target_modules=TARGETS_A)
    return _random_lora(base, seed=2, adapter="b", pm=pm, r=3, lora_alpha=5, target_modules=TARGETS_B,
                        rank_pattern={"c_attn": 1}, alpha_pattern={"score": 2})


def _deltas(pm, adapter):
    return {m: layer.get_delta_weight(adapter).detach().double() for m, layer in _lora_layers(pm, adapter).items()}


@pytest.mark.parametrize("combination_type, r", [("cat", None), ("svd", 2), ("svd", None)])
def test_merge_in_a_peft_model_matches_peft_add_weighted_adapter(combination_type, r, tmp_path):
    base = _cls()
    pm = _two_adapters(base)
    # exact in float32: PEFT's svd path multiplies by torch.tensor(weights), a float32 tensor
    w = [0.75, -0.375]
    ref = copy.deepcopy(pm)
    ref.add_weighted_adapter(["a", "b"], w, "peft", combination_type=combination_type, svd_rank=r)
    want = _deltas(ref, "peft")
    out = merge_lora_adapters(pm, w, combination_type, r=r, adapter_names=["a", "b"])
    assert out is pm and "merged" in pm.peft_config and pm.active_adapter == "a"  # added, not activated (PEFT)
    got = _deltas(pm, "merged")
    assert set(got) == set(want)
    for m in want:
        torch.testing.assert_close(got[m], want[m], **TOL, msg=m)
    # the hand sum Σ w_t s_t B_t A_t (cat) / its truncation (svd), from each adapter's own delta
    da, db = _deltas(pm, "a"), _deltas(pm, "b")
    for m in got:
        total = w[0] * da.get(m, 0) + w[1] * db.get(m, 0)
        if combination_type == "cat":
            torch.testing.assert_close(got[m], total, **TOL)
            assert _lora_layers(pm, "merged")[m].r["merged"] == sum(
                _lora_layers(pm, a)[m].r[a] for a in "ab" if m in _lora_layers(pm, a))
        else:
            k = r or 3  # PEFT's svd_rank=None: the largest rank of the adapters
            torch.testing.assert_close(got[m], _hand_truncation(total, k), **TOL)
    pm.set_adapter("merged")
    ref_logits = _logits(pm, IDS)
    pm.save_pretrained(tmp_path, selected_adapters=["merged"])
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "merged")
    torch.testing.assert_close(_logits(again, IDS), ref_logits, **TOL)


def test_merge_task_vectors_into_a_factored_vector_and_an_adapter(tmp_path):
    base = _cls()
    pm = _two_adapters(base)
    a = TaskVector.from_peft(pm, adapter_name="a", factored=True)
    b = TaskVector.from_peft(pm, adapter_name="b", factored=True)
    w = [0.7, -0.4]
    dense = (w[0] * a.to_dense() + w[1] * b.to_dense())
    cat = merge_lora_adapters([a, b], w, "cat")
    assert cat.is_low_rank and cat.ranks["transformer.h.0.attn.c_attn.weight"] == 2 + 1
    for n in dense.keys():
        torch.testing.assert_close(cat[n].double(), dense[n].double(), **TOL)
    svd = merge_lora_adapters([a, b], w, "svd", r=2)
    for n in dense.keys():
        torch.testing.assert_close(svd[n].double(), _hand_truncation(dense[n], 2), **TOL)
    lora = merge_lora_adapters([a, b], w, "cat", base=base, task_type=None)
    got = _merged_delta(lora, base)
    for n in dense.keys():
        torch.testing.assert_close(got[n], dense[n].double(), **TOL)
    lora.save_pretrained(tmp_path)
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path), IDS),
                               _logits(lora, IDS), **TOL)
    en = merge_lora_adapters([a, b], w, "svd", energy=1.0)
    for n in dense.keys():
        torch.testing.assert_close(en[n].double(), dense[n].double(), **TOL)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(combination_type="linear"), MergeConfigError, "'linear'.*A and B factors"),
    (dict(combination_type="ties"), MergeConfigError, "combination_type must be one of"),
    (dict(weights=[1.0]), MergeConfigError, "1 weights for 2 adapters"),
    (dict(weights=[1.0, float("nan")]), MergeConfigError, "finite"),
    (dict(weights=["a", 1]), MergeConfigError, "numbers"),
    (dict(combination_type="cat", r=2), MergeConfigError, "'cat' is exact"),
    (dict(r=0), MergeConfigError, "r must be a positive integer"),
    (dict(energy=2.0), MergeConfigError, "energy must be"),
    (dict(adapter_names=["a", "zzz"]), MergeConfigError, "zzz"),
    (dict(adapter_name="a"), MergeConfigError, "already has an adapter named 'a'"),
    (dict(base="x"), MergeConfigError, "apply to task vectors"),
])
def test_bad_merge_inputs_are_named(kwargs, err, match):
    base = _cls()
    pm = _two_adapters(base)
    args = dict(weights=[0.5, 0.5], combination_type="svd")
    args.update(kwargs)
    with pytest.raises(err, match=match):
        merge_lora_adapters(pm, args.pop("weights"), args.pop("combination_type"), **args)


def test_adapters_that_are_more_than_factors_are_refused_by_name():
    base = _cls()
    dora = _random_lora(base, adapter="d", target_modules=["c_attn"], use_dora=True)
    with pytest.raises(HfTaujpError, match="DoRA"):
        merge_lora_adapters(dora, [1.0], "svd")
    lb = _random_lora(base, adapter="l", target_modules=["c_attn"], lora_bias=True)
    with pytest.raises(HfTaujpError, match="lora_bias"):
        merge_lora_adapters(lb, [1.0], "cat")
    a = TaskVector.from_peft(_random_lora(base, target_modules=["c_attn"]), factored=True)
    lin = TaskVector({"score.weight": torch.zeros(3, 8, dtype=torch.float64)}, kind="linear")
    with pytest.raises(HfTaujpError, match="'linear'"):
        merge_lora_adapters([a, lin], [1.0, 1.0], "cat")
    with pytest.raises(HfTaujpError, match="PeftModel or a sequence of TaskVectors"):
        merge_lora_adapters([a, 3], [1.0, 1.0], "cat")
    with pytest.raises(MergeConfigError, match="no LoRA factors"):
        merge_lora_adapters([TaskVector({"score.weight": torch.zeros(3, 8)})], [1.0], "svd")
