"""Per-task statistics (diagonal Fisher, RegMean Gram matrices) as shareable Hub artifacts.

Folder layout = the TaskVector layout (docs/modules.md) with prefix ``fisher`` or ``gram``:
``config.json`` ({"format": "hf-taujp/fisher" | "hf-taujp/gram", "format_version": 1, "num_examples",
"base_model", "base_fingerprint", "task", "empirical"}), ``fisher.safetensors`` (or shards + index),
``README.md``.

Also the one way the estimators read their data (:func:`example_batches`) and the model inputs they
build from a batch: the token input (``input_ids`` or ``inputs_embeds``, :func:`sequence_input`) and the
position ids of a left-padded batch (:func:`position_ids_from_mask`, :func:`with_position_ids`) — the
same ids the recipes' collator and transformers' generation give.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping

import torch

from .. import hub
from ..errors import HfTaujpError
from ..linearize import _accepts

_PREFIX = {"fisher": "fisher", "gram": "gram"}


class Statistics:
    """Per-parameter statistics of one task: ``tensors[name]`` has the parameter's shape (Fisher)
    or (in, in) (Gram of a linear layer's inputs, keyed ``<module>.weight``); ``num_examples`` = s_t."""

    kind = "fisher"
    # what the card and the error messages call them, and the hf-taujp methods that use them
    # (a subclass of another kind sets its own: e.g. hf_taujp.trainer.curvature.KFACStatistics)
    label = "Fisher statistics"
    card_what = "Diagonal Fisher"
    card_use = "merging with hf-taujp (fisher_average, gradient_matching)"

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, num_examples: int, base_model: str | None = None,
                 base_fingerprint: str | None = None, task: str | None = None, extra: dict | None = None):
        bad = hub.check_finite(tensors, what=f"{self.kind} statistics", raise_error=False)
        if bad:
            raise hub.HfTaujpError(f"{self.kind} statistics have NaN/inf in {bad[:5]}")
        self.tensors = dict(tensors)
        self.num_examples = int(num_examples)
        self.base_model, self.base_fingerprint, self.task = base_model, base_fingerprint, task
        self.extra = dict(extra or {})

    def config(self) -> dict:
        return {"format": f"hf-taujp/{self.kind}", "format_version": 1, "num_examples": self.num_examples,
                "base_model": self.base_model, "base_fingerprint": self.base_fingerprint, "task": self.task,
                **self.extra}

    def save_pretrained(self, save_directory, max_shard_size="5GB") -> None:
        with hub.atomic_dir(save_directory) as tmp:
            hub.save_safetensors_sharded({k: v.contiguous() for k, v in self.tensors.items()}, tmp,
                                         prefix=_PREFIX.get(self.kind, self.kind), max_shard_size=max_shard_size)
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(self.config(), f, indent=2)
            hub.model_card(f"{self.kind} statistics",
                           f"{self.card_what} of {f'task `{self.task}`' if self.task else 'an unnamed task'} over {self.num_examples} examples, for {self.card_use}.{self.card_extra()}",
                           base_model=self.base_model, tags=[self.kind]).save(os.path.join(tmp, "README.md"))

    def card_extra(self) -> str:
        """More of the card's body after its first sentence (none for Fisher / Gram statistics)."""
        return ""

    @classmethod
    def from_pretrained(cls, repo_id_or_dir, revision: str | None = None, token: str | bool | None = None, *,
                        subfolder: str | None = None, **kw) -> "Statistics":
        """Load statistics from a folder or Hub repo (``hub.resolve_pretrained_dir``; ``revision``, ``token``,
        ``cache_dir``, ``local_files_only`` as in huggingface_hub). ``subfolder``: their folder inside the
        folder / repo (``"fisher/sst2"``), as transformers' ``subfolder=``.

        Raises ``ArtifactNotFoundError`` (no such folder / repo / revision / sub-folder: the message lists the
        artifacts there), ``CorruptFileError`` (no config.json — with the sub-folders that hold statistics of
        this kind when there are some —, another format, truncated files)."""
        d = hub.resolve_pretrained_dir(repo_id_or_dir, revision=revision, token=token, subfolder=subfolder, **kw)
        sub = hub.normalize_subfolder(subfolder)
        where = hub._where(os.fspath(repo_id_or_dir), sub, revision)
        what = cls.label
        cfg_path = os.path.join(d, "config.json")
        if not os.path.isfile(cfg_path):
            hint = hub.artifact_folders_hint(repo_id_or_dir, revision=revision, token=token, under=sub, kind=what)
            raise hub.CorruptFileError(f"{where} has no config.json: not hf-taujp {what}.{hint}")
        cfg = hub.read_json(cfg_path, f"{cls.kind} config")
        if cfg.get("format") != f"hf-taujp/{cls.kind}":
            hint = hub.artifact_folders_hint(repo_id_or_dir, revision=revision, token=token, under=sub, kind=what)
            raise hub.CorruptFileError(f"{where} is not a {cls.kind} folder (format {cfg.get('format')!r}).{hint}")
        tensors = hub.load_safetensors(d, _PREFIX.get(cls.kind, cls.kind))
        extra = {k: v for k, v in cfg.items() if k not in ("format", "format_version", "num_examples", "base_model",
                                                          "base_fingerprint", "task")}
        return cls(tensors, num_examples=cfg["num_examples"], base_model=cfg.get("base_model"),
                   base_fingerprint=cfg.get("base_fingerprint"), task=cfg.get("task"), extra=extra)

    def push_to_hub(self, repo_id: str, **kw):
        """Save into a temporary folder and upload it (``hub.push_folder_to_hub``: ``private``, ``token``,
        ``commit_message``, ``revision`` — a new branch is created first —, ``create_pr``, ``subfolder``);
        returns the CommitInfo."""
        import tempfile

        with tempfile.TemporaryDirectory() as t:
            self.save_pretrained(os.path.join(t, "out"))
            return hub.push_folder_to_hub(os.path.join(t, "out"), repo_id, **kw)


