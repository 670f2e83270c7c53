"""Configuration of the linearized PEFT method (f_lin(x; θ0 + τ) = f(x; θ0) + J f(x; θ0)·τ)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

# PEFT's PeftType enum is closed to outside methods, so the type is a plain string registered in
# peft.mapping's dictionaries (see hf_taujp/tuners/linearized/__init__.py).
PEFT_TYPE_LINEARIZED = "LINEARIZED"


@dataclass
class LinearizedConfig(PeftConfig):
    """Linearized fine-tuning as a PEFT method (Ortiz-Jiménez et al. 2023, Eq. 2; τJp, Yoshida et al. 2025).

    The model is f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0)·τ: θ0 stays frozen, the trainable
    adapter is τ, one tensor per linearized base parameter with that parameter's shape. The saved
    adapter holds τ under ``base_model.model.<module path>.linearized_tau.<param name>``.

    ``task_type`` is required (e.g. ``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``, ``"SEQ_CLS"``,
    ``"FEATURE_EXTRACTION"``): PEFT's generic ``PeftModel`` (task_type None) calls the base model
    directly and would silently skip the linearization.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Modules whose parameters are linearized (τ trained), PEFT matching: a list of module names "
                "or name suffixes (e.g. ['c_attn', 'c_fc']), or a regex full-matched on the module path. "
                "None or 'all' linearizes every parameter of the model (tied weights once)."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules (same matching as target_modules) whose parameters stay at θ0 and get no τ."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE_LINEARIZED
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
