"""Predictions and accuracy of a model over a dataset of example dicts (gold labels from the first
present key of :data:`hf_taujp.linearize.LOSS_KEYS`, ``labels`` first)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..errors import HfTaujpError
from ..linearize import LOSS_KEYS

# The package's one list of loss inputs (gold labels are read from the first present, `labels` first).
_LABEL_KEYS = LOSS_KEYS


def _collate(rows: Sequence[Mapping]) -> dict:
    from transformers import default_data_collator

    return default_data_collator(list(rows))


def _batches(dataset, batch_size: int, collate_fn: Callable | None):
    """Yield collated batches from a sequence of example dicts (a list, a torch or HF Dataset)."""
    if len(dataset) == 0:
        raise HfTaujpError("evaluation dataset is empty")
    collate = collate_fn or _collate
    for i in range(0, len(dataset), batch_size):
        rows = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
        yield collate(rows)


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _split(batch: dict, device) -> tuple[dict, torch.Tensor | None]:
    """(model inputs on `device`, gold labels or None): the loss inputs (`_LABEL_KEYS`) are never passed to
    the model; the gold labels are the first present of them (`labels` first)."""
    labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    inputs = _to({k: v for k, v in batch.items() if k not in _LABEL_KEYS}, device)
    return inputs, (None if labels is None else torch.as_tensor(labels).cpu())


def _default_predict(model, batch: dict) -> torch.Tensor:
    out = model(**batch)
    logits = out["logits"] if isinstance(out, Mapping) else (out.logits if hasattr(out, "logits") else out)
    return logits.argmax(-1)


@torch.no_grad()
def predictions(model: torch.nn.Module, dataset, *, batch_size: int = 32, collate_fn: Callable | None = None,
                predict_fn: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(predicted labels, gold labels or None) over `dataset`; predict_fn(model, batch) -> (B,) labels."""
    was = model.training
    model.eval()
    preds, golds = [], []
    dev = _device_of(model)
    try:
        for batch in _batches(dataset, batch_size, collate_fn):
            inputs, labels = _split(batch, dev)
            preds.append((predict_fn or _default_predict)(model, inputs).cpu())
            if labels is not None:
                golds.append(labels)
    finally:
        model.train(was)
    return torch.cat(preds), (torch.cat(golds) if golds else None)


def accuracy(model: torch.nn.Module, dataset, *, batch_size: int = 32, collate_fn: Callable | None = None,
             predict_fn: Callable | None = None) -> float:
    """Top-1 accuracy: mean 1{pred(x) = y} over `dataset` (examples with a `labels`/`label` field)."""
    pred, gold = predictions(model, dataset, batch_size=batch_size, collate_fn=collate_fn, predict_fn=predict_fn)
    if gold is None:
        raise HfTaujpError("accuracy needs labels ('labels' or 'label') in the evaluation dataset")
    return float((pred == gold).float().mean())


def _select(out, output: str | Callable, batch):
    if callable(output):
        return output(out, batch)
    from ..trainer.penalty import select_output

    return select_output(out, output)
