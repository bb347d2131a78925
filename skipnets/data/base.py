"""What every skipnets data module tells the model: ``num_classes`` and ``input_shape``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, TensorDataset

from skipnets.data.analysis import AnalysisSplit, check_split, dataset_split
from skipnets.data.workers import WorkerLoader
from skipnets.errors import ConfigError


class DataModule(L.LightningDataModule):
    """Base for the skipnets data modules: loaders over ``train_set``/``val_set``/``test_set``.

    Subclasses set ``num_classes`` and ``input_shape`` in ``__init__`` (the CLI links them into
    the model before anything is loaded) and build the three datasets in ``setup``.
    Under DDP Lightning gives each rank a distributed sampler, so each sample is seen once per
    epoch across ranks.
    """

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        # The training samples without training augmentation, where ``train_set`` augments:
        # what analysis of the train split reads.
        self.plain_train_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        dataset, collate_fn = _batched(dataset)
        if collate_fn is _fetched_batch and self.num_workers == 0:
            _in_memory_needs_no_workers()
        return ResumableLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collate_fn,
            sampler=SeededShuffle(dataset, self.seed)
            if shuffle
            else self._evaluation_sampler(dataset),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # A loader's own generator, so iterating it never draws from the global RNG.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _evaluation_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP, each sample of an evaluation split to exactly one rank: Lightning's own
        ``DistributedSampler`` pads the split to a multiple of the ranks, counting a few samples
        twice, so metrics would differ from a single process's. Ranks may then run one batch
        fewer than others, which evaluation allows (no collective runs per batch)."""
        trainer = self.trainer
        size = len(dataset)  # type: ignore[arg-type]
        if trainer is None or trainer.world_size == 1 or size < trainer.world_size:
            return None
        return UnrepeatedDistributedSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
        )

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.train_set, shuffle=True)
        return self._train_loader

    def continue_epoch(self, trained_batches: Callable[[], int]) -> None:
        """For a run resumed in the middle of an epoch: ``trained_batches()`` is how many
        batches of that epoch the trainer counts as trained. It is asked when the epoch goes on
        (after the trainer has settled a step that a signal cut short), and that many batches
        are skipped; without it, the train loader goes by its own count from the checkpoint,
        which includes a batch fetched but not trained when the checkpoint was written in the
        middle of a step."""
        loader = getattr(self, "_train_loader", None)
        if isinstance(loader, ResumableLoader) and loader.resuming:
            loader.consumed = trained_batches

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def analysis_split(
        self,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        max_samples: int | None = None,
    ) -> AnalysisSplit:
        """Rank ``rank`` of ``world_size``'s share of ``split`` for analysis, read in order (see
        ``skipnets.data.analysis``); sets the data module up first if that split is missing."""
        check_split(split, type(self).__name__)

        def dataset() -> Dataset | None:
            if split == "train" and self.plain_train_set is not None:
                return self.plain_train_set
            return getattr(self, f"{split}_set")

        if dataset() is None:
            self.setup("test" if split == "test" else "fit")
        data = dataset()
        if data is None:
            raise ConfigError(f"{type(self).__name__} has no {split} split")
        data, collate_fn = _batched(data)
        return dataset_split(
            split,
            data,
            batch_size=self.batch_size,
            collate_fn=collate_fn,
            rank=rank,
            world_size=world_size,
            max_samples=max_samples,
            num_workers=self.num_workers,
        )

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # A batch already on the device (CPU training, the GPU-resident modules) is handed on as
        # it is, without Lightning's walk over the batch.
        if isinstance(batch, (tuple, list)) and all(
            isinstance(item, Tensor) and item.device == device for item in batch
        ):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


class InMemoryDataset(TensorDataset):
    """Tensors in memory, fetched a whole batch at a time.

    ``DataLoader`` hands ``__getitems__`` the indices of a batch: one indexing per tensor instead
    of one per sample followed by stacking them, which for small inputs costs more than the
    training step itself. The batch holds the same values as the per-sample path. Any sampler
    works, including the ``DistributedSampler`` Lightning puts in under DDP. ``DataModule``
    loaders use it for every plain ``TensorDataset``.
    """

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[index] for tensor in self.tensors)


