"""hf-taujp: task arithmetic with linearized fine-tuning and the τJp regularizer.

Data flows one way: base model → linearize → train (τJp) → task vector → Hub → merge → evaluate.

* Linearization (Ortiz-Jimenez et al., NeurIPS 2023): f_lin(x; θ0 + τ) = f(x; θ0) + J_θ f(x; θ0)·τ,
  as a PEFT method (`LinearizedConfig`) or in plain PyTorch (`linearize`).
* τJp (Yoshida et al., ICLR 2025): L = L_t(θ0 + τ_t) + λ · E_{x'∼D_t'} ‖J_θ f(x'; θ0)·τ_t‖,
  inside `TauJpTrainer` configured by `TauJpConfig`.
* Task vectors τ = θ_ft − θ0 (`TaskVector`) with save_pretrained / from_pretrained / push_to_hub.
* Merging (`merge`, `merge_from_config`, `merge_streaming`), from task arithmetic to
  uncertainty-based gradient matching (Daheim et al., ICLR 2024) with `estimate_fisher`.
"""

__version__ = "0.1.0"

from .attention import forward_ad_attention
from .evaluation import (
    disentanglement_error,
    evaluate_task_addition,
    evaluate_task_negation,
    format_table,
    plot_alpha_curves,
    taujp_matrix,
)
from .hub import BaseModelMismatchError, CorruptFileError, HfTaujpError, UnsafeFileError
from .linearize import LinearizedModule, linearize, linearized_forward
from .merging import (
    MERGE_METHODS,
    FisherStatistics,
    GramStatistics,
    estimate_fisher,
    merge,
    merge_from_config,
    merge_streaming,
    register_merge_method,
    search_coefficients,
)
from .task_vector import TaskVector, cosine_matrix, fingerprint
from .trainer import TauJpConfig, TauJpTrainer, taujp_penalty

__all__ = [
    "__version__",
    # errors
    "HfTaujpError",
    "BaseModelMismatchError",
    "CorruptFileError",
    "UnsafeFileError",
    # linearization
    "linearize",
    "linearized_forward",
    "LinearizedModule",
    "forward_ad_attention",
    # task vectors
    "TaskVector",
    "fingerprint",
    "cosine_matrix",
    # τJp training
    "TauJpConfig",
    "TauJpTrainer",
    "taujp_penalty",
    # evaluation
    "taujp_matrix",
    "disentanglement_error",
    "evaluate_task_addition",
    "evaluate_task_negation",
    "format_table",
    "plot_alpha_curves",
    # merging
    "merge",
    "merge_from_config",
    "merge_streaming",
    "estimate_fisher",
    "FisherStatistics",
    "GramStatistics",
    "search_coefficients",
    "MERGE_METHODS",
    "register_merge_method",
]
