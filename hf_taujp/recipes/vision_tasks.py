"""The vision tasks of the CLIP recipe (:mod:`hf_taujp.recipes.clip`) and their data: each task's Hub id, class
names and zero-shot templates (:data:`VISION_TASKS`), the negation control held out of the targets
(:func:`negation_control_task`), loading a task online (`datasets.load_dataset`) or offline from IDX files
(:func:`load_vision_task`, :func:`read_idx`), and images to RGB pixel batches (:func:`check_images`,
:func:`to_rgb`, :class:`ImageCollator`).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CorruptFileError
from ..hub import HfTaujpError
from .common import subsample
from .imagenet_classes import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES

__all__ = ["HUB", "IMAGENET", "TEMPLATES", "VisionTask", "VISION_TASKS", "IDX_FILES", "negation_control_task",
           "read_idx", "load_vision_task", "check_images", "to_rgb", "ImageCollator"]

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
            keep = subsample(range(len(y)), max_train if split == "train" else max_test, seed)
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
        part = ds[split].select(subsample(range(len(ds[split])), n, seed))  # decode only the images used
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
