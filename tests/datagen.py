"""Tiny datasets in the real on-disk formats, for tests that must not download anything.

    write_cifar10(tmp_path)             # then --data.init_args.root=<tmp_path>
    write_cifar100(tmp_path)
    write_image_folder(tmp_path)        # ImageNet's train/<class>/*.JPEG, val/<class>/*.JPEG

The CIFAR files are the pickled dicts of the "python version" archives (uint8 ``data`` rows of
3072 values, channel-major; ``labels`` or ``fine_labels``/``coarse_labels``; a meta file with the
label names), so torchvision's loaders read them exactly as they read the real ones.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _dump(path: Path, obj: dict) -> None:
    # Protocol 2, as the original (Python 2) archives were written.
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 4, test_size: int = 10, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py``: data_batch_1..5 with ``per_batch`` images each, a test
    batch, and batches.meta. Labels cycle through the ten classes. Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_size)]
    for offset, (name, n) in enumerate(batches):
        _dump(
            folder / name,
            {
                "batch_label": f"{name} of 6",
                "labels": [(offset + i) % 10 for i in range(n)],
                "data": _images(rng, n),
                "filenames": [f"{name}_{i:05d}.png" for i in range(n)],
            },
        )
    _dump(
        folder / "batches.meta",
        {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": per_batch, "num_vis": 3072},
    )
    return Path(root)


def write_cifar100(root: Path, train_size: int = 20, test_size: int = 10, seed: int = 0) -> Path:
    """``root/cifar-100-python``: train, test and meta files. Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train_size), ("test", test_size)):
        fine = [i % 100 for i in range(n)]
        _dump(
            folder / name,
            {
                "batch_label": f"{name} batch",
                "fine_labels": fine,
                "coarse_labels": [label // 5 for label in fine],
                "data": _images(rng, n),
                "filenames": [f"{name}_{i:05d}.png" for i in range(n)],
            },
        )
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        },
    )
    return Path(root)


def write_image_folder(
    root: Path,
    classes: int = 3,
    train_per_class: int = 4,
    val_per_class: int = 2,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """ImageNet's folder layout, ``root/{train,val}/nXXXXXXXX/*.JPEG``, with random colour JPEGs
    of ``size`` x ``size + 8`` pixels. Returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for index in range(classes):
            folder = Path(root) / split / f"n{index:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for image in range(count):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{split}_{index}_{image}.JPEG")
    return Path(root)
