"""On-disk and Hub I/O shared by every hf-taujp artifact (task vectors, Fisher/Gram statistics, merges).

Layout follows transformers' sharded checkpoints: ``<prefix>.safetensors``, or shards
``<prefix>-00001-of-00003.safetensors`` plus ``<prefix>.safetensors.index.json`` holding
``{"metadata": {"total_size": bytes}, "weight_map": {tensor_name: shard_file}}``.

Every write goes to a temporary sibling folder that is renamed into place only when complete, so a
crash or an error never leaves a half-written artifact nor destroys the previous one. Pickle-based
files are never loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "HfTaujpError",
    "BaseModelMismatchError",
    "CorruptFileError",
    "UnsafeFileError",
    "atomic_dir",
    "atomic_write_text",
    "parse_size",
    "save_safetensors_sharded",
    "SafetensorsReader",
    "load_safetensors",
    "read_json",
    "resolve_pretrained_dir",
    "push_folder_to_hub",
    "check_finite",
    "PICKLE_SUFFIXES",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_DEFAULT_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.yaml", "*.txt"]


class HfTaujpError(ValueError):
    """Base class of every error hf-taujp raises on bad input."""


class BaseModelMismatchError(HfTaujpError):
    """Two artifacts (or an artifact and a model) refer to different base models."""


class CorruptFileError(HfTaujpError):
    """A file is truncated, unreadable or inconsistent with its index / config."""


class UnsafeFileError(HfTaujpError):
    """A repository or folder offers only pickle-based weights, which hf-taujp refuses to load."""


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[str]:
    """Yield a fresh temporary folder that replaces ``path`` only if the block finishes.

    On an exception the temporary folder is removed and ``path`` is left exactly as it was. With
    ``overwrite=False`` an existing non-empty ``path`` is an error (raised before anything is written).
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.isfile(path):
        raise HfTaujpError(f"Cannot write a folder to {path!r}: a file of that name exists.")
    if not overwrite and os.path.isdir(path) and os.listdir(path):
        raise HfTaujpError(f"Output folder {path!r} exists and is not empty (pass overwrite=True to replace it).")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if os.path.exists(path):
        # Rename the old folder aside first: the new one lands before the old one is deleted.
        backup = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
        os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        if backup is not None:
            os.rename(backup, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Sharded safetensors
# --------------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5_000_000_000, ``"500MiB"`` → 524_288_000; ints pass through."""
    if isinstance(size, int):
        if size <= 0:
            raise HfTaujpError(f"Shard size must be positive, got {size}.")
        return size
    m = _SIZE_RE.match(str(size))
    if not m:
        raise HfTaujpError(f"Cannot parse size {size!r}; use e.g. '5GB', '500MB' or a number of bytes.")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


def _index_name(prefix: str) -> str:
    return f"{prefix}.safetensors.index.json"


def save_safetensors_sharded(
    tensors: Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    prefix: str,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` into ``directory`` (which must already exist) as one or more safetensors files.

    Tensors are moved to CPU and made contiguous; tensors sharing storage are cloned (safetensors
    refuses shared storage). Returns the list of files written (shards and index).
    """
    limit = parse_size(max_shard_size)
    directory = os.fspath(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    seen_ptrs: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise HfTaujpError(f"Value for {name!r} is a {type(t).__name__}, not a tensor.")
        t = t.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen_ptrs or not t.is_contiguous():
            t = t.clone().contiguous()
        elif ptr is not None:
            seen_ptrs.add(ptr)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
    meta = {"format": "pt", **dict(metadata or {})}
    written = []
    if len(shards) == 1:
        fname = f"{prefix}.safetensors"
        save_file(shards[0], os.path.join(directory, fname), metadata=meta)
        return [fname]
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"{prefix}-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(directory, fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
        written.append(fname)
    index = {"metadata": {"total_size": sum(sizes), **dict(metadata or {})}, "weight_map": weight_map}
    with open(os.path.join(directory, _index_name(prefix)), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    written.append(_index_name(prefix))
    return written


def _refuse_pickles(directory: str, what: str) -> None:
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeFileError(
            f"{what} in {directory!r} has no safetensors weights, only pickle-based files {pickles}; "
            "hf-taujp never unpickles (arbitrary code execution). Convert them to safetensors first."
        )


class SafetensorsReader:
    """Lazy, tensor-by-tensor access to a (possibly sharded) safetensors artifact.

    ``reader.keys()``, ``reader.shape(name)``, ``reader.dtype(name)`` read only headers;
    ``reader.get(name)`` loads one tensor. Use as a context manager or call ``close()``.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, device: str = "cpu"):
        self.directory = os.fspath(directory)
        self.prefix = prefix
        self.device = device
        single = os.path.join(self.directory, f"{prefix}.safetensors")
        index = os.path.join(self.directory, _index_name(prefix))
        if os.path.isfile(index):
            data = read_json(index, what="safetensors index")
            if not isinstance(data.get("weight_map"), dict):
                raise CorruptFileError(f"Index {index!r} has no 'weight_map'.")
            self.weight_map: dict[str, str] = dict(data["weight_map"])
        elif os.path.isfile(single):
            self.weight_map = None  # filled once the file is opened
        else:
            if os.path.isdir(self.directory):
                _refuse_pickles(self.directory, f"Artifact '{prefix}'")
            raise CorruptFileError(
                f"No '{prefix}.safetensors' nor '{_index_name(prefix)}' in {self.directory!r}."
            )
        self._handles: dict[str, Any] = {}
        if self.weight_map is None:
            h = self._open(f"{prefix}.safetensors")
            self.weight_map = {k: f"{prefix}.safetensors" for k in h.keys()}
        else:
            for fname in sorted(set(self.weight_map.values())):
                h = self._open(fname)
                missing = [k for k, f in self.weight_map.items() if f == fname and k not in set(h.keys())]
                if missing:
                    raise CorruptFileError(
                        f"Shard {fname!r} lacks {len(missing)} tensors its index lists (first: {missing[0]!r})."
                    )

    def _open(self, fname: str):
        if fname not in self._handles:
            path = os.path.join(self.directory, fname)
            if not os.path.isfile(path):
                raise CorruptFileError(f"Missing file {path!r} (listed for '{self.prefix}').")
            try:
                self._handles[fname] = safe_open(path, framework="pt", device=self.device)
            except (SafetensorError, OSError, ValueError) as e:
                raise CorruptFileError(f"Cannot read {path!r}: truncated or corrupt safetensors file ({e}).") from e
        return self._handles[fname]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __len__(self) -> int:
        return len(self.weight_map)

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"Tensor {name!r} not found in '{self.prefix}' at {self.directory!r}.")
        return self._open(self.weight_map[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"Tensor {name!r} not found in '{self.prefix}' at {self.directory!r}.")
        fname = self.weight_map[name]
        try:
            return self._open(fname).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CorruptFileError(f"Cannot read tensor {name!r} from {fname!r}: {e}") from e

    def metadata(self) -> dict[str, str]:
        fname = next(iter(sorted(set(self.weight_map.values()))), None)
        return dict(self._open(fname).metadata() or {}) if fname else {}

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_safetensors(
    directory: str | os.PathLike, prefix: str, keys: Iterable[str] | None = None, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Load all (or the given) tensors of a possibly sharded safetensors artifact into memory."""
    with SafetensorsReader(directory, prefix, device=device) as r:
        names = r.keys() if keys is None else list(keys)
        return {k: r.get(k) for k in names}


# --------------------------------------------------------------------------------------------
# JSON, Hub resolution and upload
# --------------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike, what: str = "config") -> dict:
    """Read a JSON object; a missing or unparsable file raises a named ``CorruptFileError``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CorruptFileError(f"Missing {what} file {path!r}.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{what} file {path!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CorruptFileError(f"{what} file {path!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def resolve_pretrained_dir(
    repo_id_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
) -> str:
    """A local folder as is, else a snapshot of the Hub repo (only JSON/safetensors/card files).

    Pickle files are never downloaded. Respects ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` as
    huggingface_hub does.
    """
    path = os.fspath(repo_id_or_dir)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id=path,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        allow_patterns=allow_patterns or _DEFAULT_ALLOW_PATTERNS,
    )


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload with hf-taujp",
    revision: str | None = None,
    create_pr: bool = False,
):
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns huggingface_hub's CommitInfo."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=getattr(repo_url, "repo_id", repo_id),
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        repo_type="model",
    )


def check_finite(tensors: Mapping[str, torch.Tensor], what: str = "tensors", raise_error: bool = True) -> list[str]:
    """Names of tensors holding NaN or inf; raises ``HfTaujpError`` listing them unless told not to."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad and raise_error:
        shown = ", ".join(repr(b) for b in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise HfTaujpError(f"{what} contain NaN or inf values in {len(bad)} tensor(s): {shown}.")
    return bad
