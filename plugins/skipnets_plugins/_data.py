"""One dataset split, read in order and sharded across ranks, for callbacks that scan a split."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from skipnets.errors import ConfigError

Split = Literal["train", "val", "test"]
SPLITS = ("train", "val", "test")


def check_split(split: str, owner: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"{owner}: split must be one of {', '.join(SPLITS)}, not {split!r}")


def split_dataset(trainer: L.Trainer, split: str, owner: str) -> tuple[Any, DataLoader]:
    """The dataset behind the data module's ``<split>_dataloader()`` and that loader."""
    datamodule = trainer.datamodule
    method = getattr(datamodule, f"{split}_dataloader", None) if datamodule is not None else None
    try:
        loader = method() if method is not None else None
    except Exception:  # Lightning's default hooks raise when a split is not defined
        loader = None
    if not isinstance(loader, DataLoader):
        raise ConfigError(
            f"{owner} reads the {split!r} split from the data module, which has no single "
            f"{split}_dataloader(); choose another split or a skipnets data module"
        )
    return loader.dataset, loader


def shard_loader(trainer: L.Trainer, split: str, max_samples: int | None, owner: str):
    """This rank's share of the first ``max_samples`` of a split, in order.

    Returns ``(loader, indices)``: ``indices`` are the dataset indices of the samples the loader
    yields, in order, so ranks can merge per-sample results.
    """
    dataset, loader = split_dataset(trainer, split, owner)
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    indices = torch.arange(trainer.global_rank, n, trainer.world_size)
    shard = DataLoader(
        Subset(dataset, indices.tolist()),
        batch_size=loader.batch_size or 64,
        shuffle=False,
        collate_fn=loader.collate_fn,
    )
    return shard, indices


def inputs_of(batch: Any) -> Tensor:
    """The input tensor of a batch: ``x`` of ``(x, y)``, or the batch itself."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch
