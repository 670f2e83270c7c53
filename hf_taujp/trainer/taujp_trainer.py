"""`TauJpTrainer`: a `transformers.Trainer` whose loss adds the τJp penalty (Yoshida et al., ICLR 2025).

    loss = L_task(θ) + λ · R,   R = mean_{x' ∼ other tasks} ‖ J_θ f(x'; θ0) · (θ − θ0) ‖      (Eq. 10 / 11)

or, with ``taujp_regularizer="kfac"``, the dataless R = Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ) of the other tasks' KFAC
factors (Porrello et al., ICLR 2026; :mod:`hf_taujp.trainer.kfac_regularizer`): no other task's inputs, no
jvp, one cost per step whatever the number of tasks.

Two ways to obtain J f(x'; θ0)·τ:

* **Linearized models** (`hf_taujp.linearize(...)` or a PEFT model with `LinearizedConfig`): the model
  already is f_lin(x; θ0 + τ) = f(x; θ0) + J f(x; θ0)·τ, and J·τ is the tangent output of the same
  forward-mode pass it uses for its forward: `model.jvp(**x')` → (primal, tangent). No copy of θ0.
* **Non-linear models**: `torch.func.jvp` over `functional_call` at θ0 (a frozen copy of the trainable
  parameters taken when the trainer is built) with tangent θ − θ0, the model in eval mode inside the jvp
  (no dropout in J, as for linearized models). LoRA: the tangent is the weight change ΔW = s·B·A of each
  LoRA layer (PEFT's `get_delta_weight`), not θ − θ0 of (A, B), evaluated with the adapter off; other PEFT
  adapters and LoRA variants (DoRA, lora_bias) are refused. Memory cost: one extra copy of the
  *trainable* parameters (θ0), plus one forward-mode pass (≈ 2–3× the activations of a plain forward)
  per regularization batch. The copy is taken in `__init__`: when resuming from a checkpoint, build
  the trainer from the *base* model, as for a fresh run.

The penalty is computed on `accelerator.unwrap_model(model)` (jvp cannot go through the DDP wrapper) and
shares the backward with the task loss, so DDP keeps ranks in sync. FSDP / DeepSpeed ZeRO shard the
parameters and are refused with `TauJpUnsupportedError`.
"""

from __future__ import annotations

import inspect
import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, RandomSampler
from transformers import Trainer
from transformers.utils import logging

from ..attention import forward_ad_attention
from ..errors import (MissingRegularizationDataError, RegularizationInputError,
                      TauJpUnsupportedError)
from ..linearize import _accepts, jvp_ready, linearized_forward, refuse_sharded
from .penalty import output_mask, prepare_reg_batch, select_output, taujp_penalty
from .tangents import adapter_type, is_peft, linearized_jvp, lora_primals_tangents
from .taujp_config import TauJpConfig, TauJpConfigError

logger = logging.get_logger(__name__)

__all__ = [
    "TauJpTrainer",
    "TauJpUnsupportedError",
    "MissingRegularizationDataError",
    "RegularizationInputError",
]


def _refuse_sharding(args, fsdp: bool = False, deepspeed: bool = False) -> None:
    """Raise `TauJpUnsupportedError` when FSDP or DeepSpeed is requested (args, accelerate env or state).

    FSDP and ZeRO-3 shard the parameters: the jvp at θ0 calls the model functionally by parameter
    name and would see shards, not weights. ZeRO-1/2 keep full weights but are untested, so every
    DeepSpeed stage is refused for now.
    """
    def env(name):
        return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")

    if fsdp or getattr(args, "fsdp", None) or env("ACCELERATE_USE_FSDP"):
        raise TauJpUnsupportedError(
            "τJp does not support FSDP yet: FSDP shards the parameters, and the penalty's jvp at θ0 needs the full "
            "weights by name. Use DDP instead (accelerate launch --num_processes N, no --use_fsdp)."
        )
    if deepspeed or getattr(args, "deepspeed", None) or env("ACCELERATE_USE_DEEPSPEED"):
        raise TauJpUnsupportedError(
            "τJp does not support DeepSpeed yet: ZeRO-3 shards the parameters, and the penalty's jvp at θ0 needs the "
            "full weights by name (ZeRO-1/2 are untested and refused too). Use DDP (accelerate launch --num_processes N)."
        )


