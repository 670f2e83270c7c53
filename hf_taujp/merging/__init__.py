"""Merge library: the method registry (``methods``, re-exporting ``registry`` and the families
``linear_methods``, ``ties_dare_methods`` and ``statistics_methods``; the SVD family in ``svd_methods``;
model_stock, slerp, DELLA, breadcrumbs and TALL-mask consensus in ``sparse_methods``), in-memory ``merge``
and out-of-core ``merge_streaming`` (its plan in ``streaming_plan``), per-task statistics (Fisher, Gram),
YAML recipes and the coefficient search."""
from .methods import (
    MERGE_METHODS,
    METHOD_SPECS,
    MergeConfigError,
    MethodSpec,
    MissingStatisticsError,
    dare_linear,
    dare_ties,
    fisher_average,
    get_merge_method,
    get_method_spec,
    gradient_matching,
    magnitude_prune,
    parameter_seed,
    regmean,
    register_merge_method,
    task_arithmetic,
    ties,
)
from .svd_methods import iso_c, iso_cts, tsv, wudi
from .sparse_methods import (breadcrumbs, breadcrumbs_ties, consensus, consensus_ties, della, della_linear,
                             model_stock, slerp)
from .layouts import WeightLayouts
from .merge import merge
from .fisher import estimate_fisher, output_type_of
from .regmean import estimate_gram
from .recipe import cli_merge, load_recipe, merge_from_config
from .search import DEFAULT_GRID, search_coefficients, select_coefficient
from .statistics import FisherStatistics, GramStatistics, Statistics
from .streaming import merge_streaming
