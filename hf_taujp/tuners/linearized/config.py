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

    r: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Rank of the low-rank tangent: each targeted weight W (out × in) gets τ_W = s·B·A with PEFT LoRA's "
                "factors (A: r × in, B: out × r, s = lora_alpha / r), trained in the tangent space: f_lin(x) = "
                "f(x; θ0) + J f(x; θ0)·τ stays exactly linear in τ. Targets must be nn.Linear, transformers' Conv1D or "
                "nn.Embedding modules; only their weight gets a τ (biases stay at θ0, as LoRA's bias='none'). None "
                "(default): a full-size τ for every targeted parameter."
            )
        },
    )
    lora_alpha: float = field(default=8, metadata={"help": "s = lora_alpha / r (PEFT LoRA's default 8). Only with r."})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA scaling s = lora_alpha / √r (PEFT's use_rslora). Only with r."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the factor path's input (x → A), PEFT's lora_dropout; active only in train mode. Only with r."},
    )
    init_lora_weights: Union[bool, str] = field(
        default=True,
        metadata={
            "help": (
                "PEFT's initialisation: True = A Kaiming-uniform (a = √5), B = 0 (embeddings: A = 0, B normal), so "
                "τ = 0 at the start; 'gaussian' = A normal(0, 1/r), B = 0. False (τ ≠ 0 at start) is refused."
            )
        },
    )
    fan_in_fan_out_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Filled in at injection (do not set): the targeted modules whose weight is stored (in, out) "
                "(transformers' Conv1D, nn.Embedding), so that a saved low-rank adapter converts to τ_weight = (s·B·A)ᵀ "
                "without the base model."
            )
        },
    )
    # LoRA fields that have no meaning for a tangent-space τ: refused by name rather than ignored.
    use_dora: bool = field(default=False, metadata={"help": "Not supported (DoRA's magnitude vector is not a tangent)."})
    lora_bias: bool = field(default=False, metadata={"help": "Not supported (biases of low-rank targets stay at θ0)."})
    rank_pattern: Optional[dict] = field(default=None, metadata={"help": "Not supported yet: one r for every target."})
    alpha_pattern: Optional[dict] = field(default=None, metadata={"help": "Not supported yet: one lora_alpha for every target."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE_LINEARIZED
        self._check_low_rank()
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

    def _check_low_rank(self) -> None:
        refused = {"use_dora": self.use_dora, "lora_bias": self.lora_bias, "rank_pattern": self.rank_pattern,
                   "alpha_pattern": self.alpha_pattern}
        bad = [k for k, v in refused.items() if v]
        if bad:
            raise HfTaujpError(f"LinearizedConfig does not support the LoRA option(s) {bad}: the low-rank tangent is "
                               "τ_W = (lora_alpha / r)·B·A on each target's weight only.")
        if self.r is None:
            given = [k for k, dflt in (("use_rslora", False), ("lora_dropout", 0.0), ("init_lora_weights", True))
                     if getattr(self, k) != dflt]
            if self.lora_alpha != 8:
                given.insert(0, "lora_alpha")
            if given:
                raise HfTaujpError(f"{given} only apply to a low-rank tangent: set r (e.g. r=16), or leave them at their "
                                   "defaults for a full-size τ.")
            return
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise HfTaujpError(f"r must be a positive integer (the rank of τ_W = s·B·A), got {self.r!r}.")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            raise HfTaujpError(f"lora_alpha must be a positive number (s = lora_alpha / r), got {self.lora_alpha!r}.")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise HfTaujpError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.init_lora_weights not in (True, "gaussian"):
            raise HfTaujpError(f"init_lora_weights must be True or 'gaussian' (τ = 0 at the start, B = 0), got "
                               f"{self.init_lora_weights!r}.")
        if self.target_modules is None:
            raise HfTaujpError("A low-rank tangent (r set) needs target_modules: a list of module-name suffixes, a "
                               "regex, or 'all-linear' (every Linear / Conv1D but the output layer), as in PEFT LoRA.")