def _batched(dataset: Dataset) -> tuple[Dataset, Callable | None]:
    """A plain ``TensorDataset`` as an :class:`InMemoryDataset` with its pass-through collate
    step; any other dataset as it is, with the default one."""
    if type(dataset) is TensorDataset:
        return InMemoryDataset(*dataset.tensors), _fetched_batch
    return dataset, None


def _in_memory_needs_no_workers() -> None:
    """Lightning's advice to add loader workers, on a machine with more than a few cores, is
    wrong for a split held in memory as tensors: a batch is one indexing of them, which worker
    processes would only copy. Filtered for the loaders of such splits (the data modules that
    read files keep it; ``SKIPNETS_VERBOSE=1`` shows it)."""
    import os
    import warnings

    if not os.environ.get("SKIPNETS_VERBOSE"):
        warnings.filterwarnings(
            "ignore", message=r"The '\w+' does not have many workers which may be a bottleneck"
        )


def _fetched_batch(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    # The collate step of an InMemoryDataset loader: __getitems__ already built the batch.
    return batch


class SeededShuffle(RandomSampler):
    """A new order every epoch that depends only on ``(seed, epoch)``: Lightning calls
    ``set_epoch``, so a run resumed at any epoch draws the same order as one never stopped.
    Under DDP Lightning replaces it with a ``DistributedSampler``, which works the same way."""

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)) & (2**63 - 1))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableLoader(WorkerLoader):
    """A ``DataLoader`` that knows how far into the epoch it is.

    Lightning stores its ``state_dict`` in each checkpoint; after a resume in the middle of an
    epoch, the first pass skips the batches the interrupted run already trained on (by index:
    they are not loaded), so training continues with the very next batch. Its generator is
    reseeded from ``(seed, epoch)`` each epoch, so workers' random augmentations repeat on an
    epoch-boundary resume; in the rest of an epoch resumed midway they differ (workers restart).

    A checkpoint written in the middle of a step (SLURM's pre-emption signal) counts a batch
    that was fetched but not trained on; ``consumed``, when set (through
    :meth:`DataModule.continue_epoch`, which ``skipnets.resume.RunState`` calls), gives the
    number of batches the trainer itself counts as done, and wins.
    """

    def __init__(self, dataset: Dataset, **kwargs: Any) -> None:
        self._position = 0
        self._skip_next = 0
        self._resume: tuple[int | None, int] | None = None
        self.consumed: Callable[[], int] | None = None
        super().__init__(dataset, **kwargs)
        generator = self.generator
        self._base_seed = generator.initial_seed() if generator is not None else None

    def _epoch(self) -> int | None:
        sampler = self.batch_sampler.sampler if self.batch_sampler is not None else self.sampler
        return getattr(sampler, "epoch", None)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch(), "batches": self._position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = (state_dict.get("epoch"), int(state_dict.get("batches", 0)))

    @property
    def resuming(self) -> bool:
        """Whether the next pass continues an epoch from a checkpoint."""
        return self._resume is not None

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(super()._index_sampler, self)

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first batch, after Lightning has set the epoch.
        epoch = self._epoch()
        skip = 0
        if self._resume is not None:
            saved_epoch, batches = self._resume
            if self.consumed is not None:
                batches = self.consumed()
            self._resume, self.consumed = None, None
            if saved_epoch == epoch and 0 < batches < len(self):
                skip = batches
        if self._base_seed is not None and epoch is not None:
            self.generator.manual_seed(hash((self._base_seed, epoch)) & (2**63 - 1))
        self._position, self._skip_next = skip, skip
        try:
            iterator = super().__iter__()
        finally:
            self._skip_next = 0
        for batch in iterator:
            self._position += 1
            yield batch


class _SkipFirst:
    """Batches of indices without the first ``loader._skip_next``. The count is read at each
    pass (an iterator over worker processes starts its pass twice while it is built, and
    persistent workers keep this object for later epochs, when the count is back to 0)."""

    def __init__(self, batches: Any, loader: ResumableLoader) -> None:
        self.batches = batches
        self.loader = loader

    def __len__(self) -> int:
        return len(self.batches) - self.loader._skip_next

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.batches), self.loader._skip_next, None)


def split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[torch.Tensor, ...]:
    """A seeded permutation of ``range(n)`` cut into train / val / test by the two fractions."""
    val_fraction, test_fraction = fractions
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError("val and test fractions must be in [0, 1) and sum to less than 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]
