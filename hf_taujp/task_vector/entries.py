"""What the TaskVector modules share about entries and base models: ``_params_of`` (the base's
parameters, the keys of τ), ``_FullTensors`` (the read-only full-τ view of a vector holding factored
entries), the base model's name and PEFT task type (``_name_of``, ``_task_type_of``), and the wording of
entry lists and ranks in messages, cards and reprs (``_few``, ``_rank_text``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..low_rank_tau import LowRankTau


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _few(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists tied weights once, under their first name (docs/modules.md).
    return dict(model.named_parameters())


def _task_type_of(model: torch.nn.Module) -> str:
    """PEFT's task type implied by a transformers model class (``GPT2LMHeadModel`` → ``CAUSAL_LM``)."""
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and name.endswith(
        ("ForConditionalGeneration", "ForSeq2SeqLM")
    ):
        return "SEQ_2_SEQ_LM"
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


class _FullTensors(Mapping):
    """Read-only ``name -> full τ`` view of a vector holding factored entries: a :class:`LowRankTau` is
    materialised (``full()``) on every access and not kept, so a consumer that walks the tensors one at a
    time holds one full tensor at a time."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, Any]):
        self._entries = entries

    def __getitem__(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        return e.full() if isinstance(e, LowRankTau) else e

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"<full τ of {len(self)} entries, {sum(isinstance(e, LowRankTau) for e in self._entries.values())} factored>"


def _name_of(model) -> str | None:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name or None


def _rank_text(factors: Mapping[str, LowRankTau]) -> str:
    """``"16"`` or ``"8–32"``: the rank(s) of factored entries, for cards and reprs."""
    ranks = sorted({e.rank for e in factors.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
