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
from ..linearize import LOSS_KEYS
from .statistics import GramStatistics, example_batches



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
    summed nor counted (the reference includes padding rows). R per layer is recorded in
    ``extra["gram_rows"]``, the number of examples in ``num_examples``. Accumulated in float64 on the
    model's device. ``data``: DataLoader / iterable of dict batches, or a dataset / list of examples batched
    with ``collate_fn`` (default transformers' ``default_data_collator``), read as ``estimate_fisher``
    reads it (:func:`~hf_taujp.merging.statistics.example_batches`); each batch is moved to the model's
    device and passed as ``model(**batch)`` without its labels. The model runs in eval mode under
    ``torch.no_grad()``. RegMean uses the Grams of each *fine-tuned* model; pass its ``base`` to record
    the base fingerprint (checked by merges). Raises ``HfTaujpError`` for a batch that is not a dict,
    no examples, or layers never called.
    """
    layers = linear_layers(model, modules)
    if not layers:
        raise HfTaujpError("the model has no nn.Linear / Conv1D layers: nothing for RegMean")
    acc = {n: None for n in layers}
    rows = {n: 0 for n in layers}
    masks: list[torch.Tensor] = []

    def hook(name):
        def fn(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().to(torch.float64)
            lead = tuple(x.shape[:-1])
            x = x.reshape(-1, x.shape[-1])
            for m in masks:  # padding positions do not count
                if tuple(m.shape) == lead:
                    x = x[m.reshape(-1).to(x.device).bool()]
                    break
            rows[name] += x.shape[0]
            g = x.T @ x
            acc[name] = g if acc[name] is None else acc[name].add_(g)
        return fn

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, (m, _) in layers.items()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    count = 0
    try:
        bar = tqdm(desc="gram", unit="ex", total=max_examples, disable=not progress)
        with torch.no_grad():
            for batch, n_b in example_batches(data, batch_size=batch_size, collate_fn=collate_fn,
                                              max_examples=max_examples, device=device, drop=tuple(LOSS_KEYS),
                                              who="estimate_gram"):
                masks[:] = [batch[k] for k in ("attention_mask", "decoder_attention_mask") if k in batch]
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
