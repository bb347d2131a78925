"""MNIST and CIFAR-10/100 through torchvision's loaders, with the papers' standard augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2 as T

from skipnets.data.base import DataModule
from skipnets.errors import ConfigError


class _CIFAR10(datasets.CIFAR10):
    # torchvision verifies MD5 sums on every load; the files' presence is checked here and the
    # sums only when downloading, so a user's own copy (or a test's tiny one) loads as it is.
    def _check_integrity(self) -> bool:
        root = Path(self.root) / self.base_folder
        return all((root / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        # The label-names file too: present is enough; its MD5 is checked when downloading.
        self.meta = {**self.meta, "md5": None}
        super()._load_meta()


class _CIFAR100(_CIFAR10, datasets.CIFAR100):
    pass


class TorchvisionData(DataModule):
    """A torchvision dataset split into train / val (``val_size`` held out of the training set,
    seeded) / test (the official test set)."""

    dataset_cls: type[Dataset]
    folder: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    how_to_get: str

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        val_size: int = 5000,
        augment: bool = True,
        batch_size: int = 128,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.root = Path(root).expanduser()
        self.download = download
        self.val_size = val_size
        self.augment = augment
        if val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {val_size}")
        if not download and not (self.root / self.folder).is_dir():
            raise ConfigError(
                f"{type(self).__name__} not found: no {self.folder!r} folder under "
                f"{str(self.root)!r}. Pass --data.init_args.download=true to fetch it, "
                f"or point --data.init_args.root at a folder holding it ({self.how_to_get})."
            )

    def _transforms(self, train: bool) -> T.Compose:
        steps = [T.ToImage()]
        if train and self.augment:
            steps += self._augmentation()
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def _augmentation(self) -> list:
        return []

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self.dataset_cls(str(self.root), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = str(self.root)
        train_aug = self.dataset_cls(root, train=True, transform=self._transforms(True))
        train_plain = self.dataset_cls(root, train=True, transform=self._transforms(False))
        n = len(train_aug)
        if self.val_size >= n:
            raise ConfigError(f"val_size={self.val_size} leaves no training data ({n} images)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_set = Subset(train_aug, order[self.val_size :])
        self.plain_train_set = Subset(train_plain, order[self.val_size :])
        self.val_set = Subset(train_plain, order[: self.val_size])
        self.test_set = self.dataset_cls(root, train=False, transform=self._transforms(False))


class MNIST(TorchvisionData):
    """MNIST (LeCun et al. 1998): 28x28 grey digits, 60,000 training and 10,000 test images."""

    dataset_cls = datasets.MNIST
    folder = "MNIST"
    num_classes = 10
    input_shape = (1, 28, 28)
    mean, std = (0.1307,), (0.3081,)
    how_to_get = "the four raw IDX files under MNIST/raw"


class CIFAR10(TorchvisionData):
    """CIFAR-10 with the ResNet paper's augmentation: 4-pixel padded random crop and flip."""

    dataset_cls = _CIFAR10
    folder = "cifar-10-batches-py"
    num_classes = 10
    input_shape = (3, 32, 32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    how_to_get = "the python version, cifar-10-python.tar.gz, extracted"

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        val_size: int = 5000,
        augment: bool = True,
        padding_mode: Literal["constant", "reflect"] = "constant",
        batch_size: int = 128,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        """``padding_mode``: zeros around the 4-pixel crop (He et al.) or a reflection of the
        image (Zagoruyko & Komodakis' wide ResNets)."""
        super().__init__(root, download, val_size, augment, batch_size, num_workers, seed)
        if padding_mode not in ("constant", "reflect"):
            raise ConfigError(f"padding_mode must be 'constant' or 'reflect', not {padding_mode!r}")
        self.padding_mode = padding_mode

    def _augmentation(self) -> list:
        return [
            T.RandomCrop(32, padding=4, padding_mode=self.padding_mode),
            T.RandomHorizontalFlip(),
        ]


class CIFAR100(CIFAR10):
    """CIFAR-100 (100 fine classes) with the same augmentation as CIFAR-10."""

    dataset_cls = _CIFAR100
    folder = "cifar-100-python"
    num_classes = 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    how_to_get = "the python version, cifar-100-python.tar.gz, extracted"
