"""Training-data throughput for CIFAR-size images: the device-resident path (``GPUCIFAR10``,
here on the CPU) against the torchvision path (``CIFAR10``'s dataset and transforms in a
``DataLoader`` with its default workers), both with crop and flip, in images per second.

The files are generated in CIFAR-10's real format (random pixels), 10,000 training images.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.common import Row, interleaved, rate

BATCH = 512


def write_cifar10(root: Path, per_batch: int) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for name in names:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
        }
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file, protocol=2)
    with (folder / "batches.meta").open("wb") as file:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, file, protocol=2)


def _epoch(loader) -> None:
    for x, _ in loader:
        x.sum()  # touch the batch, as the training step would


def main(quick: bool = False) -> list[Row]:
    from skipnets.data import CIFAR10, GPUCIFAR10

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_cifar10(root, per_batch=400 if quick else 2000)
        device_data = GPUCIFAR10(root=str(root), val_size=0, batch_size=BATCH)
        device_data.setup("fit")
        device_loader = device_data.train_dataloader()
        torchvision_data = CIFAR10(root=str(root), val_size=0, batch_size=BATCH)
        dataset = torchvision_data.dataset_cls(
            str(root), train=True, transform=torchvision_data._transforms(train=True)
        )
        workers = torchvision_data.num_workers
        torchvision_loader = DataLoader(
            dataset,
            batch_size=BATCH,
            shuffle=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(0),
        )
        n = len(dataset)
        best = interleaved(
            {
                "device path": lambda: rate(lambda: _epoch(device_loader), n),
                "torchvision path": lambda: rate(lambda: _epoch(torchvision_loader), n),
            },
            1 if quick else 3,
        )
    return [
        Row(
            f"CIFAR-10 training batches, crop+flip (batch {BATCH}, CPU)",
            "img/s",
            best["device path"],
            f"torchvision path ({workers} workers)",
            best["torchvision path"],
            "GPU path never starves the GPU",
        )
    ]
