"""Tied groups of a model folder without building the model (hf_taujp.tied.find_tied_groups).

The reference is the architecture built on the meta device (tied_groups_by_meta_build: parameters
that are one object): every rule must give exactly its groups, member order included (the first
stored member is the canonical name). Each family is checked on a real checkpoint written by
save_pretrained, every entry of TIED_FAMILIES for every value of tie_word_embeddings, and each way
the fast rule stays silent or finds a contradiction is shown to end at the meta-device build."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, BertForMaskedLM, OPTConfig, OPTForCausalLM
from transformers.models.auto import configuration_auto, modeling_auto

import hf_taujp.tied as tied
from hf_taujp.errors import HfTaujpError
from hf_taujp.tied import TIED_FAMILIES, find_tied_groups, tied_groups_by_meta_build
from tests.tiny_models import CLIP_TEXT, CLIP_VISION, tiny_bert, tiny_clip, tiny_gpt2, tiny_llama, tiny_t5

# the smallest config of each TIED_FAMILIES model_type (transformers' field names)
_LLAMA = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=16, head_dim=4)
_BERT = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=16,
             max_position_embeddings=12)
TINY = {
    "gpt2": dict(n_embd=8, n_layer=1, n_head=2, vocab_size=16, n_positions=8),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "t5": dict(d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4, vocab_size=16),
    "bert": _BERT, "roberta": _BERT,
    "clip": dict(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=8),
    "clip_text_model": CLIP_TEXT, "clip_vision_model": CLIP_VISION,
}


def _save(d, config, *, tie="keep", architectures="keep"):
    """config.json of ``config`` in folder ``d``, with tie_word_embeddings set (True / False), removed
    ("absent": the family's default) or kept, and architectures kept, removed (None) or replaced."""
    config.save_pretrained(d)
    path = os.path.join(d, "config.json")
    raw = json.load(open(path))
    if tie == "absent":
        raw.pop("tie_word_embeddings", None)
    elif tie != "keep":
        raw["tie_word_embeddings"] = tie
    if architectures is None:
        raw.pop("architectures", None)
    elif architectures != "keep":
        raw["architectures"] = architectures
    json.dump(raw, open(path, "w"))
    return d


def _stored_by_save(d):
    """The names save_pretrained would store for the model of folder ``d``: one per parameter."""
    cfg = AutoConfig.from_pretrained(d)
    arch = (cfg.architectures or [None])[0]
    with torch.device("meta"):
        m = getattr(transformers, arch)(cfg) if arch else transformers.AutoModel.from_config(cfg)
    return [n for n, _ in m.named_parameters()]


def _same_as_meta(d, stored=None, rule="declared", **kw):
    got = find_tied_groups(d, stored, **kw)
    want = tied_groups_by_meta_build(d, **kw)
    assert got.groups == want, (got, want)
    assert got.rule == rule, got
    return got


# --------------------------------------------------------------- every entry of the table
_CASES = [(mt, cls, tie) for mt, fam in TIED_FAMILIES.items() for cls in fam.classes
          for tie in (True, False, "absent")]


@pytest.mark.parametrize("model_type,cls,tie", _CASES, ids=[f"{c}-{t}" for _, c, t in _CASES])
def test_every_table_entry_is_the_meta_build(tmp_path, model_type, cls, tie):
    config = configuration_auto.CONFIG_MAPPING[model_type](**TINY[model_type])
    config.architectures = [cls]
    d = _save(str(tmp_path), config, tie=tie)
    _same_as_meta(d, _stored_by_save(d))


@pytest.mark.parametrize("model_type", list(TIED_FAMILIES))
def test_no_architectures_means_the_auto_model_class(tmp_path, model_type):
    assert TIED_FAMILIES[model_type].base == modeling_auto.MODEL_MAPPING_NAMES[model_type]
    config = configuration_auto.CONFIG_MAPPING[model_type](**TINY[model_type])
    d = _save(str(tmp_path), config, architectures=None)
    _same_as_meta(d, _stored_by_save(d))


def test_table_defaults_are_the_config_classes():
    for mt, fam in TIED_FAMILIES.items():
        cfg = configuration_auto.CONFIG_MAPPING[mt](**TINY[mt])
        assert getattr(cfg, "tie_word_embeddings", None) == fam.default_tie, mt
        if fam.forced_tie is not None:  # whatever the caller passes
            assert configuration_auto.CONFIG_MAPPING[mt](**TINY[mt], tie_word_embeddings=not fam.forced_tie
                                                          ).tie_word_embeddings == fam.forced_tie


# --------------------------------------------------------------- one real checkpoint per family
def test_gpt2_tied_checkpoint_and_the_kept_copy(tmp_path):
    m = tiny_gpt2(n_layer=1, n_embd=8, vocab_size=30, n_positions=8)
    m.save_pretrained(tmp_path / "a")  # transformers stores wte only
    got = _same_as_meta(str(tmp_path / "a"))
    assert got.groups == [("transformer.wte.weight", "lm_head.weight")] and "1 of 2 names" in got.reason
    # a checkpoint that keeps the tied copy (both names stored): still one parameter, as the meta build says
    (tmp_path / "b").mkdir()
    save_file({k: v.contiguous().clone() for k, v in m.state_dict().items()}, str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    assert "2 of 2 names" in _same_as_meta(str(tmp_path / "b")).reason


@pytest.mark.parametrize("tie", [True, False])
def test_llama_tied_and_untied(tmp_path, tie):
    tiny_llama(tie_word_embeddings=tie).save_pretrained(tmp_path)
    got = _same_as_meta(str(tmp_path))
    assert got.groups == ([("model.embed_tokens.weight", "lm_head.weight")] if tie else [])


def test_t5_ties_lm_head_even_when_config_json_says_false(tmp_path):
    tiny_t5().save_pretrained(tmp_path / "a")
    got = _same_as_meta(str(tmp_path / "a"))
    assert got.groups == [("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                           "lm_head.weight")]
    # T5 v1.1 / flan-t5 save tie_word_embeddings: false; transformers 5's T5Config ties regardless
    tiny_t5().save_pretrained(tmp_path / "b")
    _save(str(tmp_path / "b"), AutoConfig.from_pretrained(tmp_path / "b"), tie=False)
    assert "forced" in _same_as_meta(str(tmp_path / "b")).reason


def test_bert_masked_lm_ties_weight_and_bias(tmp_path):
    tiny_bert(BertForMaskedLM).save_pretrained(tmp_path)
    got = _same_as_meta(str(tmp_path))
    assert got.groups == [("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
                          ("cls.predictions.bias", "cls.predictions.decoder.bias")]


def test_clip_ties_nothing(tmp_path):
    tiny_clip().save_pretrained(tmp_path)
    got = _same_as_meta(str(tmp_path))
    assert got.groups == [] and "declares no tied" in got.reason


_CUSTOM_MODEL = """
import torch
from transformers import PreTrainedModel, PretrainedConfig


class TiedCustomConfig(PretrainedConfig):
    model_type = "tied-custom-hftaujp"


class TiedCustomModel(PreTrainedModel):
    config_class = TiedCustomConfig

    def __init__(self, config):
        super().__init__(config)
        self.emb = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight  # tied in code, declared nowhere a static rule could read
        self.post_init()
"""


def test_custom_code_is_built_or_refused(tmp_path):
    (tmp_path / "modeling_tied.py").write_text(textwrap.dedent(_CUSTOM_MODEL))
    save_file({"emb.weight": torch.randn(6, 4)}, str(tmp_path / "model.safetensors"))
    # model_type gpt2 would send a static rule to GPT-2's table entry: the auto_map must win
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["TiedCustomModel"],
        "auto_map": {"AutoConfig": "modeling_tied.TiedCustomConfig", "AutoModel": "modeling_tied.TiedCustomModel"}}))
    with pytest.raises(HfTaujpError, match="trust_remote_code"):
        find_tied_groups(tmp_path)
    got = _same_as_meta(str(tmp_path), rule="meta-build", trust_remote_code=True)
    assert got.groups == [("emb.weight", "head.weight")] and "custom code" in got.reason


# --------------------------------------------------------------- silent or contradicting: the meta build decides
def test_untied_config_with_a_tied_checkpoint_goes_to_the_meta_build(tmp_path):
    tiny_llama(tie_word_embeddings=False).save_pretrained(tmp_path)
    stored = [n for n in _stored_by_save(str(tmp_path)) if n != "lm_head.weight"]  # as a tied save would store
    got = _same_as_meta(str(tmp_path), stored, rule="meta-build")
    assert got.groups == [] and "stores only" in got.reason


def test_family_outside_the_table_goes_to_the_meta_build(tmp_path):
    assert "opt" not in TIED_FAMILIES
    OPTForCausalLM(OPTConfig(hidden_size=8, ffn_dim=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=16,
                             word_embed_proj_dim=8, max_position_embeddings=8)).save_pretrained(tmp_path)
    got = _same_as_meta(str(tmp_path), rule="meta-build")
    assert got.groups == [("model.decoder.embed_tokens.weight", "lm_head.weight")] and "'opt'" in got.reason


def test_class_outside_the_table_goes_to_the_meta_build(tmp_path, monkeypatch):
    tiny_gpt2(n_layer=1, n_embd=8, vocab_size=30, n_positions=8).save_pretrained(tmp_path)
    fam = TIED_FAMILIES["gpt2"]
    monkeypatch.setitem(TIED_FAMILIES, "gpt2", fam._replace(
        classes={k: v for k, v in fam.classes.items() if k != "GPT2LMHeadModel"}))
    assert "GPT2LMHeadModel" in _same_as_meta(str(tmp_path), rule="meta-build").reason


def test_other_transformers_version_or_tie_encoder_decoder_go_to_the_meta_build(tmp_path, monkeypatch):
    tiny_gpt2(n_layer=1, n_embd=8, vocab_size=30, n_positions=8).save_pretrained(tmp_path / "a")
    with monkeypatch.context() as mp:
        mp.setattr(tied, "_transformers_version", lambda: (6, 0))
        assert "outside" in _same_as_meta(str(tmp_path / "a"), rule="meta-build").reason
    tiny_gpt2(n_layer=1, n_embd=8, vocab_size=30, n_positions=8).save_pretrained(tmp_path / "b")
    raw = json.load(open(tmp_path / "b" / "config.json"))
    json.dump({**raw, "tie_encoder_decoder": True}, open(tmp_path / "b" / "config.json", "w"))
    assert "tie_encoder_decoder" in _same_as_meta(str(tmp_path / "b"), rule="meta-build").reason


def test_folders_without_a_transformers_config(tmp_path):
    assert find_tied_groups(tmp_path).rule == "no-config"
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    got = find_tied_groups(tmp_path)
    assert got.groups == [] and got.rule == "not-transformers"


# --------------------------------------------------------------- the fast path imports no transformers
def test_declared_rule_imports_no_transformers(tmp_path):
    tiny_gpt2(n_layer=1, n_embd=8, vocab_size=30, n_positions=8).save_pretrained(tmp_path)
    code = ("import sys; from hf_taujp.tied import find_tied_groups; "
            f"r = find_tied_groups({str(tmp_path)!r}); "
            "print(r.rule, sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "declared []"


def test_streaming_merge_logs_the_rule(tmp_path, caplog):
    from hf_taujp.merging import merge_streaming
    from hf_taujp.task_vector import TaskVector, fingerprint

    base = tiny_gpt2(n_layer=1, n_embd=8, vocab_size=30, n_positions=8)
    base.save_pretrained(tmp_path / "base")
    tau = {n: torch.full(p.shape, 0.5) for n, p in base.named_parameters()}
    TaskVector(tau, base_fingerprint=fingerprint(base)).save_pretrained(tmp_path / "tv")
    with caplog.at_level("INFO", logger="hf_taujp.tied"):
        merge_streaming(str(tmp_path / "base"), [str(tmp_path / "tv")], str(tmp_path / "out"), progress=False)
    assert "rule declared" in caplog.text and "lm_head.weight" in caplog.text
