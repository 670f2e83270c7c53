"""Tensor files on disk: one reader and one writer of (possibly sharded) safetensors artifacts.

Used by task vectors, Fisher / Gram statistics and both merge paths (in memory and streaming).

Layout follows transformers' sharded checkpoints: ``<prefix>.safetensors``, or shards
``<prefix>-00001-of-00003.safetensors`` plus ``<prefix>.safetensors.index.json`` holding
``{"metadata": {"total_size": bytes, ...}, "weight_map": {tensor_name: shard_file}}``. One cut
rule (:func:`plan_shards`): tensors in the caller's order, a new shard whenever the next tensor
would take the current one past ``max_shard_size``.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the end of the header.

Why ``pread`` / ``pwrite`` rather than ``safetensors.safe_open`` / ``save_file``: ``safe_open``
memory-maps every file, and the pages of a mapped file that a merge has touched count in the
process's resident set (RSS) until the file is closed, so reading a base and four task vectors
tensor by tensor would end with ~5 × the model in RSS; ``save_file`` needs every tensor of a shard
in memory at once. Here tensors are read into fresh buffers freed as soon as the caller drops them,
and written at offsets laid out in advance (every shape and dtype is known before the first
write), so the streaming merge never holds more than the tensors it is working on.

Pickle-based files are never loaded (:func:`refuse_pickles`).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence

import torch

from .errors import CorruptFileError, HfTaujpError, UnsafeFileError

__all__ = [
    "SafetensorsReader",
    "ShardedWriter",
    "save_safetensors_sharded",
    "load_safetensors",
    "plan_shards",
    "index_name",
    "parse_size",
    "read_json",
    "refuse_pickles",
    "dtype_name",
    "PICKLE_SUFFIXES",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# safetensors dtype codes ↔ torch dtypes (the package's one table of them)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_IO = 1 << 30  # bytes per pread / pwrite call (Linux caps one call near 2 GiB)
_MAX_HEADER = 100_000_000


# --------------------------------------------------------------------------------------------
# Small shared pieces: sizes, JSON, pickles, dtypes
# --------------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` → 5_000_000_000, ``"500MiB"`` → 524_288_000; ints pass through. ``HfTaujpError`` if ≤ 0 or unparsable."""
    if isinstance(size, int):
        if size <= 0:
            raise HfTaujpError(f"Shard size must be positive, got {size}.")
        return size
    m = _SIZE_RE.match(str(size))
    if not m:
        raise HfTaujpError(f"Cannot parse size {size!r}; use e.g. '5GB', '500MB' or a number of bytes.")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


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


def refuse_pickles(directory: str, what: str) -> None:
    """``UnsafeFileError`` if ``directory`` holds pickle-based weights (called where safetensors are missing)."""
    pickles = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeFileError(
            f"{what} in {directory!r} has no safetensors weights, only pickle-based files {pickles}; "
            "hf-taujp never unpickles (arbitrary code execution). Convert them to safetensors first."
        )


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.float32`` → ``"F32"``); ``HfTaujpError`` if none."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise HfTaujpError(f"dtype {dtype} cannot be stored in safetensors") from None


