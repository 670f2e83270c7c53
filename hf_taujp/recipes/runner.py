"""The train-each-method loop shared by the recipes: one fine-tune per (method, task) through
`TauJpTrainer`, returned as a `TaskVector` keyed by the base model's parameter names.

Methods (Yoshida et al. 2025, Table 1 and Sec. 5; Ortiz-Jiménez et al. 2023):

| name              | model                                  | penalty                              |
|-------------------|----------------------------------------|--------------------------------------|
| `nonlinear`       | θ0 + τ, ordinary fine-tuning           | none                                 |
| `linear`          | f(x; θ0) + J f(x; θ0)·τ (linearized)   | none                                 |
| `taujp`           | linearized                             | λ·E_{x'∼other tasks} ‖J f(x'; θ0)·τ‖ |
| `nonlinear+taujp` | θ0 + τ                                 | same penalty (the authors' open question) |

Statistics-based merges of the recipes' own non-linear vectors (opt-in, ``--merge-methods``), beside the
recipes' task addition θ0 + α Σ_t τ_t; each is searched over the same α grid on validation:

| name                | statistics (on each task's training examples)          | merged model at α                       |
|---------------------|--------------------------------------------------------|-----------------------------------------|
| `fisher_average`    | diagonal Fisher F_t at θ0 + τ_t                        | θ0 + α·T·Σ_t F_t τ_t / Σ_s F_s          |
| `gradient_matching` | F_t at θ0 + τ_t, base Fisher H0 at θ0                  | θ0 + Σ_t α(P + s_t F_t)/(P + α Σ_s s_s F_s) τ_t, P = s0·H0 |
| `regmean`           | input Grams G_t of the trained Linear layers at θ0 + τ_t | θ0 + α·T·(Σ_t G_t)⁻¹ Σ_t G_t τ_t (per layer) |

The averaging methods are scaled by T so that equal statistics give task arithmetic θ0 + α Σ_t τ_t at the
same α; gradient matching's α is Daheim et al.'s own global α (λ of ``merging.methods.gradient_matching``),
which also reduces to task arithmetic for equal Fishers when s0·H0 dominates.
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

__all__ = ["METHODS", "Method", "parse_methods", "finetune", "STATISTICS_MERGES", "parse_merge_methods",
           "statistics_batches", "estimate_statistics", "statistics_merge", "add_statistics_arguments"]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    linear: bool
    taujp: bool

    @property
    def kind(self) -> str:
        return "linear" if self.linear else "nonlinear"


METHODS: dict[str, Method] = {
    "nonlinear": Method("nonlinear", "non-linear FT", linear=False, taujp=False),
    "linear": Method("linear", "linear FT", linear=True, taujp=False),
    "taujp": Method("taujp", "linear FT + τJp", linear=True, taujp=True),
    "nonlinear+taujp": Method("nonlinear+taujp", "non-linear FT + τJp", linear=False, taujp=True),
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
) -> tuple[TaskVector, dict]:
    """Fine-tune a copy of ``base`` on one task with ``method``; returns (task vector, stats).

    Args:
        base: θ0 (never modified: the run works on a deep copy).
        parameter_names: the parameters that are trained (non-linear) or linearized (linear); the others
            stay at θ0. Names of ``submodule`` when it is given, else of ``base``.
        args: a :class:`~hf_taujp.TauJpConfig`; its ``taujp_lambda`` is used for methods with τJp and
            forced to 0 for the others. AdamW decays every trained tensor alike (``args.weight_decay``):
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
    Returns:
        (TaskVector of kind "linear" or "nonlinear", {"seconds_per_step", "train_loss", "log_history"}).
    """
    from ..trainer import TauJpTrainer

    if method.taujp and not regularization_datasets:
        raise HfTaujpError(f"method {method.name!r} needs regularization datasets (the other tasks' inputs)")
    run_args = copy.deepcopy(args)
    if not method.taujp:
        run_args.taujp_lambda = 0.0
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

    auto = method.taujp and run_args.taujp_lambda == "auto"
    if auto and lambda_score is None:
        raise HfTaujpError(f"{method.label}: taujp_lambda='auto' needs the recipe's validation score (lambda_score=)")
    trainer = TauJpTrainer(
        model=train_model, args=run_args, train_dataset=train_dataset, data_collator=data_collator,
        regularization_datasets=regularization_datasets if method.taujp else None,
        taujp_output_fn=taujp_output_fn if method.taujp else None, optimizers=(optimizer, None),
        taujp_auto_score=(lambda tr: lambda_score(current())) if auto else None,
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
STATISTICS_MERGES = {"fisher_average": "fisher", "gradient_matching": "fisher", "regmean": "gram"}


def parse_merge_methods(merge_methods: str | Sequence[str] | None) -> list[str]:
    """Statistics-based merge methods from a comma list / sequence of names in :data:`STATISTICS_MERGES`
    (empty for None / ""); unknown or repeated names raise."""
    if merge_methods is None:
        return []
    names = [m.strip() for m in merge_methods.split(",")] if isinstance(merge_methods, str) else list(merge_methods)
    names = [m for m in names if m]
    unknown = [m for m in names if m not in STATISTICS_MERGES]
    if unknown:
        raise HfTaujpError(f"unknown merge method(s) {unknown}; choose from {list(STATISTICS_MERGES)} (task arithmetic is "
                           "the recipe's own task addition, always run)")
    if len(set(names)) != len(names):
        raise HfTaujpError(f"a merge method is listed twice: {names}")
    return names


def check_statistics_options(merge_methods: Sequence[str], methods: Sequence[Method], fisher_examples: int,
                             fisher_samples: int, base_fisher_weight: float | None) -> None:
    """Raise HfTaujpError for statistics options that cannot run or would mean nothing (before any training)."""
    for flag, v in (("--fisher-examples", fisher_examples), ("--fisher-samples", fisher_samples)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise HfTaujpError(f"{flag} must be a positive integer, got {v!r}")
    if base_fisher_weight is not None:
        if "gradient_matching" not in merge_methods:
            raise HfTaujpError("--base-fisher-weight (s0) applies to gradient_matching only: add it to --merge-methods")
        if not (float(base_fisher_weight) >= 0 and math.isfinite(float(base_fisher_weight))):
            raise HfTaujpError(f"--base-fisher-weight must be a finite number >= 0, got {base_fisher_weight!r}")
    if merge_methods and not any(not m.linear for m in methods):
        raise HfTaujpError(f"--merge-methods {','.join(merge_methods)} merges non-linear vectors (θ0 + τ_t is the model "
                           "whose statistics are taken): add nonlinear (or nonlinear+taujp) to --methods")


def statistics_batches(examples: Sequence, collate_fn: Callable, batch_size: int, n: int, samples: int = 1) -> list[dict]:
    """The first ``n`` of ``examples`` collated in batches of ``batch_size`` — the batches the recipe's own
    forward reads (``input_ids`` or cached ``inputs_embeds``, mask, position ids, ``logits_to_keep``) —,
    repeated ``samples`` times (each pass draws new labels for the true Fisher)."""
    chosen = list(examples[:n])
    batches = [collate_fn(chosen[i:i + batch_size]) for i in range(0, len(chosen), batch_size)]
    return batches * samples


def estimate_statistics(model: nn.Module, kind: str, batches: Sequence[dict], names: Sequence[str], *, task: str | None,
                        seed: int, meta: Mapping | None = None, output_type: str | None = None):
    """Fisher (``kind="fisher"``: :func:`~hf_taujp.merging.fisher.estimate_fisher`, labels sampled from the model,
    of the parameters ``names``) or Gram (``"gram"``: :func:`~hf_taujp.merging.regmean.estimate_gram` of the
    Linear / Conv1D layers whose weight is in ``names``) of ``model`` at its current weights over ``batches``.
    ``meta``: base_model / base_fingerprint recorded on the statistics (the base θ0, not the fine-tuned weights
    they are taken at) and any other config entries. ``output_type``: the Fisher's, for a model that
    :func:`~hf_taujp.merging.fisher.output_type_of` cannot tell (default: read from the model)."""
    from ..merging import estimate_fisher, estimate_gram
    from ..merging.regmean import linear_layers

    meta = dict(meta or {})
    if kind == "fisher":
        st = estimate_fisher(model, batches, parameters=list(names), seed=seed, task=task, progress=False,
                             output_type=output_type)
    else:
        wanted = set(names)
        modules = [p for p in linear_layers(model) if f"{p}.weight" in wanted]
        if not modules:
            raise HfTaujpError("regmean: no trained parameter is a Linear / Conv1D weight (nothing to take Grams of)")
        st = estimate_gram(model, batches, modules=modules, task=task, progress=False)
    st.base_model = meta.pop("base_model", st.base_model)
    st.base_fingerprint = meta.pop("base_fingerprint", st.base_fingerprint)
    st.extra.update(meta)
    return st


def statistics_merge(base: nn.Module, vectors: Sequence[TaskVector], method: str, stats: Sequence, *,
                     sizes: Sequence[float] | None = None, base_fisher=None, base_weight: float | None = None
                     ) -> Callable[[float], dict[str, torch.Tensor]]:
    """α → the merged Δ of ``method`` (table in the module docstring), {name: tensor}. ``stats``: one Fisher
    (fisher_average, gradient_matching) or Gram (regmean) per vector; gradient matching also takes the tasks'
    dataset sizes s_t (``sizes``), the base Fisher H0 and s0 (``base_weight``). ``base`` holds θ0 for every
    name in the vectors (the recipes' frozen-prefix model does; its fingerprint is not the full model's, so it
    is not compared). The averaging methods are merged once and scaled; gradient matching is merged per α."""
    from ..merging import merge

    common = dict(return_task_vector=True, check_base_model=False, progress=False)
    T = len(vectors)
    if method == "gradient_matching":  # α enters the precision sum: one (elementwise, cheap) merge per α
        def at(alpha: float) -> dict[str, torch.Tensor]:
            return merge(base, list(vectors), method, fishers=list(stats), base_fisher=base_fisher,
                         num_examples=list(sizes), base_num_examples=float(base_weight), lambda_=float(alpha),
                         **common).tensors

        return at
    kw = {"fishers": list(stats)} if method == "fisher_average" else {"grams": list(stats)}
    delta = merge(base, list(vectors), method, **kw, **common).tensors
    return lambda alpha: {k: (float(alpha) * T) * v for k, v in delta.items()}


def add_statistics_arguments(p) -> None:
    """The recipes' ``--merge-methods``, ``--fisher-examples``, ``--fisher-samples`` and ``--base-fisher-weight``."""
    p.add_argument("--merge-methods", default=None,
                   help=f"comma list from {', '.join(STATISTICS_MERGES)}: also merge the non-linear vectors with these "
                        "(each task's Fisher / Grams at θ0 + τ_t, the base Fisher at θ0, on training examples; saved "
                        "under <output-dir>/statistics/), α chosen on validation like task addition; default: none")
    p.add_argument("--fisher-examples", type=int, default=32,
                   help="training examples per task for each Fisher / Gram (and per task for the base Fisher)")
    p.add_argument("--fisher-samples", type=int, default=1,
                   help="labels sampled from the model per example for the Fisher (the true Fisher's Monte-Carlo size)")
    p.add_argument("--base-fisher-weight", type=float, default=None, metavar="S0",
                   help="gradient_matching's s0, how much the base Fisher counts against the tasks' s_t (their training "
                        "examples): large s0 → task arithmetic, s0 = 0 → Fisher averaging; no principled value when "
                        "the pretraining data is unseen; default: the mean s_t")


