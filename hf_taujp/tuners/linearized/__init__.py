"""Linearized fine-tuning as a PEFT method: ``peft.get_peft_model(model, LinearizedConfig(task_type=...))``.

Importing this package registers the method with the installed PEFT (once, idempotently): the last
line, as in PEFT's own method packages. What registration does and why, and how the layout meets
PEFT's ``BaseTuner`` contract, is documented in one place: :mod:`hf_taujp.peft_registration`.

Not supported: transformers' ``model.load_adapter(dir)`` / ``add_adapter`` (they inject adapters
into the plain model, whose forward would ignore τ; PEFT refuses it because the tuner holds the
linearization). Load with ``peft.PeftModel.from_pretrained(base, dir)`` instead.
"""

from __future__ import annotations

from ...peft_registration import register_linearized
from .config import PEFT_TYPE_LINEARIZED, LinearizedConfig
from .model import LinearizedModel

__all__ = ["PEFT_TYPE_LINEARIZED", "LinearizedConfig", "LinearizedModel", "register_linearized"]


register_linearized()
