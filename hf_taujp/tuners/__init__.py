"""PEFT methods contributed by hf-taujp (importing a method's package registers it with PEFT)."""

from .linearized import PEFT_TYPE_LINEARIZED, LinearizedConfig, LinearizedModel, register_linearized

__all__ = ["PEFT_TYPE_LINEARIZED", "LinearizedConfig", "LinearizedModel", "register_linearized"]
