"""Linearized fine-tuning as a PEFT method: ``peft.get_peft_model(model, LinearizedConfig(task_type=...))``.

Importing this package registers the method with the installed PEFT (once, idempotently). PEFT's
``register_peft_method`` only accepts names of its closed ``PeftType`` enum, so the method is added
with the plain-string type ``"LINEARIZED"`` to the dictionaries PEFT dispatches on:
``PEFT_TYPE_TO_CONFIG_MAPPING`` (config class for ``PeftConfig.from_pretrained`` / AutoPeftModel),
``PEFT_TYPE_TO_TUNER_MAPPING`` (tuner for ``get_peft_model``, save / load hooks) and
``PEFT_TYPE_TO_PREFIX_MAPPING`` (adapter key prefix). It is not mixed-adapter compatible
(``PEFT_TYPE_TO_MIXED_MODEL_MAPPING`` is left alone).

Not supported: transformers' ``model.load_adapter(dir)`` / ``add_adapter`` (they inject adapters
into the plain model, whose forward would ignore τ; PEFT refuses it because the tuner holds the
linearization). Load with ``peft.PeftModel.from_pretrained(base, dir)`` instead.
"""

from __future__ import annotations

from .config import PEFT_TYPE_LINEARIZED, LinearizedConfig
from .model import LinearizedModel

__all__ = ["PEFT_TYPE_LINEARIZED", "LinearizedConfig", "LinearizedModel", "register_linearized"]


def register_linearized() -> None:
    """Register LINEARIZED in the installed PEFT's type dictionaries (idempotent)."""
    from peft import mapping

    entries = (
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, LinearizedConfig),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, LinearizedModel),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, LinearizedModel.prefix),
    )
    for table, value in entries:
        current = table.get(PEFT_TYPE_LINEARIZED)
        # A re-imported module (e.g. importlib.reload) brings new class objects: replace them.
        if current is not None and current != value and getattr(current, "__qualname__", None) != getattr(value, "__qualname__", None):
            raise RuntimeError(f"PEFT type {PEFT_TYPE_LINEARIZED!r} is already registered to {current!r}.")
        table[PEFT_TYPE_LINEARIZED] = value


register_linearized()