def _named_datasets(datasets) -> dict[str, object]:
    """`{name: dataset}` from a mapping, or from a list / tuple (named "task0", "task1", ...)."""
    if datasets is None:
        return {}
    if isinstance(datasets, Mapping):
        return dict(datasets)
    if isinstance(datasets, (list, tuple)):
        return {f"task{i}": d for i, d in enumerate(datasets)}
    raise MissingRegularizationDataError(
        f"regularization_datasets must be a dict {{'task name': dataset}} or a list of datasets, got {type(datasets).__name__} "
        "(a single dataset: wrap it in a list)."
    )


def _stackable(batches: list[dict]) -> bool:
    """Same keys, all tensors, same shapes after the batch dim and same dtypes: safe to concatenate."""
    keys = list(batches[0])
    for b in batches:
        if list(b) != keys:
            return False
        for k in keys:
            v, v0 = b[k], batches[0][k]
            if not (isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[1:] == v0.shape[1:] and v.dtype == v0.dtype):
                return False
    return bool(keys)


class TauJpTrainer(Trainer):
    """`Trainer` + τJp regularization on the inputs of other tasks.

    Args:
        *args, **kwargs: every `transformers.Trainer` argument, unchanged; `args` must be a `TauJpConfig`.
        regularization_datasets: `{"task name": dataset}` of *other* tasks' inputs (labels ignored; for
            encoder-decoder models they give the decoder inputs and mask), or a list of datasets, named
            "task0", "task1", ... in order. Use the other tasks' *training* inputs; measure τJp
            (`hf_taujp.evaluation.taujp_matrix`) on held-out ones.
        regularization_collators: optional `{"task name": collator}`; default: the trainer's data collator.
        taujp_output_fn: optional callable `(model_outputs, batch) -> Tensor` choosing what is penalised
            (e.g. a pooled representation). It is applied to the *tangent* outputs of linearized models,
            so it must be linear in the outputs (selection, pooling, fixed projection); for non-linear
            models it runs inside the jvp and may be any function. Default: `args.taujp_output`.
        taujp_auto_score: optional `fn(trainer) -> float`, the validation score of the model being trained,
            used by `taujp_lambda="auto"` instead of `evaluate()` (e.g. a recipe's accuracy on its validation
            split; greater is better unless `args.greater_is_better` is False).
        curvature: ``taujp_regularizer="kfac"``: the other tasks' factors as loaded
            :class:`~hf_taujp.trainer.curvature.KFACStatistics` (or folders / repo ids), in addition to
            ``args.taujp_curvature``.

    With ``taujp_regularizer="kfac"`` (λ > 0) the factors are checked before training (named errors, all
    :class:`~hf_taujp.errors.CurvatureError`: an empty list, another base, a trained linear layer missing or of
    another size, NaN / inf, the task's own factors by ``taujp_task_name``), aggregated once
    (``taujp_kfac_aggregation``) over the trained nn.Linear / Conv1D layers and kept on the device; other trained
    tensors (embeddings, norms) are not penalised (a warning names them). No regularization_datasets.

    Logged (in `state.log_history`): `taujp_penalty` (R — τJp's, or R_KFAC with "kfac" —, mean over the logging
    window, averaged over processes) and `task_loss`. `taujp_visits` lists the reg task(s) used at each of the last 1024 penalised steps
    (bounded, so long runs do not grow it).
    """

    def __init__(
        self,
        *args,
        regularization_datasets: Mapping[str, object] | None = None,
        regularization_collators: Mapping[str, Callable] | None = None,
        taujp_output_fn: Callable | None = None,
        taujp_auto_score: Callable | None = None,
        curvature: Sequence[object] | None = None,
        **kwargs,
    ):
        # Named errors before the (costly) Trainer set-up: wrong args class, FSDP / DeepSpeed requested.
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if not isinstance(targs, TauJpConfig):
            raise TauJpConfigError(f"TauJpTrainer needs args=TauJpConfig(...), got {type(targs).__name__}")
        _refuse_sharding(targs)
        super().__init__(*args, **kwargs)
        # An accelerate config (`accelerate launch --use_fsdp ...`) can enable them without the args saying so.
        _refuse_sharding(self.args, fsdp=self.is_fsdp_enabled, deepspeed=self.is_deepspeed_enabled)
        inner = getattr(self.model, "base_model", None)
        if self.args.label_names is None and not self.label_names and inner is not None and not is_peft(self.model) \
                and callable(getattr(self.model, "jvp", None)):
            # LinearizedModule.forward(*args, **kwargs) hides the base model's label names: without them
            # evaluate() reports no eval_loss. Read them from the wrapped model (as the signature columns).
            from transformers.utils import find_labels

            self.label_names = find_labels(type(inner))
        self.taujp_output_fn = taujp_output_fn
        self.regularization_datasets = _named_datasets(regularization_datasets)
        self.regularization_collators = dict(regularization_collators or {})
        unknown = set(self.regularization_collators) - set(self.regularization_datasets)
        if unknown:
            raise MissingRegularizationDataError(f"collators given for unknown regularization datasets {sorted(unknown)}")
        auto = self.args.taujp_lambda == "auto"
        # λ of the running step: the configured one, or under "auto" the pilot's / the chosen one
        self._taujp_lambda: float = 0.0 if auto else float(self.args.taujp_lambda)
        self.taujp_lambda_search: dict | None = None  # the record of taujp_lambda="auto" (lambda_search)
        self.taujp_auto_score = taujp_auto_score
        if auto and self.eval_dataset is None and taujp_auto_score is None:
            raise TauJpConfigError("taujp_lambda='auto' chooses λ on the validation split: give eval_dataset=... "
                                   "(or taujp_auto_score=)")
        kfac = self.args.taujp_regularizer == "kfac"
        if (curvature or self.args.taujp_curvature) and not kfac:  # never dropped silently
            raise TauJpConfigError("curvature= / taujp_curvature (KFAC factors) is for taujp_regularizer='kfac'; this "
                                   f"run's regularizer is {self.args.taujp_regularizer!r}")
        if kfac and self.regularization_datasets:
            raise TauJpConfigError("taujp_regularizer='kfac' uses the other tasks' KFAC factors (taujp_curvature), not "
                                   "regularization_datasets: drop them, or use taujp_regularizer='taujp'")
        if (auto or self._taujp_lambda > 0) and not kfac:
            if not self.regularization_datasets:
                raise MissingRegularizationDataError(
                    f"taujp_lambda={self.args.taujp_lambda} but no regularization_datasets were given "
                    "(pass {'other task': dataset, ...}, or set taujp_lambda=0)"
                )
            for name, ds in self.regularization_datasets.items():
                if ds is None or len(ds) == 0:
                    raise MissingRegularizationDataError(f"regularization dataset {name!r} is empty")
        self._taujp_names = list(self.regularization_datasets)
        self._taujp_loaders: dict[str, DataLoader] | None = None
        self._taujp_iters: dict[str, Iterator] = {}
        self._taujp_epochs: dict[str, int] = {}
        # Logged means: running (sum, count) kept on the device, read once per logging step (no per-step host sync).
        self._taujp_log: dict[str, list] = {"taujp_penalty": [None, 0], "task_loss": [None, 0]}
        self.taujp_visits: deque[tuple[str, ...]] = deque(maxlen=1024)
        self._theta0: dict[str, torch.Tensor] | None = None
        self._adapter: str | None = None
        self._kfac: dict | None = None  # {layer: [(A, G), ...]}, the aggregated factors on the device
        self.kfac_statistics: list = []  # the other tasks' factors as loaded (task names, examples, cards)
        if auto or self._taujp_lambda > 0:
            base = self.accelerator.unwrap_model(self.model)
            refuse_sharded(base)  # a model already sharded by FSDP2 / DTensor: refused before the first step
            self._adapter = adapter_type(base)
            if linearized_jvp(base) is None:
                # Frozen θ0 of the trainable parameters (the non-linear path's memory cost).
                self._theta0 = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
            if kfac:
                self._kfac_setup(base, curvature)
            else:
                self._taujp_check_inputs()

    # ---------------------------------------------------------------- data
    def _set_signature_columns_if_needed(self) -> None:
        """A plain `LinearizedModule.forward(*args, **kwargs)` hides the base model's input names, and the
        Trainer would drop every column: read them from the wrapped base model instead."""
        inner = getattr(self.model, "base_model", None)
        if self._signature_columns is None and callable(getattr(self.model, "jvp", None)) and inner is not None:
            if not is_peft(self.model):
                names = list(inspect.signature(inner.forward).parameters)
                self._signature_columns = names + list({"label", "label_ids", *self.label_names})
                return
        super()._set_signature_columns_if_needed()

    def _taujp_dataloader(self, name: str, prepare: bool) -> DataLoader:
        ds = self.regularization_datasets[name]
        collator = self.regularization_collators.get(name, self.data_collator)
        try:
            import datasets as hf_datasets

            if isinstance(ds, hf_datasets.Dataset) and self.args.remove_unused_columns and name not in self.regularization_collators:
                ds = self._remove_unused_columns(ds, description=f"regularization[{name}]")
        except ImportError:  # pragma: no cover - datasets is a transformers dependency
            pass
        gen = torch.Generator().manual_seed(self.args.seed + 1 + self._taujp_names.index(name))
        loader = DataLoader(
            ds,
            batch_size=self.args.taujp_reg_batch_size,
            sampler=RandomSampler(ds, generator=gen),
            collate_fn=collator,
            drop_last=False,
            num_workers=0,
        )
        return self.accelerator.prepare(loader) if prepare else loader

    def _taujp_next(self, name: str) -> dict:
        if self._taujp_loaders is None:
            self._taujp_loaders = {n: self._taujp_dataloader(n, prepare=True) for n in self._taujp_names}
        if name not in self._taujp_iters:
            self._taujp_iters[name] = iter(self._taujp_loaders[name])
        try:
            batch = next(self._taujp_iters[name])
        except StopIteration:  # a new pass over a (small) reg set
            self._taujp_epochs[name] = self._taujp_epochs.get(name, 0) + 1
            self._taujp_iters[name] = iter(self._taujp_loaders[name])
            batch = next(self._taujp_iters[name])
        return self._taujp_clean(batch)

    def _taujp_clean(self, batch) -> dict:
        if not isinstance(batch, Mapping):
            raise RegularizationInputError(f"regularization batches must be dicts of tensors, got {type(batch).__name__}")
        return self._prepare_inputs(prepare_reg_batch(self.accelerator.unwrap_model(self.model), batch))

    def _taujp_check_inputs(self) -> None:
        """Run one reg batch of every dataset through the model (no grad) before training."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            for name in self._taujp_names:
                try:
                    batch = self._taujp_clean(next(iter(self._taujp_dataloader(name, prepare=False))))
                    with torch.no_grad():
                        out = model(**self._with_no_cache(model, batch))
                        self._taujp_select(out, batch)
                except Exception as e:  # noqa: BLE001 - re-raised with the dataset named
                    raise RegularizationInputError(
                        f"regularization dataset {name!r} does not fit the model: {type(e).__name__}: {e}"
                    ) from e
        finally:
            model.train(was_training)

    def _with_no_cache(self, model, batch: dict) -> dict:
        # DynamicCache is not a tensor output: torch.func.jvp carries tensors only. Linearized models
        # add use_cache=False themselves when their base declares it; a plain model gets it only when its
        # forward declares it (one rule: linearize._accepts). Cached per model.
        cache = self.__dict__.setdefault("_taujp_use_cache", {})
        if id(model) not in cache:
            cache[id(model)] = linearized_jvp(model) is None and _accepts(model, "use_cache")
        out = {**batch, "use_cache": False} if cache[id(model)] else batch
        if self.taujp_output_fn is None and self.args.taujp_output.startswith(("hidden_states", "attentions")):
            # a tuple output the model only returns when asked (e.g. taujp_output="hidden_states[-1]")
            out = {**out, f"output_{self.args.taujp_output.split('[')[0]}": True}
        return out

    # ---------------------------------------------------------------- KFAC
    def _kfac_setup(self, base: torch.nn.Module, curvature) -> None:
        """Load, check and aggregate the other tasks' factors over the trained linear layers (before training)."""
        from ..errors import CurvatureLayerMismatchError, CurvatureUnitsError
        from .kfac_regularizer import load_curvature, prepare_curvature
        from .tangents import layer_deltas, theta0_fingerprint

        stats = load_curvature(list(self.args.taujp_curvature or []) + list(curvature or []))
        for key in ("output", "probe"):  # the penalty never runs f; but a mix sums drifts in different units
            seen = {f"#{i} ({s.task or 'no task name'})": s.extra.get(key) for i, s in enumerate(stats)}
            if len(set(seen.values())) > 1:
                raise CurvatureUnitsError(f"the other tasks' KFAC factors were estimated with different {key}s: "
                                          f"{seen} (estimate every task's factors with the same output f and probe)")
        deltas, other = layer_deltas(base, self._theta0, self._adapter)
        if not deltas:
            raise CurvatureLayerMismatchError("the model trains no nn.Linear / Conv1D layer: the KFAC penalty has "
                                              f"nothing to regularize (trained: {other[:5]})")
        if other:
            logger.warning(f"taujp_regularizer='kfac' penalises linear layers only; not penalised: {other[:5]}"
                           + (f" and {len(other) - 5} more" if len(other) > 5 else ""))
        f64 = any(t is not None and t.dtype == torch.float64 for d in deltas.values() for t in (d.weight, d.bias))
        f64 = f64 or any(b.dtype == torch.float64 for d in deltas.values() for b, _, _ in d.factors)
        cfg = getattr(base, "config", None)
        self._kfac = prepare_curvature(
            stats, deltas, fingerprint=theta0_fingerprint(base, self._adapter),
            base_model=getattr(cfg, "_name_or_path", None) or None, task_name=self.args.taujp_task_name,
            aggregation=self.args.taujp_kfac_aggregation, device=self.args.device,
            dtype=torch.float64 if f64 else torch.float32)
        self.kfac_statistics = stats

    def kfac_penalty_on(self, model: torch.nn.Module) -> torch.Tensor:
        """R_KFAC = Σ_layers Σ_terms tr(G·ΔW̃·A·ΔW̃ᵀ) of the current τ (:func:`~hf_taujp.trainer.kfac_regularizer.kfac_penalty`),
        in float32 (float64 for float64 models) outside autocast."""
        from .kfac_regularizer import kfac_penalty
        from .tangents import layer_deltas

        base = self.accelerator.unwrap_model(model)
        with torch.autocast(self.args.device.type, enabled=False):
            deltas, _ = layer_deltas(base, self._theta0, self._adapter)
            return kfac_penalty(deltas, self._kfac)

    # ---------------------------------------------------------------- penalty
    def _taujp_select(self, outputs, batch) -> torch.Tensor:
        if self.taujp_output_fn is not None:
            return self.taujp_output_fn(outputs, batch)
        return select_output(outputs, self.args.taujp_output)

    def _taujp_tangent(self, base: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x'; θ0), J f(x'; θ0)·τ) for one reg batch: the jvp's primal and tangent of the selected output
        (the primal is free: forward-mode AD computes it anyway; the "relative" / "kl" forms need it)."""
        kwargs = self._with_no_cache(base, batch)
        jvp = linearized_jvp(base)
        if jvp is not None:
            # linearized_forward already switches checkpointing off and routes attention for the jvp;
            # walking the module tree twice more per step is measurable on small models.
            with self.accelerator.autocast():
                primal_out, tangent_out = jvp(**kwargs)
            return self._taujp_select(primal_out, batch), self._taujp_select(tangent_out, batch)
        # J at θ0 of the eval-mode model (no dropout), as for linearized models' default; checkpointing off.
        lora = getattr(self, "_adapter", None) == "LORA"
        if lora:
            # τ of the weights, ΔW = s·B·A, at the model with the adapter off (θ0): the low-rank tangent path of
            # hf_taujp.low_rank. Built before disabling: PEFT's disable_adapter sets requires_grad=False on the
            # adapter until the block ends.
            with self.accelerator.autocast():
                primals, tangents, factors = lora_primals_tangents(base, self._theta0)
            with self.accelerator.autocast(), base.disable_adapter():
                return linearized_forward(base, primals, tangents, kwargs=kwargs, mode="eval", low_rank=factors,
                                          method=lambda **kw: self._taujp_select(base(**kw), batch))
        with jvp_ready(base, "eval"), forward_ad_attention(base), self.accelerator.autocast():
            params = dict(base.named_parameters())
            primals = {n: t for n, t in self._theta0.items()}
            tangents = {n: (params[n] - t).to(t.dtype) for n, t in self._theta0.items()}

            def f(p):
                return self._taujp_select(functional_call(base, p, args=(), kwargs=kwargs, strict=False), batch)

            return torch.func.jvp(f, (primals,), (tangents,))

    def taujp_penalty_on(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """R on one (clean) reg batch: mean ‖J f(x'; θ0)·τ‖ (see `hf_taujp.trainer.penalty.taujp_penalty`)."""
        base = self.accelerator.unwrap_model(model)
        primal, tangent = self._taujp_tangent(base, batch)
        return taujp_penalty(tangent, self._taujp_mask(base, batch, tangent), self.args.taujp_norm, primal)

    def taujp_penalties_on(self, model: torch.nn.Module, batches: list[dict]) -> torch.Tensor:
        """(R_1, ..., R_k) for k reg batches, shape (k,).

        Strict mode penalises every other task each step; when the batches have the same keys and
        shapes (fixed-length padding, the usual case) they go through ONE jvp over their concatenation,
        then R is taken per batch: fewer, larger matmuls than k small passes, same values for models
        without cross-example operations (no BatchNorm in train mode). Otherwise one jvp per batch.
        """
        if len(batches) > 1 and _stackable(batches):
            sizes = [next(iter(b.values())).shape[0] for b in batches]
            cat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
            base = self.accelerator.unwrap_model(model)
            primal, tangent = self._taujp_tangent(base, cat)
            if tangent.shape[0] == sum(sizes) and primal.shape == tangent.shape:
                mask = self._taujp_mask(base, cat, tangent)
                parts = zip(tangent.split(sizes), primal.split(sizes),
                            mask.split(sizes) if mask is not None else [None] * len(sizes))
                return torch.stack([taujp_penalty(t, m, self.args.taujp_norm, f) for t, f, m in parts])
        return torch.stack([self.taujp_penalty_on(model, b) for b in batches])

    def _taujp_mask(self, base, batch: dict, tangent: torch.Tensor) -> torch.Tensor | None:
        """The mask that belongs to the penalised output (decoder mask for seq2seq decoder outputs); see
        `hf_taujp.trainer.penalty.output_mask`, which raises when none fits."""
        return output_mask(base, batch, tangent, None if self.taujp_output_fn is not None else self.args.taujp_output)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Task loss (the stock `Trainer.compute_loss`) + λ·R while training."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        a = self.args
        penalised = self._kfac is not None or self._taujp_names
        if model.training and self._taujp_lambda > 0 and self.state.global_step >= a.taujp_start_step and penalised:
            if self._kfac is not None:  # dataless: a function of τ alone
                penalty = self.kfac_penalty_on(model)
            else:
                n = len(self._taujp_names)
                if a.taujp_mode == "cyclic":  # Eq. 11: one other task per step, in turn
                    names = (self._taujp_names[self.state.global_step % n],)
                else:  # Eq. 10: every other task each step, penalties averaged
                    names = tuple(self._taujp_names)
                self.taujp_visits.append(names)
                penalty = self.taujp_penalties_on(model, [self._taujp_next(t) for t in names]).mean()
            if self._loss_scaled_for_ga(num_items_in_batch):
                # The Trainer will not divide this loss by the GA steps; R is a per-batch mean (R_KFAC: one per
                # micro-batch), so we do.
                ga_penalty = penalty / self.current_gradient_accumulation_steps
            else:
                ga_penalty = penalty
            self._taujp_record("taujp_penalty", penalty)
            self._taujp_record("task_loss", loss)
            loss = loss + self._taujp_lambda * ga_penalty.to(loss.dtype)
        elif model.training:
            self._taujp_record("task_loss", loss)
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, **kwargs):
        """`Trainer.train`; with ``taujp_lambda="auto"`` first the λ search of
        :func:`hf_taujp.trainer.lambda_search.search_lambda` (pilots from the same initial state, recorded in
        ``self.taujp_lambda_search``), then the full run at the chosen λ.

        Raises:
            TauJpConfigError: ``resume_from_checkpoint`` with ``taujp_lambda="auto"`` (the search would start
                over: resume with the chosen λ, ``self.taujp_lambda_search["chosen"]``, instead).
        """
        if self.args.taujp_lambda == "auto" and self.taujp_lambda_search is None:
            if (args and args[0]) or kwargs.get("resume_from_checkpoint"):
                raise TauJpConfigError("taujp_lambda='auto' cannot resume from a checkpoint: resume with the λ the "
                                       "search chose (taujp_lambda_search['chosen']) as taujp_lambda")
            from .lambda_search import search_lambda

            self.taujp_lambda_search = search_lambda(self)
        return super().train(*args, **kwargs)

    def _taujp_record(self, key: str, value: torch.Tensor) -> None:
        """Add a scalar to the running sum of `key` on its device (synchronised only in `log`)."""
        acc = self._taujp_log[key]
        v = value.detach().float()
        acc[0] = v if acc[0] is None else acc[0] + v
        acc[1] += 1

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """transformers 5's rule (Trainer.training_step) for 'the loss is already scaled for GA'."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    # ---------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the mean `taujp_penalty` / `task_loss` since the last log (averaged over processes)."""
        if "loss" in logs:  # training logs only, not eval
            for key, acc in self._taujp_log.items():
                total, count = acc
                # [has values, mean] of this process, averaged over processes (one host sync per key and log)
                stats = torch.zeros(2, device=self.args.device)
                if count:
                    stats[0] = 1.0
                    stats[1] = total.to(stats.device) / count
                if self.accelerator.num_processes > 1:
                    stats = self.accelerator.reduce(stats, "mean")
                has, mean = stats.tolist()
                if has > 0:
                    logs[key] = round(mean / has, 6)
                acc[0], acc[1] = None, 0
        super().log(logs, *args, **kwargs)
