"""The τJp indicator of Yoshida et al. (ICLR 2025, Sec. 4): M[t, t'] = E_{x' ∼ D_t'} ‖J_θ f(x'; θ0)·τ_t‖
(the norm of ``hf_taujp.trainer.penalty``, the one implementation the training penalty uses too)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import HfTaujpError
from ..linearize import linearized_forward
from .predict import _batches, _device_of, _select, _to


@torch.no_grad()
def taujp_matrix(
    base: torch.nn.Module,
    task_vectors: Mapping[str, object] | Sequence[object],
    datasets: Mapping[str, object] | Sequence[object],
    *,
    output: str | Callable = "logits",
    batch_size: int = 32,
    collate_fn: Callable | None = None,
    max_examples: int | None = None,
    norm: str = "l2",
    method: str | Callable | None = None,
) -> dict:
    """The T×T τJp indicator: M[t][t'] = mean_{x' ∈ D_t'} ‖J_θ f(x'; θ0)·τ_t‖ (Yoshida et al. 2025).

    Args:
        base: θ0 (its parameters are read, never changed).
        task_vectors: `{name: TaskVector}` (or a list, named by `.task` / position); tensors keyed by
            base parameter names. Works for both kinds: J at θ0 applied to τ.
        datasets: `{name: examples}` in the same order as the task vectors (row t' = inputs of task t').
        output: output field penalised (default "logits"), or `fn(outputs, batch) -> Tensor`,
            applied to the tangent output (must be linear: selection / pooling).
        max_examples: use at most this many examples per dataset.
        norm: the per-position form, one of ``hf_taujp.trainer.penalty.TAUJP_NORMS`` ("l2", the paper's;
            "sq_l2", "rms", "relative", "kl"; see ``per_position``).
        Reduction and masks are the trainer's (`hf_taujp.trainer.penalty.penalty_terms` / `output_mask`):
        mean over all examples (valid tokens, with the mask of the penalised output) of each dataset.
        Use held-out inputs, not the ones the penalty was trained on.
    Raises:
        HfTaujpError: unknown norm; a vector with parameters the base lacks; no mask fits a token-level output.
    Returns:
        `{"tasks": [...], "datasets": [...], "matrix": [[M[t][t'] for t'] for t]}` (rows: task vectors).
    """
    from ..trainer.penalty import TAUJP_NORMS, output_mask, penalty_terms, prepare_reg_batch

    if norm not in TAUJP_NORMS:
        raise HfTaujpError(f"unknown taujp norm {norm!r} (expected one of {TAUJP_NORMS})")
    tvs = dict(task_vectors) if isinstance(task_vectors, Mapping) else {
        (getattr(tv, "task", None) or f"task{i}"): tv for i, tv in enumerate(task_vectors)}
    dss = dict(datasets) if isinstance(datasets, Mapping) else {f"data{i}": d for i, d in enumerate(datasets)}
    params = dict(base.named_parameters())
    was = base.training
    base.eval()
    matrix = []
    try:
        for tname, tv in tqdm(tvs.items(), desc="τJp matrix", leave=False):
            missing = [k for k in tv.keys() if k not in params]
            if missing:
                raise HfTaujpError(f"task vector {tname!r} has parameters the base lacks: {missing[:5]}")
            primals = {k: params[k] for k in tv.keys()}
            tangents = {k: tv[k] for k in tv.keys()}
            row = []
            for dname, ds in dss.items():
                ds = ds if max_examples is None else [ds[i] for i in range(min(max_examples, len(ds)))]
                total, count = 0.0, 0.0
                for batch in _batches(ds, batch_size, collate_fn):
                    batch = _to(prepare_reg_batch(base, batch), _device_of(base))
                    out, tan = linearized_forward(base, primals, tangents, (), batch, method=method)
                    t = _select(tan, output, batch).double()
                    f = _select(out, output, batch).double()
                    # the trainer's reduction and mask rule: mean over examples / valid tokens of the whole set
                    s_, c_ = penalty_terms(t, output_mask(base, batch, t, None if callable(output) else output), norm, f)
                    total += float(s_)
                    count += float(c_)
                row.append(total / max(count, 1.0))
            matrix.append(row)
    finally:
        base.train(was)
    return {"tasks": list(tvs), "datasets": list(dss), "norm": norm, "matrix": matrix}
