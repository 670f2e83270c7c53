"""The CLIP vision recipe: task addition and negation with zero-shot heads (Ilharco et al. 2023).

`hf-taujp clip --model openai/clip-vit-base-patch32 --tasks cars,dtd,eurosat,gtsrb,mnist,resisc45,sun397,svhn`
(or :func:`run_clip` from Python):

1. each task gets a **zero-shot classification head** (Ilharco et al. 2023, `zeroshot.py`): for class c,
   h_c = normalize(mean_k normalize(g(template_k(c)))) with g the CLIP text encoder, then
   W = exp(logit_scale)·[h_1 … h_C]; logits(x) = W · normalize(f(x)) with f the image encoder (the
   projected image embedding). Heads are buffers: **frozen**; only the image encoder is trained. The
   heads, class names and templates are written next to the results (`zero_shot_heads.*`).
2. each task is fine-tuned with each method (:data:`hf_taujp.recipes.runner.METHODS`) through
   `TauJpTrainer`. "linear" methods linearize the **image encoder** only, f_lin(x) = f(x; θ0) + J f(x; θ0)·τ,
   and apply the (non-linear: normalize, then W) head to f_lin, as tangent_task_arithmetic does
   (Ortiz-Jiménez et al. 2023); linearizing the whole classifier would also linearize the normalisation.
3. τJp penalises the tangent of the **image embedding** (`image_embeds`, before normalisation), the
   authors' choice for vision (Yoshida et al. 2025), on the other tasks' training inputs; the τJp matrix
   is measured on held-out (test) inputs.
4. task addition θ0 + α Σ_t τ_t (α = 1 and α chosen on validation over 0…1 step 0.05, ties → nearest 1)
   and task negation θ0 − α τ_target for every target (α minimising target accuracy on validation with
   control accuracy ≥ 0.95 × the base's; the control is held out of the targets and never fine-tuned:
   ImageNet online, as the authors, a held-out task offline, :func:`negation_control_task`),
   absolute and normalized accuracy (merged / single-task accuracy of the same method), results table,
   JSON and α-curve PNG (:mod:`hf_taujp.recipes.report`).
5. opt-in (`--merge-methods fisher_average,gradient_matching,regmean`): the non-linear vectors also merged by
   the statistics-based methods (:mod:`hf_taujp.recipes.runner`, "Statistics-based merges"), as the GLUE
   recipe does: each task's Fisher — of the classifier's logits with the task's frozen head, w.r.t. the image
   encoder's parameters — at θ0 + τ_t, the base Fisher at θ0 (each task's examples with its own head) and the
   Grams of the encoder's Linear layers, on `--fisher-examples` training examples per task, saved under
   `statistics/` keyed like the task vectors; each merge's α searched on validation like task addition.

Task vectors are keyed by the image tower's parameter names (`vision_model.*`, `visual_projection.weight`,
the CLIPModel's own) and fingerprinted on it: they apply to `CLIPVisionModelWithProjection.from_pretrained(model)`
(`TaskVector.apply_to`, `linear=True` for the linearized reading).

Data: online through `datasets.load_dataset` (:data:`VISION_TASKS` lists one Hub id per task, and ImageNet,
`ILSVRC/imagenet-1k`, with OpenAI's 1000 class names and 80 templates, for the negation control); the
validation split that chooses α is carved out of train (10%, ≤ 5000, seeded); results are on the test
split. Offline: `data_dir` = a folder with `mnist/` and `fashion_mnist/` IDX `.gz` files (the original
LeCun / Zalando layout; any task can be stored as `<data_dir>/<task>/` in that layout). Images go through
the model's own `CLIPImageProcessor` (resize, crop, normalise); grayscale is expanded to RGB first.

Optimiser defaults are the authors' (task_vectors / tangent_task_arithmetic): AdamW lr 1e-5, weight
decay 0.1, cosine schedule with 500 warm-up steps, grad clip 1, batch 128; τJp λ 0.1, reg batch 16
(ratio 1/8), cyclic. `model="tiny"` builds a tiny random CLIP (tests, CI, the notebook's offline mode).

Multi-GPU: `accelerate launch --num_processes N -m hf_taujp clip ...` (DDP; on a CPU-only machine add
`--multi_gpu`: `--cpu` alone starts one process). `--batch-size` stays the global batch (each process takes
1/N), so N processes train on the same batches as one; evaluation is split over the processes and
all-gathered; only the main process writes files (see :func:`run_clip`).

Differences from the authors' runs, on purpose or not yet done: τJp regularizes on the other tasks' *training*
inputs (theirs: validation inputs plus ImageNet; here validation chooses α, so it stays unseen); a fixed
number of steps per task rather than their per-dataset epochs.

Layout: this module holds :func:`run_clip` and the CLI, and re-exports the parts' names. The tasks and their data
are in :mod:`.vision_tasks`; the model, heads and classifier in :mod:`.clip_model`; the DDP-collective embeddings
and τJp matrix in :mod:`.clip_distributed`; the evaluation protocols in :mod:`.clip_evaluation`; the recipe in
the one recipe shape (:mod:`.runner`) in :mod:`.clip_recipe` — the report is rewritten after every method, a
partial one marked ``"complete": false``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from ..evaluation import DEFAULT_ALPHAS
from .clip_distributed import _barrier, _embed
from .clip_evaluation import _accuracy, _evaluate_addition
from .clip_model import (TINY, ZeroShotCLIP, ZeroShotOutput, finetune_clip, image_encoder, load_clip, tiny_clip,
                         zero_shot_head)
from .clip_recipe import CLIP_TAUJP_NORMS, ClipRecipe
from .lambda_options import add_lambda_arguments, cli_lambda
from .runner import (METHODS, SHAPE_ALPHAS, add_kfac_arguments, add_statistics_arguments, plan_runs, push_outputs,
                     run_methods, torch_threads)
from .vision_tasks import (HUB, IDX_FILES, IMAGENET, TEMPLATES, VISION_TASKS, ImageCollator, VisionTask, check_images,
                           load_vision_task, negation_control_task, read_idx, to_rgb)

# Re-exported beside __all__ (the module's names before its split): image_encoder, TEMPLATES, HUB and, for the
# tests, _embed, _accuracy and _evaluate_addition.
__all__ = ["VisionTask", "VISION_TASKS", "IDX_FILES", "TINY", "IMAGENET", "run_clip", "negation_control_task",
           "check_images", "zero_shot_head", "ZeroShotCLIP", "ZeroShotOutput", "ImageCollator", "load_clip", "tiny_clip",
           "load_vision_task", "read_idx", "to_rgb", "finetune_clip", "main", "add_arguments"]

CLIP_KFAC_LAMBDA = 500.0  # the reference's (tak.py --reg_lambda, CLIP ViT)


def run_clip(
    model: str = "openai/clip-vit-base-patch32",
    tasks=("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"),
    *,
    data_dir: str = HUB,
    methods="nonlinear,linear,taujp",
    output_dir: str = "hf_taujp_clip",
    steps: int = 2000,
    batch_size: int = 128,
    learning_rate: float = 1e-5,
    weight_decay: float = 0.1,
    warmup_steps: int = 500,
    max_grad_norm: float = 1.0,
    taujp_lambda: float | str = 0.1,
    taujp_norm: str = "l2",
    lambda_grid: Sequence[float] | None = None,
    taujp_mode: str = "cyclic",
    taujp_batch_ratio: float = 0.125,
    negation_control: str | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    val_fraction: float = 0.1,
    max_val: int = 5000,
    alphas=DEFAULT_ALPHAS,
    shape_alphas=SHAPE_ALPHAS,
    matrix_examples: int = 64,
    eval_batch_size: int = 256,
    push_to_hub: str | None = None,
    seed: int = 0,
    compare_merges: str | Sequence[str] | None = None,
    compare_sets: str | Sequence[str] = "linear,taujp",
    merge_methods: str | Sequence[str] | None = None,
    fisher_examples: int = 32,
    fisher_samples: int = 1,
    base_fisher_weight: float | None = None,
    kfac_lambda: float = CLIP_KFAC_LAMBDA,
    kfac_probe: str = "gaussian",
    kfac_examples: int = 256,
    kfac_aggregation: str = "merged",
) -> dict:
    """Run the CLIP vision recipe; returns the results dict (also `<output_dir>/results.json`).

    Args (all have CLI flags, see `hf-taujp clip --help`):
        model: Hub id / folder of a CLIPModel, or "tiny" (random tiny CLIP, offline).
        tasks: names in :data:`VISION_TASKS` (≥ 2, distinct).
        data_dir: "hub" or a folder with `mnist/`, `fashion_mnist/` IDX files.
        steps, batch_size, learning_rate, weight_decay, warmup_steps, max_grad_norm: AdamW + cosine per task
            and method (the authors' defaults). `batch_size` is the global batch: under DDP each of the N
            processes takes batch_size / N images per step (so N processes train on the same batches as one).
        taujp_lambda, taujp_norm, taujp_mode, taujp_batch_ratio: the penalty on `image_embeds` (TauJpConfig
            fields; "kl" is refused: the embedding is not a vector of logits). ``taujp_lambda="auto"``: each task's
            λ chosen by pilot runs on its own validation split (top-1 accuracy with its zero-shot head; the largest
            λ of ``lambda_grid`` within 0.03 of λ = 0's, else its smallest, :mod:`hf_taujp.trainer.lambda_search`), recorded per
            method as ``taujp_lambda`` (task → λ) and ``lambda_search``.
        lambda_grid: the λ grid of "auto" (default: ``DEFAULT_LAMBDA_GRIDS[taujp_norm]``).
        negation_control: the control task of negation, held out of `tasks` (:func:`negation_control_task`:
            default ImageNet online, the first held-out task with data offline); every task is negated in turn.
            "none" skips negation.
        max_train, max_test: seeded subsamples per task (None = all); validation = `val_fraction` of train, ≤ `max_val`.
            Memory: the validation and test images are kept preprocessed (3 × H × W float32 each: 0.6 MB at 224²,
            e.g. 12 GB for SUN397's ~20k test images), and the used training images are kept decoded:
            bound both with `max_train` / `max_test` on large datasets.
        alphas: the α grid of addition and negation; `shape_alphas` are plotted, never chosen.
        compare_merges, compare_sets: merge methods compared on the vectors of those methods
            (:func:`hf_taujp.evaluation.compare_merges`, chosen on validation; "default" = its DEFAULT_METHODS),
            saved under ``<output_dir>/merge_bench/<method>/`` and in ``results["merge_bench"]`` (main process).
        merge_methods: statistics-based merges of the non-linear vectors, names from
            :data:`hf_taujp.recipes.runner.STATISTICS_MERGES` (comma list; default none). Each task's true Fisher
            (labels sampled from the model) of its zero-shot classifier's logits w.r.t. the image encoder's
            parameters / the Grams of the encoder's Linear layers, at θ0 + τ_t on its first ``fisher_examples``
            training examples (``fisher_samples`` label draws per example), and the base Fisher at θ0 (every
            task's examples, each with its own head); saved (main process) in ``statistics/fisher/<method>/<task>``,
            ``statistics/fisher/base``, ``statistics/gram/<method>/<task>``, keyed by the encoder's parameter
            names as the task vectors. Reported as "<method label> · <merge>" rows in ``results["merges"]``.
        base_fisher_weight: gradient matching's s0 (the tasks' s_t are their training examples; default: the
            mean s_t): large s0 gives task arithmetic, s0 = 0 Fisher averaging.
        kfac_lambda, kfac_probe, kfac_examples, kfac_aggregation: the ``kfac`` methods (Porrello et al. 2026): each
            task's KFAC factors of the image encoder's Linear layers at θ0 on its first ``kfac_examples`` training
            images (f = ``image_embeds``; G of the ``kfac_probe``, default the reference's Gaussian probe), saved as
            ``curvature/<task>`` (main process); every task trained against the others' factors, penalty
            λ·Σ_layers tr(G·ΔW̃·A·ΔW̃ᵀ). λ default 500, the reference's — its f is the *normalised* embedding,
            ours the embedding before normalisation (as τJp's), whose scale is the model's.
    Raises HfTaujpError for bad input (unknown task / method, < 2 tasks, bad control, missing data, splits or
    class names, labels outside the class names, images of another shape / channel count, a batch size that
    the processes do not divide), before any training.

    Multi-GPU (DDP): run the same call under `accelerate launch --num_processes N` (or torchrun). Training is
    the Trainer's DDP; every process ends with the same task vectors; evaluation is split over the processes
    (:func:`_embed` rows, τJp matrix rows) and all-gathered, so every process returns the same results; only
    the main process writes files, and all processes return after its writes.
    """
    recipe = ClipRecipe(dict(locals()))  # run_clip's arguments, by name
    results = run_methods(recipe, plan_runs(recipe.method_list))
    if recipe.is_main:  # every process holds the same results (gathered evaluation); one prints and pushes
        recipe.print_summary()
        if push_to_hub:
            made = [sub for sub in ("statistics", "curvature") if sub in results]  # what this run made
            pushed = push_outputs(output_dir, push_to_hub, made)
            print(f"pushed {', '.join(pushed[:-1])} and {pushed[-1]}" if len(pushed) > 1 else f"pushed {pushed[0]}",
                  f"to {push_to_hub}")
        paths = recipe.paths
        print(f"\nsaved: {paths['json']}, {paths['markdown']}, {paths['png']}, task vectors in "
              f"{output_dir}/task_vectors/")
    _barrier()  # when run_clip returns on any process, the main process has written everything
    return results


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="openai/clip-vit-base-patch32",
                   help="Hub id or folder of a CLIPModel, or 'tiny' (random tiny CLIP, offline)")
    p.add_argument("--tasks", default="cars,dtd,eurosat,gtsrb,mnist,resisc45,sun397,svhn",
                   help=f"comma list from {', '.join(VISION_TASKS)}")
    p.add_argument("--data-dir", default=HUB, help="'hub' (datasets.load_dataset, ids in hf_taujp.recipes.clip.VISION_TASKS) "
                   "or a folder with mnist/ and fashion_mnist/ IDX .gz files (offline)")
    p.add_argument("--methods", default="nonlinear,linear,taujp", help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--output-dir", default="hf_taujp_clip")
    p.add_argument("--steps", type=int, default=2000, help="training steps per task and method")
    p.add_argument("--batch-size", type=int, default=128,
                   help="global batch per step; under accelerate launch --num_processes N each process takes 1/N")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW peak learning rate (cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    add_lambda_arguments(p, default=0.1, lambda_help="penalty on image_embeds; the authors' 0.1", several=False,
                         norms=CLIP_TAUJP_NORMS)
    p.add_argument("--mode", dest="taujp_mode", default="cyclic", choices=["cyclic", "strict"])
    p.add_argument("--reg-ratio", dest="taujp_batch_ratio", type=float, default=0.125, help="reg batch / task batch (16/128)")
    p.add_argument("--negation-control", default=None,
                   help="control task of negation, held out of --tasks (default: imagenet with --data-dir hub, else the "
                        "first other task with a folder in --data-dir; 'none' skips negation)")
    p.add_argument("--max-train", type=int, default=None, help="training rows per task (seeded subsample)")
    p.add_argument("--max-test", type=int, default=None, help="test rows per task (seeded subsample)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--compare-merges", default=None, metavar="METHODS",
                   help="also compare these merge methods (comma list, or 'default') on the vectors of --compare-sets")
    p.add_argument("--compare-sets", default="linear,taujp", help="methods whose vectors --compare-merges merges")
    add_statistics_arguments(p)
    add_kfac_arguments(p, default_lambda=CLIP_KFAC_LAMBDA, default_probe="gaussian",
                       why="default 500, the reference's (Porrello et al. 2026, CLIP ViT)", several=False)
    p.add_argument("--push-to-hub", default=None, metavar="REPO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (0: the idle cores, shared by the processes on this machine)")
    return p


def main(argv=None) -> dict:
    a = add_arguments(argparse.ArgumentParser(prog="hf-taujp clip", description=__doc__.split("\n")[0])).parse_args(argv)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # set by torchrun / accelerate launch
    torch.set_num_threads(a.threads if a.threads > 0 else max(1, torch_threads(0) // max(1, local)))
    results = run_clip(a.model, a.tasks, data_dir=a.data_dir, methods=a.methods, output_dir=a.output_dir, steps=a.steps,
                       batch_size=a.batch_size, learning_rate=a.lr, weight_decay=a.weight_decay,
                       warmup_steps=a.warmup_steps, max_grad_norm=a.max_grad_norm, taujp_lambda=cli_lambda(a.taujp_lambda),
                       taujp_norm=a.taujp_norm, lambda_grid=a.lambda_grid, taujp_mode=a.taujp_mode, taujp_batch_ratio=a.taujp_batch_ratio,
                       negation_control=a.negation_control, max_train=a.max_train, max_test=a.max_test,
                       eval_batch_size=a.eval_batch_size, push_to_hub=a.push_to_hub, seed=a.seed,
                       compare_merges=a.compare_merges, compare_sets=a.compare_sets, merge_methods=a.merge_methods,
                       fisher_examples=a.fisher_examples, fisher_samples=a.fisher_samples,
                       base_fisher_weight=a.base_fisher_weight, kfac_lambda=a.kfac_lambda[0] if len(a.kfac_lambda) == 1
                       else a.kfac_lambda, kfac_probe=a.kfac_probe, kfac_examples=a.kfac_examples,
                       kfac_aggregation=a.kfac_aggregation)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # the command's process ends here: leaving the group to interpreter shutdown can abort the process
        # (seen with gloo: "terminate called without an active exception") after everything was written
        dist.destroy_process_group()
    return results
