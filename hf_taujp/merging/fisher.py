"""Diagonal Fisher information from per-example gradients, batched with torch.func (vmap over grad).

F = (1/N) Σ_n (∇_θ log p(ŷ_n | x_n; θ))², with ŷ_n sampled from the model's own predictive
distribution (true Fisher, as Daheim et al., ICLR 2024, and Matena & Raffel, NeurIPS 2022, Eq. 4),
or ŷ_n = gold label (``empirical=True``). For token outputs (causal LM, seq2seq) log p(ŷ|x) is
the sum over non-padded target positions of token log-probabilities, with one token sampled per
position (teacher-forced on the input sequence); padding (attention_mask 0 / label -100) is masked.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ..hub import HfTaujpError
from .statistics import FisherStatistics

_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "decoder_input_ids",
               "decoder_attention_mask", "inputs_embeds")


def _targets(model, batch: dict, logits: torch.Tensor, empirical: bool, generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(labels, mask, kind): labels aligned with ``logits`` positions; mask 1 where a position counts."""
    if logits.dim() == 2:  # classification
        if empirical:
            if "labels" not in batch:
                raise HfTaujpError("empirical Fisher needs gold `labels` in the batch")
            y = batch["labels"].reshape(-1)
        else:
            y = torch.multinomial(torch.softmax(logits.detach().double(), -1), 1, generator=generator).squeeze(-1)
        return y, torch.ones_like(y, dtype=logits.dtype), "cls"
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    if enc_dec:
        gold = batch["labels"]
        mask = (gold != -100)
        if "decoder_attention_mask" in batch:
            mask = mask & batch["decoder_attention_mask"].bool()
        kind = "seq2seq"
    else:
        gold = batch.get("labels", batch["input_ids"])
        gold = gold[:, 1:]
        mask = gold != -100
        if "attention_mask" in batch:
            mask = mask & batch["attention_mask"][:, 1:].bool()
        kind = "causal"
        logits = logits[:, :-1]
    if empirical:
        y = gold.clamp(min=0)
    else:
        p = torch.softmax(logits.detach().double(), -1)
        y = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(p.shape[:-1])
    return y, mask.to(logits.dtype), kind


def _log_lik(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "causal":
        logits = logits[..., :-1, :]
    lp = torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum()


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
) -> FisherStatistics:
    """Diagonal Fisher of ``model`` over ``data`` (a DataLoader / list / iterable of dict batches, or a
    ``datasets.Dataset`` / torch ``Dataset`` of dict examples batched here with ``collate_fn``,
    default transformers' ``default_data_collator``).

    Per-example gradients come from ``vmap(grad(log p(ŷ_n | x_n)))`` over the batch, so one forward /
    backward per batch instead of a batch-size-1 loop. The model runs in eval mode (no dropout).
    ``chunk_size``: examples per vmap call inside a batch (``torch.func.vmap(chunk_size=...)``) to bound
    the memory of the per-example gradients, B × the trainable parameters (default: the whole batch).
    Returns a :class:`FisherStatistics` with ``tensors[name]`` (parameter shape) = mean squared
    gradient and ``num_examples`` = N (s_t in gradient matching).
    """
    if not (hasattr(data, "column_names") or isinstance(data, torch.utils.data.Dataset)):
        loader = data  # a DataLoader or any iterable (list, generator) of dict batches
    else:
        if collate_fn is None:
            from transformers import default_data_collator as collate_fn
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)
    was_training = model.training
    model.eval()
    names = set(parameters) if parameters is not None else None
    params = {n: p.detach() for n, p in model.named_parameters()
              if p.requires_grad and (names is None or n in names)}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = {n: b for n, b in model.named_buffers()}
    sums = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32) for n, p in params.items()}
    g = torch.Generator().manual_seed(seed)
    count = 0
    try:
        bar = tqdm(desc="fisher", unit="ex", total=max_examples, disable=not progress)
        for batch in loader:
            batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if "label" in batch and "labels" not in batch:
                batch["labels"] = batch.pop("label")
            if max_examples is not None:
                left = max_examples - count
                if left <= 0:
                    break
                batch = {k: v[:left] for k, v in batch.items()}
            inputs = {k: v for k, v in batch.items() if k in _MODEL_KEYS}
            if "input_ids" in inputs and "attention_mask" not in inputs:
                # without a mask HF models check the ids for padding with .item(): not vmap-able
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
                inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
            with torch.no_grad():
                logits = model(**inputs, use_cache=False).logits if _accepts_cache(model) else model(**inputs).logits
            y, mask, kind = _targets(model, batch, logits, empirical, g)

            def loglik(p, inp, yy, mm):
                inp = {k: v.unsqueeze(0) for k, v in inp.items()}
                kw = {"use_cache": False} if _accepts_cache(model) else {}
                out = functional_call(model, ({**p, **frozen}, buffers), args=(), kwargs={**inp, **kw})
                return _log_lik(out.logits[0], yy, mm, kind)

            grads = vmap(grad(loglik), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)(params, inputs, y, mask)
            for n, gr in grads.items():
                sums[n] += (gr.to(sums[n].dtype) ** 2).sum(0)
            n_b = y.shape[0]
            count += n_b
            bar.update(n_b)
        bar.close()
    finally:
        model.train(was_training)
    if count == 0:
        raise HfTaujpError("estimate_fisher got no examples")
    fp = None
    try:
        from ..task_vector import fingerprint

        fp = fingerprint(model)
    except Exception:  # TaskVector module absent or model not fingerprintable: leave unset
        fp = None
    return FisherStatistics({n: s / count for n, s in sums.items()}, num_examples=count,
                            base_model=getattr(model.config, "_name_or_path", None) or None,
                            base_fingerprint=fp, task=task, extra={"empirical": bool(empirical)})


def _accepts_cache(model) -> bool:
    return hasattr(model.config, "use_cache")
