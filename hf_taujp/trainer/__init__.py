"""τJp-regularized fine-tuning inside `transformers.Trainer` (Yoshida et al., ICLR 2025)."""

from .penalty import select_output, taujp_penalty
from .taujp_config import TAUJP_MODES, TAUJP_NORMS, TauJpConfig, TauJpConfigError
from .taujp_trainer import (
    MissingRegularizationDataError,
    RegularizationInputError,
    TauJpTrainer,
    TauJpUnsupportedError,
)

__all__ = [
    "TauJpConfig",
    "TauJpConfigError",
    "TauJpTrainer",
    "TauJpUnsupportedError",
    "MissingRegularizationDataError",
    "RegularizationInputError",
    "taujp_penalty",
    "select_output",
    "TAUJP_MODES",
    "TAUJP_NORMS",
]
