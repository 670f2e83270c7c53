"""Offline data for the CLIP recipe's tests: MNIST / Fashion-MNIST-like tasks written here (random 28 × 28
grayscale images, 10 classes, the IDX layout of the real files) or, for the tests marked `shared_data`, the real
ones from the data kit; plus small fake tasks in the same layout (a held-out negation control, bad shapes)."""

import gzip
import os
import struct

import numpy as np


def write_idx(path, arr: np.ndarray) -> None:
    """An IDX uint8 file (LeCun's format: 0, 0, 0x08, ndim, big-endian dims, data), gzipped."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def write_fake_task(folder, n_train: int, n_test: int, shape=(32, 32, 3), classes: int = 10, seed: int = 0) -> str:
    """`folder/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz` of random images of `shape` and labels < classes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, *shape)))
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), rng.integers(0, classes, n))
    return str(folder)


def offline_data_dir(root, shared_data: str | None = None, held_out: str | None = "svhn") -> str:
    """A data dir with `mnist/`, `fashion_mnist/` and, when `held_out` is given, a small fake RGB 32 × 32 task of
    that name: the held-out negation control (MNIST's 28 × 28 grayscale differs on purpose).

    `shared_data=None`: the two targets are random stand-ins in MNIST's shape (64 train, 32 test rows each);
    a path: symlinks to the real folders there (the data kit)."""
    d = os.path.join(str(root), "data")
    os.makedirs(d, exist_ok=True)
    for seed, t in enumerate(("mnist", "fashion_mnist")):
        if os.path.exists(os.path.join(d, t)):
            continue
        if shared_data is None:
            write_fake_task(os.path.join(d, t), n_train=64, n_test=32, shape=(28, 28), seed=10 + seed)
        else:
            os.symlink(os.path.join(shared_data, t), os.path.join(d, t))
    if held_out:
        write_fake_task(os.path.join(d, held_out), n_train=20, n_test=9)
    return d