class FisherStatistics(Statistics):
    kind = "fisher"


class GramStatistics(Statistics):
    kind = "gram"
    label = "Gram statistics"
    card_what = "Input Gram matrices (RegMean)"
    card_use = "merging with hf-taujp (regmean)"


def example_batches(
    data: Any,
    *,
    batch_size: int,
    collate_fn=None,
    max_examples: int | None = None,
    device: torch.device | str = "cpu",
    drop: tuple[str, ...] = (),
    who: str = "the estimate",
) -> Iterator[tuple[dict, int]]:
    """The one way the statistics estimators (``estimate_fisher``, ``estimate_gram``) read their data.

    ``data``: a DataLoader or any iterable (list, generator) of *batches* (dicts of tensors with a
    leading batch dimension), or a ``datasets.Dataset`` / torch ``Dataset`` / list of *examples* (dicts
    of un-batched values: ints, lists, 0-d tensors; with ``collate_fn`` given, any list of dicts — e.g. rows of
    1-D tensors — is read as examples), batched here with ``collate_fn`` (default
    transformers' ``default_data_collator``) in batches of ``batch_size``. Yields ``(batch, n)``: the
    batch without the keys in ``drop``, its tensors moved to ``device``, cut so that at most
    ``max_examples`` examples come out in all; ``n`` = its examples (the leading dimension).

    Raises:
        HfTaujpError: a batch that is not a dict, holds a tensor without a batch dimension, or no tensor;
            no example at all (``who`` names the caller).
    """
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], dict) and (collate_fn is not None or not any(
            isinstance(v, torch.Tensor) and v.dim() > 0 for v in data[0].values())):
        # a list of examples: no batched tensor in them, or a collate_fn given to batch them (1-D tensor rows)
        data = list(data)
    elif not (hasattr(data, "column_names") or isinstance(data, torch.utils.data.Dataset)):
        yield from _cut(data, max_examples, device, drop, who)  # already batches
        return
    if collate_fn is None:
        from transformers import default_data_collator as collate_fn
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)
    yield from _cut(loader, max_examples, device, drop, who)


