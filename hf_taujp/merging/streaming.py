"""Out-of-core merges: read base, vectors and statistics tensor by tensor from (sharded) safetensors
folders (local or Hub), write sharded safetensors + index into an atomic output folder.

Memory: elementwise methods (task arithmetic, Fisher averaging, gradient matching) stream slices of
``chunk_elements`` entries through two reused sets of K + 1 (+ statistics) buffers (~10 MB at the
default for four fp32 vectors); the others (TIES, DARE, RegMean, ...) see whole tensors, read into
two reused sets of buffers the size of the largest tensor: peak ≈ 2 (K + 1) × the largest tensor
plus the method's working set, never K × the model. One thread reads the next job and another
writes the previous result while the caller's thread merges. Inputs are read with ``pread`` and the
output written with ``pwrite`` at precomputed offsets (``hf_taujp.safetensors_io``), so neither
memory-mapped input pages nor output shards accumulate in memory.

The plan (what a merge decides before its first read) is :mod:`.streaming_plan`; this module runs it
(the per-tensor loop) and writes the output folder's other files.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .. import hub
from ..task_vector import FORMAT as TV_FORMAT
from .layouts import weight_layout
from .methods import MissingStatisticsError, check_finite, parameter_seed, require_statistics  # noqa: F401
from ..safetensors_io import SafetensorsReader, ShardedWriter  # noqa: F401
from .streaming_plan import (_Plan, _aliases, _folder_fingerprint, _model_prefix, _plan,  # noqa: F401
                             _stat_reader)


@contextlib.contextmanager
def _intra_op_threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (restored after); ``None`` leaves it alone.

    Why 1 by default: a streaming merge is bound by memory traffic; its other core serves the I/O
    thread, and OpenMP regions on chunk-sized ops stall for milliseconds whenever a core is busy
    with another process (measured 5-60x slower on a shared 2-core machine)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Files of the base folder a merged model folder needs to load besides its weights: configs, tokenizer
# files, chat templates and the base's custom code (auto_map modules). Weights, weight indexes, the
# model card (we write our own) and pickles (*.bin, *.pt: never copied) are left out.
_COPY_SUFFIXES = (".json", ".txt", ".model", ".py", ".jinja", ".tiktoken")


def _files_to_copy(base_dir: str) -> list[str]:
    out = []
    for f in sorted(os.listdir(base_dir)):
        if f.startswith(".") or not os.path.isfile(os.path.join(base_dir, f)) or not f.endswith(_COPY_SUFFIXES):
            continue
        if f.endswith(".safetensors.index.json") or f.endswith(".bin.index.json"):
            continue
        out.append(f)
    return out


def merge_streaming(
    base: str,
    vectors: Sequence[str],
    output: str,
    method: str = "task_arithmetic",
    *,
    weights=None,
    fishers: Sequence[str] | None = None,
    grams: Sequence[str] | None = None,
    base_fisher: str | None = None,
    dtype=None,
    output_kind: str | None = None,
    max_shard_size: int | str = "2GB",
    recipe: dict | None = None,
    check_base_model: bool = True,
    trust_remote_code: bool = False,
    weight_layout: str | dict | None = None,
    chunk_elements: int = 1 << 18,  # 1 MiB of fp32 per buffer: fits L2; 1 << 20 cost ~15% more CPU (1.3 GB Llama)
    compute_threads: int | None = 1,
    progress: bool = True,
    **params,
) -> str:
    """Merge TaskVector folders / repo ids into the model folder / repo id ``base`` tensor by tensor.

    θ_p = θ0_p + method(θ0_p, [τ_t,p], **params) in float32, cast to ``dtype`` (default: the base
    tensor's dtype). ``output_kind="model"`` (default for weight vectors) writes a
    ``save_pretrained``-loadable folder (model shards + index; configs, tokenizer files, chat template
    and the base's custom code ``*.py`` copied from the base); ``"task_vector"`` (default, and the only
    choice, for linear vectors: a tangent is not weights) writes the merged Δ as a TaskVector folder
    of the vectors' kind. ``params`` are the method's declared parameters (others raise
    ``MergeConfigError``); the rules of :func:`merge` hold here too (negation, tied parameters, the
    base Fisher that gradient matching requires, finite results). ``trust_remote_code``: needed for a
    base with custom code, whose architecture is built on the meta device to find its tied parameters
    (:func:`hf_taujp.tied.find_tied_groups` says which bases need no build). Statistics (``fishers``
    for fisher_average / gradient_matching, ``grams`` for regmean: folders or repo ids, one per
    vector) are read the same way. A factored (low-rank) vector folder is read as its full τ, computed
    from its factors tensor by tensor (slice by slice); the output holds full tensors. A folder or repo is read at its root: for one in a sub-folder (the
    recipes' ``<method>/<task>/`` layout) pass ``hub.resolve_pretrained_dir(repo, subfolder=...)``, or use
    a recipe's ``subfolder:``; a root that holds vectors only in sub-folders raises ``CorruptFileError``
    listing them.
    Vectors of different bases, or made from another base than ``base`` (recorded fingerprint),
    raise ``BaseModelMismatchError`` before anything is written. Methods whose result depends on which
    side of a 2-D weight is its output (``iso_cts``, ``wudi``) learn which weights are Conv1D (in, out)
    from the base's architecture, built on the meta device from its config.json (the rule of
    :class:`~hf_taujp.merging.merge.WeightLayouts`); ``weight_layout`` ("out_in" / "in_out" for the 2-D
    tensors it does not cover, or {name: layout}) is needed only when that cannot be built. Elementwise methods
    (registered ``elementwise=True``) run on slices of ``chunk_elements`` entries, read into reused
    buffers (0: whole tensors); other methods see whole tensors. One thread reads the next slice /
    tensor and another writes the previous result while this thread merges, with ``compute_threads`` torch
    intra-op threads (default 1; ``None`` leaves torch's setting). Returns ``output``.
    """
    readers: list[SafetensorsReader] = []  # every open reader, closed whatever happens
    try:
        plan = _plan(base, vectors, method, readers, weights=weights, fishers=fishers, grams=grams,
                     base_fisher=base_fisher, dtype=dtype, output_kind=output_kind, check_base_model=check_base_model,
                     trust_remote_code=trust_remote_code, chunk_elements=chunk_elements, params=params,
                     weight_layout=weight_layout)
        with hub.atomic_dir(output) as tmp:
            writer = ShardedWriter(tmp, plan.prefix, [(n, plan.base_r.shape(n), plan.out_dt(n)) for n in plan.names],
                                   max_shard_size)
            try:
                _TensorLoop(plan, writer).run(compute_threads, progress)
            except BaseException:
                writer.close(check=False)
                raise
            writer.close()
            _write_side_files(plan, tmp, base, vectors, recipe)
    finally:
        for r in readers:
            r.close()
    return output


# --------------------------------------------------------------------------------------------
# The per-tensor loop: read jobs j+1.. on one thread, merge job j here, write job j−1 on another
# --------------------------------------------------------------------------------------------
class _TensorLoop:
    """Runs a plan's jobs through reused read buffers: ``SLICE_SETS`` sets for slices (the reader runs
    up to ``SLICE_SETS`` − 1 slices ahead of the merge) and two sets, of the largest such tensor's
    size, for whole-tensor jobs; reused, so no fresh pages (page faults + zeroing) per tensor or
    chunk. Job j's ``slot`` is the buffer set it reads into and ``conflict[j]`` the job that used that
    set before it (its read waits for that job's write)."""

    # Double buffering: a deeper ring (4 sets, the reader 3 slices ahead) was slower, not faster, on
    # the 1.3 GB Llama of benchmarks/bench_merge_throughput.py (median CPU 3.8 s against 3.0 s; more
    # buffers fall out of cache), even on a loaded machine where threads wait to be scheduled.
    SLICE_SETS = 2

    def __init__(self, plan: _Plan, writer: ShardedWriter):
        self.plan, self.writer = plan, writer
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.full_size = max([n for kind, _, _, n in plan.jobs if kind == "full"], default=0)
        self.slot: list[tuple] = []
        self.conflict: list[int | None] = []
        count, last = {"slice": 0, "full": 0}, {}
        for j, (kind, *_rest) in enumerate(plan.jobs):
            slot = (kind, count[kind] % (self.SLICE_SETS if kind == "slice" else 2))
            count[kind] += 1
            self.slot.append(slot)
            self.conflict.append(last.get(slot))
            last[slot] = j

    def _buf(self, key, dtype, n, size=None):
        size = self.plan.chunk if size is None else size
        t = self.buffers.get((key, dtype))
        if t is None or t.numel() < n:
            t = self.buffers[(key, dtype)] = torch.empty(max(size, n), dtype=dtype)
        return t[:n]

    def read(self, j: int):
        """Job ``j``'s inputs (base, τs, statistics, base Fisher); runs in the reader thread (pread releases the GIL)."""
        plan = self.plan
        kind, name, start, n = plan.jobs[j]
        par = self.slot[j]
        if kind == "slice":
            def get(r, slot):
                rn = plan.stored(r, name)
                return None if rn is None else r.read_into(rn, start, self._buf((par, slot), r.torch_dtype(rn), n))
        else:
            def get(r, slot):  # whole tensor, into a reused buffer of the largest tensor's size
                rn = plan.stored(r, name)
                if rn is None:
                    return None
                out = self._buf((par, slot, "full"), r.torch_dtype(rn), math.prod(r.shape(rn)), self.full_size)
                return r.read_into(rn, 0, out).reshape(r.shape(rn))
        b = get(plan.base_r, "base")
        if not plan.merged_here(name):
            return b, None, None, None
        taus = [get(r, ("tau", k)) for k, r in enumerate(plan.vec_r)]
        stats = None
        if plan.stat_readers is not None:
            stats = [get(r, ("stat", k)) for k, r in enumerate(plan.stat_readers)]
        bf = get(plan.bfr, "bf") if plan.bfr is not None else None
        return b, taus, stats, bf

    def compute(self, name, b, taus, stats, bf) -> torch.Tensor:
        """θ0 + method(θ0, τs) (or the merged Δ for a task-vector output) in the output dtype;
        ``MissingStatisticsError`` for a statistic missing at ``name``. The result may be a view of this
        job's read buffers (θ0's, for a model): ``run`` lets no read reuse them before it is written."""
        plan = self.plan
        if taus is None:
            return b.to(plan.out_dt(name)) if b.is_floating_point() else b
        needs = plan.spec.needs
        taus = [torch.zeros(b.shape, dtype=torch.float32) if t is None else
                (t if t.dtype in (torch.float32, torch.float64) else t.float()) for t in taus]
        kw = dict(plan.params)
        if plan.seed is not None:  # by the canonical name: a stored tied copy draws the same masks
            kw["seed"] = parameter_seed(plan.seed, plan.canon_of.get(name, name))
        if stats is not None:
            if needs == "gram":
                if any(s is not None for s in stats):
                    missing = [plan.labels[k] for k, s in enumerate(stats) if s is None]
                    if missing:
                        raise MissingStatisticsError(f"gram of {missing[0]} has no entry for {name} (others do)")
                    kw["grams"] = stats
                    kw["layout"] = weight_layout(name, plan.layouts, b.shape, stats[0].shape, plan.layout_default)
            else:
                for k, st in enumerate(stats):
                    if st is None:
                        raise MissingStatisticsError(
                            f"{needs} of {plan.labels[k]} ({plan.stat_paths[k]!r}) has no entry for {name}")
                kw["fishers"] = stats
            if plan.bfr is not None:
                if bf is None:  # the in-memory rule: no silent δ-only prior for this parameter
                    raise MissingStatisticsError(f"base fisher ({plan.base_fisher!r}) has no entry for {name}")
                kw["base_fisher"] = bf
        lay = plan.layout_of.get(plan.canon_of.get(name, name))
        if lay is not None:
            kw["layout"] = lay
        if "name" in plan.spec.driver_args:
            kw["name"] = name
        delta = plan.spec.fn(b, taus, weights=plan.weights, **kw)
        if plan.output_kind == "model":
            inputs = {t.untyped_storage().data_ptr() for t in [b, *taus, *(stats or []), bf] if t is not None}
            ptr = delta.untyped_storage().data_ptr()
            if b.dtype == delta.dtype and ptr != b.untyped_storage().data_ptr():
                # into θ0's read buffer (x + y == y + x exactly): Δ is freed here and its memory reused by
                # the next job's Δ, where a result alive until written made the allocator return and
                # re-fault its pages (~130k page faults, 8% of the CPU time of a 1.3 GB merge)
                res = b.add_(delta)
            else:
                res = delta.add_(b) if ptr not in inputs else delta + b  # in place: no second buffer
            del delta
        else:
            res = delta
        res = res.to(plan.out_dt(name))
        check_finite(res, name)
        return res

    def write(self, j: int, res: torch.Tensor) -> None:  # I/O thread
        kind, name, start, n = self.plan.jobs[j]
        if kind == "slice":
            self.writer.write_range(name, start, res.reshape(-1))
        else:
            self.writer.write(name, res)

    def _read_after(self, j: int, write_before):
        """Job ``j``'s read once ``write_before`` (the write of ``conflict[j]``, whose buffers job j
        reuses: a copied tensor is written straight from its read buffer) is done; a failed write
        raises here."""
        if write_before is not None:
            write_before.result()
        return self.read(j)

    def run(self, compute_threads: int | None, progress: bool) -> None:
        plan, jobs = self.plan, self.plan.jobs
        # Three threads: one reads (jobs j + 1, ...), this one merges (job j), one writes (job j − 1).
        # Why not one I/O thread for both: reads and writes (kernel copies) then add up on one core
        # while the merge's core waits. A read is submitted once the job that used its buffer set
        # before it has been merged and handed to the writer, and runs once that write is done.
        ahead = self.SLICE_SETS - 1
        with _intra_op_threads(compute_threads), ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
            reads: dict[int, Any] = {}
            writes: dict[int, Any] = {}
            nxt = 0  # the next job whose read is not submitted yet
            bar = tqdm(total=len(plan.names), desc=f"merge ({plan.method})", disable=not progress)
            for j, (kind, name, start, n) in enumerate(jobs):
                while nxt < len(jobs) and nxt <= j + ahead:
                    c = self.conflict[nxt]
                    if c is not None and c >= j:  # its buffers are not merged yet (c < j: write submitted)
                        break
                    reads[nxt] = reader.submit(self._read_after, nxt, writes.get(c))
                    nxt += 1
                data = reads.pop(j).result()
                for i in [i for i, w in writes.items() if w.done()]:
                    writes.pop(i).result()  # surface a failed write now
                res = self.compute(name, *data)
                del data
                writes[j] = writer.submit(self.write, j, res)
                del res
                if start + n == math.prod(plan.base_r.shape(name)):
                    bar.update(1)
            for i in sorted(writes):
                writes[i].result()
            bar.close()


# --------------------------------------------------------------------------------------------
# The output folder's other files: configs / tokenizer copied from the base, or a task-vector config
# --------------------------------------------------------------------------------------------
def _write_side_files(plan: _Plan, tmp: str, base, vectors, recipe) -> None:
    out_dtype, method = plan.out_dtype, plan.method
    if plan.output_kind == "model":
        for fname in _files_to_copy(plan.base_dir):
            shutil.copy2(os.path.join(plan.base_dir, fname), os.path.join(tmp, fname))
        if out_dtype is not None and os.path.isfile(os.path.join(tmp, "config.json")):
            cfg = hub.read_json(os.path.join(tmp, "config.json"))
            cfg["dtype"] = str(out_dtype).replace("torch.", "")
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
    else:
        c0 = next((c for c in plan.cfgs if c.get("base_fingerprint")), plan.cfgs[0])
        num = sum(int(torch.Size(plan.base_r.shape(n)).numel()) for n in plan.names)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"format": TV_FORMAT, "format_version": 1, "base_model": c0.get("base_model"),
                       "base_model_revision": c0.get("base_model_revision"),
                       "base_fingerprint": c0.get("base_fingerprint"), "kind": plan.vec_kind,
                       "task": f"merge:{method}", "training": {"merge_recipe": recipe or {}},
                       "dtype": str(out_dtype).replace("torch.", "") if out_dtype else None,
                       "num_parameters": num}, f, indent=2)
    params = plan.params  # as before the split: the card lists the method's parameters but not the seed
    card = hub.model_card_text(f"Merged with hf-taujp ({method})", "```json\n"
                               + json.dumps(recipe or {"method": method, "vectors": list(map(str, vectors)),
                                                      "weights": plan.weights,
                                                      **{k: v for k, v in params.items() if isinstance(v, (int, float, str))}},
                                            indent=2, default=str)
                               + "\n```", base_model=base if isinstance(base, str) else None, tags=["merge"])
    # the text, not hub.model_card(...).save(): ModelCard imports the Hub client (~0.4 s of each CLI run)
    with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8", newline="") as f:
        f.write(card)
