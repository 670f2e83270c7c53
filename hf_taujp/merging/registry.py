"""The merge-method registry: :func:`register_merge_method`, the lookups (:func:`get_method_spec`,
:func:`get_merge_method`), each method's declared parameters (:class:`MethodSpec`) and the drivers' check of
the statistics a method declares (:func:`require_statistics`).

The methods themselves live by family (``linear_methods``, ``ties_dare_methods``, ``statistics_methods``,
``svd_methods``, ``sparse_methods``); :mod:`hf_taujp.merging.methods` re-exports the registry and the
first three families.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import MergeConfigError, MissingStatisticsError


MERGE_METHODS: dict[str, Callable[..., torch.Tensor]] = {}
# methods that need per-task statistics, and which kind
REQUIRES_STATISTICS: dict[str, str] = {}
# methods whose output entry depends only on the same entry of the inputs (no per-tensor threshold,
# no random stream): streaming merges may run them on slices of a tensor
ELEMENTWISE_METHODS: set[str] = set()

# Keywords the merge drivers (merge(), merge_streaming()) fill in themselves, never user parameters:
# the parameter's name and its per-task statistics.
DRIVER_ARGS = frozenset({"name", "fishers", "grams", "base_fisher", "layout"})


@dataclass(frozen=True)
class MethodSpec:
    """What the registry knows about a merge method (mergekit style: each method declares its parameters).

    ``parameters``: {user parameter: default} from the function's keyword-only arguments (minus
    :data:`DRIVER_ARGS`); ``None`` when the function takes ``**kwargs`` (anything accepted, unchecked).
    ``per_vector``: parameters that take one value per task vector (``weights``, ``density``, ...).
    ``needs``: "fisher" / "gram" statistics per vector, or None. ``elementwise``: entry i of the result
    depends only on entry i of the inputs (streamed in slices). ``linear_ok``: the method's definition
    holds for linear (tangent) vectors too (False: it needs the weights themselves, e.g. RegMean).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    parameters: Mapping[str, Any] | None
    per_vector: frozenset
    needs: str | None
    elementwise: bool
    linear_ok: bool
    driver_args: frozenset

    def check_params(self, params: Mapping[str, Any], where: str = "") -> None:
        """``MergeConfigError`` naming the method and its valid parameters for any unknown parameter."""
        if self.parameters is None:
            return
        unknown = sorted(k for k in params if k not in self.parameters)
        if unknown:
            raise MergeConfigError(
                f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for merge method "
                f"{self.name!r}{where}; its parameters are: {', '.join(sorted(self.parameters)) or '(none)'}")


METHOD_SPECS: dict[str, MethodSpec] = {}


def register_merge_method(name: str, needs: str | None = None, *, elementwise: bool = False,
                          per_vector: Sequence[str] = ("weights",), linear_ok: bool = True):
    """Decorator: register ``fn`` under ``name`` in :data:`MERGE_METHODS`.

    ``fn(base, vectors, *, weights=None, <parameters>..., name="")`` returns the merged Δ of one parameter.
    Its keyword-only arguments are its declared parameters: ``merge(..., method=name, **params)`` and
    recipes refuse any other name (a function with ``**kwargs`` accepts everything, unchecked). The
    drivers pass ``name`` and the statistics (``fishers`` / ``grams`` / ``base_fisher`` / ``layout``)
    only when ``fn`` accepts them. See :class:`MethodSpec` for the other flags.
    """

    def deco(fn):
        sig = inspect.signature(fn)
        open_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        kwonly = {k: p.default for k, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
        params = None if open_kw else {k: v for k, v in kwonly.items() if k not in DRIVER_ARGS}
        driver = frozenset(DRIVER_ARGS if open_kw else DRIVER_ARGS & set(kwonly))
        METHOD_SPECS[name] = MethodSpec(name, fn, params, frozenset(per_vector), needs, elementwise, linear_ok, driver)
        MERGE_METHODS[name] = fn
        if needs:
            REQUIRES_STATISTICS[name] = needs
        if elementwise:
            ELEMENTWISE_METHODS.add(name)
        return fn

    return deco


def get_method_spec(name: str) -> MethodSpec:
    try:
        return METHOD_SPECS[name]
    except KeyError:
        raise MergeConfigError(f"unknown merge method {name!r}; known: {sorted(METHOD_SPECS)}") from None


def get_merge_method(name: str) -> Callable[..., torch.Tensor]:
    return get_method_spec(name).fn


# ------------------------------------------------------------------ the drivers' statistics check
def require_statistics(method: str, spec: MethodSpec, given: Sequence | None, n_vectors: int, base_fisher: Any,
                       noun: str = "statistic") -> None:
    """``MissingStatisticsError`` unless the statistics ``spec.needs`` are given, one per task vector, and the
    base Fisher when the method's driver takes ``base_fisher`` (both merge paths call it; ``noun`` says what
    the caller passes: statistics objects or folders)."""
    needs = spec.needs
    if needs:
        arg = "fishers" if needs == "fisher" else "grams"
        if not given:
            raise MissingStatisticsError(f"method {method!r} needs one {needs} {noun} per task vector ({arg}=...)")
        if len(given) != n_vectors:
            raise MissingStatisticsError(f"got {len(given)} {needs} {noun}s for {n_vectors} task vectors ({arg}=...)")
    if "base_fisher" in spec.driver_args and base_fisher is None:
        raise MissingStatisticsError(
            f"method {method!r} needs the base model's Fisher H0 (base_fisher=...): without it the prior is δ "
            "alone and the merge equals fisher_average with λ inert; estimate it with estimate_fisher(base, data) "
            "or use method='fisher_average'")
