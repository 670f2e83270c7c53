"""The GLUE recipe's own parts (:class:`GlueRecipe`, run by :func:`hf_taujp.recipes.runner.run_methods`): the
option checks, the tasks' data and splits, the model, the encoding (with the frozen-prefix cache), the results
skeleton, and training / evaluating one run. :func:`hf_taujp.recipes.glue.run_glue` documents every option.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from types import SimpleNamespace

import torch

from ..evaluation import taujp_matrix
from ..hub import HfTaujpError, check_repo_id
from ..linearize import _accepts
from ..task_vector import TaskVector, fingerprint
from ..trainer.lambda_search import check_auto_settings
from .glue_evaluation import _compare_merges, _evaluate_addition, _statistics_merges
from .glue_report import _report
from .lambda_options import lambda_record, lambda_text, parse_lambdas, vector_score
from .models import load_text_model, trained_parameter_names
from .runner import (Recipe, Run, check_kfac_options, check_rank_and_dtype, check_statistics_options, estimate_curvature,
                     finetune, jsonable, kfac_layers, parse_compare_options, parse_merge_methods, parse_methods,
                     plan_runs, statistics_batches, subsample)
from .tasks import GLUE_TASKS, TextTask, embedded_glue_dir, load_task_data, load_task_spec, split_train_val
from .text_to_text import (FrozenPrefix, TextToTextEncoder, answer_logits_output, first_trained_layer, generate_scores,
                           rank_scores)

__all__ = ["GlueRecipe", "EMBEDDED", "HUB", "GLUE_KFAC_LAMBDA", "GLUE_KFAC_LAMBDA_WHY"]

# the kfac methods' λ with the Fisher probe (the penalty is in nats: 2·Σ_s KL₂ over the other tasks' inputs)
GLUE_KFAC_LAMBDA = 1.0
GLUE_KFAC_LAMBDA_WHY = ("default 1, chosen on validation among 1, 10, 100 on the main job's data with the Fisher probe "
                        "(README); 1 nat of the others' KL drift per nat of task loss")
EMBEDDED, HUB = "embedded", "hub"
SAY = "[hf-taujp glue]"


def _prompt_part(example: dict, family: str) -> dict:
    """The prompt-only part of a labelled causal / seq2seq example (what the τJp penalty sees)."""
    if family == "causal":  # prompt + answer, labels -100 on the prompt
        n = sum(1 for y in example["labels"] if y == -100)
        key = "features" if "features" in example else "input_ids"
        return {key: example[key][:n]}
    return {"input_ids": example["input_ids"]}  # seq2seq: the answer is the decoder target


def _saved_vector(run_dir: str, folder: str, name: str, fp: str):
    """The task vector a previous run saved for (method folder, task); it must come from this base."""
    path = os.path.join(run_dir, "task_vectors", folder, name)
    if not os.path.isdir(path):
        raise HfTaujpError(f"{run_dir!r} has no task vector {folder}/{name} (run `hf-taujp glue` with these methods "
                           "and tasks first)")
    tv = TaskVector.from_pretrained(path)
    if tv.base_fingerprint and tv.base_fingerprint != fp:
        raise HfTaujpError(f"{path}: made from another base (fingerprint {tv.base_fingerprint} ≠ {fp})")
    return tv


LAMBDA_SCORES = ("metric", "loss")


def _validation_score(method, name, model, choices_scores, score_fn):
    """``fn(τ tensors) -> score of task `name` on its validation split`` for taujp_lambda="auto":
    ``score_fn(name, "val", (N, K) label-word scores)`` of the linear reading (one forward-mode pass) for linear
    methods, of θ0 + τ written into the model for others."""
    return vector_score(method, model, lambda tensors: score_fn(name, "val", choices_scores("val", name, tensors)[..., 0]),
                        lambda: score_fn(name, "val", choices_scores("val", name)))


class GlueRecipe(Recipe):
    """The GLUE text-to-text recipe's parts. The constructor takes :func:`~hf_taujp.recipes.glue.run_glue`'s
    arguments (``options``: its parameters by name) and does everything before training, in this order (so bad
    input fails before the model loads, and the model's own checks before any training): the option checks and
    the runs (:attr:`runs`), the tasks' data and splits, the model, the encoding, the zero-shot scores, the
    results skeleton and, for the kfac methods, each task's KFAC factors.

    Raises:
        HfTaujpError: bad input (see run_glue), before any training.
    """

    def __init__(self, options: Mapping):
        self.t_start = time.time()
        self.o = SimpleNamespace(**options)
        self.output_dir, self.vectors_from = self.o.output_dir, self.o.vectors_from
        self._check_options()
        self._load_tasks()
        self._load_model()
        self._encode()
        self._results_skeleton()
        self._estimate_curvature()

    # ------------------------------------------------------------------------------ before training
    def _check_options(self) -> None:
        """Every option checked before any data or model is read; plans the runs (one label / folder each)."""
        o = self.o
        self.methods = parse_methods(o.methods)
        self.torch_dtype, self.lora_alpha = check_rank_and_dtype(o.rank, o.lora_alpha, o.dtype, self.methods)
        plan = parse_lambdas(o.taujp_lambda, o.lambda_grid, o.taujp_norm, recipe="the GLUE recipe")
        self.lambdas, self.auto, self.lambda_grid = plan.lambdas, plan.auto, plan.grid
        if o.lambda_score not in LAMBDA_SCORES:
            raise HfTaujpError(f"lambda_score must be one of {LAMBDA_SCORES}, got {o.lambda_score!r}")
        check_auto_settings(o.lambda_pilot, o.lambda_tolerance, ("lambda_pilot", "lambda_tolerance"))
        if o.lambda_score == "loss" and o.decode == "generate":
            raise HfTaujpError("lambda_score='loss' reads the label words' log-likelihoods: it needs decode='rank'")
        self.kfac_lambdas = check_kfac_options(o.kfac_lambda, o.kfac_probe, o.kfac_examples, o.kfac_aggregation)
        # one label (results key) and one folder (vectors, runs) per run: nothing is overwritten
        self.runs = plan_runs(self.methods, lambda m: self.lambdas if m.taujp else self.kfac_lambdas if m.kfac
                              else [self.lambdas[0]], lambda_text)
        tasks = o.tasks
        self.tasks = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
        if len(self.tasks) < 2 or len(set(self.tasks)) != len(self.tasks):
            raise HfTaujpError(f"--tasks needs at least 2 distinct tasks (τJp regularizes on the others), got {self.tasks}")
        if not o.alphas:
            raise HfTaujpError("the α grid is empty")
        if o.decode not in ("rank", "generate"):
            raise HfTaujpError(f"decode must be 'rank' or 'generate', got {o.decode!r}")
        if o.push_to_hub:
            check_repo_id(o.push_to_hub)
        self.merge_list = parse_merge_methods(o.merge_methods)
        check_statistics_options(self.merge_list, self.methods, o.fisher_examples, o.fisher_samples, o.base_fisher_weight)
        self.bench_list, self.bench_sets = parse_compare_options(o.compare_merges, o.compare_sets, self.methods)
        if o.vectors_from and not os.path.isdir(os.path.join(o.vectors_from, "task_vectors")):
            raise HfTaujpError(f"vectors_from={o.vectors_from!r} has no task_vectors/ folder (the output of a glue run)")

    def _load_tasks(self) -> None:
        """The tasks (built in or from the task spec) and their train / val / test rows; all checks before the model
        is loaded. Validation is carved out of train (seeded), test is GLUE's dev set (its test labels are hidden)."""
        o = self.o
        self.spec = spec = {t.name: (t, d) for t, d in load_task_spec(o.task_spec)} if o.task_spec else {}
        clash = sorted(set(spec) & set(GLUE_TASKS))
        if clash:
            raise HfTaujpError(f"task spec redefines built-in task(s) {clash}; rename them")
        unknown = [t for t in self.tasks if t not in GLUE_TASKS and t not in spec]
        if unknown:
            raise HfTaujpError(f"unknown task(s) {unknown}; built in: {sorted(GLUE_TASKS)}"
                               + (f", from the spec: {sorted(spec)}" if spec else " (define others with --task-spec)"))
        glue_dir = None if o.data_dir == HUB else (embedded_glue_dir() if o.data_dir == EMBEDDED else o.data_dir)
        if glue_dir is not None and not os.path.isdir(glue_dir):
            raise HfTaujpError(f"--data-dir {o.data_dir!r}: no such folder (use 'embedded', 'hub' or a GLUE TSV folder)")
        self.task_objs: dict[str, TextTask] = {}
        self.rows: dict[str, dict] = {}
        for i, name in enumerate(self.tasks):
            task, data = spec[name] if name in spec else (GLUE_TASKS[name], load_task_data(GLUE_TASKS[name], glue_dir))
            pool = subsample(data["train"], o.max_train, o.seed + i)
            train, val = split_train_val(pool, fraction=o.val_fraction, min_size=min(o.min_val, len(pool) // 2),
                                         seed=o.seed + i)
            self.task_objs[name] = task
            self.rows[name] = {"train": train, "val": val, "test": subsample(data["dev"], o.max_dev, o.seed + i)}

    def _load_model(self) -> None:
        """The base model, its trained parameter names and the encoder; the label words checked encodable."""
        o = self.o
        print(f"{SAY} loading {o.model}")
        self.base, tokenizer, self.family = load_text_model(o.model, dtype=self.torch_dtype)
        self.base.eval()
        if o.decode == "generate" and self.family != "seq2seq":
            raise HfTaujpError("--decode generate is for seq2seq (T5) models; causal LMs use rank classification")
        self.names = trained_parameter_names(self.base, self.family, o.layers, o.target_modules)
        if "regmean" in self.merge_list:
            from ..merging.regmean import linear_layers

            if not any(f"{p}.weight" in set(self.names) for p in linear_layers(self.base)):
                raise HfTaujpError("--merge-methods regmean: no trained parameter is a Linear / Conv1D weight")
        keep_logits = self.family == "causal" and _accepts(self.base, "logits_to_keep")
        self.encoder = TextToTextEncoder(tokenizer, self.family, max_length=o.max_length, keep_logits=keep_logits,
                                         penalized_output=o.penalized_output,
                                         decoder_start_token_id=getattr(self.base.config, "decoder_start_token_id", None))
        for t in self.task_objs.values():
            self.encoder.answer_ids(t)  # every label word encodable, words distinct: checked before training
        self.model_name = getattr(self.base.config, "_name_or_path", None) or str(o.model)
        self.fp = fingerprint(self.base)

    def _encode(self) -> None:
        """Each task's examples: training (steps × batch of its train rows), rank-classification choices of val /
        test, τJp inputs and held-out τJp-matrix prompts. With the frozen-prefix cache (a causal LM whose lower
        layers are frozen) the examples carry those layers' outputs and the model is the suffix from then on."""
        o, encoder = self.o, self.encoder
        n_used = o.steps * o.batch_size  # each training row is seen once per method when the split is large enough
        self.ex = ex = {}
        for i, (name, t) in enumerate(self.task_objs.items()):
            r = self.rows[name]
            used = subsample(r["train"], n_used, o.seed + 100 + i)
            ex[name] = {"train": encoder.encode_train(t, used), "val_prompts": encoder.encode_prompts(t, r["val"]),
                        "test_prompts": encoder.encode_prompts(t, r["test"])}
        self.eval_model, base = self.base, self.base
        del self.base  # the full model is not needed once the examples are encoded (or cached)
        start = first_trained_layer(base, self.names) if self.family == "causal" else 0
        self.prefix_info = {"used": False}
        if o.prefix_cache and self.family == "causal" and start > 0:
            prefix = FrozenPrefix(base, encoder, start, batch_size=o.eval_batch_size)
            t0 = time.time()
            self.eval_model = prefix.suffix_model()
            err = prefix.check(self.eval_model, ex[self.tasks[0]]["train"][:4])
            for name in self.tasks:
                answers = encoder.answer_ids(self.task_objs[name])
                e = ex[name]
                e["train"] = prefix.features(e["train"], desc=f"frozen prefix {name}/train")
                e["val"], _ = prefix.choice_features(e.pop("val_prompts"), answers, desc=f"frozen prefix {name}/val")
                e["test"], e["test_prompts"] = prefix.choice_features(e["test_prompts"], answers,
                                                                      desc=f"frozen prefix {name}/dev")
            self.prefix_info = {"used": True, "first_trained_layer": start, "seconds": round(time.time() - t0, 1),
                                "check_max_abs_error": err}
            print(f"{SAY} frozen layers 0..{start - 1}: outputs cached in {self.prefix_info['seconds']} s "
                  f"(max logit error vs the full model {err:.2e})")
        else:
            for name, t in self.task_objs.items():
                e = ex[name]
                e["val"] = encoder.encode_choices(t, self.rows[name]["val"])
                e["test"] = encoder.encode_choices(t, self.rows[name]["test"])
                if o.decode == "generate":
                    e["val_gen"], e["test_gen"] = e["val_prompts"], e["test_prompts"]
                del e["val_prompts"]
        for name in self.tasks:
            e = ex[name]
            # τJp inputs = the prompts of the task's training rows (labels dropped); the τJp matrix = held-out dev prompts
            e["reg"] = [_prompt_part(x, self.family) for x in e["train"]]
            e["heldout"] = e.pop("test_prompts")[:o.matrix_examples]
        self.eval_model.eval()
        print(f"{SAY} model {self.model_name} ({self.family}), tasks {self.tasks}, methods "
              f"{[m.name for m in self.methods]}, {len(self.names)} trained tensors, {o.steps} steps × {o.batch_size}")

    def _results_skeleton(self) -> None:
        """The zero-shot dev scores, the fine-tuning arguments shared by every run, and ``results`` before any run
        (what the run is: arguments, data, sizes, splits, the τJp / statistics settings)."""
        o, tasks = self.o, self.tasks
        zero_shot = {n: self.metric(n, "test", self.choices_scores("test", n)) for n in tasks}
        print(f"{SAY} zero-shot dev scores: " + ", ".join(f"{n} {v:.3f}" for n, v in zero_shot.items()))
        self.args_common = dict(
            per_device_train_batch_size=o.batch_size, learning_rate=o.learning_rate, max_steps=o.steps,
            weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, logging_steps=max(1, o.steps // 4),
            save_strategy="no", report_to="none", seed=o.seed, use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False, taujp_mode=o.taujp_mode, taujp_norm=o.taujp_norm,
            **({"taujp_lambda_grid": list(self.lambda_grid), "taujp_auto_pilot": o.lambda_pilot,
                "taujp_auto_tolerance": o.lambda_tolerance} if self.auto else {}),
            taujp_batch_ratio=o.taujp_batch_ratio, taujp_start_step=o.taujp_start_step, disable_tqdm=False)
        arguments = {k: v for k, v in vars(o).items() if k not in ("compare_merges", "compare_sets", "vectors_from")}
        lams = self.lambdas
        self.results = {
            "arguments": jsonable(arguments), "vectors_from": o.vectors_from, "model": self.model_name,
            "family": self.family,
            "tasks": {n: {**self.task_objs[n].to_dict(), "source": "task spec" if n in self.spec else "glue"} for n in tasks},
            "data": "embedded GLUE sample" if o.data_dir == EMBEDDED else o.data_dir,
            "sizes": {n: {**{s: len(self.rows[n][s]) for s in ("train", "val", "test")},
                          "train_used": len(self.ex[n]["train"])} for n in tasks},
            "splits": {"val": "held out from train (chooses α)", "test": "GLUE dev set (reported)"},
            "trained_parameters": len(self.names), "decode": o.decode, "dtype": o.dtype,
            "low_rank": None if o.rank is None else {"rank": o.rank, "lora_alpha": self.lora_alpha},
            "frozen_prefix": self.prefix_info, "steps": o.steps, "batch_size": o.batch_size,
            "learning_rate": o.learning_rate,
            "taujp": {"lambda": lams if len(lams) > 1 else lams[0], "norm": o.taujp_norm,
                      **({"lambda_grid": list(self.lambda_grid), "lambda_score": o.lambda_score,
                          "lambda_pilot": o.lambda_pilot, "lambda_tolerance": o.lambda_tolerance} if self.auto else {}),
                      "mode": o.taujp_mode, "batch_ratio": o.taujp_batch_ratio, "start_step": o.taujp_start_step,
                      "output": o.penalized_output, "regularization_inputs": "other tasks' training inputs"},
            "zero_shot": zero_shot, "methods": {}}
        if self.merge_list:  # statistics-based merges of the non-linear vectors (opt-in)
            sizes = {n: len(self.ex[n]["train"]) for n in tasks}  # s_t: the examples each vector was trained on
            s0 = float(o.base_fisher_weight) if o.base_fisher_weight is not None else sum(sizes.values()) / len(sizes)
            self.stats_ctx = dict(
                merge_list=self.merge_list, samples=o.fisher_samples, sizes=sizes, base_weight=s0,
                output_dir=o.output_dir, seed=o.seed, base_fisher=None,
                batches={n: statistics_batches(self.ex[n]["train"], self.encoder.collate, o.eval_batch_size,
                                               o.fisher_examples) for n in tasks},
                meta={"base_model": self.model_name, "base_fingerprint": self.fp, "recipe": "glue",
                      "examples": o.fisher_examples})
            self.results["merges"] = {}
            self.results["statistics"] = {
                "merge_methods": self.merge_list, "fisher_examples": o.fisher_examples, "fisher_samples": o.fisher_samples,
                "fisher": "true Fisher (labels sampled from the model) of the trained parameters, at θ0 + τ_t; base at θ0",
                "task_sizes_s_t": sizes, "base_fisher_weight_s0": s0, "s0_default": o.base_fisher_weight is None,
                "seconds": 0.0}

    def _estimate_curvature(self) -> None:
        """Each task's KFAC factors at θ0 on its training prompts, once for every kfac run (not when the vectors
        are loaded: nothing is trained then)."""
        o = self.o
        self.curvature = None
        if not any(m.kfac for m in self.methods) or o.vectors_from:
            return
        print(f"{SAY} KFAC factors ({o.kfac_probe} probe) of each task on {o.kfac_examples} training prompts")
        self.curvature, info = estimate_curvature(
            self.eval_model, {n: self.ex[n]["reg"] for n in self.tasks}, kfac_layers(self.eval_model, self.names),
            output_dir=o.output_dir, probe=o.kfac_probe, seed=o.seed, output_fn=answer_logits_output,
            collate_fn=self.encoder.collate, batch_size=o.eval_batch_size, max_examples=o.kfac_examples,
            meta={"base_model": self.model_name})
        kl = self.kfac_lambdas
        self.results["curvature"] = {"probe": o.kfac_probe, "examples": o.kfac_examples,
                                     "aggregation": o.kfac_aggregation, "lambda": kl if len(kl) > 1 else kl[0],
                                     "output": "answer-position logits" if o.penalized_output == "answer"
                                     else "prompt-token logits", "tasks": info}

    # ------------------------------------------------------------------------------ scores
    def choices_scores(self, split, name, tangents=None, alphas_=(1.0,), model=None):
        """Scores of task ``name``'s ``split`` examples (rank classification, or T5 generation), for the evaluation
        model, ``model``, or with ``tangents`` the linear reading at ``alphas_``."""
        model = self.eval_model if model is None else model
        o, task = self.o, self.task_objs[name]
        if o.decode == "generate":
            return generate_scores(model, self.encoder, task, self.ex[name][f"{split}_gen"], batch_size=o.eval_batch_size,
                                   tangents=tangents, alphas=alphas_, desc=f"{name}/{split}")
        return rank_scores(model, self.encoder, len(task.words), self.ex[name][split], batch_size=o.eval_batch_size,
                           tangents=tangents, alphas=alphas_, desc=f"{name}/{split}")

    def metric(self, name, split, scores):
        """Task ``name``'s metric of the predictions ``scores.argmax(1)`` on ``split``."""
        gold = [self.task_objs[name].label_index(r) for r in self.rows[name][split]]
        return self.task_objs[name].score(gold, scores.argmax(1).tolist())

    def label_log_likelihood(self, name, split, scores):
        """Mean log-probability of the gold label word among the task's K label words, ``log_softmax`` over their
        summed token log-likelihoods ``scores`` (N, K): nats, ≤ 0, greater is better — the cross-entropy of rank
        classification, continuous where a metric on a few hundred rows moves in steps of 1/N."""
        gold = torch.tensor([self.task_objs[name].label_index(r) for r in self.rows[name][split]])
        logp = torch.log_softmax(scores.double(), dim=1)
        return float(logp.gather(1, gold[:, None]).mean())

    # ------------------------------------------------------------------------------ the runs
    def train(self, run: Run, task: str):
        """Fine-tune ``task`` with ``run`` (τJp / KFAC on the other tasks' training inputs / factors), or load the
        vector a previous run saved (``vectors_from``: stats empty)."""
        if self.vectors_from:
            return _saved_vector(self.vectors_from, run.folder, task, self.fp), {}
        from ..trainer import TauJpConfig

        o, m = self.o, run.method
        print(f"{SAY} {run.label} on {task}")
        args = TauJpConfig(output_dir=os.path.join(o.output_dir, "runs", run.folder, task), taujp_lambda=run.lam,
                           taujp_kfac_aggregation=o.kfac_aggregation, **self.args_common)
        others = [t for t in self.tasks if t != task]
        return finetune(
            self.eval_model, self.names, m, self.ex[task]["train"], args, data_collator=self.encoder,
            regularization_datasets={t: self.ex[t]["reg"] for t in others},
            taujp_output_fn=answer_logits_output, rank=o.rank, lora_alpha=self.lora_alpha,
            lambda_score=_validation_score(m, task, self.eval_model, self.choices_scores,
                                           self.metric if o.lambda_score == "metric" else self.label_log_likelihood)
            if self.auto else None,
            curvature=[self.curvature[t] for t in others] if m.kfac else None,
            meta={"base_model": self.model_name, "base_fingerprint": self.fp, "task": task,
                  "training": {"recipe": "glue", "penalized_output": o.penalized_output}})

    def vector_dir(self, run: Run, task: str) -> str | None:
        """``task_vectors/<folder>/<task>``; None for loaded vectors (``vectors_from``: not saved again)."""
        return None if self.vectors_from else super().vector_dir(run, task)

    def evaluate(self, run: Run, vectors, stats) -> dict:
        """Task addition of the run's vectors (α on validation), the τJp matrix on held-out inputs, s/step and λ."""
        o, m, tasks = self.o, run.method, self.tasks
        res = _evaluate_addition(self.eval_model, m, vectors, tasks, self.choices_scores, self.metric, o.alphas,
                                 o.shape_alphas)
        mat = taujp_matrix(self.eval_model, vectors, {n: self.ex[n]["heldout"] for n in tasks},
                           output=answer_logits_output, batch_size=o.eval_batch_size,
                           collate_fn=self.encoder.collate)["matrix"]
        off = [mat[i][j] for i in range(len(tasks)) for j in range(len(tasks)) if i != j]
        res["taujp_matrix"] = mat
        res["taujp_offdiag_mean"] = sum(off) / len(off)
        trained = {n: st for n, st in stats.items() if st}  # loaded vectors (vectors_from) carry no training stats
        seconds = [s for s in (st["seconds_per_step"] for st in trained.values()) if s]
        res["seconds_per_step"] = sum(seconds) / max(1, len(seconds)) if not self.vectors_from else None
        res.update(lambda_record(m.regularized, run.lam, trained))
        print(f"{SAY} {run.label}: one-shot normalized {res['one_shot']['avg_norm']}, best α {res['best_alpha']:.2f}")
        return res

    def after_run(self, run: Run, vectors, res: dict) -> None:
        """The statistics-based merges of a non-linear run's vectors; the merge comparison of a ``compare_sets`` run."""
        o, m = self.o, run.method
        if self.merge_list and not m.linear:
            _statistics_merges(self.eval_model, run.label, run.folder, vectors, res["single"], self.tasks,
                               self.stats_ctx, self.results, self.choices_scores, self.metric, o.alphas,
                               o.shape_alphas, self.names)
        if self.bench_list and m.name in self.bench_sets:
            _compare_merges(self.eval_model, m, run.label, run.folder, vectors, res["single"], self.tasks,
                            self.bench_list, self.choices_scores, self.metric, o.output_dir, self.results)

    def report(self, complete: bool) -> None:
        """results.json / .md / the α-curve PNG; keeps (table rows, notes, paths) in ``written``."""
        self.written = _report(self.o.output_dir, self.results, self.runs, self.tasks, self.o.batch_size,
                               self.t_start, complete)
