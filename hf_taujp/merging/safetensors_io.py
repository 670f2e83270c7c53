"""Low-memory safetensors reading and writing for streaming merges.

Why not ``safetensors.safe_open``: it memory-maps every file, and the pages of a mapped file that a
merge has touched count in the process's resident set (RSS) until the file is closed, so reading a
base and four task vectors tensor by tensor still ends with ~5 × the model in RSS. Here tensors
are read with ``pread`` into fresh buffers that are freed as soon as the merge drops them, and the
output is written with ``pwrite`` at offsets laid out in advance (every output shape and dtype is
known from the base's header), so no output shard is ever held in memory.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the data; offsets are relative to the end of the header. Sharded artifacts use transformers'
index ``<prefix>.safetensors.index.json``.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence

import torch

from .. import hub

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_IO = 1 << 30  # bytes per pread / pwrite call (Linux caps one call near 2 GiB)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise hub.HfTaujpError(f"dtype {dtype} cannot be stored in safetensors") from None


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class _File:
    """One safetensors file: header parsed once, tensors read on demand with ``pread``."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise ValueError("shorter than 8 bytes")
                (n,) = struct.unpack("<Q", raw)
                if n > 100_000_000:
                    raise ValueError(f"header length {n} is implausible")
                header = json.loads(f.read(n))
            size = os.path.getsize(path)
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise hub.CorruptFileError(f"Cannot read {path!r}: truncated or corrupt safetensors file ({e}).") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        for name, e in header.items():
            if e.get("dtype") not in _DTYPES:
                raise hub.CorruptFileError(f"{path!r}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}.")
            a, b = e["data_offsets"]
            if b < a or self.data_start + b > size:
                raise hub.CorruptFileError(f"{path!r}: tensor {name!r} lies beyond the end of the file (truncated?).")
        self._fd: int | None = None

    def _fileno(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = _DTYPES[e["dtype"]]
        a, b = e["data_offsets"]
        buf = torch.empty(b - a, dtype=torch.uint8)
        view = memoryview(buf.numpy()) if b > a else memoryview(b"")
        done, fd = 0, self._fileno()
        while done < b - a:
            got = os.preadv(fd, [view[done:done + _MAX_IO]], self.data_start + a + done)
            if got <= 0:
                raise hub.CorruptFileError(f"{self.path!r}: unexpected end of file reading {name!r}.")
            done += got
        return buf.view(dtype).reshape(e["shape"])

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Read elements [start, start + out.numel()) of the flattened tensor ``name`` into ``out``
        (1-D, same dtype): no allocation, so a reused buffer never page-faults again."""
        e = self.entries[name]
        if _DTYPES[e["dtype"]] != out.dtype:
            raise hub.HfTaujpError(f"{name}: stored as {e['dtype']}, buffer is {out.dtype}")
        size = out.element_size()
        a = e["data_offsets"][0] + start * size
        nbytes = out.numel() * size
        if a + nbytes > e["data_offsets"][1]:
            raise hub.HfTaujpError(f"{name}: range beyond the tensor")
        view = memoryview(out.view(torch.uint8).numpy())
        done, fd = 0, self._fileno()
        while done < nbytes:
            got = os.preadv(fd, [view[done:done + _MAX_IO]], self.data_start + a + done)
            if got <= 0:
                raise hub.CorruptFileError(f"{self.path!r}: unexpected end of file reading {name!r}.")
            done += got
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StreamReader:
    """Tensor-by-tensor reads of a (possibly sharded) safetensors artifact without memory-mapping.

    Same surface as ``hub.SafetensorsReader``: ``keys()``, ``in``, ``shape(name)``, ``dtype(name)``,
    ``get(name)``, ``close()``; plus ``sampled_state()`` for fingerprints.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str):
        self.directory, self.prefix = os.fspath(directory), prefix
        index = os.path.join(self.directory, f"{prefix}.safetensors.index.json")
        single = os.path.join(self.directory, f"{prefix}.safetensors")
        self.files: dict[str, _File] = {}
        self.weight_map: dict[str, str] = {}
        if os.path.isfile(index):
            wm = hub.read_json(index, what="safetensors index").get("weight_map")
            if not isinstance(wm, dict):
                raise hub.CorruptFileError(f"Index {index!r} has no 'weight_map'.")
            for fname in sorted(set(wm.values())):
                path = os.path.join(self.directory, fname)
                if not os.path.isfile(path):
                    raise hub.CorruptFileError(f"Missing file {path!r} (listed for '{prefix}').")
                self.files[fname] = _File(path)
            for name, fname in wm.items():
                if name not in self.files[fname].entries:
                    raise hub.CorruptFileError(f"Shard {fname!r} lacks tensor {name!r} that its index lists.")
                self.weight_map[name] = fname
        elif os.path.isfile(single):
            fname = os.path.basename(single)
            self.files[fname] = _File(single)
            self.weight_map = {k: fname for k in self.files[fname].entries}
        else:
            if os.path.isdir(self.directory):
                hub._refuse_pickles(self.directory, f"Artifact '{prefix}'")
            raise hub.CorruptFileError(f"No '{prefix}.safetensors' nor its index in {self.directory!r}.")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _entry(self, name: str) -> dict:
        if name not in self.weight_map:
            raise KeyError(f"Tensor {name!r} not found in '{self.prefix}' at {self.directory!r}.")
        return self.files[self.weight_map[name]].entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entry(name)["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        self._entry(name)
        return self.files[self.weight_map[name]].get(name)

    def read_into(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        self._entry(name)
        return self.files[self.weight_map[name]].read_into(name, start, out)

    def sampled_state(self) -> tuple[dict[str, torch.Tensor], list]:
        """All tensors as zero-copy views of private memory maps, for ``task_vector.fingerprint``, which
        reads only ~256 entries per tensor, so only those pages become resident. Returns (state, maps);
        drop the state and close the maps when done."""
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
                n = (b - a) // torch.tensor([], dtype=dt).element_size()
                t = torch.frombuffer(mm, dtype=dt, count=n, offset=f.data_start + a) if n else torch.empty(0, dtype=dt)
                state[name] = t.reshape(e["shape"])
        return state, maps

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedWriter:
    """Write tensors of known names / shapes / dtypes straight to their final offsets in sharded files.

    ``specs``: (name, shape, dtype) in output order; shards are cut at ``max_shard_size`` bytes like
    ``hub.save_safetensors_sharded`` (same file names and index). ``write(name, tensor)`` may come in
    any order; ``close()`` checks that every tensor was written and writes the index.
    """

    def __init__(self, directory: str, prefix: str, specs: Sequence[tuple[str, tuple, torch.dtype]],
                 max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None):
        limit = hub.parse_size(max_shard_size)
        shards: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
            if shards[-1] and size + nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.directory, self.prefix = directory, prefix
        self.fnames = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        self.where: dict[str, tuple[int, int, int, tuple, torch.dtype]] = {}
        self.fds: list[int] = []
        self.total = 0
        meta = {"format": "pt", **dict(metadata or {})}
        for j, shard in enumerate(shards):
            header, off = {"__metadata__": meta}, 0
            for name, shape, dtype, nbytes in shard:
                header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [off, off + nbytes]}
                off += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
            fd = os.open(os.path.join(directory, self.fnames[j]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(raw)) + raw, 0)
            os.ftruncate(fd, 8 + len(raw) + off)
            start = 8 + len(raw)
            for name, shape, dtype, nbytes in shard:
                a = header[name]["data_offsets"][0]
                self.where[name] = (j, start + a, nbytes, shape, dtype)
            self.total += off
        self.pending = set(self.where)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        j, off, nbytes, shape, dtype = self.where[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise hub.HfTaujpError(f"{name}: writing {tuple(tensor.shape)} {tensor.dtype}, laid out as {shape} {dtype}.")
        view = _as_bytes(tensor)
        done = 0
        while done < nbytes:
            done += os.pwrite(self.fds[j], view[done:done + _MAX_IO], off + done)
        self.pending.discard(name)

    def write_range(self, name: str, start: int, chunk: torch.Tensor) -> None:
        """Write a 1-D ``chunk`` as elements [start, start + numel) of the flattened tensor ``name``
        (the caller writes every element of the tensor exactly once across its ranges)."""
        j, off, nbytes, shape, dtype = self.where[name]
        if chunk.dtype != dtype:
            raise hub.HfTaujpError(f"{name}: writing {chunk.dtype}, laid out as {dtype}.")
        size = chunk.element_size()
        if (start + chunk.numel()) * size > nbytes:
            raise hub.HfTaujpError(f"{name}: range beyond the tensor")
        view = _as_bytes(chunk)
        done, base = 0, off + start * size
        while done < len(view):
            done += os.pwrite(self.fds[j], view[done:done + _MAX_IO], base + done)
        if start + chunk.numel() == math.prod(shape):
            self.pending.discard(name)

    def close(self, check: bool = True) -> list[str]:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if not check:
            return []
        if self.pending:
            raise hub.HfTaujpError(f"{len(self.pending)} output tensors were never written (e.g. {sorted(self.pending)[0]!r}).")
        if len(self.fnames) > 1:
            wm = {name: self.fnames[w[0]] for name, w in self.where.items()}
            with open(os.path.join(self.directory, f"{self.prefix}.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": wm}, f, indent=2, sort_keys=True)
            return self.fnames + [f"{self.prefix}.safetensors.index.json"]
        return list(self.fnames)
