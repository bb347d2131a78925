"""A split for analysis: this rank's share of one split, read in order, on the model's device.

Research callbacks (lesioning, DeconvNet, highway gates) scan a whole split outside the training
loop. They all get it the same way, whatever the data module keeps its data in (files read by a
``DataLoader``, tensors in memory, or images already on the GPU behind a ``DeviceLoader``)::

    split = analysis_split(trainer, "val", max_samples=1000, owner="Lesion")
    for (x, y), index in split.on_device(trainer):
        ...  # x, y on the model's device; index: their positions in the split
    x, y = split.fetch(trainer, [3, 17])  # two chosen samples, from any rank

The data module owns the answer (``DataModule.analysis_split``); a plain Lightning data module,
or a ``Trainer`` given loaders directly, works when its loader is a ``DataLoader`` over a
map-style dataset. Rank ``r`` of ``w`` takes samples ``r, r + w, r + 2w, ...``: every sample is
read exactly once across ranks, with no padding, so sums over ranks are those of one process.
Batches are moved as Lightning moves training batches (the precision plugin's input conversion,
then the strategy's ``batch_to_device`` with the module's transfer hooks), so they land on the
device and in the dtype the model has in the hooks where Lightning has placed it there
(``on_fit_start``, ``on_train_*``, ``on_validation_*``), not in ``setup`` or ``on_fit_end``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from skipnets.data.workers import WorkerLoader
from skipnets.errors import ConfigError

__all__ = [
    "SPLITS",
    "AnalysisSplit",
    "Split",
    "analysis_split",
    "check_split",
    "inputs_of",
    "to_device",
]

Split = Literal["train", "val", "test"]
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class AnalysisSplit:
    """This rank's share of a split, in order, without shuffling or training augmentation.

    Attributes:
        name: ``train``, ``val`` or ``test``.
        batches: re-iterable batches of this rank's samples, as the split's loader makes them
            (usually ``(inputs, targets)``), not yet on the model's device.
        indices: CPU ``long`` tensor, the position in the split of each sample ``batches``
            yields, in order.
        size: samples in the whole split (every rank, before ``max_samples``).
        read: the batch made of the samples at the given positions (any rank may ask for any).
    """

    name: str
    batches: Iterable[Any]
    indices: Tensor
    size: int
    read: Callable[[Sequence[int]], Any]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)

    def on_device(self, trainer: L.Trainer) -> Iterator[tuple[Any, Tensor]]:
        """``(batch, indices)`` pairs, the batch moved to the trainer's device."""
        start = 0
        for batch in self.batches:
            batch = to_device(trainer, batch)
            count = len(inputs_of(batch))
            yield batch, self.indices[start : start + count]
            start += count

    def fetch(self, trainer: L.Trainer, positions: Sequence[int] | Tensor) -> Any:
        """The samples at ``positions`` as one batch on the trainer's device."""
        if isinstance(positions, Tensor):
            positions = positions.tolist()
        positions = [int(p) for p in positions]
        bad = [p for p in positions if not 0 <= p < self.size]
        if bad:
            raise ConfigError(
                f"sample {bad[0]} requested but the {self.name} split has {self.size} samples"
            )
        return to_device(trainer, self.read(positions))


def check_split(split: str, owner: str) -> None:
    """Raise a ``ConfigError`` naming ``owner`` unless ``split`` is train, val or test."""
    if split not in SPLITS:
        raise ConfigError(f"{owner}: split must be one of {', '.join(SPLITS)}, not {split!r}")


