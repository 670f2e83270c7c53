"""The CLIP vision recipe in the one recipe shape (:mod:`hf_taujp.recipes.runner`): :class:`ClipRecipe`, whose
parts :func:`hf_taujp.recipes.clip.run_clip` runs through :func:`~hf_taujp.recipes.runner.run_methods`. What the
recipe computes (heads, fine-tuning, addition, negation, merges, DDP) is documented in :mod:`hf_taujp.recipes.clip`
and :func:`~hf_taujp.recipes.clip.run_clip`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from types import SimpleNamespace

import torch

from ..evaluation import format_table
from ..hub import HfTaujpError, check_repo_id
from ..merging.regmean import linear_layers
from ..task_vector import TaskVector, fingerprint
from .clip_distributed import _embed, _taujp_matrix
from .clip_evaluation import (_accuracy, _evaluate_addition, _evaluate_negation, _merged_accuracy, _negation_rows,
                              _statistics_merges, _validation_score)
from .clip_model import ZeroShotCLIP, _save_heads, finetune_clip, image_encoder, load_clip, zero_shot_head
from .lambda_options import lambda_record, parse_lambdas
from .report import TAUJP_COLUMN_NOTE, addition_rows, mean_defined, per_task_rows, write_report
from .runner import (Recipe, Run, check_kfac_options, check_statistics_options, compare_and_save, estimate_curvature,
                     kfac_note, parse_compare_options, parse_merge_methods, parse_methods, statistics_batches,
                     subsample)
from .tasks import split_train_val
from .vision_tasks import HUB, VISION_TASKS, ImageCollator, check_images, load_vision_task, negation_control_task

__all__ = ["ClipRecipe", "CLIP_TAUJP_NORMS"]

_PREFIX = "[hf-taujp clip]"
CLIP_TAUJP_NORMS = ("l2", "sq_l2", "rms", "relative")  # not "kl": it reads f as logits, and image_embeds are not


class ClipRecipe(Recipe):
    """The CLIP recipe's parts. ``options``: :func:`~hf_taujp.recipes.clip.run_clip`'s arguments by name.

    The constructor does everything before training, in this order, so bad input fails before any of it: the
    option checks, the Trainer's arguments (under DDP they start the process group), the datasets (checked
    before the model loads), the model and zero-shot heads, the pixel / embedding caches, the results skeleton
    (the heads written), the statistics-merge context and the kfac methods' curvature. Every process runs every
    part (training and evaluation are collective under DDP); only the main one (``is_main``) writes files.

    Raises:
        HfTaujpError: bad input (see run_clip), before any training.
    """

    def __init__(self, options: Mapping):
        self.t_start = time.time()
        self.o = SimpleNamespace(**options)
        self.output_dir = self.o.output_dir
        self._check_options()
        self._trainer_arguments()
        self._load_datasets()
        self._load_model_and_heads()
        self._cache_pixels_and_embeddings()
        self._results_skeleton()
        self._statistics_context()
        self._curvature()
        self.paths: dict | None = None  # of the last report write (main process)

    # ------------------------------------------------------------------------------ before training
    def _check_options(self) -> None:
        """Methods, merge comparisons, kfac and statistics options, tasks, α grid, data folder, negation control
        and Hub repo id, all checked before anything is loaded."""
        o = self.o
        self.method_list = parse_methods(o.methods)
        self.bench_list, self.bench_sets = parse_compare_options(o.compare_merges, o.compare_sets, self.method_list)
        self.lam = parse_lambdas(o.taujp_lambda, o.lambda_grid, o.taujp_norm, several=False, norms=CLIP_TAUJP_NORMS,
                                 recipe="the CLIP recipe")
        self.kfac_lambdas = check_kfac_options(o.kfac_lambda, o.kfac_probe, o.kfac_examples, o.kfac_aggregation)
        if len(self.kfac_lambdas) > 1:
            raise HfTaujpError(f"the CLIP recipe trains each method once: one kfac_lambda, got {self.kfac_lambdas}")
        self.merge_list = parse_merge_methods(o.merge_methods)
        check_statistics_options(self.merge_list, self.method_list, o.fisher_examples, o.fisher_samples,
                                 o.base_fisher_weight)
        task_names = [t.strip() for t in o.tasks.split(",")] if isinstance(o.tasks, str) else list(o.tasks)
        unknown = [t for t in task_names if t not in VISION_TASKS]
        if unknown:
            raise HfTaujpError(f"unknown task(s) {unknown}; known: {sorted(VISION_TASKS)}")
        if len(task_names) < 2 or len(set(task_names)) != len(task_names):
            raise HfTaujpError(f"--tasks needs at least 2 distinct tasks (τJp regularizes on the others), got "
                               f"{task_names}")
        if not o.alphas:
            raise HfTaujpError("the α grid is empty")
        if o.data_dir != HUB and not os.path.isdir(o.data_dir):
            raise HfTaujpError(f"--data-dir {o.data_dir!r}: no such folder (use 'hub' or a folder with mnist/, "
                               "fashion_mnist/)")
        self.tasks = task_names
        self.control = negation_control_task(o.negation_control, task_names, o.data_dir)
        if o.push_to_hub:
            check_repo_id(o.push_to_hub)

    def _trainer_arguments(self) -> None:
        """The Trainer's arguments, built first: under `accelerate launch` / torchrun they start the process group,
        and their device (cuda:<local rank>, or cpu) is where evaluation runs too. Sets the number of processes,
        the device, ``is_main`` and the per-process batch (the global batch split over the processes)."""
        from ..trainer import TauJpConfig

        o = self.o
        self.args_common = dict(
            learning_rate=o.learning_rate, max_steps=o.steps, weight_decay=o.weight_decay, lr_scheduler_type="cosine",
            warmup_steps=o.warmup_steps, max_grad_norm=o.max_grad_norm, optim="adamw_torch",
            logging_steps=max(1, o.steps // 4), save_strategy="no", report_to="none", seed=o.seed,
            use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, taujp_lambda=self.lam.lambdas[0],
            taujp_norm=o.taujp_norm, **({"taujp_lambda_grid": self.lam.grid} if self.lam.auto else {}),
            taujp_mode=o.taujp_mode, taujp_batch_ratio=o.taujp_batch_ratio, taujp_output="image_embeds",
            disable_tqdm=True)
        self.probe = probe = TauJpConfig(output_dir=os.path.join(o.output_dir, "runs"), **self.args_common)
        self.world, self.device, self.is_main = probe.world_size, probe.device, probe.process_index == 0
        if o.batch_size < 1 or o.batch_size % self.world:
            raise HfTaujpError(f"--batch-size {o.batch_size} is the global batch: it must be a positive multiple of "
                               f"the {self.world} processes")
        self.per_device = o.batch_size // self.world
        self.args_common["per_device_train_batch_size"] = self.per_device
        self.say = print if self.is_main else (lambda *a, **k: None)

    def _load_datasets(self) -> None:
        """Every task's rows (train / val carved out of train / test) and class names, the control's (val and test
        only: never fine-tuned), the training rows used (steps × batch, seeded), labels and images checked — all
        before the model is loaded; the main process downloads first, the others read its cache."""
        o, control = self.o, self.control
        self.rows, self.classnames = rows, classnames = {}, {}
        with self.probe.main_process_first(local=True, desc="datasets"):
            for i, name in enumerate([*self.tasks, *([control] if control else [])]):
                try:
                    data = load_vision_task(VISION_TASKS[name], o.data_dir, max_train=o.max_train,
                                            max_test=o.max_test, seed=o.seed + i)
                except HfTaujpError as e:
                    if name != control:
                        raise
                    raise HfTaujpError(f"negation control {name!r}: {e} (choose another with --negation-control, "
                                       "or 'none')") from e
                train = data["train"]
                n = len(train)
                train, val = split_train_val(train, fraction=o.val_fraction, max_size=o.max_val,
                                             min_size=min(32, max(1, n // 4)), seed=o.seed + i)
                rows[name] = {"train": train if name != control else [], "val": val, "test": data["test"]}
                classnames[name] = data["classnames"]
                bad = sorted({y for s in rows[name].values() for _, y in s if not 0 <= y < len(classnames[name])})
                if bad:
                    raise HfTaujpError(f"task {name!r}: labels {bad[:5]} outside the {len(classnames[name])} class "
                                       "names")
        self.eval_names = [*self.tasks, *([control] if control else [])]
        n_used = o.steps * o.batch_size
        self.used = {n: subsample(rows[n]["train"], n_used, o.seed + 100 + i) for i, n in enumerate(self.tasks)}
        for n in self.eval_names:  # wrong channel counts / empty images fail here, not in the middle of training
            for s, part in (("train", self.used.get(n, [])), ("val", rows[n]["val"]), ("test", rows[n]["test"])):
                check_images((x for x, _ in part), f"task {n!r}, {s} images")

    def _load_model_and_heads(self) -> None:
        """The CLIP model, each evaluated task's zero-shot head, the image encoder (the tower that is trained) and
        two classifiers over it: ``clf`` (the target tasks' heads: trained) and ``eval_clf`` (+ the control's)."""
        o = self.o
        self.say(f"{_PREFIX} loading {o.model} ({self.world} process{'es' if self.world > 1 else ''}, "
                 f"{self.per_device} images each per step)")
        with self.probe.main_process_first(local=True, desc="model"):
            clip, tokenizer, processor = load_clip(o.model, seed=o.seed)
        clip.to(self.device)
        self.heads = {n: zero_shot_head(clip, tokenizer, self.classnames[n], VISION_TASKS[n].templates)
                      for n in self.eval_names}
        self.encoder = encoder = image_encoder(clip)
        self.clf = ZeroShotCLIP(encoder, {n: self.heads[n] for n in self.tasks}).to(self.device).eval()
        self.eval_clf = ZeroShotCLIP(encoder, self.heads).to(self.device).eval()  # task id = position
        del clip.text_model  # the text tower is done once the heads exist
        self.model_name = getattr(clip.config, "_name_or_path", None) or str(o.model)
        self.fp = fingerprint(encoder)
        self.collator = ImageCollator(processor)
        self.tid = {n: i for i, n in enumerate(self.eval_names)}

    def _cache_pixels_and_embeddings(self) -> None:
        """The training rows as Trainer rows, the val / test images preprocessed once (``pix``), their labels
        (``gold``), f(x; θ0) on them (``emb0``, shared by every method) and the τJp matrix's held-out inputs."""
        o, rows = self.o, self.rows
        self.train_rows = {n: [{"image": x, "labels": y, "task_ids": self.tid[n]} for x, y in self.used[n]]
                           for n in self.tasks}
        self.pix, self.gold = pix, gold = {}, {}
        for n in self.eval_names:
            for s in ("val", "test"):
                pix[(n, s)] = torch.cat([self.collator.pixels([x for x, _ in rows[n][s][j:j + 512]])
                                         for j in range(0, len(rows[n][s]), 512)])
                gold[(n, s)] = torch.tensor([y for _, y in rows[n][s]])
        self.emb0 = {k: _embed(self.encoder, v, o.eval_batch_size) for k, v in pix.items()}
        self.heldout = {n: [{"pixel_values": p} for p in pix[(n, "test")][:o.matrix_examples]] for n in self.tasks}

    def acc(self, n: str, s: str, emb: torch.Tensor) -> float:
        """Top-1 accuracy on task ``n``'s split ``s`` of the embeddings ``emb`` (its zero-shot head)."""
        return _accuracy(self.eval_clf, self.tid[n], emb, self.gold[(n, s)])

    def _results_skeleton(self) -> None:
        """``results`` before any method (model, tasks, sizes, splits, training options, zero-shot accuracy) and
        the zero-shot heads written (main process)."""
        o, control = self.o, self.control
        self.zero_shot = zero_shot = {n: self.acc(n, "test", self.emb0[(n, "test")]) for n in self.tasks}
        self.say(f"{_PREFIX} zero-shot test accuracy: " + ", ".join(f"{n} {v:.3f}" for n, v in zero_shot.items()))
        self.probe.per_device_train_batch_size = self.per_device
        reg_bs = self.probe.taujp_reg_batch_size  # per process: ceil(ratio × per-device batch)
        rows, classnames, world = self.rows, self.classnames, self.world
        self.results = {
            "model": self.model_name,
            "tasks": {n: {**VISION_TASKS[n].to_dict(), "classnames": classnames[n]} for n in self.tasks},
            "data": o.data_dir, "sizes": {n: {**{s: len(rows[n][s]) for s in ("train", "val", "test")},
                                              "train_used": len(self.used.get(n, []))} for n in self.eval_names},
            "splits": {"val": f"held out from train ({o.val_fraction:.0%}, ≤ {o.max_val}; chooses α"
                              + (" and, with --lambda auto, each task's λ)" if self.lam.auto else ")"),
                       "test": "the dataset's test split (reported)"},
            "steps": o.steps, "batch_size": o.batch_size, "num_processes": world,
            "per_device_batch_size": self.per_device, "learning_rate": o.learning_rate,
            "weight_decay": o.weight_decay, "warmup_steps": o.warmup_steps, "max_grad_norm": o.max_grad_norm,
            "scheduler": "cosine",
            "taujp": {"lambda": self.lam.lambdas[0], "norm": o.taujp_norm,
                      **({"lambda_grid": self.lam.grid} if self.lam.auto else {}), "mode": o.taujp_mode,
                      "batch_ratio": o.taujp_batch_ratio,
                      "reg_batch_size": reg_bs * world, "per_device_reg_batch_size": reg_bs,
                      "output": "image_embeds", "regularization_inputs": "other tasks' training inputs"},
            "zero_shot": zero_shot, "methods": {}, "negation": {},
            "negation_control": None if control is None else {
                **VISION_TASKS[control].to_dict(), "classnames": classnames[control],
                "zero_shot": self.acc(control, "test", self.emb0[(control, "test")])}}
        if self.is_main:
            _save_heads(o.output_dir, self.heads, classnames, self.eval_names)

    def _statistics_context(self) -> None:
        """What the statistics-based merges of the non-linear vectors need (opt-in ``merge_methods``; None
        without), and their ``results["statistics"]`` / ``results["merges"]``."""
        o, tasks = self.o, self.tasks
        self.stats_ctx = None
        if not self.merge_list:
            return
        sizes = {n: len(self.train_rows[n]) for n in tasks}  # s_t: the examples each vector was trained on
        s0 = float(o.base_fisher_weight) if o.base_fisher_weight is not None else sum(sizes.values()) / len(sizes)
        self.stats_ctx = dict(
            merge_list=self.merge_list, samples=o.fisher_samples, sizes=sizes, base_weight=s0,
            output_dir=o.output_dir, seed=o.seed, base_fisher=None, save=self.is_main,
            heads={n: (self.clf.task_names.index(n), self.heads[n].shape[0]) for n in tasks},
            batches={n: statistics_batches(self.train_rows[n], self.collator, o.eval_batch_size, o.fisher_examples)
                     for n in tasks},
            meta={"base_model": self.model_name, "base_fingerprint": self.fp, "recipe": "clip",
                  "examples": o.fisher_examples})
        self.results["merges"] = {}
        self.results["statistics"] = {
            "merge_methods": self.merge_list, "fisher_examples": o.fisher_examples, "fisher_samples": o.fisher_samples,
            "fisher": "true Fisher (labels sampled from the model) of the zero-shot classifier's logits (the task's "
                      "frozen head) w.r.t. the image encoder's parameters, at θ0 + τ_t; base at θ0",
            "gram": "inputs of the image encoder's Linear layers, at θ0 + τ_t",
            "task_sizes_s_t": sizes, "base_fisher_weight_s0": s0, "s0_default": o.base_fisher_weight is None,
            "seconds": 0.0}

    def _curvature(self) -> None:
        """The kfac methods' KFAC factors of every task at θ0 (saved under ``curvature/`` by the main process);
        None without a kfac method."""
        o = self.o
        self.curvature = None
        if not any(m.kfac for m in self.method_list):
            return
        self.say(f"{_PREFIX} KFAC factors ({o.kfac_probe} probe) of each task on {o.kfac_examples} training images")
        layers = [f"image_encoder.{p}" for p in linear_layers(self.clf.image_encoder)]
        self.curvature, info = estimate_curvature(
            self.clf, {n: self.train_rows[n] for n in self.tasks}, layers, output_dir=o.output_dir,
            probe=o.kfac_probe, seed=o.seed, output="image_embeds", collate_fn=self.collator,
            batch_size=o.eval_batch_size, max_examples=o.kfac_examples, meta={"base_model": self.model_name},
            save=self.is_main)
        self.results["curvature"] = {"probe": o.kfac_probe, "examples": o.kfac_examples,
                                     "aggregation": o.kfac_aggregation, "lambda": self.kfac_lambdas[0],
                                     "output": "image_embeds", "tasks": info}

    # ------------------------------------------------------------------------------- the shape
    def train(self, run: Run, task: str) -> tuple[TaskVector, dict]:
        """One task fine-tuned with ``run``'s method (:func:`finetune_clip`), regularized on the other tasks'
        training inputs (τJp) or against their KFAC factors (kfac)."""
        from ..trainer import TauJpConfig

        o, m, tasks = self.o, run.method, self.tasks
        self.say(f"{_PREFIX} {m.label} on {task}")
        # the Trainer's folder keeps the method's own name (runs/<name>/<task>), as before the one shape
        kfac = {"taujp_lambda": self.kfac_lambdas[0], "taujp_kfac_aggregation": o.kfac_aggregation} if m.kfac else {}
        args = TauJpConfig(output_dir=os.path.join(o.output_dir, "runs", m.name, task), **{**self.args_common, **kfac})
        return finetune_clip(
            self.clf, m, self.train_rows[task], args, data_collator=self.collator,
            regularization_datasets={t: self.train_rows[t] for t in tasks if t != task},
            curvature=[self.curvature[t] for t in tasks if t != task] if m.kfac else None,
            lambda_score=_validation_score(m, self.encoder, task, self.pix, self.acc, o.eval_batch_size)
            if m.taujp and self.lam.auto else None,
            meta={"base_model": self.model_name, "base_fingerprint": self.fp, "task": task,
                  "training": {"recipe": "clip", "head": "frozen zero-shot", "batch_size": o.batch_size,
                               "num_processes": self.world}})

    def vector_dir(self, run: Run, task: str) -> str | None:
        """``task_vectors/<run folder>/<task>`` on the main process; None on the others (DDP keeps the processes'
        vectors equal: one writes them)."""
        return super().vector_dir(run, task) if self.is_main else None

    def evaluate(self, run: Run, vectors: Mapping[str, TaskVector], stats: Mapping[str, dict]) -> dict:
        """Task addition (:func:`_evaluate_addition`), the τJp matrix on held-out test inputs and its off-diagonal
        mean, and the mean training seconds per step."""
        o, tasks = self.o, self.tasks
        res = _evaluate_addition(self.encoder, run.method, vectors, tasks, self.pix, self.emb0, self.acc, o.alphas,
                                 o.shape_alphas, o.eval_batch_size)
        mat = _taujp_matrix(self.encoder, vectors, self.heldout, o.eval_batch_size)
        off = [mat[i][j] for i in range(len(tasks)) for j in range(len(tasks)) if i != j]
        res["taujp_matrix"] = mat
        res["taujp_offdiag_mean"] = sum(off) / len(off)
        res["seconds_per_step"] = mean_defined([stats[t]["seconds_per_step"] for t in tasks])
        m = run.method
        res.update(lambda_record(m.regularized, self.kfac_lambdas[0] if m.kfac else self.lam.lambdas[0], stats))
        return res

    def after_run(self, run: Run, vectors: Mapping[str, TaskVector], res: dict) -> None:
        """Negation of every target (with a control), the statistics merges (non-linear methods, with
        ``merge_methods``) and the merge comparison (methods of ``compare_sets``). Every process computes
        (``_embed`` is collective); the main one writes."""
        o, m, results = self.o, run.method, self.results
        if self.control:
            results["negation"][run.label] = _evaluate_negation(self.encoder, m, vectors, self.tasks, self.control,
                                                                self.pix, self.acc, o.alphas, o.eval_batch_size)
        self.say(f"{_PREFIX} {m.label}: one-shot normalized {res['one_shot']['avg_norm']}, "
                 f"best α {res['best_alpha']:.2f}")
        if self.merge_list and not m.linear:
            _statistics_merges(self.clf, run.label, run.folder, vectors, res["single"], self.tasks, self.stats_ctx,
                               results, self.pix, self.acc, o.alphas, o.shape_alphas, o.eval_batch_size, self.say)
        if self.bench_list and m.name in self.bench_sets:
            compare_and_save(self.encoder, run.label, run.folder, vectors, res["single"], self.bench_list,
                             _merged_accuracy(m, self.encoder, self.tasks, self.pix, self.acc, o.eval_batch_size),
                             o.output_dir, results, prefix=_PREFIX, save=self.is_main)

    def report(self, complete: bool) -> None:
        """The tables, notes and wall time into ``results`` (every process: all return the same results), and
        results.json / .md / alpha_curves.png written by the main process; a partial write says so."""
        results = self.results
        # re-added at the end on every write, so the final file keeps the keys in the order of a single write
        for key in ("table", "negation_table", "complete", "wall_time_s", "warnings"):
            results.pop(key, None)  # "warnings": write_report's plot warning, added again by this write
        shown = {**results["methods"], **results.get("merges", {})}
        rows_ = addition_rows(shown, self.zero_shot)
        if len(rows_) > 1:  # format_table takes its columns from the first row: the zero-shot row gets them all
            rows_[0] = {k: rows_[0].get(k) for k in rows_[1]}
        results["table"] = self.rows_ = rows_
        results["negation_table"] = self.neg_rows = neg_rows = _negation_rows(results["negation"])
        results["complete"] = complete
        results["wall_time_s"] = round(time.time() - self.t_start, 1)
        notes = self._notes()
        if not complete:
            notes.append(f"PARTIAL: {len(results['methods'])} of {len(self.method_list)} method runs finished")
        extra = [("Per-task normalized accuracy at α = 1 (test)", per_task_rows(shown, self.tasks)),
                 ("Per-task normalized accuracy at best α (test)", per_task_rows(shown, self.tasks, "best"))]
        if neg_rows:
            extra.append(("Task negation (test; mean over targets)", neg_rows))
        if self.is_main:  # every process holds the same results (gathered evaluation); one writes them
            self.paths = write_report(self.output_dir, results, rows_,
                                      f"CLIP task addition ({self.model_name.split('/')[-1]})", shown,
                                      extra_tables=extra, notes=notes)

    def _notes(self) -> list[str]:
        """The report's notes: what the columns mean, the negation protocol, kfac and statistics merges."""
        results = self.results
        notes = [
            "accuracy (top-1) with frozen zero-shot heads; single / abs / norm on the test split; α chosen on a "
            "validation split held out from train; the α-curve PNG shows that validation split",
            "norm = merged / single-task accuracy of the same method (n/a when single = 0, left out of means)",
            "linear methods: linearized image encoder, non-linear head (normalize, then W) on its output",
            TAUJP_COLUMN_NOTE.replace("outputs", "image embeddings"),
            f"negation: θ0 − α τ_target, α minimising target accuracy (val) with control ≥ 0.95 × base control; "
            f"control = {self.control or 'none (skipped)'}, a task held out of the targets",
        ]
        if "curvature" in results:
            notes.append(kfac_note(results["curvature"]))
        if "statistics" in results:
            st = results["statistics"]
            notes.append(
                "<method> · <merge>: that method's vectors merged by fisher_average (θ0 + α·T·Σ F_t τ_t / Σ F_s), "
                "gradient_matching (Daheim et al.: θ0 + Σ_t α(s0·H0 + s_t F_t)/(s0·H0 + α Σ_s s_s F_s) τ_t) or regmean "
                f"(θ0 + α·T·(Σ G_t)⁻¹ Σ G_t τ_t), statistics on {st['fisher_examples']} training examples per task "
                "(Fisher of the classifier's logits with the task's frozen head, w.r.t. the image encoder); "
                f"s_t = training examples per task, s0 = {st['base_fisher_weight_s0']:g}"
                + (" (default: the mean s_t)" if st["s0_default"] else "")
                + ": large s0 → task arithmetic, s0 = 0 → Fisher averaging, no principled value when the pretraining "
                  "data is unseen")
        return notes

    def print_summary(self) -> None:
        """The task addition and negation tables (main process, after the last report write)."""
        print("\nTask addition (test split; α chosen on validation held out from train)\n" + format_table(self.rows_))
        if self.neg_rows:
            print("\nTask negation (test split)\n" + format_table(self.neg_rows))
