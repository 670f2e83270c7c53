"""What the toxicity recipe measures a (negated) model with: perplexity in fixed-length blocks (ordinary or
linearized logits), the negated model θ0 − α τ, and sampled generations under a complete, explicit sampling
config (:data:`SAMPLING`). Re-exported by :mod:`hf_taujp.recipes.toxicity`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from ..hub import HfTaujpError
from ..linearize import linearize, linearized_forward
from .common import weights_of
from .lambda_options import vector_score

# Every generation setting that shapes transformers' sampling, set explicitly: top-k 50 at temperature 1, all
# other filters and penalties off. generate() fills any setting left unset from the model's own
# generation_config (checkpoints ship top_p 0.9, repetition_penalty 1.1, ...), so none is left unset, and the
# model's config is swapped out while generating (see generate_continuations).
SAMPLING = {
    "do_sample": True, "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "top_k": 50, "top_p": 1.0,
    "temperature": 1.0, "min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False, "remove_invalid_values": False,
    "guidance_scale": None, "watermarking_config": None, "penalty_alpha": None, "diversity_penalty": 0.0,
    "dola_layers": None, "token_healing": False, "length_penalty": 1.0, "min_new_tokens": 0, "stop_strings": None,
    "max_time": None, "use_cache": True, "cache_implementation": None, "low_memory": None,
}


# ---------------------------------------------------------------------------------------------- perplexity
def _context_length(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, *, block_size: int = 1024, stride: int | None = None, batch_size: int = 4,
               tangents=None, alphas: Sequence[float] = (1.0,)) -> list[float]:
    """Perplexity exp(mean NLL) of a token stream in fixed-length blocks (the sliding window of transformers'
    perplexity guide): windows [b, b + block_size) for b = 0, stride, 2·stride, …; each window scores only the
    tokens no earlier window scored, each predicted from the window's own preceding tokens; a token at a window's
    first position has no context there and is not scored. stride = block_size (default) gives non-overlapping
    blocks (the first token of each block unscored, as in the guide); stride < block_size overlaps them so that
    only the stream's first token goes unscored.

    Args:
        model: a causal LM (ordinary, or the base θ0 when `tangents` is given).
        input_ids: the token stream, shape (L,), L ≥ 2.
        tangents: `{param name: τ}`: score the linearized logits f(x; θ0) + α·J f(x; θ0)·τ for every α in
            `alphas` from one forward-mode pass per batch of windows (pass −τ for negation).
    Returns:
        one perplexity per α (a single one for an ordinary model).
    Raises:
        HfTaujpError: fewer than 2 tokens, stride not in 1…block_size, block_size < 2.
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    L = ids.numel()
    stride = block_size if stride is None else stride
    if L < 2:
        raise HfTaujpError(f"perplexity needs at least 2 tokens, got {L}")
    if block_size < 2 or not 1 <= stride <= block_size:
        raise HfTaujpError(f"perplexity: need block_size ≥ 2 and 1 ≤ stride ≤ block_size, got {block_size}, {stride}")
    windows, prev = [], 0
    for begin in range(0, L, stride):
        end = min(begin + block_size, L)
        windows.append((begin, end, end - prev))  # score the last end - prev tokens of the window
        prev = end
        if end == L:
            break
    alphas = [float(a) for a in alphas] if tangents is not None else [1.0]
    nll = torch.zeros(len(alphas), dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    lin = None
    if tangents is not None:
        names = list(tangents)
        params = dict(model.named_parameters())
        lin = (model, {n: params[n] for n in names}, dict(tangents))
    by_len: dict[int, list] = {}
    for w in windows:
        by_len.setdefault(w[1] - w[0], []).append(w)
    for n, group in by_len.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
            if lin is None:
                logits = [model(input_ids=x).logits]
            else:
                primal, tangent = linearized_forward(lin[0], lin[1], lin[2], kwargs={"input_ids": x})
                logits = [primal.logits + a * tangent.logits for a in alphas]
            for j, lg in enumerate(logits):
                logp = torch.log_softmax(lg.double(), dim=-1)  # (B, n, V); position t predicts token t + 1
                for k, (b, e, trg) in enumerate(chunk):
                    first = max(1, n - trg)  # first scored position in the window (position 0 has no context)
                    tgt = x[k, first:]
                    nll[j] -= logp[k, first - 1:n - 1].gather(-1, tgt[:, None]).sum().cpu()
            count += sum(n - max(1, n - trg) for _, _, trg in chunk)
    return [math.exp(v / count) for v in nll.tolist()]


def lm_fit_score(method, base, ppl, input_ids: torch.Tensor):
    """``fn(τ tensors) -> −ln perplexity`` (nats per token, greater is better) of θ0 + τ on ``input_ids`` (the linear
    reading f(θ0) + J·τ for linear methods), with ``ppl(ids, model, tangents=None, alphas=(1.0,)) -> [ppl]`` (the
    recipe's :func:`perplexity`): how well τ learned its task — the score taujp_lambda="auto" keeps within
    tolerance of λ = 0's (:mod:`hf_taujp.trainer.lambda_search`). ``base`` is θ0 again after each call."""
    return vector_score(method, base, lambda tensors: -math.log(ppl(input_ids, base, tensors, [1.0])[0]),
                        lambda: -math.log(ppl(input_ids, base)[0]))


# ---------------------------------------------------------------------------------------------- negation
@contextlib.contextmanager
def negated_model(base, tv, alpha: float):
    """The negated model at α: θ0 − α τ written into `base` in place (weight reading; θ0 restored on exit) for a
    non-linear vector, f(x; θ0) − α J f(x; θ0)·τ for a linear one (a LinearizedModule sharing `base`'s weights;
    its `.generate` decodes with a tangent KV cache). The same models as `(-tv).apply_to(base, alpha)`, without
    copying the base per α."""
    if tv.kind == "linear":
        params = dict(base.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        try:
            yield linearize(base, parameter_names=list(tv.keys()),
                            tangents={k: -float(alpha) * t for k, t in tv.items()}).eval()
        finally:
            for n, p in params.items():
                p.requires_grad_(flags[n])
    else:
        with weights_of(base) as set_weights:
            set_weights(-float(alpha), tv)
            yield base


# --------------------------------------------------------------------------------------------- generation
def check_prompts(prompts: Sequence[str], tokenizer, model, max_new_tokens: int,
                  where: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each prompt; raises HfTaujpError for an empty prompt list / prompt or one that does not fit
    the model's context with `max_new_tokens` new tokens, naming `where[i]` (e.g. the file and line) if given."""
    if not prompts:
        raise HfTaujpError("no prompt to generate from")
    ctx = _context_length(model)
    out = []
    for i, p in enumerate(prompts):
        at = f" ({where[i]})" if where is not None else ""
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if not ids:
            raise HfTaujpError(f"empty prompt {p!r}{at}")
        if ctx is not None and len(ids) + max_new_tokens > ctx:
            raise HfTaujpError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the model's context "
                               f"of {ctx} tokens: {p[:60]!r}…{at}")
        out.append(ids)
    return out


def _generating_model(model):
    """The transformers model whose generate() runs: a LinearizedModule decodes through its base model."""
    return model.base_model if hasattr(model, "tau") else model


def sampling_config(model, tokenizer, max_new_tokens: int, **overrides):
    """The complete `transformers.GenerationConfig` the recipe samples with: :data:`SAMPLING` (top-k 50,
    temperature 1, every other filter / penalty off) updated by `overrides`, `max_new_tokens`, the tokenizer's
    pad token, and the end-of-sequence id(s) of the model's generation config (else its tokenizer's): the only
    value taken from the model, since it says where a text ends, not how tokens are drawn.

    Raises HfTaujpError for an override that is not a key of :data:`SAMPLING`."""
    from transformers import GenerationConfig

    unknown = sorted(set(overrides) - set(SAMPLING))
    if unknown:
        raise HfTaujpError(f"unknown sampling setting(s) {unknown}; settable: {sorted(SAMPLING)}")
    own = getattr(_generating_model(model), "generation_config", None)
    eos = getattr(own, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return GenerationConfig(**{**SAMPLING, **overrides}, max_new_tokens=max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)


@contextlib.contextmanager
def _only_this_generation_config(model, config):
    """generate() completes the config it is given from `model.generation_config`; with `config` in that place
    there is nothing left to complete from, so the model's own settings cannot leak in. Restored on exit."""
    lm = _generating_model(model)
    saved = lm.generation_config
    lm.generation_config = config
    try:
        yield
    finally:
        lm.generation_config = saved


@torch.no_grad()
def generate_continuations(model, tokenizer, prompts: Sequence[str], n: int, *, max_new_tokens: int = 50,
                           batch_size: int = 32, seed: int = 0, **sampling) -> list[str]:
    """`n` sampled continuations (text after the prompt), the prompts taken in turn; `model` is an ordinary causal
    LM or a LinearizedModule (its `.generate` is transformers' generate over f_lin). Sampling: the complete
    config of :func:`sampling_config` (top-k 50, temperature 1.0, nothing else; `sampling` overrides keys of
    :data:`SAMPLING`), never completed from the model's own `generation_config`; seeded per batch
    (`torch.manual_seed(seed + first row)`). Raises HfTaujpError: bad prompts (:func:`check_prompts`), an
    unknown sampling setting."""
    ids = check_prompts(prompts, tokenizer, model, max_new_tokens)
    config = sampling_config(model, tokenizer, max_new_tokens, **sampling)
    order = [ids[i % len(ids)] for i in range(n)]
    pad = tokenizer.pad_token_id
    dev = next(p for p in (model.base_model if hasattr(model, "tau") else model).parameters()).device
    out = []
    with _only_this_generation_config(model, config):
        for s in range(0, n, batch_size):
            chunk = order[s:s + batch_size]
            m = max(len(c) for c in chunk)
            x = torch.full((len(chunk), m), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for i, c in enumerate(chunk):  # left padding: every prompt ends where generation starts
                x[i, m - len(c):] = torch.tensor(c)
                mask[i, m - len(c):] = 1
            torch.manual_seed(seed + s)
            gen = model.generate(input_ids=x.to(dev), attention_mask=mask.to(dev), generation_config=config)
            out += tokenizer.batch_decode(gen[:, m:], skip_special_tokens=True)
    return out