def inputs_of(batch: Any) -> Tensor:
    """The input tensor of a batch: ``x`` of ``(x, y)``, or the batch itself."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def to_device(trainer: L.Trainer, batch: Any) -> Any:
    """``batch`` moved the way Lightning moves a training batch: to the strategy's device, in the
    precision plugin's input dtype, through the module's batch-transfer hooks."""
    batch = trainer.precision_plugin.convert_input(batch)
    return trainer.strategy.batch_to_device(batch)


def analysis_split(
    trainer: L.Trainer, split: str, max_samples: int | None = None, owner: str = "analysis"
) -> AnalysisSplit:
    """This rank's share of the first ``max_samples`` samples of ``split`` (all when None).

    Asks the data module (``analysis_split(split, rank, world_size, max_samples)``, which every
    skipnets data module has); otherwise reads the dataset behind the split's ``DataLoader``.
    ``owner`` names the caller in error messages.
    """
    check_split(split, owner)
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"{owner}: max_samples must be positive or null, got {max_samples}")
    rank, world_size = trainer.global_rank, trainer.world_size
    datamodule = trainer.datamodule
    method = getattr(datamodule, "analysis_split", None)
    if callable(method):
        return method(split, rank=rank, world_size=world_size, max_samples=max_samples)
    loader = _split_loader(trainer, split)
    dataset = getattr(loader, "dataset", None)
    if not isinstance(loader, DataLoader) or not _map_style(dataset):
        where = type(datamodule).__name__ if datamodule is not None else "the trainer"
        raise ConfigError(
            f"{owner} reads the {split!r} split, but {where} gives no DataLoader over a "
            f"map-style dataset for it. Use a skipnets data module, give the data module an "
            f"analysis_split() method, or choose another split"
        )
    return dataset_split(
        split,
        dataset,
        batch_size=loader.batch_size or 64,
        collate_fn=loader.collate_fn,
        rank=rank,
        world_size=world_size,
        max_samples=max_samples,
        num_workers=loader.num_workers,
    )


def dataset_split(
    name: str,
    dataset: Dataset,
    *,
    batch_size: int,
    collate_fn: Callable | None = None,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
    num_workers: int = 0,
) -> AnalysisSplit:
    """The analysis split of a map-style dataset, read by ``DataLoader``s with ``collate_fn``."""
    size = len(dataset)  # type: ignore[arg-type]
    count = size if max_samples is None else min(size, max_samples)
    indices = torch.arange(rank, count, world_size)

    def loader(positions: list[int], batch: int, workers: int = 0) -> DataLoader:
        return WorkerLoader(
            Subset(dataset, positions),
            batch_size=batch,
            shuffle=False,
            collate_fn=collate_fn,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
        )

    def read(positions: Sequence[int]) -> Any:
        return next(iter(loader(list(positions), max(len(positions), 1))))

    batches = loader(indices.tolist(), batch_size, num_workers)
    return AnalysisSplit(name, batches, indices, size, read)


def tensor_split(
    name: str,
    tensors: Sequence[Tensor],
    transform: Callable[[Tensor], Tensor],
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
) -> AnalysisSplit:
    """The analysis split of tensors kept on a device (inputs first): each batch is gathered
    there and its inputs passed through ``transform`` (the evaluation transform)."""
    size = len(tensors[0])
    count = size if max_samples is None else min(size, max_samples)
    indices = torch.arange(rank, count, world_size)

    def read(positions: Sequence[int] | Tensor) -> tuple[Tensor, ...]:
        index = torch.as_tensor(positions, dtype=torch.long).to(tensors[0].device)
        inputs, *rest = (tensor[index] for tensor in tensors)
        return (transform(inputs), *rest)

    return AnalysisSplit(name, _TensorBatches(indices, batch_size, read), indices, size, read)


class _TensorBatches:
    # Re-iterable: each pass gathers the batches anew.
    def __init__(self, indices: Tensor, batch_size: int, read: Callable) -> None:
        self.indices, self.batch_size, self.read = indices, batch_size, read

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for chunk in self.indices.split(self.batch_size):
            yield self.read(chunk)


def _map_style(dataset: Any) -> bool:
    return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def _split_loader(trainer: L.Trainer, split: str) -> Any:
    """The split's loader from the data module, or the one the trainer was given."""
    datamodule = trainer.datamodule
    if datamodule is not None:
        try:
            return getattr(datamodule, f"{split}_dataloader")()
        except Exception:  # Lightning's default hooks raise when a split is not defined
            return None
    loader = {
        "train": lambda: trainer.train_dataloader,
        "val": lambda: trainer.val_dataloaders,
        "test": lambda: trainer.test_dataloaders,
    }[split]()
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if len(loader) == 1 else None
    return loader
