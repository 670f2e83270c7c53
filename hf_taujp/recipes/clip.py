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
"""

from __future__ import annotations

import argparse
import copy
import gzip
import os
import struct
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.utils import ModelOutput

from ..errors import CorruptFileError
from ..evaluation import DEFAULT_ALPHAS, _addition_protocol, evaluate_task_negation, format_table, taujp_matrix
from ..hub import HfTaujpError, check_repo_id
from ..linearize import LinearizedModule, linearized_forward
from ..task_vector import fingerprint
from .glue import SHAPE_ALPHAS, _rows, _threads, _weights_of, evaluate_statistics_merges
from .imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES
from .report import TAUJP_COLUMN_NOTE, addition_rows, mean_defined, per_task_rows, write_report
from .runner import (METHODS, STATISTICS_MERGES, Method, add_statistics_arguments, check_statistics_options,
                     compare_and_save, estimate_statistics, finetune, parse_compare_options, parse_merge_methods,
                     parse_methods, statistics_batches)
from .tasks import split_train_val

__all__ = ["VisionTask", "VISION_TASKS", "IDX_FILES", "TINY", "IMAGENET", "run_clip", "negation_control_task",
           "check_images", "zero_shot_head", "ZeroShotCLIP", "ZeroShotOutput", "ImageCollator", "load_clip", "tiny_clip",
           "load_vision_task", "read_idx", "to_rgb", "finetune_clip", "main", "add_arguments"]

TINY = "tiny"
HUB = "hub"

# Ilharco et al. (2023) / tangent_task_arithmetic `templates.py`; fashion_mnist is not in their 8 tasks (ours).
_DIGITS = ('a photo of the number: "{c}".',)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "mnist": _DIGITS,
    "svhn": _DIGITS,
    "fashion_mnist": ("a photo of a {c}.", "a photo of the {c}.", "a photo of a {c}, a type of clothing."),
    "eurosat": ("a centered satellite photo of {c}.", "a centered satellite photo of a {c}.",
                "a centered satellite photo of the {c}."),
    "gtsrb": ('a zoomed in photo of a "{c}" traffic sign.', 'a centered photo of a "{c}" traffic sign.',
              'a close up photo of a "{c}" traffic sign.'),
    "dtd": tuple(f"a photo of {d} {{c}} {w}." for d in ("a", "the") for w in ("texture", "pattern", "thing", "object")),
    "resisc45": tuple(f"{k} {v} of {d}{{c}}." for d in ("", "a ", "the ") for v in ("imagery", "photo", "view")
                      for k in ("satellite", "aerial")),
    "cars": ("a photo of a {c}.", "a photo of the {c}.", "a photo of my {c}.", "i love my {c}!",
             "a photo of my dirty {c}.", "a photo of my clean {c}.", "a photo of my new {c}.", "a photo of my old {c}."),
    "sun397": ("a photo of a {c}.", "a photo of the {c}."),
}


@dataclass(frozen=True)
class VisionTask:
    """One image-classification task: where its data lives and how its zero-shot head is built.

    `classnames=None` reads them from the dataset's `ClassLabel` feature (underscores → spaces).
    `idx_dir`: the offline folder (under `data_dir`) holding `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
    `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz` (LeCun's MNIST layout; images (N, H, W) or
    (N, H, W, 1 | 3) uint8); None = the task's name.
    """

    name: str
    hub_id: str
    templates: tuple[str, ...]
    classnames: tuple[str, ...] | None = None
    hub_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    idx_dir: str | None = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def offline_dir(self, data_dir: str) -> str:
        return os.path.join(data_dir, self.idx_dir or self.name)

    def missing_idx_files(self, data_dir: str) -> list[str]:
        """The IDX files (:data:`IDX_FILES`) absent from the task's offline folder (all of them without one)."""
        d = self.offline_dir(data_dir)
        return [f for f in IDX_FILES if not os.path.isfile(os.path.join(d, f))]


# The offline layout of a task folder (LeCun's MNIST files, gzipped): the only one read offline.
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")


_FASHION = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
_DIGIT_NAMES = tuple(str(i) for i in range(10))
# Hub ids: ylecun/mnist, zalando-datasets/fashion_mnist and ufldl-stanford/svhn are the datasets' own repos; the
# other six are FusionBench's copies (tanganke/*, image + label columns, train / test splits).
VISION_TASKS: dict[str, VisionTask] = {
    "mnist": VisionTask("mnist", "ylecun/mnist", TEMPLATES["mnist"], _DIGIT_NAMES, idx_dir="mnist"),
    "fashion_mnist": VisionTask("fashion_mnist", "zalando-datasets/fashion_mnist", TEMPLATES["fashion_mnist"], _FASHION,
                                idx_dir="fashion_mnist"),
    "svhn": VisionTask("svhn", "ufldl-stanford/svhn", TEMPLATES["svhn"], _DIGIT_NAMES, hub_config="cropped_digits"),
    "cars": VisionTask("cars", "tanganke/stanford_cars", TEMPLATES["cars"]),
    "dtd": VisionTask("dtd", "tanganke/dtd", TEMPLATES["dtd"]),
    "eurosat": VisionTask("eurosat", "tanganke/eurosat", TEMPLATES["eurosat"]),
    "gtsrb": VisionTask("gtsrb", "tanganke/gtsrb", TEMPLATES["gtsrb"]),
    "resisc45": VisionTask("resisc45", "tanganke/resisc45", TEMPLATES["resisc45"]),
    "sun397": VisionTask("sun397", "tanganke/sun397", TEMPLATES["sun397"]),
    # The negation control of Ilharco et al. (2023) (never fine-tuned there): ILSVRC/imagenet-1k is the Hub's
    # ImageNet-1k (gated: accept its terms and log in); its test split has no labels, so "validation" is the test.
    "imagenet": VisionTask("imagenet", "ILSVRC/imagenet-1k", IMAGENET_TEMPLATES, IMAGENET_CLASSNAMES,
                           test_split="validation"),
}
IMAGENET = "imagenet"


# ------------------------------------------------------------------------------------------ data
def read_idx(path: str) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, optionally .gz) as a numpy array: uint8 images (N, H, W) or labels (N,).

    Raises HfTaujpError for a missing file; CorruptFileError (an HfTaujpError) for a file that cannot be read or
    un-gzipped (permissions, a truncated / corrupt .gz), a header that is not IDX uint8 or is cut short, or a
    size that differs from the header's."""
    if not os.path.isfile(path):
        raise HfTaujpError(f"IDX file {path!r} not found")
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a truncated .gz ends in EOFError
        raise CorruptFileError(f"{path}: cannot be read{' as gzip' if path.endswith('.gz') else ''} "
                               f"({type(e).__name__}: {e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CorruptFileError(f"{path!r} is not an IDX uint8 file")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise CorruptFileError(f"{path}: IDX header cut short ({len(data)} bytes, {ndim} dimension(s) announced)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise CorruptFileError(f"{path!r}: header says {dims} but holds {arr.size} values")
    return arr.reshape(dims)


def load_vision_task(task: VisionTask, data_dir: str = HUB, *, max_train: int | None = None,
                     max_test: int | None = None, seed: int = 0) -> dict:
    """`{"train": [(image, label)], "test": [...], "classnames": [...]}` of one task.

    data_dir: "hub" (`datasets.load_dataset(task.hub_id, task.hub_config)`) or a folder with
    `<task.idx_dir or task.name>/` IDX files (offline MNIST / Fashion-MNIST, or any task stored in that layout).
    max_train, max_test: seeded subsamples (rows in dataset order), taken before images are decoded.
    Raises HfTaujpError: no offline folder for the task, or one without the four IDX files (:data:`IDX_FILES`;
    an empty folder, or class folders of images, which are not read offline), an unreadable / corrupt IDX file
    (:func:`read_idx`), a dataset without the expected split or columns, an empty split, no class names
    (neither built in nor a `ClassLabel` feature), images that are neither (H, W) nor (H, W, 1 | 3) (IDX files;
    Hub images are checked when used, see :func:`check_images`).
    """
    if data_dir != HUB:
        d = task.offline_dir(data_dir)
        if not os.path.isdir(d):
            raise HfTaujpError(f"task {task.name!r} has no offline data: no folder {d!r} with IDX files "
                               "(use --data-dir hub, or store the task there in LeCun's MNIST layout)")
        missing = task.missing_idx_files(data_dir)
        if missing:
            try:
                entries = sorted(os.listdir(d))
            except OSError as e:
                raise HfTaujpError(f"task {task.name!r}: folder {d} cannot be read ({e.strerror or e})") from None
            subdirs = [e for e in entries if os.path.isdir(os.path.join(d, e))]
            seen = ("it is empty" if not entries else
                    f"it holds the folder(s) {subdirs[:3]}: class folders of images are not read offline"
                    if subdirs else f"it holds {entries[:3]}")
            raise HfTaujpError(f"task {task.name!r}: {d} lacks the IDX file(s) {missing} of LeCun's MNIST layout "
                               f"({seen}); store the task as IDX files or use --data-dir hub")
        out = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            x = read_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte.gz"))
            y = read_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz"))
            if y.ndim != 1 or len(x) != len(y):
                raise HfTaujpError(f"{d}: {prefix} images {x.shape} and labels {y.shape} do not match")
            if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3))) or 0 in x.shape[1:]:
                raise HfTaujpError(f"{d}: {prefix} images of shape {x.shape}: expected (N, H, W) or (N, H, W, 1 | 3)")
            if not len(y):
                raise HfTaujpError(f"{d}: the {split} split is empty")
            keep = _rows(range(len(y)), max_train if split == "train" else max_test, seed)
            out[split] = [(x[j], int(y[j])) for j in keep]
        if task.classnames is None:
            raise HfTaujpError(f"class names missing for task {task.name!r}: give VisionTask(classnames=...)")
        out["classnames"] = list(task.classnames)
        return out
    import datasets

    ds = datasets.load_dataset(task.hub_id, task.hub_config)
    for split in (task.train_split, task.test_split):
        if split not in ds:
            raise HfTaujpError(f"dataset {task.hub_id!r} has no split {split!r} (splits: {list(ds)})")
        if not len(ds[split]):
            raise HfTaujpError(f"dataset {task.hub_id!r}: the {split!r} split is empty")
        missing = [c for c in (task.image_column, task.label_column) if c not in ds[split].column_names]
        if missing:
            raise HfTaujpError(f"dataset {task.hub_id!r}[{split}] has no column(s) {missing} "
                               f"(columns: {ds[split].column_names})")
    names = task.classnames
    if names is None:
        feat = ds[task.train_split].features[task.label_column]
        names = tuple(n.replace("_", " ") for n in getattr(feat, "names", None) or ())
    if not names:
        raise HfTaujpError(f"class names missing for task {task.name!r}: give VisionTask(classnames=...)")
    out = {}
    for s, split, n in (("train", task.train_split, max_train), ("test", task.test_split, max_test)):
        part = ds[split].select(_rows(range(len(ds[split])), n, seed))  # decode only the images used
        out[s] = list(zip(part[task.image_column], part[task.label_column]))
    out["classnames"] = list(names)
    return out


def _image_problem(image) -> str | None:
    """Why `image` cannot go to the image processor (None when it can), without decoding it: PIL images of
    any mode and size > 0; arrays (H, W), (H, W, 1) or (H, W, 3) channels-last with H, W > 0."""
    if hasattr(image, "convert"):
        return None if min(getattr(image, "size", (1, 1))) > 0 else f"empty PIL image of size {image.size}"
    shape = tuple(image.shape) if isinstance(image, torch.Tensor) else np.shape(image)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[-1] in (1, 3))) or 0 in shape:
        return (f"image of shape {shape}: expected (H, W), (H, W, 1) or (H, W, 3) channels-last with H, W > 0, "
                "or a PIL image")
    return None


def check_images(images, what: str = "images") -> None:
    """Raise HfTaujpError naming the first image that :func:`to_rgb` would refuse (shape / channel count);
    sizes are the processor's business (it resizes and crops any H, W > 0). Cheap: no decoding."""
    for i, im in enumerate(images):
        problem = _image_problem(im)
        if problem:
            raise HfTaujpError(f"{what}, row {i}: {problem}")


def to_rgb(image):
    """An image as RGB for the image processor: PIL images through `.convert("RGB")`; numpy / torch arrays
    (H, W), (H, W, 1) → channel repeated; (H, W, 3) kept.

    Raises HfTaujpError for arrays with another shape / channel count (e.g. RGBA arrays, (3, H, W))."""
    problem = _image_problem(image)
    if problem:
        raise HfTaujpError(problem)
    if hasattr(image, "convert"):
        return image.convert("RGB")
    a = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


class ImageCollator:
    """Rows `{"image", "labels", "task_ids"}` → `{"pixel_values": (B, 3, H, W), "labels": (B,), "task_ids": (B,)}`
    through the model's image processor (so no torchvision is needed)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def pixels(self, images) -> torch.Tensor:
        return self.image_processor(images=[to_rgb(im) for im in images], return_tensors="pt")["pixel_values"]

    def __call__(self, rows):
        out = {"pixel_values": self.pixels([r["image"] for r in rows])}
        for k in ("labels", "task_ids"):
            if k in rows[0]:
                out[k] = torch.tensor([int(r[k]) for r in rows], dtype=torch.long)
        return out


# ----------------------------------------------------------------------------------------- model
def tiny_clip(image_size: int = 28, patch_size: int = 7, seed: int = 0):
    """(CLIPModel, tokenizer, CLIPImageProcessor) of a tiny random CLIP, built offline (tests, CI).

    The tokenizer is character-level (`tokenizers` WordLevel over printable ASCII) with an end token whose
    position the text tower pools, as CLIP's BPE tokenizer does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)]
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", model_max_length=64)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch_size, projection_dim=16),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = CLIPModel._from_config(cfg, attn_implementation="eager").eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def load_clip(model: str = TINY, seed: int = 0):
    """(CLIPModel, tokenizer, image processor) of a Hub id / folder, or `"tiny"` (:func:`tiny_clip`)."""
    if model == TINY:
        return tiny_clip(seed=seed)
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(model, attn_implementation="eager").eval()
    return clip, AutoTokenizer.from_pretrained(model), AutoImageProcessor.from_pretrained(model)


def image_encoder(clip) -> nn.Module:
    """The image tower of a CLIPModel as a `CLIPVisionModelWithProjection` sharing its weights: parameter
    names `vision_model.*` and `visual_projection.weight`, the CLIPModel's own, so task vectors apply to both."""
    from transformers import CLIPVisionModelWithProjection

    cfg = copy.deepcopy(clip.config.vision_config)
    cfg.projection_dim = clip.config.projection_dim  # a CLIPConfig keeps it at the top level only
    enc = CLIPVisionModelWithProjection._from_config(cfg, attn_implementation="eager")
    enc.vision_model = clip.vision_model
    enc.visual_projection = clip.visual_projection
    return enc.eval()


def _text_features(clip, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    feats = []
    dev = next(clip.parameters()).device
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, return_tensors="pt").to(dev)
        out = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        feats.append(out if isinstance(out, torch.Tensor) else out.pooler_output)
    return torch.cat(feats)


@torch.no_grad()
def zero_shot_head(clip, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """W (C, D): row c = exp(logit_scale) · normalize(mean_k normalize(g(template_k.format(c=name_c)))).

    Ilharco et al. (2023), `src/modeling.py` / `zeroshot.py` (CLIP's zero-shot recipe, Radford et al. 2021).
    Raises HfTaujpError: no class names, no templates, a template without `{c}`."""
    if not classnames:
        raise HfTaujpError("class names missing: a zero-shot head needs one name per class")
    if not templates or any("{c}" not in t for t in templates):
        raise HfTaujpError(f"templates must be a non-empty list of strings with a '{{c}}' slot, got {list(templates)}")
    was = clip.training
    clip.eval()
    try:
        texts = [t.format(c=c) for c in classnames for t in templates]
        e = _text_features(clip, tokenizer, texts).float().reshape(len(classnames), len(templates), -1)
        e = e / e.norm(dim=-1, keepdim=True)
        h = e.mean(1)
        h = h / h.norm(dim=-1, keepdim=True)
        return (clip.logit_scale.exp().float() * h).detach().cpu()
    finally:
        clip.train(was)


@dataclass
class ZeroShotOutput(ModelOutput):
    """loss: CE of `logits` (with labels); logits: (B, C_max) (classes a task lacks at the finfo.min of the
    dtype); image_embeds: (B, D) projected image embedding f(x), before normalisation (what τJp penalises)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


class ZeroShotCLIP(nn.Module):
    """Image encoder f (trainable or linearized) + frozen zero-shot heads: logits = W_t · normalize(f(x)).

    Args:
        encoder: a `CLIPVisionModelWithProjection` (:func:`image_encoder`) or a `LinearizedModule` around one.
        heads: `{task: W (C_t, D)}` from :func:`zero_shot_head`; task id t = position in this mapping.
    forward(pixel_values (B, 3, H, W), task_ids (B,) = 0, labels (B,) = None) → :class:`ZeroShotOutput`.
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, torch.Tensor]):
        super().__init__()
        if not heads:
            raise HfTaujpError("ZeroShotCLIP needs at least one head")
        self.image_encoder = encoder
        self.task_names = list(heads)
        cmax = max(h.shape[0] for h in heads.values())
        dim = next(iter(heads.values())).shape[1]
        stacked = torch.zeros(len(heads), cmax, dim)
        mask = torch.zeros(len(heads), cmax, dtype=torch.bool)
        for i, h in enumerate(heads.values()):
            if h.shape[1] != dim:
                raise HfTaujpError(f"head {self.task_names[i]!r} has dim {h.shape[1]}, expected {dim}")
            stacked[i, :h.shape[0]] = h
            mask[i, :h.shape[0]] = True
        self.register_buffer("heads", stacked)
        self.register_buffer("head_mask", mask)

    @property
    def config(self):
        return getattr(self.image_encoder, "config", None)

    @property
    def jvp(self):
        """With a linearized encoder: `jvp(pixel_values, ...) → (f(x; θ0), J f(x; θ0)·τ)` as ZeroShotOutputs
        holding `image_embeds` (what TauJpTrainer penalises); None otherwise (the trainer then takes J itself)."""
        enc = self.image_encoder
        if not isinstance(enc, LinearizedModule):
            return None

        def jvp(pixel_values, **_):
            p, t = enc.jvp(pixel_values=pixel_values)
            return ZeroShotOutput(image_embeds=p.image_embeds), ZeroShotOutput(image_embeds=t.image_embeds)

        return jvp

    def classify(self, image_embeds: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """logits (B, C_max) = W_{task_b} · normalize(image_embeds_b)."""
        feats = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        w = self.heads[task_ids].to(feats.dtype)
        logits = torch.einsum("bd,bcd->bc", feats, w)
        return logits.masked_fill(~self.head_mask[task_ids], torch.finfo(logits.dtype).min)

    def forward(self, pixel_values, task_ids=None, labels=None):
        # no **kwargs: the Trainer then keeps scaling the (mean) loss for gradient accumulation itself
        emb = self.image_encoder(pixel_values=pixel_values).image_embeds
        if task_ids is None:
            task_ids = torch.zeros(emb.shape[0], dtype=torch.long, device=emb.device)
        logits = self.classify(emb, task_ids.to(emb.device))
        loss = nn.functional.cross_entropy(logits.float(), labels.to(logits.device)) if labels is not None else None
        return ZeroShotOutput(loss=loss, logits=logits, image_embeds=emb)


# -------------------------------------------------------------------------------------- training
def finetune_clip(clf: ZeroShotCLIP, method: Method, train_dataset, args, *, data_collator,
                  regularization_datasets: Mapping[str, object] | None = None, meta: Mapping | None = None):
    """Fine-tune a copy of the classifier's image encoder on one task; returns (TaskVector, stats).

    :func:`hf_taujp.recipes.runner.finetune` with ``submodule="image_encoder"``: linear methods linearize
    the image encoder only (the head stays non-linear, as in tangent_task_arithmetic). Task-vector keys
    are the encoder's (= CLIPModel's) parameter names; τJp penalises ``image_embeds``.
    """
    names = [n for n, _ in clf.image_encoder.named_parameters()]
    meta = dict(meta or {})
    meta["training"] = {**dict(meta.get("training") or {}), **({"taujp_output": "image_embeds"} if method.taujp else {})}
    tv, stats = finetune(clf, names, method, train_dataset, args, data_collator=data_collator,
                         regularization_datasets=regularization_datasets, submodule="image_encoder", meta=meta)
    stats.pop("log_history", None)
    return tv, stats


# ------------------------------------------------------------------------------------ processes
def _world() -> tuple[int, int]:
    """(number of processes, rank of this one) of the running `torch.distributed` job, (1, 0) outside one.

    Under `accelerate launch --num_processes N` / torchrun the Trainer's arguments start the process group
    (:func:`run_clip` builds its `TauJpConfig` before any evaluation)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(N·n, ...): the equal-shaped (n, ...) tensors of all N processes, concatenated in rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _barrier() -> None:
    import torch.distributed as dist

    if _world()[0] > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def _embed(encoder, pixels: torch.Tensor, batch_size: int, tangents: Mapping | None = None):
    """f(x) (N, D), or (f(x; θ0), J f(x; θ0)·τ) with `tangents` — one jvp per batch.

    Under DDP (N processes) process r embeds rows [r·s, (r+1)·s), s = ceil(N_rows / N) (the last row repeated
    so every share has s rows: every process joins the same collectives, none waits on a shorter one), and
    the shares are all-gathered: every process returns the same full (N_rows, D) result, computed once."""
    world, rank = _world()
    n = len(pixels)
    if world == 1 or n == 0:
        out = _embed_local(encoder, pixels, batch_size, tangents)
        return out.cpu() if tangents is None else tuple(t.cpu() for t in out)
    share = -(-n // world)
    if share * world > n:
        pixels = torch.cat([pixels, pixels[-1:].expand(share * world - n, *pixels.shape[1:])])
    out = _embed_local(encoder, pixels[rank * share:(rank + 1) * share], batch_size, tangents)
    if tangents is None:
        return _all_gather_rows(out)[:n].cpu()
    return tuple(_all_gather_rows(t)[:n].cpu() for t in out)


def _embed_local(encoder, pixels: torch.Tensor, batch_size: int, tangents: Mapping | None = None):
    """:func:`_embed` on this process's rows, results on the encoder's device (float32)."""
    dev = next(encoder.parameters()).device
    params = dict(encoder.named_parameters())
    outs, tans = [], []
    for i in range(0, len(pixels), batch_size):
        x = pixels[i:i + batch_size].to(dev)
        if tangents is None:
            outs.append(encoder(pixel_values=x).image_embeds.float())
        else:
            p, t = linearized_forward(encoder, {k: params[k] for k in tangents}, tangents, (), {"pixel_values": x})
            outs.append(p.image_embeds.float())
            tans.append(t.image_embeds.float())
    return torch.cat(outs) if tangents is None else (torch.cat(outs), torch.cat(tans))


def _taujp_matrix(encoder, vectors: Mapping, heldout: Mapping, batch_size: int) -> list[list[float]]:
    """:func:`hf_taujp.evaluation.taujp_matrix` rows (one per task vector, on `image_embeds`); under DDP row i
    is computed by process i mod N and the rows are all-gathered (every process returns the whole matrix)."""
    world, rank = _world()
    names = list(vectors)
    mine = [i for i in range(len(names)) if i % world == rank]
    rows = taujp_matrix(encoder, {names[i]: vectors[names[i]] for i in mine}, heldout, output="image_embeds",
                        batch_size=batch_size)["matrix"] if mine else []
    if world == 1:
        return rows
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, list(zip(mine, rows)))
    got = dict(pair for part in parts for pair in part)
    return [got[i] for i in range(len(names))]


def _accuracy(clf: ZeroShotCLIP, task_id: int, emb: torch.Tensor, gold: torch.Tensor) -> float:
    ids = torch.full((emb.shape[0],), task_id, dtype=torch.long)
    dev = clf.heads.device
    return float((clf.classify(emb.to(dev), ids.to(dev)).argmax(-1).cpu() == gold).float().mean())


def negation_control_task(control: str | None, tasks: Sequence[str], data_dir: str = HUB) -> str | None:
    """The control task of negation, held out of the target `tasks` (never fine-tuned), or None for "none".

    Default (None): online (`data_dir="hub"`) ImageNet (:data:`IMAGENET`, Ilharco et al. 2023's control);
    offline the first task of :data:`VISION_TASKS` that is not a target and has its IDX files in `data_dir`.
    Raises HfTaujpError: an unknown task, a control that is also a target task, a control without data
    (offline: no folder; the default when no held-out task has one).
    """
    if control == "none":
        return None
    if control is None:
        if data_dir == HUB:
            control = IMAGENET
        else:
            # a folder counts as data when it holds the IDX files (an empty / other-layout folder is not a task)
            held_out = [n for n, t in VISION_TASKS.items() if n not in tasks and not t.missing_idx_files(data_dir)]
            if not held_out:
                raise HfTaujpError(
                    f"task negation needs a control task held out of the targets {list(tasks)}, and no other task has "
                    f"offline data in {data_dir!r} (a <task>/ folder of IDX files): add one, name one with "
                    "--negation-control, or skip negation with --negation-control none")
            control = held_out[0]
    if control not in VISION_TASKS:
        raise HfTaujpError(f"--negation-control {control!r}: unknown task; known: {sorted(VISION_TASKS)} (or 'none')")
    if control in tasks:
        raise HfTaujpError(f"--negation-control {control!r} is also a target task {list(tasks)}: the control must be "
                           f"held out (default: {IMAGENET} online, a held-out task offline; 'none' skips negation)")
    if data_dir != HUB and not os.path.isdir(VISION_TASKS[control].offline_dir(data_dir)):
        raise HfTaujpError(f"--negation-control {control!r} has no data: no folder "
                           f"{VISION_TASKS[control].offline_dir(data_dir)!r} of IDX files (or 'none' skips negation)")
    return control


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
    taujp_lambda: float = 0.1,
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
) -> dict:
    """Run the CLIP vision recipe; returns the results dict (also `<output_dir>/results.json`).

    Args (all have CLI flags, see `hf-taujp clip --help`):
        model: Hub id / folder of a CLIPModel, or "tiny" (random tiny CLIP, offline).
        tasks: names in :data:`VISION_TASKS` (≥ 2, distinct).
        data_dir: "hub" or a folder with `mnist/`, `fashion_mnist/` IDX files.
        steps, batch_size, learning_rate, weight_decay, warmup_steps, max_grad_norm: AdamW + cosine per task
            and method (the authors' defaults). `batch_size` is the global batch: under DDP each of the N
            processes takes batch_size / N images per step (so N processes train on the same batches as one).
        taujp_lambda, taujp_mode, taujp_batch_ratio: the penalty on `image_embeds` (TauJpConfig fields).
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
    Raises HfTaujpError for bad input (unknown task / method, < 2 tasks, bad control, missing data, splits or
    class names, labels outside the class names, images of another shape / channel count, a batch size that
    the processes do not divide), before any training.

    Multi-GPU (DDP): run the same call under `accelerate launch --num_processes N` (or torchrun). Training is
    the Trainer's DDP; every process ends with the same task vectors; evaluation is split over the processes
    (:func:`_embed` rows, τJp matrix rows) and all-gathered, so every process returns the same results; only
    the main process writes files, and all processes return after its writes.
    """
    t_start = time.time()
    method_list = parse_methods(methods)
    bench_list, bench_sets = parse_compare_options(compare_merges, compare_sets, method_list)
    merge_list = parse_merge_methods(merge_methods)
    check_statistics_options(merge_list, method_list, fisher_examples, fisher_samples, base_fisher_weight)
    task_names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in task_names if t not in VISION_TASKS]
    if unknown:
        raise HfTaujpError(f"unknown task(s) {unknown}; known: {sorted(VISION_TASKS)}")
    if len(task_names) < 2 or len(set(task_names)) != len(task_names):
        raise HfTaujpError(f"--tasks needs at least 2 distinct tasks (τJp regularizes on the others), got {task_names}")
    if not alphas:
        raise HfTaujpError("the α grid is empty")
    if data_dir != HUB and not os.path.isdir(data_dir):
        raise HfTaujpError(f"--data-dir {data_dir!r}: no such folder (use 'hub' or a folder with mnist/, fashion_mnist/)")
    control = negation_control_task(negation_control, task_names, data_dir)
    if push_to_hub:
        check_repo_id(push_to_hub)
    from ..trainer import TauJpConfig

    # The Trainer's arguments, built first: under `accelerate launch` / torchrun they start the process group,
    # and their device (cuda:<local rank>, or cpu) is where evaluation runs too.
    args_common = dict(learning_rate=learning_rate, max_steps=steps, weight_decay=weight_decay,
                       lr_scheduler_type="cosine", warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                       optim="adamw_torch", logging_steps=max(1, steps // 4), save_strategy="no", report_to="none",
                       seed=seed, use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
                       taujp_lambda=taujp_lambda, taujp_mode=taujp_mode, taujp_batch_ratio=taujp_batch_ratio,
                       taujp_output="image_embeds", disable_tqdm=True)
    probe = TauJpConfig(output_dir=os.path.join(output_dir, "runs"), **args_common)
    world, device, is_main = probe.world_size, probe.device, probe.process_index == 0
    if batch_size < 1 or batch_size % world:
        raise HfTaujpError(f"--batch-size {batch_size} is the global batch: it must be a positive multiple of the "
                           f"{world} processes")
    per_device = batch_size // world
    args_common["per_device_train_batch_size"] = per_device
    say = print if is_main else (lambda *a, **k: None)
    # ---- data (all checks before the model is loaded; the main process downloads first, the others read its cache)
    rows, classnames = {}, {}
    with probe.main_process_first(local=True, desc="datasets"):
        for i, name in enumerate([*task_names, *([control] if control else [])]):
            try:
                data = load_vision_task(VISION_TASKS[name], data_dir, max_train=max_train, max_test=max_test,
                                        seed=seed + i)
            except HfTaujpError as e:
                if name != control:
                    raise
                raise HfTaujpError(f"negation control {name!r}: {e} (choose another with --negation-control, or "
                                   "'none')") from e
            train = data["train"]
            n = len(train)
            train, val = split_train_val(train, fraction=val_fraction, max_size=max_val,
                                         min_size=min(32, max(1, n // 4)), seed=seed + i)
            rows[name] = {"train": train if name != control else [], "val": val, "test": data["test"]}
            classnames[name] = data["classnames"]
            bad = sorted({y for s in rows[name].values() for _, y in s if not 0 <= y < len(classnames[name])})
            if bad:
                raise HfTaujpError(f"task {name!r}: labels {bad[:5]} outside the {len(classnames[name])} class names")
    eval_names = [*task_names, *([control] if control else [])]
    n_used = steps * batch_size
    used = {n: _rows(rows[n]["train"], n_used, seed + 100 + i) for i, n in enumerate(task_names)}
    for n in eval_names:  # wrong channel counts / empty images fail here, not in the middle of training
        for s, part in (("train", used.get(n, [])), ("val", rows[n]["val"]), ("test", rows[n]["test"])):
            check_images((x for x, _ in part), f"task {n!r}, {s} images")
    # ---- model and heads
    say(f"[hf-taujp clip] loading {model} ({world} process{'es' if world > 1 else ''}, {per_device} images each per step)")
    with probe.main_process_first(local=True, desc="model"):
        clip, tokenizer, processor = load_clip(model, seed=seed)
    clip.to(device)
    heads = {n: zero_shot_head(clip, tokenizer, classnames[n], VISION_TASKS[n].templates) for n in eval_names}
    encoder = image_encoder(clip)
    clf = ZeroShotCLIP(encoder, {n: heads[n] for n in task_names}).to(device).eval()  # trained: target heads only
    eval_clf = ZeroShotCLIP(encoder, heads).to(device).eval()  # + the control's head (task id = position)
    del clip.text_model  # the text tower is done once the heads exist
    model_name = getattr(clip.config, "_name_or_path", None) or str(model)
    fp = fingerprint(encoder)
    collator = ImageCollator(processor)
    tid = {n: i for i, n in enumerate(eval_names)}
    train_rows, pix, gold = {}, {}, {}
    for n in task_names:
        train_rows[n] = [{"image": x, "labels": y, "task_ids": tid[n]} for x, y in used[n]]
    for n in eval_names:
        for s in ("val", "test"):
            pix[(n, s)] = torch.cat([collator.pixels([x for x, _ in rows[n][s][j:j + 512]])
                                     for j in range(0, len(rows[n][s]), 512)])
            gold[(n, s)] = torch.tensor([y for _, y in rows[n][s]])
    emb0 = {k: _embed(encoder, v, eval_batch_size) for k, v in pix.items()}  # f(x; θ0), shared by every method

    def acc(n, s, emb):
        return _accuracy(eval_clf, tid[n], emb, gold[(n, s)])

    zero_shot = {n: acc(n, "test", emb0[(n, "test")]) for n in task_names}
    say("[hf-taujp clip] zero-shot test accuracy: " + ", ".join(f"{n} {v:.3f}" for n, v in zero_shot.items()))
    probe.per_device_train_batch_size = per_device
    reg_bs = probe.taujp_reg_batch_size  # per process: ceil(ratio × per-device batch)
    heldout = {n: [{"pixel_values": p} for p in pix[(n, "test")][:matrix_examples]] for n in task_names}
    results = {"model": model_name, "tasks": {n: {**VISION_TASKS[n].to_dict(), "classnames": classnames[n]}
                                              for n in task_names},
               "data": data_dir, "sizes": {n: {**{s: len(rows[n][s]) for s in ("train", "val", "test")},
                                               "train_used": len(used.get(n, []))} for n in eval_names},
               "splits": {"val": f"held out from train ({val_fraction:.0%}, ≤ {max_val}; chooses α)",
                          "test": "the dataset's test split (reported)"},
               "steps": steps, "batch_size": batch_size, "num_processes": world, "per_device_batch_size": per_device,
               "learning_rate": learning_rate, "weight_decay": weight_decay,
               "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm, "scheduler": "cosine",
               "taujp": {"lambda": taujp_lambda, "mode": taujp_mode, "batch_ratio": taujp_batch_ratio,
                         "reg_batch_size": reg_bs * world, "per_device_reg_batch_size": reg_bs,
                         "output": "image_embeds", "regularization_inputs": "other tasks' training inputs"},
               "zero_shot": zero_shot, "methods": {}, "negation": {},
               "negation_control": None if control is None else {
                   **VISION_TASKS[control].to_dict(), "classnames": classnames[control],
                   "zero_shot": acc(control, "test", emb0[(control, "test")])}}
    if is_main:
        _save_heads(output_dir, heads, classnames, eval_names)
    if merge_list:  # statistics-based merges of the non-linear vectors (opt-in)
        sizes = {n: len(train_rows[n]) for n in task_names}  # s_t: the examples each vector was trained on
        s0 = float(base_fisher_weight) if base_fisher_weight is not None else sum(sizes.values()) / len(sizes)
        stats_ctx = dict(merge_list=merge_list, samples=fisher_samples, sizes=sizes, base_weight=s0,
                         output_dir=output_dir, seed=seed, base_fisher=None, save=is_main,
                         heads={n: (clf.task_names.index(n), heads[n].shape[0]) for n in task_names},
                         batches={n: statistics_batches(train_rows[n], collator, eval_batch_size, fisher_examples)
                                  for n in task_names},
                         meta={"base_model": model_name, "base_fingerprint": fp, "recipe": "clip",
                               "examples": fisher_examples})
        results["merges"] = {}
        results["statistics"] = {
            "merge_methods": merge_list, "fisher_examples": fisher_examples, "fisher_samples": fisher_samples,
            "fisher": "true Fisher (labels sampled from the model) of the zero-shot classifier's logits (the task's "
                      "frozen head) w.r.t. the image encoder's parameters, at θ0 + τ_t; base at θ0",
            "gram": "inputs of the image encoder's Linear layers, at θ0 + τ_t",
            "task_sizes_s_t": sizes, "base_fisher_weight_s0": s0, "s0_default": base_fisher_weight is None,
            "seconds": 0.0}
    for m in method_list:
        vectors, seconds = {}, []
        for n in task_names:
            say(f"[hf-taujp clip] {m.label} on {n}")
            args = TauJpConfig(output_dir=os.path.join(output_dir, "runs", m.name, n), **args_common)
            tv, stats = finetune_clip(
                clf, m, train_rows[n], args, data_collator=collator,
                regularization_datasets={o: train_rows[o] for o in task_names if o != n},
                meta={"base_model": model_name, "base_fingerprint": fp, "task": n,
                      "training": {"recipe": "clip", "head": "frozen zero-shot", "batch_size": batch_size,
                                   "num_processes": world}})
            if is_main:  # DDP keeps the processes' vectors equal; one writes them
                tv.save_pretrained(os.path.join(output_dir, "task_vectors", m.name.replace("+", "_"), n))
            vectors[n] = tv
            seconds.append(stats["seconds_per_step"])
        res = _evaluate_addition(encoder, m, vectors, task_names, pix, emb0, acc, alphas, shape_alphas,
                                 eval_batch_size)
        mat = _taujp_matrix(encoder, vectors, heldout, eval_batch_size)
        off = [mat[i][j] for i in range(len(task_names)) for j in range(len(task_names)) if i != j]
        res["taujp_matrix"] = mat
        res["taujp_offdiag_mean"] = sum(off) / len(off)
        res["seconds_per_step"] = mean_defined(seconds)
        results["methods"][m.label] = res
        if control:
            results["negation"][m.label] = _evaluate_negation(encoder, m, vectors, task_names, control,
                                                              pix, acc, alphas, eval_batch_size)
        say(f"[hf-taujp clip] {m.label}: one-shot normalized {res['one_shot']['avg_norm']}, best α {res['best_alpha']:.2f}")
        if merge_list and not m.linear:  # every process computes and evaluates (_embed is collective); main writes
            _statistics_merges(clf, m.label, m.name.replace("+", "_"), vectors, res["single"], task_names, stats_ctx,
                               results, pix, acc, alphas, shape_alphas, eval_batch_size, say)
        if bench_list and m.name in bench_sets:  # every process evaluates (_embed is collective); the main one writes
            compare_and_save(encoder, m.label, m.name.replace("+", "_"), vectors, res["single"], bench_list,
                             _merged_accuracy(m, encoder, task_names, pix, acc, eval_batch_size), output_dir, results,
                             prefix="[hf-taujp clip]", save=is_main)
    shown = {**results["methods"], **results.get("merges", {})}
    rows_ = addition_rows(shown, zero_shot)
    if len(rows_) > 1:  # format_table takes its columns from the first row: the zero-shot row gets them all
        rows_[0] = {k: rows_[0].get(k) for k in rows_[1]}
    results["table"] = rows_
    neg_rows = _negation_rows(results["negation"])
    results["negation_table"] = neg_rows
    results["wall_time_s"] = round(time.time() - t_start, 1)
    notes = [
        "accuracy (top-1) with frozen zero-shot heads; single / abs / norm on the test split; α chosen on a validation "
        "split held out from train; the α-curve PNG shows that validation split",
        "norm = merged / single-task accuracy of the same method (n/a when single = 0, left out of means)",
        "linear methods: linearized image encoder, non-linear head (normalize, then W) on its output",
        TAUJP_COLUMN_NOTE.replace("outputs", "image embeddings"),
        f"negation: θ0 − α τ_target, α minimising target accuracy (val) with control ≥ 0.95 × base control; "
        f"control = {control or 'none (skipped)'}, a task held out of the targets",
    ]
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
    extra = [("Per-task normalized accuracy at α = 1 (test)", per_task_rows(shown, task_names)),
             ("Per-task normalized accuracy at best α (test)", per_task_rows(shown, task_names, "best"))]
    if neg_rows:
        extra.append(("Task negation (test; mean over targets)", neg_rows))
    if is_main:  # every process holds the same results (gathered evaluation); one writes them
        paths = write_report(output_dir, results, rows_, f"CLIP task addition ({model_name.split('/')[-1]})",
                             shown, extra_tables=extra, notes=notes)
        print("\nTask addition (test split; α chosen on validation held out from train)\n" + format_table(rows_))
        if neg_rows:
            print("\nTask negation (test split)\n" + format_table(neg_rows))
        if push_to_hub:
            from .. import hub

            hub.push_folder_to_hub(os.path.join(output_dir, "task_vectors"), push_to_hub)
            if merge_list:
                hub.push_folder_to_hub(os.path.join(output_dir, "statistics"), push_to_hub, subfolder="statistics")
            print(f"pushed task vectors{' and statistics' if merge_list else ''} to {push_to_hub}")
        print(f"\nsaved: {paths['json']}, {paths['markdown']}, {paths['png']}, task vectors in {output_dir}/task_vectors/")
    _barrier()  # when run_clip returns on any process, the main process has written everything
    return results


def _save_heads(output_dir, heads, classnames, task_names) -> None:
    """`zero_shot_heads.safetensors` ({task: W}) and `zero_shot_heads.json` (class names, templates, Hub ids)."""
    from safetensors.torch import save_file

    from ..evaluation import save_json

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "zero_shot_heads.safetensors")
    tmp = path + f".tmp{os.getpid()}"
    save_file({n: heads[n].contiguous() for n in task_names}, tmp)
    os.replace(tmp, path)
    save_json({n: {"classnames": classnames[n], "templates": list(VISION_TASKS[n].templates),
                   "hub_id": VISION_TASKS[n].hub_id, "formula": "exp(logit_scale) * normalize(mean_k normalize(g(t_k(c))))"}
               for n in task_names}, os.path.join(output_dir, "zero_shot_heads.json"))


def _merged_accuracy(method, encoder, tasks, pix, acc, bs):
    """``evaluate(merged, split)`` of compare_merges for this recipe: accuracy with each task's zero-shot head of
    the merged encoder's embeddings (a merged tangent by the linear reading f(x; θ0) + J f·τ)."""
    def evaluate(merged, split):
        if method.linear:
            tangents = merged.get_tangents()
            return {t: acc(t, split, sum(_embed(encoder, pix[(t, split)], bs, tangents))) for t in tasks}
        return {t: acc(t, split, _embed(merged.eval(), pix[(t, split)], bs)) for t in tasks}

    return evaluate


def _evaluate_addition(encoder, method, vectors, tasks, pix, emb0, acc, alphas, shape_alphas, bs) -> dict:
    """Task addition for one method: single-task accuracy, α on validation, test at best α and α = 1.

    Linear: the embedding is linear in α, f(x; θ0) + α·J f·τ, so one jvp per split gives every α."""
    total = vectors[tasks[0]]
    for t in tasks[1:]:
        total = total + vectors[t]
    grid = [float(a) for a in alphas]
    if method.linear:
        single = {s: {t: acc(t, s, sum(_embed(encoder, pix[(t, s)], bs, vectors[t].tensors))) for t in tasks}
                  for s in ("val", "test")}
        jt = {(t, s): _embed(encoder, pix[(t, s)], bs, total.tensors)[1] for t in tasks for s in ("val", "test")}
        return _addition_protocol(tasks, single, grid, True,
                                  lambda a, t, s, _m: acc(t, s, emb0[(t, s)] + float(a) * jt[(t, s)]),
                                  extra_alphas=shape_alphas)
    with _weights_of(encoder) as set_weights:
        single = {"val": {}, "test": {}}
        for t in tasks:
            set_weights(1.0, vectors[t])
            for s in ("val", "test"):
                single[s][t] = acc(t, s, _embed(encoder, pix[(t, s)], bs))
            set_weights(0.0, vectors[t])

        def model_fn(alpha):
            set_weights(alpha, total)
            return encoder

        return _addition_protocol(tasks, single, grid, False,
                                  lambda a, t, s, m: acc(t, s, _embed(m, pix[(t, s)], bs)), model_fn,
                                  extra_alphas=shape_alphas)


class _TaskLogits(nn.Module):
    """The zero-shot classifier of one task from ``pixel_values`` alone: ``clf``'s logits with task ``task_id``'s
    frozen head, its ``num_classes`` classes only (no padded class to sample) — the model whose Fisher the
    statistics merges take (estimate_fisher passes a batch's model inputs, not its ``task_ids``). Its parameters
    are ``clf``'s: the encoder's parameter ``n`` is ``PREFIX + n`` here."""

    PREFIX = "clf.image_encoder."

    def __init__(self, clf: ZeroShotCLIP, task_id: int, num_classes: int):
        super().__init__()
        self.clf, self.task_id, self.num_classes = clf, int(task_id), int(num_classes)

    @property
    def config(self):
        return self.clf.config

    def forward(self, pixel_values, **_):
        emb = self.clf.image_encoder(pixel_values=pixel_values).image_embeds
        ids = torch.full((emb.shape[0],), self.task_id, dtype=torch.long, device=emb.device)
        return ZeroShotOutput(logits=self.clf.classify(emb, ids)[:, :self.num_classes])


def _encoder_fisher(clf, task_id, num_classes, batches, names, *, task, seed, meta):
    """The Fisher of one task's classifier (:class:`_TaskLogits`) w.r.t. the image encoder's parameters ``names``,
    keyed by the encoder's names (the task vectors' keys)."""
    pre = _TaskLogits.PREFIX
    st = estimate_statistics(_TaskLogits(clf, task_id, num_classes), "fisher", batches, [pre + n for n in names],
                             task=task, seed=seed, meta=meta, output_type="sequence_classification")
    assert all(k.startswith(pre) for k in st.tensors)  # exactly the names asked for, each with the prefix
    st.tensors = {k[len(pre):]: v for k, v in st.tensors.items()}
    return st


def _statistics_merges(clf, label, folder, vectors, single, tasks, ctx, results, pix, acc, alphas, shape_alphas, bs,
                       say) -> None:
    """The statistics-based merges of one non-linear method's vectors (run_clip's ``merge_methods``; run_glue's
    protocol): estimate (every process) and save (the main one) the statistics they need — the base Fisher once,
    at θ0 —, then evaluate each merge like task addition (same single-task scores, α on validation, test at the
    best α and at α = 1)."""
    from ..merging.statistics import FisherStatistics

    encoder = clf.image_encoder
    t0 = time.time()
    need = {STATISTICS_MERGES[m] for m in ctx["merge_list"]}
    root = os.path.join(ctx["output_dir"], "statistics")
    samples = ctx["samples"]
    stats: dict[str, dict] = {}
    for i, t in enumerate(tasks):
        tv = vectors[t]
        names = list(tv.keys())
        with _weights_of(encoder) as set_weights:
            set_weights(1.0, tv)  # θ0 + τ_t: the fine-tuned model the statistics describe
            for kind in sorted(need):
                meta = {**ctx["meta"], "at": "θ0 + τ_t", "vectors": folder,
                        **({"samples_per_example": samples} if kind == "fisher" else {})}
                if kind == "fisher":
                    st = _encoder_fisher(clf, *ctx["heads"][t], ctx["batches"][t] * samples, names, task=t,
                                         seed=ctx["seed"] + 1000 + i, meta=meta)
                else:  # the encoder's Linear inputs do not depend on the head: the encoder itself, on its pixels
                    st = estimate_statistics(encoder, "gram", [{"pixel_values": b["pixel_values"]}
                                                               for b in ctx["batches"][t]],
                                             names, task=t, seed=ctx["seed"] + 1000 + i, meta=meta)
                if ctx["save"]:
                    st.save_pretrained(os.path.join(root, kind, folder, t))
                stats.setdefault(kind, {})[t] = st
    if "gradient_matching" in ctx["merge_list"] and ctx["base_fisher"] is None:
        # H0 at θ0 over every task's examples, each read through its own head: the per-task means, pooled
        names = list(vectors[tasks[0]].keys())
        parts = [_encoder_fisher(clf, *ctx["heads"][t], ctx["batches"][t] * samples, names, task=None,
                                 seed=ctx["seed"] + 999 + 7919 * i, meta={}) for i, t in enumerate(tasks)]
        total = sum(p.num_examples for p in parts)
        h0 = FisherStatistics({k: sum(p.tensors[k] * (p.num_examples / total) for p in parts) for k in names},
                              num_examples=total, base_model=ctx["meta"]["base_model"],
                              base_fingerprint=ctx["meta"]["base_fingerprint"], task=None,
                              extra={**{k: v for k, v in ctx["meta"].items() if k not in ("base_model", "base_fingerprint")},
                                     "at": "θ0", "samples_per_example": samples, "empirical": False,
                                     "tasks": list(tasks)})
        if ctx["save"]:
            h0.save_pretrained(os.path.join(root, "fisher", "base"))
        ctx["base_fisher"] = h0
    results["statistics"]["seconds"] = round(results["statistics"]["seconds"] + time.time() - t0, 1)
    say(f"[hf-taujp clip] {label}: {' and '.join(sorted(need))} statistics in {time.time() - t0:.1f} s"
        + (f", saved in {root}/" if ctx["save"] else ""))
    evaluate_statistics_merges(encoder, label, vectors, tasks, single, stats, ctx, results,
                               lambda a, t, s, m: acc(t, s, _embed(m, pix[(t, s)], bs)), alphas, shape_alphas,
                               say=say, prefix="[hf-taujp clip]")


def _evaluate_negation(encoder, method, vectors, tasks, control, pix, acc, alphas, bs) -> dict:
    """θ0 − α τ_t for every target task t (:func:`hf_taujp.evaluation.evaluate_task_negation`; the control is held
    out of the targets), plus the normalized target accuracy (negated / zero-shot) and control accuracy relative
    to the base."""
    out = {}
    for t in tasks:

        def eval_fn(model, which, split, t=t):
            n = t if which == "target" else control
            return acc(n, split, _embed(model, pix[(n, split)], bs))

        r = evaluate_task_negation(encoder, vectors[t], eval_fn, alphas=alphas, linear=method.linear)
        b = r["base"]["test"]
        r["target_norm"] = r["target"] / b["target"] if b["target"] > 0 else None
        r["control_norm"] = r["control"] / b["control"] if b["control"] > 0 else None
        out[t] = r
    return out


def _negation_rows(negation: Mapping[str, Mapping]) -> list[dict]:
    rows = []
    for label, per in negation.items():
        if not per:
            continue
        rows.append({"method": label,
                     "target (base)": mean_defined(r["base"]["test"]["target"] for r in per.values()),
                     "target": mean_defined(r["target"] for r in per.values()),
                     "control": mean_defined(r["control"] for r in per.values()),
                     "target norm": mean_defined(r["target_norm"] for r in per.values()),
                     "control norm": mean_defined(r["control_norm"] for r in per.values()),
                     "α": ", ".join(f"{r['alpha']:.2f}" for r in per.values())})
    return rows


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
    p.add_argument("--lambda", dest="taujp_lambda", type=float, default=0.1, help="τJp weight λ (penalty on image_embeds)")
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
    p.add_argument("--push-to-hub", default=None, metavar="REPO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process (0: the idle cores, shared by the processes on this machine)")
    return p


def main(argv=None) -> dict:
    a = add_arguments(argparse.ArgumentParser(prog="hf-taujp clip", description=__doc__.split("\n")[0])).parse_args(argv)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # set by torchrun / accelerate launch
    torch.set_num_threads(a.threads if a.threads > 0 else max(1, _threads(0) // max(1, local)))
    results = run_clip(a.model, a.tasks, data_dir=a.data_dir, methods=a.methods, output_dir=a.output_dir, steps=a.steps,
                       batch_size=a.batch_size, learning_rate=a.lr, weight_decay=a.weight_decay,
                       warmup_steps=a.warmup_steps, max_grad_norm=a.max_grad_norm, taujp_lambda=a.taujp_lambda,
                       taujp_mode=a.taujp_mode, taujp_batch_ratio=a.taujp_batch_ratio,
                       negation_control=a.negation_control, max_train=a.max_train, max_test=a.max_test,
                       eval_batch_size=a.eval_batch_size, push_to_hub=a.push_to_hub, seed=a.seed,
                       compare_merges=a.compare_merges, compare_sets=a.compare_sets, merge_methods=a.merge_methods,
                       fisher_examples=a.fisher_examples, fisher_samples=a.fisher_samples,
                       base_fisher_weight=a.base_fisher_weight)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # the command's process ends here: leaving the group to interpreter shutdown can abort the process
        # (seen with gloo: "terminate called without an active exception") after everything was written
        dist.destroy_process_group()
    return results