def index_name(prefix: str) -> str:
    return f"{prefix}.safetensors.index.json"


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _pread_into(fd: int, view: memoryview, offset: int, path: str, name: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:done + _MAX_IO]], offset + done)
        if got <= 0:
            raise CorruptFileError(f"{path!r}: unexpected end of file reading {name!r}.")
        done += got


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
class _File:
    """One safetensors file: header parsed and checked once, tensors read on demand with ``pread``."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ValueError("shorter than 8 bytes")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER:
                    raise ValueError(f"header length {n} is implausible")
                header = json.loads(f.read(n))
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
            size = os.path.getsize(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"Cannot read {path!r}: truncated or corrupt safetensors file ({e}).") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        for name, e in header.items():
            if not isinstance(e, dict) or e.get("dtype") not in _DTYPES:
                raise CorruptFileError(f"{path!r}: tensor {name!r} has unsupported dtype "
                                       f"{e.get('dtype') if isinstance(e, dict) else e!r}.")
            a, b = e["data_offsets"]
            if b < a or self.data_start + b > size:
                raise CorruptFileError(f"{path!r}: tensor {name!r} lies beyond the end of the file (truncated?).")
            if (b - a) != math.prod(e["shape"]) * _DTYPES[e["dtype"]].itemsize:
                raise CorruptFileError(f"{path!r}: tensor {name!r} has {b - a} bytes for shape {e['shape']} "
                                       f"{e['dtype']}.")
        self._fd: int | None = None

    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        a, b = e["data_offsets"]
        buf = torch.empty(b - a, dtype=torch.uint8)
        if b > a:
            _pread_into(self._fileno(), memoryview(buf.numpy()), self.data_start + a, self.path, name)
        return buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        e = self.entries[name]
        if _DTYPES[e["dtype"]] != out.dtype:
            raise HfTaujpError(f"{name}: stored as {e['dtype']}, buffer is {out.dtype}")
        size = out.element_size()
        a = e["data_offsets"][0] + start * size
        nbytes = out.numel() * size
        if a + nbytes > e["data_offsets"][1]:
            raise HfTaujpError(f"{name}: range beyond the tensor")
        if nbytes:
            _pread_into(self._fileno(), memoryview(out.view(torch.uint8).numpy()), self.data_start + a, self.path, name)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SafetensorsReader:
    """Tensor-by-tensor access to a (possibly sharded) safetensors artifact ``<directory>/<prefix>…``.

    ``keys()``, ``in``, ``len``, ``shape(name)``, ``dtype(name)`` (the safetensors code, e.g. ``"F32"``),
    ``torch_dtype(name)`` and ``metadata()`` read only headers; ``get(name)`` reads one tensor into a
    fresh buffer (on ``device``); ``read_into(name, start, out)`` reads a range of the flattened tensor
    into a caller's buffer (no allocation). Use as a context manager or call ``close()``.

    Raises ``CorruptFileError`` (missing / truncated / inconsistent file or index) and
    ``UnsafeFileError`` (only pickle-based weights in the folder) on opening; ``KeyError`` for an
    unknown tensor name.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, device: str | torch.device = "cpu"):
        self.directory, self.prefix, self.device = os.fspath(directory), prefix, device
        index = os.path.join(self.directory, index_name(prefix))
        single = os.path.join(self.directory, f"{prefix}.safetensors")
        self.files: dict[str, _File] = {}
        self.weight_map: dict[str, str] = {}
        if os.path.isfile(index):
            wm = read_json(index, what="safetensors index").get("weight_map")
            if not isinstance(wm, dict):
                raise CorruptFileError(f"Index {index!r} has no 'weight_map'.")
            for fname in sorted(set(wm.values())):
                path = os.path.join(self.directory, fname)
                if not os.path.isfile(path):
                    raise CorruptFileError(f"Missing file {path!r} (listed for '{prefix}').")
                self.files[fname] = _File(path)
            for fname in self.files:
                missing = [k for k, f in wm.items() if f == fname and k not in self.files[fname].entries]
                if missing:
                    raise CorruptFileError(
                        f"Shard {fname!r} lacks {len(missing)} tensors its index lists (first: {missing[0]!r}).")
            self.weight_map = dict(wm)
        elif os.path.isfile(single):
            fname = os.path.basename(single)
            self.files[fname] = _File(single)
            self.weight_map = {k: fname for k in self.files[fname].entries}
        else:
            if os.path.isdir(self.directory):
                refuse_pickles(self.directory, f"Artifact '{prefix}'")
            raise CorruptFileError(f"No '{prefix}.safetensors' nor '{index_name(prefix)}' in {self.directory!r}.")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __len__(self) -> int:
        return len(self.weight_map)

    def _file(self, name: str) -> _File:
        if name not in self.weight_map:
            raise KeyError(f"Tensor {name!r} not found in '{self.prefix}' at {self.directory!r}.")
        return self.files[self.weight_map[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self._file(name).entries[name]["dtype"]

    def torch_dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.dtype(name)]

    def get(self, name: str) -> torch.Tensor:
        t = self._file(name).get(name)
        return t if str(self.device) == "cpu" else t.to(self.device)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Read elements [start, start + out.numel()) of the flattened tensor ``name`` into ``out``
        (1-D CPU, same dtype): no allocation, so a reused buffer never page-faults again."""
        return self._file(name).read_into(name, start, out)

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first file (every shard carries the same)."""
        fname = next(iter(sorted(self.files)), None)
        return dict(self.files[fname].metadata) if fname else {}

    def sampled_state(self) -> tuple[dict[str, torch.Tensor], list]:
        """All tensors as zero-copy views of private memory maps, for ``fingerprint``, which reads only
        ~256 entries per tensor, so only those pages become resident. Returns (state, maps); drop the
        state and close the maps when done."""
        state, maps = {}, []
        for fname, f in self.files.items():
            if not f.entries:
                continue
            with open(f.path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for frombuffer; never written
            maps.append(mm)
            for name, e in f.entries.items():
                if self.weight_map.get(name) != fname:
                    continue
                a, b = e["data_offsets"]
                dt = _DTYPES[e["dtype"]]
                n = (b - a) // dt.itemsize
                t = torch.frombuffer(mm, dtype=dt, count=n, offset=f.data_start + a) if n else torch.empty(0, dtype=dt)
                state[name] = t.reshape(e["shape"])
        return state, maps

    def close(self) -> None:
        for f in self.files.values():
            f.close()

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
# Writing
# --------------------------------------------------------------------------------------------
def plan_shards(specs: Iterable[tuple[str, tuple, torch.dtype]], max_shard_size: int | str) -> list[list[tuple]]:
    """The shard cut rule: ``specs`` (name, shape, dtype) in order, a new shard whenever the next tensor
    would take the current one past ``max_shard_size`` bytes (a tensor larger than the limit gets a
    shard of its own). Returns shards of (name, shape, dtype, nbytes)."""
    limit = parse_size(max_shard_size)
    shards: list[list[tuple]] = [[]]
    size = 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype, nbytes))
        size += nbytes
    return shards


