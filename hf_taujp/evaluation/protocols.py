"""The evaluation protocols of task arithmetic: ξ (disentanglement error), task addition over an α grid
chosen on validation, task negation under a control-accuracy constraint (formulas in the package docstring)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import HfTaujpError
from ..linearize import linearized_forward
from ..merging.search import DEFAULT_GRID, select_coefficient
from .predict import _batches, _device_of, _select, _split, accuracy, predictions

DEFAULT_ALPHAS = DEFAULT_GRID  # α grid of the task-arithmetic protocol: one definition, in merging.search


# ------------------------------------------------------------------------ disentanglement error
def disentanglement_error(
    base: torch.nn.Module,
    tv1,
    tv2,
    data1,
    data2,
    *,
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    alphas2: Sequence[float] | None = None,
    linear: bool = False,
    batch_size: int = 32,
    collate_fn: Callable | None = None,
    predict_fn: Callable | None = None,
    predict_fn2: Callable | None = None,
) -> dict:
    """ξ(α1, α2) = Σ_{t=1,2} E_{x ∼ D_t} 1{pred_t(x; θ0 + α_t τ_t) ≠ pred_t(x; θ0 + α1 τ1 + α2 τ2)}
    (Ortiz-Jimenez et al. 2023, Eq. 5, with the prediction error as the distance).

    `linear=True` reads the vectors as tangents of the linearized model (f_lin). `predict_fn` /
    `predict_fn2` map (model, batch) to labels of task 1 / 2 (e.g. with per-task heads); default argmax of
    logits. Returns `{"alphas1", "alphas2", "xi": [[ξ(a1, a2) for a2] for a1], "mean"}`.
    """
    alphas2 = list(alphas if alphas2 is None else alphas2)
    alphas1 = list(alphas)
    kw = dict(batch_size=batch_size, collate_fn=collate_fn)

    def preds(tv, a, data, fn):
        return predictions(tv.apply_to(base, a, linear=linear), data, predict_fn=fn, **kw)[0]

    single1 = {a: preds(tv1, a, data1, predict_fn) for a in alphas1}
    single2 = {a: preds(tv2, a, data2, predict_fn2) for a in alphas2}
    xi = []
    for a1 in tqdm(alphas1, desc="ξ(α1, α2)", leave=False):
        row = []
        for a2 in alphas2:
            both = tv1 * a1 + tv2 * a2
            m = both.apply_to(base, 1.0, linear=linear)
            p1 = predictions(m, data1, predict_fn=predict_fn, **kw)[0]
            p2 = predictions(m, data2, predict_fn=predict_fn2, **kw)[0]
            row.append(float((p1 != single1[a1]).float().mean() + (p2 != single2[a2]).float().mean()))
        xi.append(row)
    flat = [v for r in xi for v in r]
    return {"alphas1": alphas1, "alphas2": alphas2, "linear": linear, "xi": xi, "mean": sum(flat) / len(flat)}


# ---------------------------------------------------------------------------- task addition
def _sum_vectors(vectors: Sequence):
    total = vectors[0]
    for v in vectors[1:]:
        total = total + v
    return total


@torch.no_grad()
def _linear_logits(base: torch.nn.Module, vectors: Sequence, dataset, batch_size: int, collate_fn: Callable | None):
    """Logits of f_lin over `dataset` split into their parts: (f(x; θ0), [J f(x; θ0)·τ_k for each vector], labels).

    f_lin(x; θ0 + α τ) = f(x; θ0) + α J f(x; θ0)·τ exactly, so a whole α grid costs one jvp per vector.
    """
    params = dict(base.named_parameters())
    keys = list(dict.fromkeys(k for v in vectors for k in v.keys()))
    missing = [k for k in keys if k not in params]
    if missing:
        raise HfTaujpError(f"task vector has parameters the base lacks: {missing[:5]}")
    primals = {k: params[k] for k in keys}
    dev = _device_of(base)
    prim, tans, golds = [], [[] for _ in vectors], []
    was = base.training
    base.eval()
    try:
        for batch in _batches(dataset, batch_size, collate_fn):
            inputs, labels = _split(batch, dev)
            if labels is None:
                raise HfTaujpError("accuracy needs labels ('labels' or 'label') in the evaluation dataset")
            golds.append(labels)
            for i, v in enumerate(vectors):
                tangents = {k: v[k] if k in v.keys() else torch.zeros_like(params[k]) for k in keys}
                p, t = linearized_forward(base, primals, tangents, (), inputs)
                if i == 0:
                    prim.append(_select(p, "logits", inputs).float().cpu())
                tans[i].append(_select(t, "logits", inputs).float().cpu())
    finally:
        base.train(was)
    return torch.cat(prim), [torch.cat(t) for t in tans], torch.cat(golds)


def _linear_eval_fn(base, task_vectors: Mapping, total, datasets: Mapping, batch_size: int, collate_fn):
    """An eval_fn for linear vectors that reads accuracies off cached primal / tangent logits."""
    cache: dict = {}

    def parts(task, split):
        if (task, split) not in cache:
            cache[(task, split)] = _linear_logits(base, [task_vectors[task], total], datasets[task][split],
                                                  batch_size, collate_fn)
        return cache[(task, split)]

    def acc(alpha_single: float | None, alpha_total: float | None, task: str, split: str) -> float:
        p, (t_single, t_total), gold = parts(task, split)
        logits = p + (alpha_single * t_single if alpha_single is not None else alpha_total * t_total)
        return float((logits.argmax(-1) == gold).float().mean())

    return acc


def evaluate_task_addition(
    base: torch.nn.Module,
    task_vectors: Mapping[str, object],
    eval_fn: Callable[[torch.nn.Module, str, str], float] | None = None,
    *,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    linear: bool = False,
    single: Mapping[str, Mapping[str, float]] | None = None,
    datasets: Mapping[str, Mapping[str, object]] | None = None,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
) -> dict:
    """Task addition θ0 + α Σ_t τ_t (Ilharco et al. 2023), α chosen on validation.

    Args:
        task_vectors: `{task: TaskVector}`.
        eval_fn: `eval_fn(model, task, split) -> accuracy` with split in {"val", "test"}; or None with
            `datasets` for top-1 accuracy of the `logits` output.
        alphas: the grid (default 0.00…1.00 step 0.05); α = 1 ("one-shot") is always evaluated. The best
            α follows :func:`hf_taujp.merging.search.select_coefficient` (ties to 1e-9 → the α nearest 1;
            NaN scores never chosen).
        linear: read the vectors with the linearized model (f_lin at θ0 + α Σ τ). With `datasets` and no
            eval_fn this uses f_lin(x; θ0 + α τ) = f(x; θ0) + α·J f(x; θ0)·τ: one jvp per task and split
            for the whole grid instead of one per α.
        single: precomputed `{"val": {task: acc}, "test": {task: acc}}` of θ0 + τ_t alone; computed if None.
        datasets: `{task: {"val": examples, "test": examples}}` (examples with `labels`), used when
            eval_fn is None.
    Returns a dict: "single" (fine-tuned accuracies), "curve" (per α: val abs / normalized per task and
    mean), "best_alpha", "best" and "one_shot" (test: "abs", "norm" per task, "avg_abs", "avg_norm").
    normalized(t) = acc_merged(t) / acc_single(t).
    """
    if not task_vectors:
        raise HfTaujpError("evaluate_task_addition needs at least one task vector")
    tasks = list(task_vectors)
    if eval_fn is None:
        if datasets is None:
            raise HfTaujpError("evaluate_task_addition needs eval_fn or datasets={task: {'val': ..., 'test': ...}}")
        absent = [(t, s) for t in tasks for s in ("val", "test") if s not in datasets.get(t, {})]
        if absent:
            raise HfTaujpError(f"datasets lacks splits {absent[:4]} (needs 'val' and 'test' per task)")
        if linear:
            return _task_addition_linear(base, task_vectors, tasks, alphas, single, datasets, batch_size, collate_fn)

        def eval_fn(model, task, split):
            return accuracy(model, datasets[task][split], batch_size=batch_size, collate_fn=collate_fn)
    if single is None:
        single = {"val": {}, "test": {}}
        for t in tqdm(tasks, desc="single-task accuracy", leave=False):
            m = task_vectors[t].apply_to(base, 1.0, linear=linear)
            single["val"][t] = eval_fn(m, t, "val")
            single["test"][t] = eval_fn(m, t, "test")
    total = _sum_vectors([task_vectors[t] for t in tasks])
    return _addition_protocol(tasks, single, alphas, linear,
                              lambda alpha, t, split, m: eval_fn(m, t, split),
                              lambda alpha: total.apply_to(base, alpha, linear=linear))


def _addition_protocol(tasks, single, alphas, linear, acc_fn, model_fn=lambda alpha: None, extra_alphas=()) -> dict:
    """The task-addition protocol shared by both readings: α on the validation grid, then test at the
    best α and at α = 1. `acc_fn(alpha, task, split, model)` scores `model_fn(alpha)` (built once per α).
    `extra_alphas` are evaluated on validation for the curve's shape (e.g. 1.1…1.5) but never chosen."""

    def score(alpha: float, split: str) -> dict:
        m = model_fn(alpha)
        abs_ = {t: acc_fn(alpha, t, split, m) for t in tasks}
        # merged / single is undefined when the single-task score is <= 0 (e.g. a Matthews correlation
        # of 0): None, and left out of the mean, rather than counted as 0.
        norm = {t: abs_[t] / single[split][t] if single[split][t] > 0 else None for t in tasks}
        defined = [v for v in norm.values() if v is not None]
        return {"alpha": alpha, "abs": abs_, "norm": norm, "avg_abs": sum(abs_.values()) / len(tasks),
                "avg_norm": sum(defined) / len(defined) if defined else None}

    curve = [score(float(a), "val") for a in tqdm(list(alphas), desc="α grid", leave=False)]
    if 1.0 not in [r["alpha"] for r in curve]:
        curve.append(score(1.0, "val"))
        curve.sort(key=lambda r: r["alpha"])
    # The mean normalized accuracy where any task has one, else the mean absolute score; ties and
    # undefined scores follow the package's one rule (select_coefficient: ties to 1e-9 → α nearest 1).
    key = "avg_norm" if any(r["avg_norm"] is not None for r in curve) else "avg_abs"
    best = curve[select_coefficient([r["alpha"] for r in curve], [r[key] for r in curve])]
    chosen = {r["alpha"] for r in curve}
    extra = [a for a in map(float, extra_alphas) if a not in chosen]
    if extra:
        curve = sorted(curve + [dict(score(a, "val"), selectable=False) for a in extra], key=lambda r: r["alpha"])
    return {
        "linear": linear,
        "tasks": tasks,
        "single": {k: dict(v) for k, v in single.items()},
        "curve": curve,
        "best_alpha": best["alpha"],
        "best": score(best["alpha"], "test"),
        "one_shot": score(1.0, "test"),
    }


