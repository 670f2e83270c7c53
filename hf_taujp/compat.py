"""When two task vectors (or a vector and a base) share a base model: the one rule, used by TaskVector
arithmetic (``TaskVector.check_compatible``), ``merge()`` and streaming merges.

Rule: the weights decide. When both sides record a ``base_fingerprint`` (``task_vector.fingerprint``
of the base weights), they are compatible exactly when the fingerprints are equal — ``gpt2`` and
``/models/gpt2`` holding the same weights agree, two checkpoints named alike but trained apart do
not. Only when a fingerprint is missing on either side do the recorded ``base_model`` ids decide
(differing ids are refused; a missing id on either side is accepted).
"""
from __future__ import annotations

from typing import Any, Mapping

from .errors import BaseModelMismatchError

__all__ = ["same_base", "check_same_base", "describe_base"]


def describe_base(meta: Mapping[str, Any]) -> str:
    """``'gpt2' (fingerprint tjp2-…)`` or ``a model without a Hub id (fingerprint …)`` for messages."""
    name = meta.get("base_model")
    fp = meta.get("base_fingerprint")
    s = repr(name) if name else "a model without a Hub id"
    return s + (f" (fingerprint {fp})" if fp else "")


def same_base(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when metadata ``a`` and ``b`` (keys ``base_fingerprint``, ``base_model``) may share a base
    under the rule of this module."""
    fa, fb = a.get("base_fingerprint"), b.get("base_fingerprint")
    if fa and fb:
        return fa == fb
    na, nb = a.get("base_model"), b.get("base_model")
    return not (na and nb and na != nb)


def check_same_base(a: Mapping[str, Any], b: Mapping[str, Any], label_a: str = "task vector",
                    label_b: str = "task vector", hint: str = "") -> None:
    """``BaseModelMismatchError`` naming both bases when :func:`same_base` is False."""
    if not same_base(a, b):
        raise BaseModelMismatchError(
            f"task vectors were made from different base models: {label_a} from {describe_base(a)} vs "
            f"{label_b} from {describe_base(b)}{hint}")
