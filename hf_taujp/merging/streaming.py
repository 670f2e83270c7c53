"""Out-of-core merges: read base, vectors and statistics tensor by tensor from (sharded) safetensors
folders (local or Hub), write sharded safetensors + index into an atomic output folder.

Peak memory ≈ (K + 2) × the largest tensor + one output shard, not K × the model.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import hub
from .merge import _as_dtype
from .methods import REQUIRES_STATISTICS, parameter_seed, MergeConfigError, MissingStatisticsError, get_merge_method

_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
         "merges.txt", "special_tokens_map.json", "added_tokens.json", "spiece.model", "tokenizer.model",
         "vocab.txt", "preprocessor_config.json", "chat_template.jinja")


def _model_prefix(d: str) -> str:
    for p in ("model", "pytorch_model"):
        if os.path.exists(os.path.join(d, p + ".safetensors")) or os.path.exists(os.path.join(d, p + ".safetensors.index.json")):
            return p
    raise hub.CorruptFileError(f"no model.safetensors (or index) in base folder {d!r}")


def merge_streaming(
    base: str,
    vectors: Sequence[str],
    output: str,
    method: str = "task_arithmetic",
    *,
    weights=None,
    fishers: Sequence[str] | None = None,
    base_fisher: str | None = None,
    dtype=None,
    output_kind: str = "model",
    max_shard_size: int | str = "2GB",
    recipe: dict | None = None,
    progress: bool = True,
    **params,
) -> str:
    """Merge TaskVector folders / repo ids into the model folder / repo id ``base`` tensor by tensor.

    θ_p = θ0_p + method(θ0_p, [τ_t,p], **params) in float32, cast to ``dtype`` (default: the base
    tensor's dtype). ``output_kind="model"`` writes a ``save_pretrained``-loadable folder (model
    shards + index, config and tokenizer files copied from the base); ``"task_vector"`` writes the
    merged Δ as a TaskVector folder. Statistics (``fishers``: Fisher folders, one per vector) are
    read the same way. Returns ``output``.
    """
    if not vectors:
        raise MergeConfigError("empty list of task vectors: nothing to merge")
    if output_kind not in ("model", "task_vector"):
        raise MergeConfigError(f'output_kind must be "model" or "task_vector", got {output_kind!r}')
    fn = get_merge_method(method)
    out_dtype = _as_dtype(dtype)
    base_dir = hub.resolve_pretrained_dir(base)
    vdirs = [hub.resolve_pretrained_dir(v) for v in vectors]
    cfgs = [hub.read_json(os.path.join(d, "config.json"), "task vector config") for d in vdirs]
    for v, c in zip(vectors, cfgs):
        if c.get("format") != "hf-taujp/task_vector":
            raise hub.HfTaujpError(f"{v!r} is not a task vector folder (format {c.get('format')!r})")
        if c.get("kind") == "linear":
            raise MergeConfigError(f"{v!r} is a linear (tangent) task vector; it cannot be merged into the weights")
    fps = {c.get("base_fingerprint") for c in cfgs if c.get("base_fingerprint")}
    if len(fps) > 1:
        raise hub.BaseModelMismatchError(
            f"task vectors were made from different base models: {[c.get('base_model') or c.get('base_fingerprint') for c in cfgs]}")
    needs = REQUIRES_STATISTICS.get(method)
    stat_readers, stat_n = None, None
    if needs:
        if not fishers or len(fishers) != len(vectors):
            raise MissingStatisticsError(f"method {method!r} needs one {needs} folder per task vector (fishers=...)")
    readers = []
    try:
        base_r = hub.SafetensorsReader(base_dir, _model_prefix(base_dir))
        readers.append(base_r)
        vec_r = [hub.SafetensorsReader(d, "task_vector") for d in vdirs]
        readers += vec_r
        if needs:
            sdirs = [hub.resolve_pretrained_dir(f) for f in fishers]
            stat_n = [hub.read_json(os.path.join(d, "config.json"), "fisher config").get("num_examples") for d in sdirs]
            stat_readers = [hub.SafetensorsReader(d, "fisher") for d in sdirs]
            readers += stat_readers
            if all(n is not None for n in stat_n):
                params.setdefault("num_examples", stat_n)
            if base_fisher is not None:
                bd = hub.resolve_pretrained_dir(base_fisher)
                params.setdefault("base_num_examples", hub.read_json(os.path.join(bd, "config.json"), "fisher config").get("num_examples", 1.0))
                bfr = hub.SafetensorsReader(bd, "fisher")
                readers.append(bfr)
            else:
                bfr = None
        base_keys = base_r.keys()
        for v, r in zip(vectors, vec_r):
            extra = set(r.keys()) - set(base_keys)
            if extra:
                raise hub.BaseModelMismatchError(f"task vector {v!r} has parameters missing from the base: {sorted(extra)[:5]}")
        seed = params.pop("seed", None)
        limit = hub.parse_size(max_shard_size)
        prefix = "model" if output_kind == "model" else "task_vector"
        with hub.atomic_dir(output) as tmp:
            shards: list[tuple[str, list[str]]] = []
            buf: dict[str, torch.Tensor] = {}
            size = total = 0

            def flush():
                nonlocal buf, size
                if buf:
                    fname = f"shard-{len(shards):05d}.tmp"
                    save_file(buf, os.path.join(tmp, fname), metadata={"format": "pt"})
                    shards.append((fname, list(buf)))
                    buf, size = {}, 0

            names = [n for n in base_keys if output_kind == "model" or any(n in r for r in vec_r)]
            for i, name in enumerate(tqdm(names, desc=f"merge ({method})", disable=not progress)):
                b = base_r.get(name)
                if any(name in r for r in vec_r) and b.is_floating_point():
                    taus = []
                    for k, r in enumerate(vec_r):
                        if name in r:
                            t = r.get(name)
                            if tuple(t.shape) != tuple(b.shape):
                                raise hub.BaseModelMismatchError(f"{name}: vector {k} shape {tuple(t.shape)} != base {tuple(b.shape)}")
                            taus.append(t.float() if t.dtype != torch.float64 else t)
                        else:
                            taus.append(torch.zeros(b.shape, dtype=torch.float32))
                    kw = dict(params)
                    if seed is not None:
                        kw["seed"] = parameter_seed(seed, name)
                    if needs:
                        fs = []
                        for k, r in enumerate(stat_readers):
                            if name not in r:
                                raise MissingStatisticsError(f"fisher of vector {k} ({fishers[k]!r}) has no entry for {name}")
                            fs.append(r.get(name))
                        kw["fishers"] = fs
                        if bfr is not None:
                            kw["base_fisher"] = bfr.get(name)
                    delta = fn(b, taus, weights=weights, name=name, **kw)
                    target = out_dtype or b.dtype
                    res = (b.to(delta.dtype) + delta) if output_kind == "model" else delta
                    res = res.to(target)
                    if not torch.isfinite(res).all():
                        raise hub.HfTaujpError(f"merge produced NaN/inf in {name}")
                else:
                    res = b.to(out_dtype) if (out_dtype is not None and b.is_floating_point()) else b
                res = res.contiguous()
                nbytes = res.numel() * res.element_size()
                if buf and size + nbytes > limit:
                    flush()
                buf[name] = res
                size += nbytes
                total += nbytes
            flush()
            n = len(shards)
            if n == 1:
                os.replace(os.path.join(tmp, shards[0][0]), os.path.join(tmp, f"{prefix}.safetensors"))
            else:
                wm = {}
                for j, (fname, keys) in enumerate(shards):
                    final = f"{prefix}-{j + 1:05d}-of-{n:05d}.safetensors"
                    os.replace(os.path.join(tmp, fname), os.path.join(tmp, final))
                    wm.update({k: final for k in keys})
                with open(os.path.join(tmp, f"{prefix}.safetensors.index.json"), "w") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=2)
            if output_kind == "model":
                for fname in _COPY:
                    src = os.path.join(base_dir, fname)
                    if os.path.isfile(src):
                        shutil.copy2(src, os.path.join(tmp, fname))
                if out_dtype is not None:
                    cfg = hub.read_json(os.path.join(tmp, "config.json"))
                    cfg["dtype"] = str(out_dtype).replace("torch.", "")
                    with open(os.path.join(tmp, "config.json"), "w") as f:
                        json.dump(cfg, f, indent=2)
            else:
                c0 = cfgs[0]
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump({"format": "hf-taujp/task_vector", "format_version": 1, "base_model": c0.get("base_model"),
                               "base_model_revision": c0.get("base_model_revision"),
                               "base_fingerprint": c0.get("base_fingerprint"), "kind": "nonlinear",
                               "task": f"merge:{method}", "training": {"merge_recipe": recipe or {}},
                               "dtype": str(out_dtype).replace("torch.", "") if out_dtype else None}, f, indent=2)
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write("---\nlibrary_name: hf-taujp\ntags: [hf-taujp, merge]\n"
                        + (f"base_model: {base}\n" if isinstance(base, str) else "")
                        + f"---\n# Merged with hf-taujp ({method})\n\n```json\n"
                        + json.dumps(recipe or {"method": method, "vectors": list(map(str, vectors)),
                                               "weights": weights, **{k: v for k, v in params.items() if isinstance(v, (int, float, str))}},
                                     indent=2, default=str)
                        + "\n```\n")
    finally:
        for r in readers:
            r.close()
    return output