def _task_addition_linear(base, task_vectors, tasks, alphas, single, datasets, batch_size, collate_fn) -> dict:
    """`evaluate_task_addition(linear=True)` from cached primal / tangent logits (same result layout)."""
    total = _sum_vectors([task_vectors[t] for t in tasks])
    acc = _linear_eval_fn(base, task_vectors, total, datasets, batch_size, collate_fn)
    if single is None:
        single = {s: {t: acc(1.0, None, t, s) for t in tasks} for s in ("val", "test")}
    return _addition_protocol(tasks, single, alphas, True, lambda alpha, t, split, _m: acc(None, alpha, t, split))


def evaluate_task_negation(
    base: torch.nn.Module,
    task_vector,
    eval_fn: Callable[[torch.nn.Module, str, str], float],
    *,
    target: str = "target",
    control: str = "control",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    linear: bool = False,
    control_threshold: float = 0.95,
) -> dict:
    """Task negation θ0 − α τ_target (Ilharco et al. 2023): on validation, α minimising target accuracy
    subject to control accuracy ≥ control_threshold × base control accuracy; then both on test.

    eval_fn(model, task, split) with task in {target, control}. Ties in target accuracy (to 1e-9) go to
    the α nearest 0 (:func:`hf_taujp.merging.search.select_coefficient`); a NaN target score is never
    chosen; when no α keeps the control accuracy, α = 0 (θ0 itself). Returns base / chosen "alpha" / test
    "target" and "control" accuracies and the validation "curve".

    Raises:
        MergeConfigError: empty ``alphas``, a NaN α, or NaN target scores at every admissible α.
    """
    base_val = {"target": eval_fn(base, target, "val"), "control": eval_fn(base, control, "val")}
    base_test = {"target": eval_fn(base, target, "test"), "control": eval_fn(base, control, "test")}
    neg = -task_vector
    curve = []
    for a in tqdm(list(alphas), desc="negation α", leave=False):
        m = neg.apply_to(base, float(a), linear=linear)
        curve.append({"alpha": float(a), "target": eval_fn(m, target, "val"), "control": eval_fn(m, control, "val")})
    # Only α keeping the control score count; among them the lowest target score, ties (to 1e-9) going to
    # the α nearest 0, the smallest edit (select_coefficient, the package's one rule).
    target_ok = [r["target"] if r["control"] >= control_threshold * base_val["control"] else None for r in curve]
    if curve and all(t is None for t in target_ok):  # no α keeps the control score: θ0 unchanged
        alpha = 0.0
    else:
        alpha = curve[select_coefficient([r["alpha"] for r in curve], target_ok, maximize=False, prefer=0.0)]["alpha"]
    m = neg.apply_to(base, alpha, linear=linear)
    return {
        "linear": linear,
        "alpha": alpha,
        "base": {"val": base_val, "test": base_test},
        "target": eval_fn(m, target, "test"),
        "control": eval_fn(m, control, "test"),
        "curve": curve,
    }
