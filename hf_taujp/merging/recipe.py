"""Merge recipes in YAML, close to mergekit's, run from Python (:func:`merge_from_config`) or
``hf-taujp merge recipe.yaml OUTPUT``. The format (also in the README and ``hf-taujp merge --help``):

```yaml
base_model: gpt2                       # folder or Hub repo id of the base model
method: ties                           # a registered method (mergekit's "merge_method" accepted)
vectors:                               # mergekit's "models" accepted
  - path: me/gpt2-tv-sst2              # TaskVector folder or repo id (mergekit's "model" accepted)
    weight: 1.0                        # α_t; negative = merge the negated vector
    density: 0.5                       # any per-vector parameter of the method, here or under
                                       #   `parameters:` (mergekit style); overrides the global one
    fisher: me/gpt2-tv-sst2-fisher     # fisher_average / gradient_matching
    gram: me/gpt2-tv-sst2-gram         # regmean
  - path: me/gpt2-glue-vectors         # one repo (or folder) holding many vectors, as the recipes push:
    subfolder: linear_ft_taujp/cola    #   the vector's folder in it (transformers' `subfolder=`)
    revision: v2                       #   optional: branch, tag or commit of a Hub repo
    fisher: {path: me/gpt2-glue-fishers, subfolder: cola}   # any folder / repo may be given this way
    parameters: {weight: 0.5}
parameters: {density: 0.2, lambda: 1.0, majority_sign_method: total, seed: 0}
base_fisher: me/gpt2-fisher            # gradient_matching: the base model's Fisher (required)
dtype: bfloat16                        # float32 | float16 | bfloat16 | float64 (default: the base's)
output: merged/                        # optional (the command line's OUTPUT wins)
output_kind: model                     # or task_vector (the default, and only choice, for linear vectors)
max_shard_size: 2GB
trust_remote_code: false               # a base with custom code (auto_map) needs true
# weight_layout: out_in                # iso_cts / wudi / regmean only (others refuse it), for a base whose
                                       #   architecture is unknown (no transformers config.json): out_in | in_out
                                       #   for every 2-D tensor, or {tensor name: out_in | in_out}
                                       #   (the rule: hf_taujp.merging.merge.WeightLayouts)
push_to_hub: me/gpt2-merged            # optional
```

Rules: every key, every parameter and every per-vector key must be known (else an error naming the
method and its parameters); parameter values are numbers, strings or booleans — mergekit's
per-layer gradients (a list as a value) are refused by name; ``lambda`` means ``lambda_``.
Folders and repos (``base_model``, a vector's ``path``, ``fisher``, ``gram``, ``base_fisher``) are a string
(a local folder or a Hub repo id) or a mapping ``{path: ..., subfolder: ..., revision: ...}``; a vector
takes ``subfolder:`` / ``revision:`` beside its ``path:``. A ``"repo/sub/folder"`` string is a local path,
never a repo and a sub-folder (the rule of ``hf_taujp.hub``): give ``subfolder:``. A vector's root that
holds no task vector but has some in sub-folders is an error listing them
(``hf_taujp.hub.list_task_vectors`` lists them too).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .. import hub
from ..task_vector import read_task_vector_config
from .merge import BASE_PATTERNS, check_method_arguments
from .methods import MergeConfigError, get_method_spec
from .streaming import merge_streaming

_KNOWN = {"base_model", "method", "merge_method", "vectors", "models", "parameters", "dtype", "output",
          "output_kind", "push_to_hub", "base_fisher", "max_shard_size", "trust_remote_code", "weight_layout"}
# per-vector keys that are not method parameters
_VECTOR_KEYS = {"path", "model", "parameters", "fisher", "gram", "subfolder", "revision"}
# keys of a folder / repo given as a mapping
_REF_KEYS = {"path", "model", "subfolder", "revision"}
# recipe spellings → method parameter names
_ALIASES = {"weight": "weights", "lambda": "lambda_"}


def _scalar(value: Any, where: str) -> Any:
    """A parameter value: number, string or bool; lists / dicts (mergekit gradients, filters) refused."""
    if isinstance(value, (list, tuple)):
        raise MergeConfigError(f"{where} is a list {value!r}: mergekit's per-layer gradients are not supported; "
                               "give one number (per-vector values go under each vector)")
    if isinstance(value, dict):
        raise MergeConfigError(f"{where} is a mapping {value!r}: mergekit's filtered values are not supported; "
                               "give one number")
    if value is None or not isinstance(value, (int, float, str, bool)):
        raise MergeConfigError(f"{where} must be a number, a string or a boolean, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    value = _scalar(value, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergeConfigError(f"{where} must be a number, got {value!r}")
    return float(value)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeConfigError(f"{where} must be a mapping (key: value), got {type(value).__name__} {value!r}")
    return dict(value)


def _ref(value: Any, where: str) -> str | dict:
    """A folder / repo reference: a non-empty string as is; a mapping ``{path, subfolder, revision}``
    (mergekit's ``model`` accepted for ``path``) as ``{"path", "subfolder"?, "revision"?}``, or just the path
    when it gives neither."""
    if isinstance(value, str) and value:
        return value
    if not isinstance(value, dict):
        raise MergeConfigError(f"{where} must be a folder or Hub repo id, or a mapping {{path: ..., subfolder: ..., "
                               f"revision: ...}}, got {value!r}")
    unknown = set(value) - _REF_KEYS
    if unknown:
        raise MergeConfigError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_REF_KEYS)}")
    return _ref_parts(value.get("path", value.get("model")), value.get("subfolder"), value.get("revision"), where)


def _ref_parts(path: Any, subfolder: Any, revision: Any, where: str) -> str | dict:
    if not path or not isinstance(path, str):
        raise MergeConfigError(f"{where} needs `path:` (a folder or Hub repo id), got {path!r}")
    if subfolder is not None and not isinstance(subfolder, str):
        raise MergeConfigError(f"{where} subfolder must be a string such as 'linear/sst2', got {subfolder!r}")
    try:
        sub = hub.normalize_subfolder(subfolder)
    except hub.HfTaujpError as e:
        raise MergeConfigError(f"{where}: {e}") from None
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise MergeConfigError(f"{where} revision must be a branch, tag or commit name, got {revision!r}")
    if sub is None and revision is None:
        return path
    return {"path": path, **({"subfolder": sub} if sub else {}), **({"revision": revision} if revision else {})}


def resolve_reference(ref: str | dict, *, allow_patterns: list[str] | None = None) -> str:
    """The folder or repo id to read for a normalised reference: a string as is; a mapping's sub-folder /
    revision resolved into a local folder (``hub.resolve_pretrained_dir``; its errors propagate)."""
    if isinstance(ref, str):
        return ref
    return hub.resolve_pretrained_dir(ref["path"], subfolder=ref.get("subfolder"), revision=ref.get("revision"),
                                      allow_patterns=allow_patterns)


def load_recipe(path_or_dict: str | os.PathLike | dict) -> dict:
    """Read and check a recipe; returns it normalised: ``method``, ``vectors`` (dicts with ``path``,
    optional ``fisher`` / ``gram`` and ``params`` of per-vector values), ``parameters`` (method names).
    Every problem is a :class:`MergeConfigError` with one line naming it."""
    if isinstance(path_or_dict, dict):
        rec = dict(path_or_dict)
        src = "recipe"
    else:
        import yaml

        src = f"recipe {os.fspath(path_or_dict)!r}"
        try:
            with open(path_or_dict, encoding="utf-8") as f:
                rec = yaml.safe_load(f)
        except FileNotFoundError:
            raise MergeConfigError(f"recipe file {os.fspath(path_or_dict)!r} not found") from None
        except OSError as e:
            raise MergeConfigError(f"cannot read recipe file {os.fspath(path_or_dict)!r}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise MergeConfigError(f"{src} is not valid YAML{at}: {problem}") from None
        if not isinstance(rec, dict):
            raise MergeConfigError(f"{src} must be a YAML mapping (base_model:, method:, vectors:, ...), "
                                   f"got {type(rec).__name__}")
    unknown = set(rec) - _KNOWN
    if unknown:
        raise MergeConfigError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(_KNOWN)}")
    if not rec.get("base_model"):
        raise MergeConfigError("recipe needs base_model: a folder or Hub repo id")
    rec["base_model"] = _ref(rec["base_model"], "base_model")
    method = rec.pop("merge_method", None) or rec.get("method") or "task_arithmetic"
    if not isinstance(method, str):
        raise MergeConfigError(f"method must be a name, got {method!r}")
    spec = get_method_spec(method)
    rec["method"] = method
    where = f" (method {method!r})"
    params = {}
    for k, v in _mapping(rec.get("parameters"), "parameters").items():
        params[_ALIASES.get(k, k)] = _scalar(v, f"parameter {k!r}")
    vecs = rec.get("vectors", rec.get("models"))
    if not vecs:
        raise MergeConfigError("recipe needs a non-empty `vectors` list")
    if not isinstance(vecs, list):
        raise MergeConfigError(f"`vectors` must be a list (one `- path: ...` entry per task vector), got "
                               f"{type(vecs).__name__}")
    per_vector_names = spec.per_vector if spec.parameters is not None else frozenset()
    norm = []
    for i, v in enumerate(vecs):
        label = f"vector {i}"
        if isinstance(v, str):
            v = {"path": v}
        v = _mapping(v, label)
        path = v.get("path", v.get("model"))
        if not path or not isinstance(path, str):
            raise MergeConfigError(f"{label} needs `path:` (a TaskVector folder or repo id), got {v!r}")
        ref = _ref_parts(path, v.get("subfolder"), v.get("revision"), label)
        flat = {k: x for k, x in v.items() if k not in _VECTOR_KEYS}
        for k, x in _mapping(v.get("parameters"), f"{label} parameters").items():
            if k in flat:
                raise MergeConfigError(f"{label}: {k!r} given twice (beside and under `parameters`)")
            flat[k] = x
        vp = {}
        for k, x in flat.items():
            name = _ALIASES.get(k, k)
            if spec.parameters is not None and name not in spec.parameters:
                spec.check_params({name: x}, where=f" ({label})")
            if spec.parameters is not None and name not in per_vector_names:
                raise MergeConfigError(f"{label}: parameter {k!r} of method {method!r} takes one value for all "
                                       f"vectors: put it under the top-level `parameters:`; per-vector parameters "
                                       f"are: {', '.join(sorted(per_vector_names))}")
            vp[name] = _number(x, f"{label} {k!r}")
        stat = {s: _ref(v[s], f"{label} {s!r}") for s in ("fisher", "gram") if v.get(s) is not None}
        where = {"path": ref} if isinstance(ref, str) else dict(ref)
        norm.append({**where, **stat, "params": vp})
    spec.check_params(params, where=where)
    rec["vectors"] = norm
    rec["parameters"] = params
    if rec.get("base_fisher") is not None:
        rec["base_fisher"] = _ref(rec["base_fisher"], "base_fisher")
    for key in ("output", "push_to_hub"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise MergeConfigError(f"{key} must be a string, got {rec[key]!r}")
    if "trust_remote_code" in rec and not isinstance(rec["trust_remote_code"], bool):
        raise MergeConfigError(f"trust_remote_code must be true or false, got {rec['trust_remote_code']!r}")
    if rec.get("weight_layout") is not None:  # merge()'s rule: a known layout, for a method whose result needs it
        check_method_arguments(spec, {}, weight_layout=rec["weight_layout"])
    return rec


def _per_vector_params(rec: dict) -> dict:
    """Global + per-vector parameters → the method's keyword arguments: a per-vector parameter becomes a
    list with each vector's value, the global value (or the method's default) where a vector gives none."""
    spec = get_method_spec(rec["method"])
    params = dict(rec["parameters"])
    vecs = rec["vectors"]
    names = {k for v in vecs for k in v["params"]}
    for k in sorted(names):
        default = params.get(k)
        if default is None:
            default = (spec.parameters or {}).get(k)
        if default is None and k == "weights":
            default = 1.0  # mergekit: a vector without a weight counts once
        values = [v["params"].get(k, default) for v in vecs]
        if any(x is None for x in values):
            missing = next(i for i, x in enumerate(values) if x is None)
            raise MergeConfigError(f"vector {missing} gives no {k!r} and there is no global one: give it for every "
                                   "vector or under the top-level `parameters:`")
        if isinstance(default, (list, tuple)) or any(isinstance(x, (list, tuple)) for x in values):
            raise MergeConfigError(f"{k!r}: per-layer lists are not supported")
        params[k] = [float(x) for x in values]
    return params


def _resolved(ref: str | dict, label: str, allow_patterns: list[str] | None = None) -> str:
    """:func:`resolve_reference`, its error prefixed with ``label`` (``"vector 1 fisher"``)."""
    if isinstance(ref, str):
        return ref
    if "subfolder" not in ref and "revision" not in ref:
        return ref["path"]
    try:
        return resolve_reference(ref, allow_patterns=allow_patterns)
    except hub.HfTaujpError as e:
        raise type(e)(f"{label}: {e}") from e


def merge_from_config(path_or_dict: str | os.PathLike | dict, output: str | None = None, *, progress: bool = True) -> str:
    """Run a merge recipe (YAML path or dict; format in this module's docstring) as a streaming merge;
    returns the output folder."""
    rec = load_recipe(path_or_dict)
    output = output or rec.get("output")
    if not output:
        raise MergeConfigError("no output folder: give `output:` in the recipe or OUTPUT on the command line")
    vecs = rec["vectors"]
    params = _per_vector_params(rec)
    weights = params.pop("weights", None)
    stats = {}
    for s in ("fisher", "gram"):
        given = [v.get(s) for v in vecs]
        if any(g is not None for g in given):
            if any(g is None for g in given):
                raise MergeConfigError(f"give a `{s}:` for every vector or for none")
            stats[s + "s"] = [_resolved(g, f"vector {i} {s}") for i, g in enumerate(given)]
    paths = []
    for i, v in enumerate(vecs):
        if "subfolder" not in v and "revision" not in v:
            paths.append(v["path"])  # merge_streaming resolves it, and names a root holding vectors in sub-folders
            continue
        d = _resolved(v, f"vector {i}")
        read_task_vector_config(d, v["path"], subfolder=v.get("subfolder"), revision=v.get("revision"),
                                label=f"vector {i}")
        paths.append(d)
    base = _resolved(rec["base_model"], "base_model", allow_patterns=BASE_PATTERNS)
    base_fisher = None if rec.get("base_fisher") is None else _resolved(rec["base_fisher"], "base_fisher")
    merge_streaming(base, paths, output, rec["method"], weights=weights,
                    base_fisher=base_fisher, dtype=rec.get("dtype"),
                    output_kind=rec.get("output_kind"), max_shard_size=rec.get("max_shard_size", "2GB"),
                    trust_remote_code=rec.get("trust_remote_code", False), weight_layout=rec.get("weight_layout"),
                    recipe={k: v for k, v in rec.items() if k != "push_to_hub"}, progress=progress,
                    **stats, **params)
    if rec.get("push_to_hub"):
        hub.push_folder_to_hub(output, rec["push_to_hub"])
    return output


def _help_text() -> str:
    from .methods import METHOD_SPECS

    doc = __doc__.split("```yaml\n", 1)[1].split("```", 1)
    lines = ["Merge task vectors from a YAML recipe (mergekit-like) into a model or task vector folder.",
             "", "recipe format:", "", doc[0].rstrip(), "", doc[1].strip(), "", "methods and their parameters:"]
    for name, sp in sorted(METHOD_SPECS.items()):
        ps = "(any)" if sp.parameters is None else ", ".join(
            f"{k}{'*' if k in sp.per_vector else ''}" for k in sorted(sp.parameters))
        extra = f"; needs {sp.needs} statistics per vector" if sp.needs else ""
        if "base_fisher" in sp.driver_args:
            extra += " and base_fisher"
        lines.append(f"  {name}: {ps}{extra}")
    lines.append("  (* = may be given per vector; `weight` and `lambda` are accepted for weights / lambda_)")
    return "\n".join(lines)


def cli_merge(argv: list[str]) -> int:
    """``hf-taujp merge RECIPE.yaml [OUTPUT]``; returns the process exit code (2 on a user error, printed
    as one line on stderr)."""
    ap = argparse.ArgumentParser(prog="hf-taujp merge", description=_help_text(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="YAML recipe file")
    ap.add_argument("output", nargs="?", help="output folder (default: the recipe's `output:`)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    try:
        out = merge_from_config(a.recipe, a.output, progress=not a.no_progress)
    except Exception as e:
        # user errors (bad recipe, missing folders, Hub unreachable, bad repo ids): one line, no traceback.
        # HFValidationError through sys.modules: whatever raised it imported huggingface_hub.errors, and
        # importing it here up front costs 0.1-0.2 s of every merge.
        hf_errors = sys.modules.get("huggingface_hub.errors")
        if not isinstance(e, (hub.HfTaujpError, OSError) + ((hf_errors.HFValidationError,) if hf_errors else ())):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"hf-taujp merge: error: {msg}", file=sys.stderr)
        return 2
    print(out)
    return 0
