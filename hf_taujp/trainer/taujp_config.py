"""`TauJpConfig`: the training arguments of τJp-regularized fine-tuning (TRL style).

Yoshida et al., "Mastering Task Arithmetic: τJp as a Key Indicator for Weight Disentanglement"
(ICLR 2025). While task t is fine-tuned (τ_t = θ − θ0) the loss becomes

    L(θ) = L_task(θ) + λ · R,   R = E_{x' ∼ D_{t'}, t' ≠ t} ‖ J_θ f(x'; θ0) · τ_t ‖     (Eq. 10 / 11)

with the unsquared L2 norm over the output vector, averaged over examples (and valid tokens),
as in the authors' code. Every field below defaults to the value the paper used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import HfTaujpError, TauJpConfigError

__all__ = ["TauJpConfig", "TauJpConfigError", "TAUJP_MODES", "TAUJP_NORMS"]

TAUJP_MODES = ("cyclic", "strict")
TAUJP_NORMS = ("l2", "sq_l2")


@dataclass
class TauJpConfig(TrainingArguments):
    """`TrainingArguments` plus the τJp regularizer's knobs.

    Reg batch size per device = ceil(taujp_batch_ratio × per_device_train_batch_size).
    """

    taujp_lambda: float = field(
        default=0.1,
        metadata={"help": "λ, weight of the τJp penalty (paper: 0.1 for vision and GLUE; grid 1e-3, 1e-2, 1e-1; "
                  "GPT-2 toxicity used 0.01). 0 disables the penalty."},
    )
    taujp_mode: str = field(
        default="cyclic",
        metadata={"help": "'cyclic': one other task per step, task = step % n_tasks (paper Eq. 11, used for the "
                  "results); 'strict': one batch of every other task each step, penalties averaged (Eq. 10)."},
    )
    taujp_batch_ratio: float = field(
        default=1 / 8,
        metadata={"help": "Reg batch = ceil(ratio × per-device task batch), in (0, 1] (paper: 16 vs 128 = 1/8 "
                  "for vision, 4 vs 16 for GLUE)."},
    )
    taujp_start_step: int = field(
        default=0,
        metadata={"help": "Global step from which the penalty is added (the paper's GPT-2 run used 500)."},
    )
    taujp_norm: str = field(
        default="l2",
        metadata={"help": "'l2': unsquared ‖J·τ‖₂ over the output dim (official code); 'sq_l2': ‖J·τ‖₂²."},
    )
    taujp_output: str = field(
        default="logits",
        metadata={"help": "Name of the model output field that is penalised (e.g. 'logits', 'image_embeds', "
                  "'last_hidden_state', or an indexed tuple output such as 'hidden_states[-1]'). A callable can "
                  "be set instead with TauJpTrainer(taujp_output_fn=...)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.taujp_lambda, (int, float)) or math.isnan(self.taujp_lambda) or self.taujp_lambda < 0:
            raise TauJpConfigError(f"taujp_lambda must be a number >= 0, got {self.taujp_lambda!r}")
        if self.taujp_mode not in TAUJP_MODES:
            raise TauJpConfigError(f"taujp_mode must be one of {TAUJP_MODES}, got {self.taujp_mode!r}")
        if self.taujp_norm not in TAUJP_NORMS:
            raise TauJpConfigError(f"taujp_norm must be one of {TAUJP_NORMS}, got {self.taujp_norm!r}")
        if not isinstance(self.taujp_batch_ratio, (int, float)) or not 0 < self.taujp_batch_ratio <= 1:
            raise TauJpConfigError(f"taujp_batch_ratio must lie in (0, 1], got {self.taujp_batch_ratio!r}")
        if int(self.taujp_start_step) != self.taujp_start_step or self.taujp_start_step < 0:
            raise TauJpConfigError(f"taujp_start_step must be an integer >= 0, got {self.taujp_start_step!r}")
        if not isinstance(self.taujp_output, str) or not re.fullmatch(r"[A-Za-z_]\w*(\[-?\d+\])?", self.taujp_output):
            raise TauJpConfigError(
                f"taujp_output must be an output field name, optionally indexed ('hidden_states[-1]'), got {self.taujp_output!r}")

    @property
    def taujp_reg_batch_size(self) -> int:
        """Per-device batch size of each regularization loader: ceil(ratio × per-device task batch)."""
        return max(1, math.ceil(self.taujp_batch_ratio * self.per_device_train_batch_size - 1e-9))
