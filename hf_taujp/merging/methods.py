"""Merge methods: one small pure function per method, over the tensors of ONE parameter name.

mergekit style: every method sees, for a single parameter, the base tensor θ0 (shape S) and the
task vectors τ_1..τ_T (each shape S), plus optional per-task statistics (diagonal Fisher /
curvature, same shape S), and returns the merged *task vector* Δ (shape S); the merged weight is
θ0 + Δ.  Methods are looked up by name in :data:`MERGE_METHODS`, so :func:`hf_taujp.merging.merge`
and streaming merges can call them tensor by tensor.

Parameter names follow PEFT / mergekit: ``weights`` (one per vector, negative allowed),
``density``, ``majority_sign_method`` ("total" | "frequency"), ``lambda_``, ``seed``. Each method
*declares* its parameters (its keyword-only arguments, see :class:`MethodSpec`): any other name is a
:class:`MergeConfigError` naming the method and its parameters. Per-vector parameters (``weights``,
``density``, ...) take one number (shared) or one per vector.

Negation: a negative α_t always means "merge −τ_t with weight |α_t|" (see the note above
:func:`task_arithmetic`), so α = [−1] gives Δ = −τ for every method.

Devices: results and every buffer follow the inputs' device (CPU, CUDA, ``meta``).
All arithmetic runs in float32 (or float64 if the inputs are float64); the caller casts the result.
Methods act on τ whatever its reading: merging linear (tangent) vectors gives a tangent, except
for methods registered with ``linear_ok=False`` (RegMean), which need the weights themselves.

Layout (one module per family; this module is the registry's and the families' import path):
:mod:`.registry` (the registry, :class:`MethodSpec`, :func:`require_statistics`), :mod:`.method_helpers`
(the helpers the families share), :mod:`.sparsify` (masks, DARE drops, sign election),
:mod:`.linear_methods` (task_arithmetic), :mod:`.ties_dare_methods` (magnitude_prune, ties, dare_linear,
dare_ties), :mod:`.statistics_methods` (fisher_average, gradient_matching, regmean); the SVD family is in
:mod:`.svd_methods`, the LLM staples and consensus merges in :mod:`.sparse_methods`. Every name that
lived here stays importable from here.
"""
from __future__ import annotations

# Re-exports. Importing the families in this order registers their methods in the registry's order.
from ..errors import HfTaujpError, MergeConfigError, MissingStatisticsError  # noqa: F401
from .registry import (DRIVER_ARGS, ELEMENTWISE_METHODS, MERGE_METHODS, METHOD_SPECS,  # noqa: F401
                       REQUIRES_STATISTICS, MethodSpec, get_merge_method, get_method_spec, register_merge_method,
                       require_statistics)
from .method_helpers import (_compute_dtype, _densities, _on_meta, _per_vector, _signed, _signs_like,  # noqa: F401
                             _stack, _weights, check_density, check_finite)
from .sparsify import (BLOCK, _dare_densities, _disjoint_mean, _generator, _magnitude_mask,  # noqa: F401
                       _magnitude_mask_mergekit, _majority_sign, _random_prune, dare_density, kth_largest,
                       parameter_seed)
from .linear_methods import task_arithmetic  # noqa: F401
from .ties_dare_methods import _ties_mergekit, dare_linear, dare_ties, magnitude_prune, ties  # noqa: F401
from .statistics_methods import _check_stats, fisher_average, gradient_matching, regmean  # noqa: F401
