"""τJp-regularized fine-tuning inside `transformers.Trainer` (Yoshida et al., ICLR 2025), and its dataless
KFAC variant (Porrello et al., ICLR 2026: ``TauJpConfig(taujp_regularizer="kfac")``)."""

import importlib

from .penalty import select_output, taujp_penalty
from .taujp_config import (KFAC_AGGREGATIONS, TAUJP_MODES, TAUJP_NORMS, TAUJP_REGULARIZERS, TauJpConfig,
                           TauJpConfigError)
from .taujp_trainer import (
    MissingRegularizationDataError,
    RegularizationInputError,
    TauJpTrainer,
    TauJpUnsupportedError,
)

# The KFAC pieces import hf_taujp.merging (the Statistics artifact): loaded on first access (PEP 562).
_LAZY = {
    **dict.fromkeys(["KFACStatistics", "aggregate_kfac", "Factor"], ".curvature"),
    **dict.fromkeys(["estimate_kfac", "KFAC_PROBES"], ".kfac_estimate"),
    **dict.fromkeys(["kfac_penalty", "kfac_quadratic"], ".kfac_regularizer"),
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "TAUJP_REGULARIZERS",
    "KFAC_AGGREGATIONS",
    # the dataless KFAC regularizer
    "KFACStatistics",
    "estimate_kfac",
    "aggregate_kfac",
    "kfac_penalty",
    "kfac_quadratic",
    "Factor",
    "KFAC_PROBES",
]
