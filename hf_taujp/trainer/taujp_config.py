"""`TauJpConfig`: the training arguments of τJp-regularized fine-tuning (TRL style).

Yoshida et al., "Mastering Task Arithmetic: τJp as a Key Indicator for Weight Disentanglement"
(ICLR 2025). While task t is fine-tuned (τ_t = θ − θ0) the loss becomes

    L(θ) = L_task(θ) + λ · R,   R = E_{x' ∼ D_{t'}, t' ≠ t} ‖ J_θ f(x'; θ0) · τ_t ‖     (Eq. 10 / 11)

with the unsquared L2 norm over the output vector, averaged over examples (and valid tokens),
as in the authors' code. Every field below defaults to the value the paper used.

``taujp_regularizer="kfac"`` replaces the other tasks' inputs by their published KFAC curvature factors
(Porrello et al., "Dataless Weight Disentanglement in Task Arithmetic via Kronecker-Factored Approximate
Curvature", ICLR 2026): R = Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ) (hf_taujp.trainer.kfac_regularizer), λ default 500 (theirs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import HfTaujpError, TauJpConfigError
from .penalty import TAUJP_NORMS

__all__ = ["TauJpConfig", "TauJpConfigError", "TAUJP_MODES", "TAUJP_NORMS", "TAUJP_REGULARIZERS", "DEFAULT_LAMBDA",
           "KFAC_AGGREGATIONS"]

TAUJP_MODES = ("cyclic", "strict")
TAUJP_REGULARIZERS = ("taujp", "kfac")
# how the other tasks' KFAC factors combine (hf_taujp.trainer.curvature.aggregate_kfac)
KFAC_AGGREGATIONS = ("merged", "per_task")
# λ when taujp_lambda is not given: the τJp paper's 0.1 (Yoshida et al. 2025), the KFAC reference's 500
# (aimagelab/mammoth models/tak.py --reg_lambda; CLIP ViT, f = the normalised image embedding)
DEFAULT_LAMBDA = {"taujp": 0.1, "kfac": 500.0}


@dataclass
class TauJpConfig(TrainingArguments):
    """`TrainingArguments` plus the τJp regularizer's knobs.

    Reg batch size per device = ceil(taujp_batch_ratio × per_device_train_batch_size).
    """

    taujp_regularizer: str = field(
        default="taujp",
        metadata={"help": "'taujp': λ·E‖J f(x'; θ0)·τ‖ on the other tasks' inputs (regularization_datasets; Yoshida "
                  "et al. 2025). 'kfac': the dataless λ·Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ) with the other tasks' KFAC factors "
                  "(taujp_curvature; Porrello et al. 2026): no other task's data, constant cost in their number; "
                  "taujp_mode / taujp_norm / taujp_batch_ratio do not apply to it."},
    )
    taujp_lambda: float | str | None = field(
        default=None,
        metadata={"help": "λ, weight of the penalty; default (None) per regularizer: 0.1 for 'taujp' (paper: 0.1 "
                  "for vision and GLUE; grid 1e-3, 1e-2, 1e-1; GPT-2 toxicity used 0.01), 500 for 'kfac' (the "
                  "reference's, for the normalised CLIP image embedding; its scale follows f's: squared drift, "
                  "mean over the other tasks' tokens, summed over tasks). 0 disables the penalty. 'auto': chosen "
                  "on eval_dataset by pilot runs — the largest λ of taujp_lambda_grid whose validation score stays "
                  "within taujp_auto_tolerance of λ = 0's, else the grid's smallest (hf_taujp.trainer.lambda_search)."},
    )
    taujp_lambda_grid: list[float] | None = field(
        default=None,
        metadata={"help": "λ grid of taujp_lambda='auto' (default per taujp_norm: "
                  "hf_taujp.trainer.lambda_search.DEFAULT_LAMBDA_GRIDS)."},
    )
    taujp_auto_pilot: float = field(
        default=0.25,
        metadata={"help": "Length of each taujp_lambda='auto' pilot as a fraction of the run's steps, in (0, 1]."},
    )
    taujp_auto_tolerance: float = field(
        default=0.03,
        metadata={"help": "taujp_lambda='auto': how much worse than λ = 0's validation score a λ may be, in the "
                  "metric's own units (0.03: accuracy 0.80 → 0.77, or eval loss 0.50 → 0.53 nats)."},
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
        metadata={"help": "Per-position form of the penalty over the output dim (t = J·τ, f = base output): 'l2' "
                  "‖t‖₂ (official code); 'sq_l2' ‖t‖₂²; 'rms' ‖t‖₂/√D; 'relative' ‖t‖₂/‖f‖₂; 'kl' "
                  "½(Σ p t² − (Σ p t)²), p = softmax(f), the second-order KL(p ‖ softmax(f + t)) (logits only; "
                  "in nats, the task loss's unit). See hf_taujp.trainer.penalty.per_position."},
    )
    taujp_output: str = field(
        default="logits",
        metadata={"help": "Name of the model output field that is penalised (e.g. 'logits', 'image_embeds', "
                  "'last_hidden_state', or an indexed tuple output such as 'hidden_states[-1]'). A callable can "
                  "be set instead with TauJpTrainer(taujp_output_fn=...)."},
    )

    taujp_curvature: list[str] | None = field(
        default=None,
        metadata={"help": "taujp_regularizer='kfac': the *other* tasks' KFAC factors, folders or Hub repo ids of "
                  "KFACStatistics (hf_taujp.trainer.estimate_kfac(...).save_pretrained / push_to_hub). Loaded "
                  "objects can be passed as TauJpTrainer(curvature=[...]) instead."},
    )
    taujp_kfac_aggregation: str = field(
        default="merged",
        metadata={"help": "How the other tasks' factors combine: 'merged' (paper Eq. 8, the reference's default): "
                  "A = Σ_s (n_s/N)·A_s, G = Σ_s G_s, one Kronecker term per layer; 'per_task' (Eq. 7): "
                  "Σ_s tr(G_s·ΔW̃·A_s·ΔW̃ᵀ), cost × number of tasks."},
    )
    taujp_task_name: str | None = field(
        default=None,
        metadata={"help": "Name of the task being trained: factors whose card names this task (its own) are "
                  "refused as 'other tasks' (OwnCurvatureError)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.taujp_regularizer not in TAUJP_REGULARIZERS:
            raise TauJpConfigError(f"taujp_regularizer must be one of {TAUJP_REGULARIZERS}, got {self.taujp_regularizer!r}")
        if self.taujp_lambda is None:
            self.taujp_lambda = DEFAULT_LAMBDA[self.taujp_regularizer]
        if self.taujp_kfac_aggregation not in KFAC_AGGREGATIONS:
            raise TauJpConfigError(f"taujp_kfac_aggregation must be one of {KFAC_AGGREGATIONS}, got "
                                   f"{self.taujp_kfac_aggregation!r}")
        if isinstance(self.taujp_curvature, str):
            self.taujp_curvature = [self.taujp_curvature]
        if self.taujp_curvature and self.taujp_regularizer != "kfac":  # never dropped silently
            raise TauJpConfigError(f"taujp_curvature is for taujp_regularizer='kfac', not {self.taujp_regularizer!r}")
        if self.taujp_curvature is not None and not all(isinstance(c, str) and c for c in self.taujp_curvature):
            raise TauJpConfigError("taujp_curvature must be a list of folders / Hub repo ids (pass loaded "
                                   "KFACStatistics as TauJpTrainer(curvature=[...]))")
        if isinstance(self.taujp_lambda, str) and self.taujp_lambda != "auto":
            try:  # from the command line (HfArgumentParser gives a str for float | str)
                self.taujp_lambda = float(self.taujp_lambda)
            except ValueError:
                raise TauJpConfigError(f"taujp_lambda must be a number >= 0 or 'auto', got {self.taujp_lambda!r}") from None
        if self.taujp_lambda != "auto" and (isinstance(self.taujp_lambda, bool) or not isinstance(self.taujp_lambda, (int, float))
                                            or math.isnan(self.taujp_lambda) or self.taujp_lambda < 0):
            raise TauJpConfigError(f"taujp_lambda must be a number >= 0 or 'auto', got {self.taujp_lambda!r}")
        if self.taujp_lambda_grid is not None:
            from .lambda_search import lambda_grid

            try:
                lambda_grid(self.taujp_grid_key, self.taujp_lambda_grid)
            except HfTaujpError as e:
                raise TauJpConfigError(str(e)) from None
        from .lambda_search import check_auto_settings

        try:
            check_auto_settings(self.taujp_auto_pilot, self.taujp_auto_tolerance)
        except HfTaujpError as e:
            raise TauJpConfigError(str(e)) from None
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
    def taujp_grid_key(self) -> str:
        """The key of ``lambda_search.DEFAULT_LAMBDA_GRIDS`` for this run: "kfac", or the τJp norm."""
        if self.taujp_regularizer == "kfac":
            return "kfac"
        return self.taujp_norm if self.taujp_norm in TAUJP_NORMS else "l2"

    @property
    def taujp_reg_batch_size(self) -> int:
        """Per-device batch size of each regularization loader: ceil(ratio × per-device task batch)."""
        return max(1, math.ceil(self.taujp_batch_ratio * self.per_device_train_batch_size - 1e-9))
