"""Configuration of the linearized PEFT method (f_lin(x; θ0 + τ) = f(x; θ0) + J f(x; θ0)·τ)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ...errors import HfTaujpError
from ...linearize import LINEARIZATION_MODES

# PEFT's PeftType enum is closed to outside methods, so the type is a plain string registered in
# peft.mapping's dictionaries (see hf_taujp/tuners/linearized/__init__.py).
PEFT_TYPE_LINEARIZED = "LINEARIZED"

# The heads PEFT's task models put in modules_to_save (peft.peft_model: PeftModelForSequenceClassification,
# PeftModelForTokenClassification, PeftModelForQuestionAnswering).
TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"], "QUESTION_ANS": ["qa_outputs"]}


@dataclass
class LinearizedConfig(PeftConfig):
    """Linearized fine-tuning as a PEFT method (Ortiz-Jiménez et al. 2023, Eq. 2; τJp, Yoshida et al. 2025).

    The model is f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0)·τ: θ0 stays frozen, the trainable
    adapter is τ, one tensor per linearized base parameter with that parameter's shape. The saved
    adapter holds τ under ``base_model.model.<module path>.linearized_tau.<param name>``.

    ``task_type`` is required (``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``, ``"SEQ_CLS"``, ``"TOKEN_CLS"``,
    ``"QUESTION_ANS"``, ``"FEATURE_EXTRACTION"``): PEFT's generic ``PeftModel`` (task_type None) calls
    the base model directly and would silently skip the linearization.

    ``modules_to_save`` (e.g. a randomly initialised classification head) are trained normally, not
    linearized: f_lin(x) = f(x; θ0, h) + J_θ f(x; θ0, h)·τ with h the head's current weights. They are
    saved with the adapter and carried into the task vector as h − h0.
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
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Modules trained normally (not linearized) and saved with the adapter, as in PEFT's LoRA: a list of "
                "module-name suffixes. For task_type SEQ_CLS / TOKEN_CLS the defaults are ['classifier', 'score'], for "
                "QUESTION_ANS ['qa_outputs'] (PEFT adds them for these task types in any case). A frozen zero-shot head "
                "(CLIP's text tower) must be in neither target_modules nor modules_to_save: use task_type "
                "FEATURE_EXTRACTION and exclude_modules."
            )
        },
    )
    linearization_mode: str = field(
        default="eval",
        metadata={
            "help": (
                "'eval' (default, the authors'): linearize around the model in eval mode, no dropout inside f(x; θ0) "
                "and J even while training. 'train': the model's own mode, dropout active in train mode (one mask "
                "shared by primal and tangent)."
            )
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE_LINEARIZED
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.linearization_mode not in LINEARIZATION_MODES:
            raise HfTaujpError(f"linearization_mode must be one of {LINEARIZATION_MODES}, got {self.linearization_mode!r}.")
        if isinstance(self.modules_to_save, str):
            raise HfTaujpError(f"modules_to_save must be a list of module names, got the string {self.modules_to_save!r}.")
        task = str(self.task_type).split(".")[-1] if self.task_type is not None else None
        defaults = TASK_HEADS.get(task, [])
        if self.modules_to_save is not None or defaults:
            # PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS models add these heads themselves (some after the adapter
            # is injected): naming them here keeps them out of the linearization from the start.
            self.modules_to_save = list(dict.fromkeys([*(self.modules_to_save or []), *defaults]))