class ShardedWriter:
    """Write tensors of known names / shapes / dtypes straight to their final offsets in sharded files.

    ``specs``: (name, shape, dtype) in output order, cut into shards by :func:`plan_shards`. Every file
    is created (header written, data area sized) on construction; ``write(name, tensor)`` and
    ``write_range(name, start, chunk)`` may come in any order; ``close()`` checks that every tensor
    was written and writes the index (``{"metadata": {"total_size", **metadata}, "weight_map"}``) when
    there are several shards. Files are created with mode 0o666 minus the umask.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, specs: Sequence[tuple[str, tuple, torch.dtype]],
                 max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None):
        shards = plan_shards(specs, max_shard_size)
        n = len(shards)
        self.directory, self.prefix = os.fspath(directory), prefix
        self.metadata = dict(metadata or {})
        self.fnames = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self.where: dict[str, tuple[int, int, int, tuple, torch.dtype]] = {}
        self.fds: list[int] = []
        self.total = 0
        meta = {"format": "pt", **self.metadata}
        try:
            for j, shard in enumerate(shards):
                header, off = {"__metadata__": meta}, 0
                for name, shape, dtype, nbytes in shard:
                    header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [off, off + nbytes]}
                    off += nbytes
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
                fd = os.open(os.path.join(self.directory, self.fnames[j]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                self.fds.append(fd)
                os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
                os.ftruncate(fd, 8 + len(raw) + off)
                start = 8 + len(raw)
                for name, shape, dtype, nbytes in shard:
                    self.where[name] = (j, start + header[name]["data_offsets"][0], nbytes, shape, dtype)
                self.total += off
        except BaseException:
            self.close(check=False)
            raise
        self.pending = set(self.where)

    def _pwrite(self, j: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(self.fds[j], view[done:done + _MAX_IO], offset + done)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        j, off, nbytes, shape, dtype = self.where[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise HfTaujpError(f"{name}: writing {tuple(tensor.shape)} {tensor.dtype}, laid out as {shape} {dtype}.")
        self._pwrite(j, _as_bytes(tensor), off)
        self.pending.discard(name)

    def write_range(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write a 1-D ``chunk`` as elements [start, start + numel) of the flattened tensor ``name``
        (the caller writes every element of the tensor exactly once across its ranges)."""
        j, off, nbytes, shape, dtype = self.where[name]
        if chunk.dtype != dtype:
            raise HfTaujpError(f"{name}: writing {chunk.dtype}, laid out as {dtype}.")
        size = chunk.element_size()
        if (start + chunk.numel()) * size > nbytes:
            raise HfTaujpError(f"{name}: range beyond the tensor")
        self._pwrite(j, _as_bytes(chunk), off + start * size)
        if start + chunk.numel() == math.prod(shape):
            self.pending.discard(name)

    def close(self, check: bool = True) -> list[str]:
        """Close the files; with ``check``, ``HfTaujpError`` if a tensor was never written, then write the
        index (several shards). Returns the files written (shards, then the index)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if not check:
            return []
        if self.pending:
            raise HfTaujpError(f"{len(self.pending)} output tensors were never written (e.g. {sorted(self.pending)[0]!r}).")
        if len(self.fnames) == 1:
            return list(self.fnames)
        wm = {name: self.fnames[w[0]] for name, w in self.where.items()}
        index = {"metadata": {"total_size": self.total, **self.metadata}, "weight_map": wm}
        with open(os.path.join(self.directory, index_name(self.prefix)), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        return self.fnames + [index_name(self.prefix)]


def save_safetensors_sharded(
    tensors: Mapping[str, torch.Tensor],
    directory: str | os.PathLike,
    prefix: str,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``tensors`` into ``directory`` (which must already exist) as one or more safetensors files,
    through :class:`ShardedWriter` (tensors may live on any device and share storage; each is copied
    to CPU on its own). ``HfTaujpError`` for a value that is not a tensor or a dtype safetensors cannot
    store. Returns the list of files written (shards and index)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise HfTaujpError(f"Value for {name!r} is a {type(t).__name__}, not a tensor.")
    writer = ShardedWriter(directory, prefix, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()],
                           max_shard_size, metadata)
    try:
        for name, t in tensors.items():
            writer.write(name, t)
    except BaseException:
        writer.close(check=False)
        raise
    return writer.close()