def _cut(loader, max_examples, device, drop, who) -> Iterator[tuple[dict, int]]:
    count = 0
    for batch in loader:
        if not isinstance(batch, dict):
            raise HfTaujpError(f"{who} needs dict batches (a DataLoader / iterable of dicts of tensors, or a dataset / "
                               f"list of dict examples), got a {type(batch).__name__}")
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k not in drop}
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
        if not tensors or any(v.dim() == 0 for v in tensors):
            raise HfTaujpError(f"{who} got a batch without a batch dimension (no tensor, or 0-d tensors): pass a "
                               "list of batches, or a dataset / list of examples to batch here")
        n = tensors[0].shape[0]
        if max_examples is not None:
            left = max_examples - count
            if left <= 0:
                break
            batch = {k: (v[:left] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            n = min(n, left)
        count += n
        yield batch, n
    if count == 0:
        raise HfTaujpError(f"{who} got no examples")


# --------------------------------------------------------------------------------------------------- inputs
TOKEN_INPUTS = ("input_ids", "inputs_embeds")
# names of learned absolute position tables (GPT-2 ``wpe``, BERT / CLIP / OPT ``position_embedding(s)`` /
# ``embed_positions``); rotary (Llama, SmolLM2) and relative-bias (T5) models have none
_POSITION_TABLES = ("wpe", "position_embeddings", "position_embedding", "embed_positions")


def sequence_input(batch: Mapping[str, Any], who: str = "the estimate") -> torch.Tensor:
    """The batch's token input: ``input_ids`` (B, L) or ``inputs_embeds`` (B, L, D) — the frozen-prefix
    cache of the recipes gives the latter —, whichever is present (``input_ids`` first). Batch size and
    sequence length are read from it, never from another key.

    Raises:
        HfTaujpError: the batch has neither (``who`` names the caller; the message lists the keys).
    """
    for k in TOKEN_INPUTS:
        v = batch.get(k)
        if isinstance(v, torch.Tensor):
            return v
    raise HfTaujpError(f"{who}: the batch has neither input_ids nor inputs_embeds (keys: {sorted(batch)})")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a (left-)padded batch, as transformers' generation computes them: position j of a row
    = (number of real tokens up to j) − 1, i.e. ``cumsum(mask) − 1``, clamped at 0 on the padding before the
    first token. Real tokens get 0, 1, 2, … whatever the padding; for an unpadded or right-padded row these are
    ``arange`` on its tokens (the models' default). Used by the recipes' collator and by the statistics
    estimators."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def uses_absolute_positions(model: torch.nn.Module) -> bool:
    """True when ``model`` adds a learned *absolute* position embedding that it indexes by ``position_ids``
    (GPT-2 ``wpe``, BERT / OPT / CLIP position tables) and its forward takes ``position_ids``: such a model
    reads a left-padded row's first real token at the position of the padding unless it is given
    positions. Rotary (Llama, SmolLM2: only relative positions matter) and relative-bias (T5) models give
    False. Encoder-decoders give False (their forward takes no ``position_ids``)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (_accepts(model, "position_ids") or _accepts(inner, "position_ids")):
        return False
    return any(isinstance(m, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES
               for name, m in inner.named_modules())


def _left_padded(mask: torch.Tensor) -> bool:
    if mask.device.type == "meta":  # values unknown: positions are computed (same shapes either way)
        return True
    m = mask.bool()
    return bool((~m[:, 0] & m.any(-1)).any())


def with_position_ids(batch: dict, absolute: bool) -> dict:
    """``batch`` with ``position_ids`` = :func:`position_ids_from_mask` added when the model uses absolute
    positions (``absolute``, from :func:`uses_absolute_positions`), the batch has a 2-D ``attention_mask``
    and no ``position_ids``, and some row is left-padded (its first position masked). Otherwise ``batch``
    unchanged: given position ids are always passed as they are, and a rotary model keeps its relative
    positions on left-padded rows without them."""
    mask = batch.get("attention_mask")
    if (not absolute or "position_ids" in batch or not isinstance(mask, torch.Tensor) or mask.dim() != 2
            or not _left_padded(mask)):
        return batch
    return {**batch, "position_ids": position_ids_from_mask(mask)}
