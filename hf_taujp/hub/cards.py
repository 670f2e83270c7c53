"""Model cards of hf-taujp artifacts (:func:`model_card`, :func:`model_card_text`) and how a base
model is named in messages (:func:`describe_model`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .locations import _looks_like_path

def describe_model(name: str | None) -> str:
    """``'gpt2'`` → ``"'gpt2'"``; None (a model built from a config) → ``"a model without a Hub id"``."""
    return repr(name) if name else "a model without a Hub id"


def _hub_id(name: str | None) -> str | None:
    """``name`` when it can be a Hub repo id (for a card's ``base_model`` link), None for local paths."""
    if not name or os.path.isabs(name) or _looks_like_path(name) or os.path.isdir(name):
        return None
    return name


def model_card(title: str, body: str, *, base_model: str | None = None, tags: Iterable[str] = ()):
    """The one model-card builder of hf-taujp artifacts (task vectors, statistics, merges).

    Returns a ``huggingface_hub.ModelCard`` with metadata ``library_name: hf-taujp``, ``tags``
    (``hf-taujp`` first) and ``base_model`` when it is a Hub id (local paths are not linked), then
    ``# title`` and ``body`` (Markdown). ``card.save(path)`` writes it (the text of :func:`model_card_text`).
    """
    from huggingface_hub import ModelCard

    return ModelCard(model_card_text(title, body, base_model=base_model, tags=tags))


def model_card_text(title: str, body: str, *, base_model: str | None = None, tags: Iterable[str] = ()) -> str:
    """The text of :func:`model_card` (YAML metadata between ``---`` lines, then Markdown), for writers
    that only save it: imports huggingface_hub's ``ModelCardData`` (~40 ms), not ``ModelCard``, which
    imports the whole Hub client (~0.4 s, a tenth of a streaming merge's CLI run)."""
    from huggingface_hub.repocard_data import ModelCardData

    tags = list(dict.fromkeys(["hf-taujp", *tags]))
    data = ModelCardData(library_name="hf-taujp", tags=tags, base_model=_hub_id(base_model))
    return f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n{body.strip()}\n"
