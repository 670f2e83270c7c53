"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

For a linear layer y = x·W (W of shape (in, out)) fine-tuned on T tasks with inputs X_t (n_t × in),
the weight minimising Σ_t ‖X_t W − X_t W_t‖² is (paper, Eq. 2)

    W* = (Σ_t X_tᵀX_t)⁻¹ Σ_t X_tᵀX_t W_t.

Only the Gram matrices G_t = X_tᵀX_t (in × in) of each task are needed (scaled: the reference code
averages them over the rows of X_t, i.e. over tokens); they are estimated here with
forward hooks on ``torch.nn.Linear`` (weight (out, in), y = x Wᵀ + b) and transformers' GPT-2-style
``Conv1D`` (weight (in, out), y = x W + b), and saved as a :class:`GramStatistics` artifact beside
the task vector (prefix ``gram``; config ``weight_layout`` records each weight's layout).
The merge itself is the ``regmean`` method in :mod:`.methods`.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from ..errors import HfTaujpError
from ..linearize import LOSS_KEYS, _accepts, _decoder_inputs_from_labels
from .statistics import GramStatistics, example_batches, sequence_input, uses_absolute_positions, with_position_ids



def _conv1d_cls():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # transformers absent: only nn.Linear layers
        return None


def linear_layers(model: torch.nn.Module, modules: Iterable[str] | None = None) -> dict[str, tuple[torch.nn.Module, str]]:
    """{module path: (module, layout)} of the model's Linear ("out_in") and Conv1D ("in_out") layers,
    optionally restricted to the given module paths (a path that is not such a layer raises)."""
    conv1d = _conv1d_cls()
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            found[name] = (m, "out_in")
        elif conv1d is not None and isinstance(m, conv1d):
            found[name] = (m, "in_out")
    if modules is not None:
        modules = list(modules)
        bad = [m for m in modules if m not in found]
        if bad:
            raise HfTaujpError(f"not Linear / Conv1D layers of the model: {bad[:5]}")
        found = {m: found[m] for m in modules}
    return found


def estimate_gram(
    model: torch.nn.Module,
    data: Iterable[dict] | Any,
    *,
    modules: Iterable[str] | None = None,
    batch_size: int = 8,
    collate_fn=None,
    max_examples: int | None = None,
    progress: bool = True,
    task: str | None = None,
    base: torch.nn.Module | None = None,
) -> GramStatistics:
    """Input Gram matrices of every Linear / Conv1D layer over ``data`` (RegMean, Jin et al. 2023).

    For layer ``<m>``: ``tensors["<m>.weight"]`` = (1/R) Σ_n Σ_j x_{n,j} x_{n,j}ᵀ, shape (in, in), where
    x_{n,j} is the layer's input at position j of example n and R the number of such rows (tokens):
    the mean over rows of the layer's input, as RegMean's reference code computes it (``x.view(-1, h)``,
    ``xᵀx / x.size(0)``, a running mean over batches), so tasks count equally whatever their dataset
    sizes and sequence lengths. One deliberate difference: padded positions (``attention_mask`` /
    ``decoder_attention_mask`` 0, used when their shape matches the input's leading dims) are neither
    summed nor counted (the reference includes padding rows). With both masks (an encoder-decoder), each input
    is masked by its side, not by its shape (the two may share one): the encoder's layers and the cross-attention
    keys / values (they read the encoder's output) by ``attention_mask``, the decoder's other layers and the
    LM head by ``decoder_attention_mask``. An encoder-decoder batch with ``labels`` and no decoder inputs gets
    ``decoder_input_ids`` = the shifted labels (the model's own shift, as in training) and, unless given,
    ``decoder_attention_mask`` = labels ≠ -100. R per layer is recorded in
    ``extra["gram_rows"]``, the number of examples in ``num_examples``. Accumulated in float64 on the
    model's device. ``data``: DataLoader / iterable of dict batches, or a dataset / list of examples batched
    with ``collate_fn`` (default transformers' ``default_data_collator``), read as ``estimate_fisher``
    reads it (:func:`~hf_taujp.merging.statistics.example_batches`); each batch is moved to the model's
    device and passed as ``model(**batch)`` without its labels and without ``logits_to_keep`` (every layer,
    the output layer included, sees every position). Token inputs may be ``input_ids`` or ``inputs_embeds``
    (the recipes' frozen-prefix cache); ``position_ids`` are passed as given, and computed from the mask
    (``cumsum(mask) − 1``) for a left-padded batch of a model with learned absolute positions (GPT-2) that
    has none (:func:`~hf_taujp.merging.statistics.with_position_ids`), as the model reads the rows unpadded.
    A model whose forward takes both ``input_ids`` and ``inputs_embeds`` (a transformers text model) must get
    one of them. The model runs in eval mode under
    ``torch.no_grad()``. RegMean uses the Grams of each *fine-tuned* model; pass its ``base`` to record
    the base fingerprint (checked by merges). Raises ``HfTaujpError`` for a batch that is not a dict,
    a text model's batch with neither ``input_ids`` nor ``inputs_embeds``, no examples, or layers never
    called.
    """
    layers = linear_layers(model, modules)
    if not layers:
        raise HfTaujpError("the model has no nn.Linear / Conv1D layers: nothing for RegMean")
    acc = {n: None for n in layers}
    rows = {n: 0 for n in layers}
    masks: dict[str, torch.Tensor] = {}
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    encoder = model.get_encoder() if seq2seq and hasattr(model, "get_encoder") else None
    # an encoder-decoder's layers read encoder positions (inside the encoder, and the cross-attention keys /
    # values, which take the encoder's output) or decoder positions: each gets its own mask, whatever the shapes
    enc = {"inside": False, "out": None}

    def encoder_side(x) -> bool:
        e = enc["out"]
        return enc["inside"] or (e is not None and x.shape == e.shape and x.data_ptr() == e.data_ptr())

    def hook(name):
        def fn(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if encoder is not None and "decoder_attention_mask" in masks:
                cands = [masks["attention_mask" if encoder_side(x) else "decoder_attention_mask"]]
                cands = [c for c in cands if c is not None]
            else:
                cands = list(masks.values())
            x = x.detach().to(torch.float64)
            lead = tuple(x.shape[:-1])
            x = x.reshape(-1, x.shape[-1])
            for m in cands:  # padding positions do not count
                if tuple(m.shape) == lead:
                    x = x[m.reshape(-1).to(x.device).bool()]
                    break
            rows[name] += x.shape[0]
            g = x.T @ x
            acc[name] = g if acc[name] is None else acc[name].add_(g)
        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, (m, _) in layers.items()]
    if encoder is not None:
        handles.append(encoder.register_forward_pre_hook(lambda m, a: enc.update(inside=True)))
        handles.append(encoder.register_forward_hook(lambda m, a, out: enc.update(inside=False, out=out[0])))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    count = 0
    absolute = uses_absolute_positions(model)
    text = _accepts(model, "input_ids") and _accepts(model, "inputs_embeds")
    drop = tuple(k for k in LOSS_KEYS if k != "labels") + ("logits_to_keep",)
    try:
        bar = tqdm(desc="gram", unit="ex", total=max_examples, disable=not progress)
        with torch.no_grad():
            for batch, n_b in example_batches(data, batch_size=batch_size, collate_fn=collate_fn,
                                              max_examples=max_examples, device=device,
                                              drop=drop, who="estimate_gram"):
                labels = batch.pop("labels", None)
                if text and "pixel_values" not in batch:
                    sequence_input(batch, "estimate_gram")  # no silent fallback: a text batch has a token input
                if seq2seq and isinstance(labels, torch.Tensor) and not any(
                        k in batch for k in ("decoder_input_ids", "decoder_inputs_embeds")):
                    # the decoder reads the shifted targets (as in training); label -100 = decoder padding
                    batch["decoder_input_ids"] = _decoder_inputs_from_labels(model, labels)
                    batch.setdefault("decoder_attention_mask", (labels != -100).long())
                batch = with_position_ids(batch, absolute)
                masks.clear()
                masks.update((k, batch.get(k)) for k in ("attention_mask", "decoder_attention_mask") if k in batch)
                if encoder is not None and "decoder_attention_mask" in masks:
                    masks.setdefault("attention_mask", None)
                enc.update(inside=False, out=None)
                model(**batch)
                count += n_b
                bar.update(n_b)
        bar.close()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [n for n, g in acc.items() if g is None]
    if missing:
        raise HfTaujpError(f"layers never called during the forward passes: {missing[:5]} (pass modules=...)")
    dt = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    tensors = {f"{n}.weight": (g / max(rows[n], 1)).to(dt) for n, g in acc.items()}
    layout = {f"{n}.weight": lay for n, (_, lay) in layers.items()}
    fp = None
    if base is not None:
        from ..fingerprints import fingerprint

        fp = fingerprint(base)
    cfg = getattr(base if base is not None else model, "config", None)
    return GramStatistics(tensors, num_examples=count, base_model=getattr(cfg, "_name_or_path", None) or None,
                          base_fingerprint=fp, task=task,
                          extra={"weight_layout": layout, "gram_rows": {f"{n}.weight": r for n, r in rows.items()}})
