"""hf-taujp: task arithmetic with linearized fine-tuning and the τJp regularizer.

Data flows one way: base model → linearize → train (τJp) → task vector → Hub → merge → evaluate.

* Linearization (Ortiz-Jimenez et al., NeurIPS 2023): f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0)·τ,
  as a PEFT method (`LinearizedConfig`) or in plain PyTorch (`linearize`).
* τJp (Yoshida et al., ICLR 2025): L = L_t(θ0 + τ_t) + λ · E_{x'∼D_t'} ‖J_θ f(x'; θ0)·τ_t‖,
  inside `TauJpTrainer` configured by `TauJpConfig`; or its dataless KFAC form (Porrello et al., ICLR 2026),
  λ · Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ) with the other tasks' published factors (`estimate_kfac`, `KFACStatistics`).
* Task vectors τ = θ_ft − θ0 (`TaskVector`) with save_pretrained / from_pretrained / push_to_hub.
* Merging (`merge`, `merge_from_config`, `merge_streaming`), from task arithmetic to
  uncertainty-based gradient matching (Daheim et al., ICLR 2024) with `estimate_fisher`.
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING

# Public names -> defining submodule. Loaded on first attribute access (PEP 562): `hf-taujp merge`
# only needs torch + safetensors I/O, and importing transformers.Trainer for it would add seconds.
_LAZY = {
    **dict.fromkeys(["forward_ad_attention", "MathAttentionWarning"], ".attention"),
    "LowRankTau": ".low_rank_tau",
    **dict.fromkeys(["low_rank_approximation", "merge_lora_adapters"], ".lora_extraction"),
    "list_task_vectors": ".hub",
    **dict.fromkeys(
        ["disentanglement_error", "evaluate_task_addition", "evaluate_task_negation", "format_table",
         "plot_alpha_curves", "taujp_matrix", "compare_merges", "MergeComparison"], ".evaluation"),
    **dict.fromkeys(["ArtifactNotFoundError", "BaseModelMismatchError", "CorruptFileError", "HfTaujpError",
                     "UnsafeFileError", "CurvatureError"], ".errors"),
    **dict.fromkeys(
        ["MERGE_METHODS", "FisherStatistics", "GramStatistics", "estimate_fisher", "estimate_gram", "merge",
         "merge_from_config", "merge_streaming", "register_merge_method", "search_coefficients"], ".merging"),
    "fingerprint": ".fingerprints",
    **dict.fromkeys(["TaskVector", "cosine_matrix"], ".task_vector"),
    **dict.fromkeys(["TauJpConfig", "TauJpTrainer", "taujp_penalty", "KFACStatistics", "estimate_kfac",
                     "aggregate_kfac"], ".trainer"),
    **dict.fromkeys(["PEFT_TYPE_LINEARIZED", "LinearizedConfig", "LinearizedModel"], ".tuners"),
}


# Eager (torch only): the function `linearize` shares its name with the submodule `hf_taujp.linearize`,
# and importing a submodule rebinds the package attribute to it, so it must be bound after that import.
from .linearize import LinearizedModule, linearize, linearized_forward  # noqa: E402


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .attention import MathAttentionWarning, forward_ad_attention
    from .hub import list_task_vectors
    from .low_rank_tau import LowRankTau
    from .lora_extraction import low_rank_approximation, merge_lora_adapters
    from .evaluation import (disentanglement_error, evaluate_task_addition, evaluate_task_negation,
                             format_table, plot_alpha_curves, taujp_matrix)
    from .errors import (ArtifactNotFoundError, BaseModelMismatchError, CorruptFileError, CurvatureError, HfTaujpError,
                         UnsafeFileError)
    from .merging import (MERGE_METHODS, FisherStatistics, GramStatistics, estimate_fisher, estimate_gram, merge,
                          merge_from_config, merge_streaming, register_merge_method, search_coefficients)
    from .fingerprints import fingerprint
    from .task_vector import TaskVector, cosine_matrix
    from .trainer import KFACStatistics, TauJpConfig, TauJpTrainer, aggregate_kfac, estimate_kfac, taujp_penalty
    from .tuners import PEFT_TYPE_LINEARIZED, LinearizedConfig, LinearizedModel


# Register the "LINEARIZED" PEFT type as soon as peft is imported (hf_taujp/peft_registration.py says
# why and how), without importing peft here.
from .peft_registration import register_when_peft_is_imported  # noqa: E402

register_when_peft_is_imported()

__all__ = [
    "__version__",
    # errors
    "HfTaujpError",
    "ArtifactNotFoundError",
    "BaseModelMismatchError",
    "CorruptFileError",
    "UnsafeFileError",
    # linearization
    "LinearizedConfig",
    "LinearizedModel",
    "PEFT_TYPE_LINEARIZED",
    "linearize",
    "linearized_forward",
    "LinearizedModule",
    "forward_ad_attention",
    "MathAttentionWarning",
    # task vectors
    "TaskVector",
    "LowRankTau",
    "low_rank_approximation",
    "merge_lora_adapters",
    "list_task_vectors",
    "fingerprint",
    "cosine_matrix",
    # τJp training
    "TauJpConfig",
    "TauJpTrainer",
    "taujp_penalty",
    # the dataless KFAC regularizer (TauJpConfig(taujp_regularizer="kfac"))
    "KFACStatistics",
    "estimate_kfac",
    "aggregate_kfac",
    "CurvatureError",
    # evaluation
    "taujp_matrix",
    "disentanglement_error",
    "evaluate_task_addition",
    "evaluate_task_negation",
    "format_table",
    "plot_alpha_curves",
    "compare_merges",
    "MergeComparison",
    # merging
    "merge",
    "merge_from_config",
    "merge_streaming",
    "estimate_fisher",
    "estimate_gram",
    "FisherStatistics",
    "GramStatistics",
    "search_coefficients",
    "MERGE_METHODS",
    "register_merge_method",
]
