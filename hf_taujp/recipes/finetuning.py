"""The recipes' fine-tuning methods: one fine-tune per (method, task) through `TauJpTrainer`, returned as a
`TaskVector` keyed by the base model's parameter names; low-rank (``--rank``) and bf16 (``--dtype``) options.

Methods (Yoshida et al. 2025, Table 1 and Sec. 5; Ortiz-Jiménez et al. 2023):

| name              | model                                  | penalty                              |
|-------------------|----------------------------------------|--------------------------------------|
| `nonlinear`       | θ0 + τ, ordinary fine-tuning           | none                                 |
| `linear`          | f(x; θ0) + J f(x; θ0)·τ (linearized)   | none                                 |
| `taujp`           | linearized                             | λ·E_{x'∼other tasks} ‖J f(x'; θ0)·τ‖ |
| `nonlinear+taujp` | θ0 + τ                                 | same penalty (the authors' open question) |
| `kfac`            | linearized                             | λ·Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ), the other tasks' KFAC factors (no data) |
| `nonlinear+kfac`  | θ0 + τ                                 | same dataless penalty                 |

The `kfac` methods (Porrello et al., ICLR 2026) replace the other tasks' inputs by their KFAC factors, each
task's estimated once at θ0 on its own training inputs (:func:`estimate_curvature`, saved under
``<output_dir>/curvature/<task>`` as a Hub artifact) — the drift Σ_s E_{x∼D_s}‖J f(x; θ0)·τ‖² without
anyone's data but the task's own.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..hub import HfTaujpError
from ..linearize import linearize
from ..task_vector import TaskVector

__all__ = ["METHODS", "Method", "parse_methods", "finetune", "low_rank_targets", "DTYPES", "check_rank_and_dtype",
           "add_low_rank_arguments"]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    linear: bool
    taujp: bool  # the τJp penalty on the other tasks' inputs
    kfac: bool = False  # the dataless KFAC penalty with the other tasks' factors

    @property
    def kind(self) -> str:
        return "linear" if self.linear else "nonlinear"

    @property
    def regularized(self) -> bool:
        """A method with a penalty weighted by λ (τJp or KFAC)."""
        return self.taujp or self.kfac


METHODS: dict[str, Method] = {
    "nonlinear": Method("nonlinear", "non-linear FT", linear=False, taujp=False),
    "linear": Method("linear", "linear FT", linear=True, taujp=False),
    "taujp": Method("taujp", "linear FT + τJp", linear=True, taujp=True),
    "nonlinear+taujp": Method("nonlinear+taujp", "non-linear FT + τJp", linear=False, taujp=True),
    "kfac": Method("kfac", "linear FT + KFAC", linear=True, taujp=False, kfac=True),
    "nonlinear+kfac": Method("nonlinear+kfac", "non-linear FT + KFAC", linear=False, taujp=False, kfac=True),
}


def parse_methods(methods: str | Sequence[str]) -> list[Method]:
    """Methods from a comma list / sequence of names in :data:`METHODS`; unknown or repeated names raise."""
    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise HfTaujpError(f"unknown method(s) {unknown or names}; choose from {list(METHODS)}")
    if len(set(names)) != len(names):
        raise HfTaujpError(f"a method is listed twice: {names}")
    return [METHODS[m] for m in names]


def finetune(
    base: nn.Module,
    parameter_names: Sequence[str],
    method: Method,
    train_dataset,
    args,
    *,
    data_collator: Callable | None = None,
    regularization_datasets: Mapping[str, object] | None = None,
    taujp_output_fn: Callable | None = None,
    submodule: str | None = None,
    meta: Mapping | None = None,
    rank: int | None = None,
    lora_alpha: float | None = None,
    lambda_score: Callable[[Mapping[str, torch.Tensor]], float] | None = None,
    curvature: Sequence[object] | None = None,
) -> tuple[TaskVector, dict]:
    """Fine-tune a copy of ``base`` on one task with ``method``; returns (task vector, stats).

    Args:
        base: θ0 (never modified: the run works on a deep copy).
        parameter_names: the parameters that are trained (non-linear) or linearized (linear); the others
            stay at θ0. Names of ``submodule`` when it is given, else of ``base``.
        args: a :class:`~hf_taujp.TauJpConfig`; its ``taujp_lambda`` is used for methods with a penalty (τJp,
            KFAC) and forced to 0 for the others; ``taujp_regularizer`` is set by the method. AdamW decays every trained tensor alike (``args.weight_decay``):
            the Trainer's default exempts biases and norm weights by module type, which τ of a
            linearized model (one parameter list) would not get, so the two readings would differ.
        regularization_datasets: ``{other task: inputs}`` for the τJp penalty (required with τJp).
        submodule: path of the module that is trained / linearized inside ``base`` (e.g. CLIP's
            ``"image_encoder"``, so the head on top stays non-linear, as in tangent_task_arithmetic);
            None = ``base`` itself. The task vector is keyed by that module's parameter names.
        meta: TaskVector metadata (base_model, base_fingerprint, task, training).
        rank: low-rank fine-tuning of the nn.Linear / Conv1D layers among ``parameter_names`` (their biases, norms
            and embeddings stay at θ0; the output layer too): linear methods train a low-rank tangent
            (``LinearizedConfig(r=rank)``, τ_W = s·B·A), non-linear ones PEFT LoRA with the same r and targets.
            The task vector is τ = s·B·A either way (full tensors, rank ≤ r). None: every parameter in
            ``parameter_names`` is trained at full size.
        lora_alpha: s = lora_alpha / r (default 2·rank).
        lambda_score: ``fn(task vector tensors) -> validation score`` (greater is better) for
            ``args.taujp_lambda == "auto"``: the recipe's own metric on its validation split, computed on the
            vector a pilot run has trained so far (:mod:`hf_taujp.trainer.lambda_search`).
        curvature: the *other* tasks' KFAC factors (:class:`~hf_taujp.trainer.KFACStatistics` or folders; required
            by the ``kfac`` methods, :func:`estimate_curvature`); ``meta["task"]`` names the task being trained,
            so that its own factors are refused.
    Returns:
        (TaskVector of kind "linear" or "nonlinear", {"seconds_per_step", "train_loss", "log_history"}).
    """
    from ..trainer import TauJpTrainer

    if method.taujp and not regularization_datasets:
        raise HfTaujpError(f"method {method.name!r} needs regularization datasets (the other tasks' inputs)")
    if method.kfac and not curvature:
        raise HfTaujpError(f"method {method.name!r} needs the other tasks' KFAC factors (curvature=)")
    run_args = copy.deepcopy(args)
    if not method.regularized:
        run_args.taujp_lambda = 0.0
    run_args.taujp_regularizer = "kfac" if method.kfac else "taujp"
    if method.kfac:
        run_args.taujp_task_name = (meta or {}).get("task")
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    target = model.get_submodule(submodule) if submodule else model
    base_target = base.get_submodule(submodule) if submodule else base
    pm = None
    if rank is not None:
        if submodule:
            raise HfTaujpError("rank (low-rank fine-tuning) is not supported with a submodule (the CLIP recipe) yet")
        lora_alpha = 2 * rank if lora_alpha is None else lora_alpha
        pm = _low_rank_model(model, parameter_names, method, rank, lora_alpha)
        train_model = pm
    elif method.linear:
        lin = linearize(target, parameter_names=list(parameter_names))
        if submodule:
            parent, _, attr = submodule.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, lin)
            train_model = model
        else:
            train_model = lin
    else:
        params = dict(target.named_parameters())
        for n in parameter_names:
            params[n].requires_grad_(True)
        train_model = model
    trained = [p for p in train_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=run_args.learning_rate, weight_decay=run_args.weight_decay,
                                  betas=(run_args.adam_beta1, run_args.adam_beta2), eps=run_args.adam_epsilon)
    def current() -> dict[str, torch.Tensor]:
        """τ trained so far."""
        if pm is not None:
            return pm.base_model.get_tangents() if method.linear else dict(TaskVector.from_peft(pm).tensors)
        if method.linear:
            return lin.get_tangents()
        b = dict(base_target.named_parameters())
        p = dict(target.named_parameters())
        return {n: (p[n].detach() - b[n].detach()) for n in parameter_names}

    auto = method.regularized and run_args.taujp_lambda == "auto"
    if auto and lambda_score is None:
        raise HfTaujpError(f"{method.label}: taujp_lambda='auto' needs the recipe's validation score (lambda_score=)")
    trainer = TauJpTrainer(
        model=train_model, args=run_args, train_dataset=train_dataset, data_collator=data_collator,
        regularization_datasets=regularization_datasets if method.taujp else None,
        taujp_output_fn=taujp_output_fn if method.taujp else None, optimizers=(optimizer, None),
        taujp_auto_score=(lambda tr: lambda_score(current())) if auto else None,
        curvature=list(curvature) if method.kfac else None,
    )
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    steps = max(1, trainer.state.global_step)
    runtime = result.metrics.get("train_runtime", float("nan"))
    tensors = current()
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise HfTaujpError(f"{method.label}: training diverged (non-finite task vector in {bad[:3]}); lower the learning rate")
    meta = dict(meta or {})
    training = {"method": method.name, "steps": steps, "learning_rate": run_args.learning_rate,
                "batch_size": run_args.per_device_train_batch_size,
                "taujp_lambda": trainer.taujp_lambda_search["chosen"] if auto else run_args.taujp_lambda,
                **({"taujp_mode": run_args.taujp_mode, "taujp_batch_ratio": run_args.taujp_batch_ratio,
                    "taujp_norm": run_args.taujp_norm,
                    "taujp_start_step": run_args.taujp_start_step} if method.taujp else {}),
                **({"regularizer": "kfac", "kfac_aggregation": run_args.taujp_kfac_aggregation,
                    "curvature_tasks": [getattr(c, "task", c) for c in curvature]} if method.kfac else {}),
                **dict(meta.pop("training", {}) or {})}
    if rank is not None:
        training.update(rank=rank, lora_alpha=lora_alpha,
                        adapter="LINEARIZED" if method.linear else "LORA")
    tv = TaskVector(tensors, kind=method.kind, training=training, **meta)
    stats = {"seconds_per_step": runtime / steps if math.isfinite(runtime) else None,
             "train_loss": result.training_loss, "log_history": trainer.state.log_history,
             "seconds": wall, "lambda_search": trainer.taujp_lambda_search}
    del trainer, train_model, model
    return tv, stats


def low_rank_targets(model: nn.Module, parameter_names: Sequence[str]) -> list[str]:
    """The module paths a recipe's ``--rank`` trains: every nn.Linear / Conv1D whose ``weight`` is among
    ``parameter_names``, except the output layer (PEFT's ``all-linear`` rule; it is tied to the embeddings in
    most LMs). Raises when there is none."""
    from ..low_rank import layer_kind

    names = set(parameter_names)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    out = []
    for path, m in model.named_modules():
        if f"{path}.weight" not in names or m is head:
            continue
        try:
            kind = layer_kind(m)
        except HfTaujpError:
            continue
        if kind != "embedding":
            out.append(path)
    if not out:
        raise HfTaujpError("--rank: the trained parameters contain no nn.Linear / Conv1D weight to give a low-rank τ")
    return out


def _low_rank_model(model: nn.Module, parameter_names: Sequence[str], method: Method, rank: int, lora_alpha: float):
    """A PEFT model of ``model``: a low-rank linearized adapter (linear methods) or LoRA (non-linear ones), same
    r, lora_alpha and targets (:func:`low_rank_targets`)."""
    import re

    import peft

    from ..task_vector import _task_type_of
    from ..tuners.linearized import LinearizedConfig

    targets = "(?:" + "|".join(re.escape(m) for m in low_rank_targets(model, parameter_names)) + ")"
    kw = dict(r=rank, lora_alpha=lora_alpha, target_modules=targets, task_type=_task_type_of(model))
    if method.linear:
        config = LinearizedConfig(**kw)
    else:
        from transformers.pytorch_utils import Conv1D

        config = peft.LoraConfig(lora_dropout=0.0, fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()), **kw)
    return peft.get_peft_model(model, config)


DTYPES = ("fp32", "bf16")


def check_rank_and_dtype(rank: int | None, lora_alpha: float | None, dtype: str, methods: Sequence[Method]):
    """``(torch dtype of --dtype, lora_alpha)`` after checking ``--rank`` / ``--lora-alpha`` / ``--dtype`` together;
    lora_alpha defaults to 2·rank (None without a rank).

    Raises:
        HfTaujpError: rank ≤ 0 or not an integer, lora_alpha ≤ 0 or without rank, an unknown dtype, bf16 with a
            non-linear method at full rank (AdamW updates of bf16 weights round away: use ``--rank``).
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise HfTaujpError(f"--rank must be a positive integer, got {rank!r}")
    if lora_alpha is not None:
        if rank is None:
            raise HfTaujpError("--lora-alpha applies to low-rank fine-tuning only: give --rank too")
        if not lora_alpha > 0:
            raise HfTaujpError(f"--lora-alpha must be > 0, got {lora_alpha!r}")
    if dtype not in DTYPES:
        raise HfTaujpError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "bf16" and rank is None:
        full = [m.name for m in methods if not m.linear]
        if full:
            raise HfTaujpError(f"--dtype bf16 with the non-linear method(s) {full} at full rank would train bf16 weights "
                               "(AdamW updates round away): add --rank R (LoRA, float32 factors) or use --dtype fp32")
    alpha = None if rank is None else (2 * rank if lora_alpha is None else lora_alpha)
    return (torch.bfloat16 if dtype == "bf16" else torch.float32), alpha


def add_low_rank_arguments(p) -> None:
    """The recipes' ``--rank``, ``--lora-alpha`` and ``--dtype`` flags (one definition for GLUE and toxicity)."""
    p.add_argument("--rank", type=int, default=None,
                   help="low-rank fine-tuning of the trained Linear / Conv1D layers: LoRA (non-linear methods) or the "
                        "low-rank tangent τ_W = s·B·A (linear methods) of this rank; default: full-size τ")
    p.add_argument("--lora-alpha", type=float, default=None, help="s = lora_alpha / rank (default 2·rank)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES,
                   help="base weights' dtype (bf16: factors and linearized τ stay float32)")


# ------------------------------------------------------------------------------------------ statistics merges
