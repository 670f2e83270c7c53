"""Diagonal Fisher information from per-example gradients, batched with torch.func (vmap over grad).

F = (1/N) Σ_n (∇_θ log p(ŷ_n | x_n; θ))², with ŷ_n sampled from the model's own predictive
distribution (true Fisher, as Daheim et al., ICLR 2024, and Matena & Raffel, NeurIPS 2022, Eq. 4),
or ŷ_n = gold label (``empirical=True``). For token outputs (causal LM, seq2seq, masked LM, token
classification) log p(ŷ|x) is the sum over the scored positions of their log-probabilities, with one
label sampled per position (teacher-forced on the input sequence); padding (attention_mask 0 / label
-100) is masked. Which positions are scored depends on the task (``output_type``, read from the model:
a causal LM's position j predicts token j + 1, a token classifier's / masked LM's position j its own
label), never on the logits' shape.

Inputs are what the model's own forward takes: ``input_ids`` or ``inputs_embeds`` (the recipes'
frozen-prefix cache), ``attention_mask``, ``position_ids`` (computed from the mask for a left-padded
batch of an absolute-position model, :func:`~hf_taujp.merging.statistics.with_position_ids`) and, for a
causal LM, ``logits_to_keep`` (the logits of the last k positions only, as the recipes' collator cuts
them: the labels then cover those k positions).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..errors import HfTaujpError
from ..linearize import _accepts
from .statistics import FisherStatistics, example_batches, sequence_input, uses_absolute_positions, with_position_ids

_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "decoder_input_ids",
               "decoder_attention_mask", "inputs_embeds", "position_ids")


@contextlib.contextmanager
def _vmappable_masks():
    """Let transformers build attention masks under vmap.

    transformers' mask builders (``masking_utils``) skip materialising the mask when an example has no
    padding, deciding with ``padding_mask.all()`` — data-dependent control flow that vmap refuses
    ("calling .item() on a Tensor"; T5 hits it, and any SDPA model with a padding mask). The skip is
    only a fast path: with it switched off here, the mask is always built, which is the same
    attention. Restored on exit; a no-op where those helpers do not exist."""
    try:
        from transformers import masking_utils as mu
    except ImportError:
        yield
        return
    names = [n for n in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa") if hasattr(mu, n)]
    saved = {n: getattr(mu, n) for n in names}
    try:
        for n in names:
            setattr(mu, n, lambda *a, **k: False)
        yield
    finally:
        for n, f in saved.items():
            setattr(mu, n, f)


_GRAD_MEMORY = 1 << 30  # bytes of per-example gradients held at once when chunk_size is not given


# output types: how log p(ŷ | x) is read from the logits (see _gold_and_mask)
OUTPUT_TYPES = ("sequence_classification", "token_classification", "causal_lm", "masked_lm", "seq2seq")
_PEFT_TASKS = {"SEQ_CLS": "sequence_classification", "TOKEN_CLS": "token_classification", "CAUSAL_LM": "causal_lm",
               "SEQ_2_SEQ_LM": "seq2seq"}
_MAPPINGS = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal_lm"), ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "masked_lm"),
             ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token_classification"),
             ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "sequence_classification"),
             ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "sequence_classification"),
             ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq"))


def output_type_of(model) -> str:
    """The task of ``model``'s logits, from what the model is (never from the logits' shape): a PEFT
    model's ``task_type``, else the transformers head class (``*ForCausalLM`` / ``GPT2LMHeadModel`` →
    causal_lm, ``*ForMaskedLM`` → masked_lm, ``*ForTokenClassification``, ``*ForSequenceClassification``
    / image classification → sequence_classification, seq2seq LMs → seq2seq), found in transformers'
    Auto mappings. Raises ``HfTaujpError`` for any other model (pass ``output_type=`` explicitly)."""
    cfg = getattr(model, "peft_config", None)
    if isinstance(cfg, dict) and cfg:
        tt = getattr(next(iter(cfg.values())), "task_type", None)
        tt = getattr(tt, "value", tt)
        if tt in _PEFT_TASKS:
            return _PEFT_TASKS[tt]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    # a PEFT tuner (.model) or hf_taujp's LinearizedModule (.base_model) may wrap the transformers model
    for m in (inner, getattr(inner, "model", None), getattr(inner, "base_model", None)):
        if not isinstance(m, torch.nn.Module):
            continue
        cls = type(m).__name__
        from transformers.models.auto import modeling_auto as ma

        for mapping, kind in _MAPPINGS:
            names = getattr(ma, mapping, {})
            for v in names.values():
                if cls == v or (isinstance(v, (list, tuple)) and cls in v):
                    return kind
    raise HfTaujpError(f"cannot tell which task {type(model).__name__}'s logits are for; pass "
                       f"output_type= one of {OUTPUT_TYPES}")


def _gold_and_mask(batch: dict, kind: str, empirical: bool, keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(gold labels, mask) aligned with the scored logits: (B,) for sequence classification; (B, L)
    positions for token classification, masked LM and seq2seq; (B, L − 1) next tokens for a causal LM
    ((B, k − 1) with ``keep`` = logits_to_keep = k: the last k positions' logits, labels given for the L
    positions or for those k). mask is 1 where a position counts: not padding (attention mask 0), not
    label -100; for a masked LM with labels, only the positions with a label (the masked tokens).
    B and L come from the token input (``input_ids`` or ``inputs_embeds``); the gold labels from
    ``labels`` (a causal LM without labels: its own next tokens, which need ``input_ids``). The true
    Fisher (``empirical=False``) without labels scores every non-padded position, its labels sampled."""
    if kind == "sequence_classification":
        if "labels" in batch:
            y = batch["labels"].reshape(-1)
        elif empirical:
            raise HfTaujpError("empirical Fisher needs gold `labels` in the batch")
        else:
            first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
            y = torch.zeros(first.shape[0], dtype=torch.long, device=first.device)
        return y, torch.ones(y.shape[0], device=y.device)
    if kind == "seq2seq":
        gold = batch["labels"]
        mask = gold != -100
        if "decoder_attention_mask" in batch:
            mask = mask & batch["decoder_attention_mask"].bool()
        return gold.clamp(min=0), mask.float()
    x = sequence_input(batch, "estimate_fisher")
    B, L = x.shape[:2]
    am = batch.get("attention_mask")
    if "labels" in batch:
        gold = batch["labels"]
    elif kind == "causal_lm" and "input_ids" in batch:
        gold = batch["input_ids"]  # a causal LM's gold labels: its own next tokens
    elif empirical:
        raise HfTaujpError("empirical Fisher needs gold `labels` in the batch"
                           + (" (a causal LM on inputs_embeds has no token ids to predict)" if kind == "causal_lm" else ""))
    else:  # true Fisher: the labels are sampled, only the scored positions matter
        gold = torch.zeros((B, L), dtype=torch.long, device=x.device)
    if kind == "causal_lm":
        if keep:
            k = min(keep, L)
            if gold.shape[1] not in (L, keep):
                raise HfTaujpError(f"labels cover {gold.shape[1]} positions: with logits_to_keep={keep} they must cover "
                                   f"the {L} input positions or the {keep} kept ones")
            gold = gold[:, -k:]
            am = am[:, -k:] if am is not None else None
        elif gold.shape[1] != L:
            raise HfTaujpError(f"labels cover {gold.shape[1]} positions, the input {L}: labels cut to the last positions "
                               "need the batch's logits_to_keep")
        gold = gold[:, 1:]  # position j predicts token j + 1
        am = am[:, 1:] if am is not None else None
    mask = gold != -100
    if am is not None:
        mask = mask & am.bool()
    return gold.clamp(min=0), mask.float()


