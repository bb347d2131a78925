"""Worker processes must not collect the parent's garbage: on a GPU, a worker that frees an
inherited CUDA tensor aborts ("CUDA error: initialization error"), and the loader stops with
"DataLoader worker exited unexpectedly". These tests see it on the CPU: a witness object notes
which process freed it."""

import gc
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from skipnets.data import Digits
from skipnets.data.analysis import dataset_split
from skipnets.data.base import ResumableLoader
from skipnets.data.workers import WorkerLoader

PARENT = os.getpid()


class CollectsInTheWorker(Dataset):
    """A dataset whose every read runs a full collection, as a worker's allocations do in time."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        gc.collect()
        return torch.tensor(index)


class Witness:
    """Part of a reference cycle; writes the process that freed it into ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cycle = self

    def __del__(self) -> None:
        with open(self.path, "a") as out:
            out.write("worker\n" if os.getpid() != PARENT else "parent\n")


def _freed_by(loader: torch.utils.data.DataLoader, path: Path) -> list[str]:
    """Iterate ``loader`` with cyclic garbage in the parent; who freed it."""
    gc.disable()  # the garbage must still be there when the workers start
    try:
        witness = Witness(path)
        gc.collect()  # it survives, into the oldest generation (old garbage: the hardest case)
        del witness
        batches = list(loader)
    finally:
        gc.enable()
    assert len(batches) == 2
    del loader, batches
    gc.collect()
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("persistent", [False, True])
def test_workers_leave_the_parents_garbage_to_the_parent(tmp_path, persistent):
    loader = ResumableLoader(
        CollectsInTheWorker(), batch_size=2, num_workers=1, persistent_workers=persistent
    )
    assert _freed_by(loader, tmp_path / "freed") == ["parent"]


def test_a_plain_dataloader_shows_what_the_workers_would_do(tmp_path):
    # The same check fails for torch's own loader: the worker frees the parent's garbage.
    loader = torch.utils.data.DataLoader(CollectsInTheWorker(), batch_size=2, num_workers=1)
    assert "worker" in _freed_by(loader, tmp_path / "freed")


def test_every_loader_the_data_modules_build_starts_its_workers_so(tmp_path):
    data = Digits(batch_size=16, num_workers=1)
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        assert isinstance(loader, WorkerLoader)
    split = dataset_split("val", CollectsInTheWorker(), batch_size=2, num_workers=1)
    assert isinstance(split.batches, WorkerLoader)
    assert _freed_by(split.batches, tmp_path / "freed") == ["parent"]