def parse_compare_options(compare_merges, compare_sets, method_list) -> tuple[list[str], list[str]]:
    """(merge methods to compare, recipe methods whose vectors they merge) of a recipe's ``--compare-merges`` /
    ``--compare-sets``, checked before any work ("default" = ``hf_taujp.evaluation.DEFAULT_METHODS``).

    Raises:
        MergeConfigError: an unknown merge method. HfTaujpError: none given, or a set that is not a method of the run.
    """
    if compare_merges is None:
        return [], []
    from ..evaluation import DEFAULT_METHODS
    from ..merging import get_method_spec

    names = [m.strip() for m in compare_merges.split(",")] if isinstance(compare_merges, str) else list(compare_merges)
    names = list(DEFAULT_METHODS) if names == ["default"] else [n for n in names if n]
    for n in names:
        get_method_spec(n)  # MergeConfigError naming the known methods
    sets = [m.strip() for m in compare_sets.split(",")] if isinstance(compare_sets, str) else list(compare_sets)
    known = [m.name for m in method_list]
    if not names or not sets or any(x not in known for x in sets):
        raise HfTaujpError(f"compare_merges needs merge methods and compare_sets among the run's methods {known}; "
                           f"got {names} on {sets}")
    return names, sets

def compare_and_save(model, label: str, folder: str, vectors, single, bench_list, evaluate, output_dir: str, results: dict,
                     *, prefix: str, check_base_model: bool = True, save: bool = True) -> None:
    """:func:`hf_taujp.evaluation.compare_merges` of one recipe method's vectors with the recipe's ``evaluate``
    (``normalize_by`` its single-task scores), saved under ``<output_dir>/merge_bench/<folder>/`` and recorded in
    ``results["merge_bench"][label]`` (``save=False``: recorded only, e.g. on the non-main processes of DDP); prints
    the table."""
    import os

    from ..evaluation import compare_merges

    say = print if save else (lambda *a, **k: None)
    say(f"{prefix} comparing merges of {label}: {', '.join(bench_list)}")
    cmp = compare_merges(model, vectors, evaluate, methods=bench_list, normalize_by=single,
                         check_base_model=check_base_model, progress=save)
    if save:
        cmp.save(os.path.join(output_dir, "merge_bench", folder))
    results.setdefault("merge_bench", {})[label] = cmp.to_dict()
    say(f"{prefix} merge methods on {label} (chosen on validation, test scores):\n" + cmp.table())
