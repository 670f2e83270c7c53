"""Small helpers every recipe uses: seeded subsampling, θ0 + α·τ written into a model in place, arguments as
JSON, the number of torch threads a shared machine can take, and the CLI's comma lists of numbers."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Mapping, Sequence

import torch

__all__ = ["subsample", "weights_of", "jsonable", "torch_threads", "float_list"]


def subsample(rows: Sequence, n: int | None, seed: int) -> list:
    """``n`` of ``rows`` (seeded, in their original order); all of them when ``n`` is None or ≥ their number."""
    if n is None or n >= len(rows):
        return list(rows)
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    return [rows[i] for i in sorted(idx[:n])]


@contextlib.contextmanager
def weights_of(model):
    """Yield set(alpha, vector) that writes θ0 + α·τ into `model` in place; θ0 is restored on exit."""
    params = dict(model.named_parameters())
    saved = {}

    def set_(alpha, tv):
        with torch.no_grad():
            for k, t in tv.items():
                if k not in saved:
                    saved[k] = params[k].detach().clone()
                params[k].copy_(saved[k] + alpha * t.to(saved[k].dtype))

    try:
        yield set_
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


def jsonable(arguments: Mapping) -> dict:
    """A recipe's arguments as JSON (tuples → lists), so a run can be replayed from its results.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items()}


def _idle_cores(window: float = 0.5) -> float | None:
    """Cores idle over the next `window` seconds (Linux /proc/stat), or None where that is not readable."""
    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            v = [float(x) for x in f.readline().split()[1:]]
        return v[3] + (v[4] if len(v) > 4 else 0.0), sum(v)  # idle + iowait, total

    try:
        i0, t0 = sample()
        time.sleep(window)
        i1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (i1 - i0) / max(t1 - t0, 1e-9)


def torch_threads(threads: int) -> int:
    """torch CPU threads: `threads` > 0 as given; 0 = the cores idle right now, at least 1.

    OpenMP threads that outnumber the free cores spin against the other processes (measured here: a run
    that took 98 s on a quiet machine took 17 min beside a busy process). The idle cores are measured
    over half a second at start-up (/proc/stat; elsewhere the 1-minute load average is used)."""
    if threads > 0:
        return threads
    cores = os.cpu_count() or 1
    idle = _idle_cores()
    if idle is None:
        try:
            idle = cores - os.getloadavg()[0]
        except OSError:
            idle = cores
    return max(1, min(cores, int(idle + 0.5)))


def float_list(text: str) -> list[float]:
    """A CLI comma list of numbers ("0.1,1,10") as floats (argparse ``type=``); an empty list is an error too
    (the recipes index its first entry)."""
    import argparse

    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, got {text!r}")
    return out
