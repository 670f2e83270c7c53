"""Merge recipes in YAML, close to mergekit's, run from Python or ``hf-taujp merge recipe.yaml OUTPUT``.

```yaml
base_model: gpt2                       # folder or Hub repo id
method: ties                           # any name in MERGE_METHODS (mergekit's "merge_method" accepted)
vectors:                               # mergekit's "models" accepted
  - path: me/gpt2-tv-sst2              # TaskVector folder or repo id
    weight: 1.0
    fisher: me/gpt2-tv-sst2-fisher     # needed by fisher_average / gradient_matching
    gram: me/gpt2-tv-sst2-gram         # needed by regmean
  - path: me/gpt2-tv-cola
    weight: 0.5
parameters: {density: 0.2, lambda_: 1.0, majority_sign_method: total, seed: 0}
dtype: bfloat16
output: merged/                        # optional (CLI gives OUTPUT)
output_kind: model                     # or task_vector
push_to_hub: me/gpt2-merged            # optional
```
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from .. import hub
from .methods import MergeConfigError
from .streaming import merge_streaming

_KNOWN = {"base_model", "method", "merge_method", "vectors", "models", "parameters", "dtype", "output",
          "output_kind", "push_to_hub", "base_fisher", "max_shard_size"}


def load_recipe(path_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(path_or_dict, dict):
        rec = dict(path_or_dict)
    else:
        import yaml

        try:
            with open(path_or_dict, encoding="utf-8") as f:
                rec = yaml.safe_load(f)
        except FileNotFoundError:
            raise MergeConfigError(f"recipe file {os.fspath(path_or_dict)!r} not found") from None
        if not isinstance(rec, dict):
            raise MergeConfigError(f"recipe {os.fspath(path_or_dict)!r} must be a YAML mapping")
    unknown = set(rec) - _KNOWN
    if unknown:
        raise MergeConfigError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(_KNOWN)}")
    if "base_model" not in rec:
        raise MergeConfigError("recipe needs base_model")
    vecs = rec.get("vectors", rec.get("models"))
    if not vecs:
        raise MergeConfigError("recipe needs a non-empty `vectors` list")
    norm = []
    for v in vecs:
        if isinstance(v, str):
            v = {"path": v}
        if "path" not in v and "model" in v:  # mergekit: {model: ..., parameters: {weight: ...}}
            v = {"path": v["model"], **(v.get("parameters") or {}), **{k: x for k, x in v.items() if k not in ("model", "parameters")}}
        if "path" not in v:
            raise MergeConfigError(f"vector entry {v!r} needs `path`")
        norm.append(v)
    rec["vectors"] = norm
    rec["method"] = rec.pop("merge_method", rec.get("method", "task_arithmetic")) or "task_arithmetic"
    return rec


def merge_from_config(path_or_dict: str | os.PathLike | dict, output: str | None = None, *, progress: bool = True) -> str:
    """Run a merge recipe (YAML path or dict) as a streaming merge; returns the output folder."""
    rec = load_recipe(path_or_dict)
    output = output or rec.get("output")
    if not output:
        raise MergeConfigError("no output folder: give `output:` in the recipe or OUTPUT on the command line")
    vecs = rec["vectors"]
    weights = [float(v.get("weight", 1.0)) for v in vecs]
    fishers = [v.get("fisher") for v in vecs]
    fishers = fishers if any(f is not None for f in fishers) else None
    if fishers is not None and any(f is None for f in fishers):
        raise MergeConfigError("give a `fisher:` for every vector or for none")
    grams = [v.get("gram") for v in vecs]
    grams = grams if any(g is not None for g in grams) else None
    if grams is not None and any(g is None for g in grams):
        raise MergeConfigError("give a `gram:` for every vector or for none")
    params = dict(rec.get("parameters") or {})
    if "lambda" in params:
        params["lambda_"] = params.pop("lambda")
    merge_streaming(rec["base_model"], [v["path"] for v in vecs], output, rec["method"], weights=weights,
                    fishers=fishers, grams=grams, base_fisher=rec.get("base_fisher"), dtype=rec.get("dtype"),
                    output_kind=rec.get("output_kind", "model"), max_shard_size=rec.get("max_shard_size", "2GB"),
                    recipe={k: v for k, v in rec.items() if k != "push_to_hub"}, progress=progress, **params)
    if rec.get("push_to_hub"):
        hub.push_folder_to_hub(output, rec["push_to_hub"])
    return output


def cli_merge(argv: list[str]) -> int:
    """``hf-taujp merge RECIPE.yaml OUTPUT``; returns the process exit code."""
    ap = argparse.ArgumentParser(prog="hf-taujp merge", description="Merge task vectors from a YAML recipe.")
    ap.add_argument("recipe")
    ap.add_argument("output", nargs="?")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        out = merge_from_config(a.recipe, a.output, progress=not a.no_progress)
    except hub.HfTaujpError as e:
        print(f"error: {e}")
        return 2
    print(out)
    return 0
