"""Diagnostics and the evaluation protocol of task arithmetic.

* `taujp_matrix`: the τJp indicator of Yoshida et al. (ICLR 2025, Sec. 4): M[t, t'] =
  E_{x' ∼ D_t'} ‖J_θ f(x'; θ0)·τ_t‖₂ (unsquared L2 over the output, mean over examples / valid tokens).
  Off-diagonal entries small ⇔ τ_t barely moves the outputs on other tasks' inputs.
* `disentanglement_error`: ξ(α1, α2) of Ortiz-Jimenez et al. (NeurIPS 2023, Eq. 5):
  ξ = Σ_{t=1,2} E_{x ∼ D_t} [ 1{ pred(x; θ0 + α_t τ_t) ≠ pred(x; θ0 + α1 τ1 + α2 τ2) } ].
* `evaluate_task_addition`: θ0 + α Σ_t τ_t, α on a grid (default 0.00…1.00 step 0.05) chosen on
  validation by the mean normalized accuracy, and one-shot α = 1; normalized accuracy =
  acc_merged(t) / acc_single(t) (same fine-tuning mode), averaged (Ilharco et al. 2023; Ortiz-Jimenez
  et al. 2023 protocol).
* `evaluate_task_negation`: θ0 − α τ_target, α minimising target accuracy subject to control accuracy
  ≥ 0.95 × the base model's control accuracy.
* Both pick α with `hf_taujp.merging.search.select_coefficient`, the rule `search_coefficients` uses too
  (ties to 1e-9 → α nearest 1 for addition, nearest 0 for negation; NaN scores never chosen).

Results are plain dicts (JSON-serialisable); `format_table` prints them without pandas, `save_json`
writes them atomically, `plot_alpha_curves` draws normalized accuracy against α (matplotlib).

* `compare_merges`: every chosen merge method over its main knob, the setting chosen on validation only,
  test scores (absolute, normalized), merge time and memory (``merge_bench``).

Layout: ``predict`` (predictions, accuracy), ``taujp`` (the τJp matrix), ``protocols`` (ξ, addition,
negation, the α grid), ``merge_bench`` (the merge-method comparison) and ``output`` (tables, JSON, plots); every name, private helpers the recipes use
included, stays importable from ``hf_taujp.evaluation``.
"""

# Re-exports (the private ones are imported by the recipes and tests).
from ..linearize import LOSS_KEYS  # noqa: F401
from .output import format_table, plot_alpha_curves, save_json
from .predict import (_LABEL_KEYS, _batches, _collate, _default_predict, _device_of, _select, _split, _to,  # noqa: F401
                      accuracy, predictions)
from .protocols import (DEFAULT_ALPHAS, _addition_protocol,  # noqa: F401
                        _linear_eval_fn, _linear_logits, _sum_vectors,
                        _task_addition_linear, disentanglement_error, evaluate_task_addition, evaluate_task_negation)
from .taujp import taujp_matrix
from .merge_bench import DEFAULT_GRIDS, DEFAULT_METHODS, MergeComparison, compare_merges, default_grid

__all__ = [
    "DEFAULT_ALPHAS",
    "accuracy",
    "predictions",
    "taujp_matrix",
    "disentanglement_error",
    "evaluate_task_addition",
    "evaluate_task_negation",
    "format_table",
    "save_json",
    "plot_alpha_curves",
    "compare_merges",
    "MergeComparison",
]