def _log_lik(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, u: torch.Tensor | None,
             kind: str) -> torch.Tensor:
    """log p(ŷ | x) of ONE example = Σ_positions mask · log softmax(logits)[ŷ]. With uniforms ``u``
    (true Fisher), ŷ is drawn here from the model's own softmax by inverse CDF, ŷ = #{c : F(c) < u}
    with F the cumulative probabilities, so the sample comes from the very forward being
    differentiated (no second forward pass); ``y`` (gold labels) is used otherwise."""
    if kind == "causal_lm":
        logits = logits[..., :-1, :]
    lp = torch.log_softmax(logits, -1)
    if u is not None:
        cdf = lp.detach().double().exp().cumsum(-1)
        y = (cdf < u.unsqueeze(-1)).sum(-1).clamp(max=logits.shape[-1] - 1)
    return (lp.gather(-1, y.unsqueeze(-1)).squeeze(-1) * mask.to(lp.dtype)).sum()


def estimate_fisher(
    model: torch.nn.Module,
    data: Iterable[dict] | Any,
    *,
    empirical: bool = False,
    batch_size: int = 8,
    collate_fn=None,
    max_examples: int | None = None,
    seed: int = 0,
    parameters: Iterable[str] | None = None,
    progress: bool = True,
    task: str | None = None,
    chunk_size: int | None = None,
    output_type: str | None = None,
) -> FisherStatistics:
    """Diagonal Fisher of ``model`` over ``data``: a DataLoader or an iterable (list, generator) of
    *batches* — dicts of tensors with a leading batch dimension — or a ``datasets.Dataset`` / torch
    ``Dataset`` / list of *examples* (dicts of un-batched values), batched here with ``collate_fn``
    (default transformers' ``default_data_collator``) in batches of ``batch_size``
    (:func:`~hf_taujp.merging.statistics.example_batches`, shared with ``estimate_gram``). Batches are
    moved to the model's device.

    ``output_type`` (default: from the model, :func:`output_type_of`): how log p(ŷ | x) is read —
    ``sequence_classification`` (logits (B, C)), ``token_classification`` (logits (B, L, C), every
    labelled, non-padded position), ``masked_lm`` (logits (B, L, V), positions with a label ≠ -100, e.g.
    from ``DataCollatorForLanguageModeling``; without labels every non-padded position), ``causal_lm``
    (position j predicts token j + 1) or ``seq2seq`` (decoder positions of ``labels``). It is never
    guessed from the logits' shape.

    Per-example gradients come from ``vmap(grad(log p(ŷ_n | x_n)))`` over the batch, so one forward /
    backward per batch instead of a batch-size-1 loop; for the true Fisher ŷ is sampled inside that
    same forward (see ``_log_lik``), from uniforms drawn with ``seed``. The model runs in eval mode
    (no dropout). ``parameters``: names to estimate, whether or not they require grad (default: every
    one that does) — fewer names, less work and memory.

    Model inputs: ``input_ids`` or ``inputs_embeds`` (batch size and length are read from whichever is
    present; on ``inputs_embeds`` the input embedding table is outside the forward, so its Fisher is 0),
    ``attention_mask`` (all ones when absent), ``position_ids`` as given — computed as
    ``cumsum(mask) − 1`` for a left-padded batch of a model with learned absolute positions (GPT-2) that
    has none (:func:`~hf_taujp.merging.statistics.with_position_ids`; rotary models keep their relative
    positions without them) —, ``token_type_ids``, ``pixel_values``, decoder inputs, and a causal LM's
    ``logits_to_keep`` (an int k: only the last k positions' logits are computed, and scored).

    ``chunk_size``: examples per vmap call (a batch is split into such sub-batches, squared and summed
    one after the other); the per-example gradients of a call take
    chunk × the estimated parameters' bytes, so the default is the largest chunk ≤ the batch that
    keeps them within 1 GiB (one example at a time beyond 1 GiB of parameters). On a CPU shared
    with other processes, ``torch.set_num_threads(1)`` can be several times faster (OpenMP stalls).
    Returns a :class:`FisherStatistics` with ``tensors[name]`` (parameter shape) = mean squared
    gradient and ``num_examples`` = N (s_t in gradient matching), on the model's device; the uniforms
    that sample ŷ come from a CPU generator seeded with ``seed`` (the same labels on every device).
    Raises ``HfTaujpError`` for an unknown ``output_type``, batches that are not dicts, a batch with neither
    ``input_ids`` nor ``inputs_embeds`` (nor ``pixel_values``), labels that do not line up with the inputs,
    unknown ``parameters``, or no examples.
    """
    if output_type is None:
        output_type = output_type_of(model)
    elif output_type not in OUTPUT_TYPES:
        raise HfTaujpError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    was_training = model.training
    model.eval()
    if parameters is not None:  # the names asked for, whether or not they require grad
        names = list(parameters)
        have = dict(model.named_parameters())
        unknown = [n for n in names if n not in have]
        if unknown:
            raise HfTaujpError(f"parameters not in the model: {unknown[:5]}")
        params = {n: have[n].detach() for n in names}
    else:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise HfTaujpError("no parameter to estimate the Fisher of (none requires grad; pass parameters=...)")
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = {n: b for n, b in model.named_buffers()}
    sums = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32) for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    grad_bytes = sum(p.numel() * p.element_size() for p in params.values())
    kind = output_type
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    absolute = uses_absolute_positions(model)
    count = 0
    try:
        bar = tqdm(desc="fisher", unit="ex", total=max_examples, disable=not progress)
        for batch, _ in example_batches(data, batch_size=batch_size, collate_fn=collate_fn, max_examples=max_examples,
                                        device=device, who="estimate_fisher"):
            keep = _logits_to_keep(batch.get("logits_to_keep"), kind, model)
            batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if "label" in batch and "labels" not in batch:
                batch["labels"] = batch.pop("label")
            if not any(k in batch for k in ("input_ids", "inputs_embeds", "pixel_values")):
                raise HfTaujpError(f"estimate_fisher: the batch has neither input_ids nor inputs_embeds (nor pixel_values); "
                                   f"keys: {sorted(batch)}")
            batch = with_position_ids(batch, absolute)
            inputs = {k: v for k, v in batch.items() if k in _MODEL_KEYS}
            tokens = next((inputs[k] for k in ("input_ids", "inputs_embeds") if k in inputs), None)
            if tokens is not None and "attention_mask" not in inputs:
                # without a mask HF models check the ids for padding with .item(): not vmap-able
                inputs["attention_mask"] = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
            if kind == "seq2seq" and "labels" not in batch:
                raise HfTaujpError("a seq2seq Fisher needs `labels` (the decoder targets) in every batch")
            if kind == "seq2seq" and "decoder_input_ids" not in inputs:
                inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
            y, mask = _gold_and_mask(batch, kind, empirical, keep)
            # true Fisher: one uniform per scored position, drawn here so `seed` fixes the labels
            u = None if empirical else torch.rand(mask.shape, generator=g, dtype=torch.float64).to(device)
            n_b = y.shape[0]
            chunk = chunk_size or max(1, min(n_b, _GRAD_MEMORY // max(1, grad_bytes)))

            def loglik(p, inp, yy, mm, uu):
                inp = {k: v.unsqueeze(0) for k, v in inp.items()}
                kw = {"use_cache": False} if _accepts_cache(model) else {}
                if keep:
                    kw["logits_to_keep"] = keep
                out = functional_call(model, ({**p, **frozen}, buffers), args=(), kwargs={**inp, **kw})
                return _log_lik(out.logits[0], yy, mm, uu, kind)

            per_example = vmap(grad(loglik), in_dims=(None, 0, 0, 0, None if u is None else 0))
            # sub-batches of `chunk` examples, squared and summed before the next: vmap's own chunk_size
            # would concatenate all B per-example gradients again
            for s in range(0, n_b, chunk):
                sl = slice(s, s + chunk)
                # SDPA's fused CPU / CUDA kernels have no vmap batching rule (vmap would fall back to a
                # slow per-example loop with a warning): use the math backend, plain batched matmuls
                with _vmappable_masks(), sdpa_kernel([SDPBackend.MATH]):
                    grads = per_example(params, {k: v[sl] for k, v in inputs.items()}, y[sl], mask[sl],
                                        None if u is None else u[sl])
                for n, gr in grads.items():
                    gr = gr.to(sums[n].dtype)
                    # in place where the gradient owns its memory; a parameter the forward never uses (the
                    # input embeddings on inputs_embeds) gets an expanded zero tensor, squared out of place
                    sums[n] += (gr.square_() if gr.is_contiguous() else gr.square()).sum(0)
                del grads
            n_b = y.shape[0]
            count += n_b
            bar.update(n_b)
        bar.close()
    finally:
        model.train(was_training)
    from ..fingerprints import fingerprint

    fp = fingerprint(model)
    return FisherStatistics({n: s / count for n, s in sums.items()}, num_examples=count,
                            base_model=getattr(model.config, "_name_or_path", None) or None,
                            base_fingerprint=fp, task=task, extra={"empirical": bool(empirical)})


def _accepts_cache(model) -> bool:
    return hasattr(model.config, "use_cache")


def _logits_to_keep(value, kind: str, model) -> int:
    """The batch's ``logits_to_keep`` as an int (0 = every position), honoured for causal LMs only."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HfTaujpError(f"logits_to_keep must be a non-negative int (the last k positions), got {value!r}")
    if value and kind != "causal_lm":
        raise HfTaujpError(f"logits_to_keep is read for causal LMs only, not {kind}")
    if value and not _accepts(model, "logits_to_keep"):
        raise HfTaujpError(f"the batch has logits_to_keep={value} but {type(model).__name__}'s forward does not take it")
    return value
