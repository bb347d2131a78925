"""MNIST and CIFAR-10/100 through torchvision's loaders, with the papers' standard augmentation.

``download: true`` fetches the files with torchvision's download (which checks each file's MD5
sum and skips the files already there); when that fails, :class:`DownloadError` says, in one
line, which address failed, into which folder, and how to put the files there by hand.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2 as T

from skipnets.data.base import DataModule
from skipnets.errors import ConfigError, SkipnetsError


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


class DownloadError(SkipnetsError):
    """A dataset's files could not be downloaded: no connection, an HTTP error, a disk that
    cannot take them, or a file that fails its checksum. The message names the address, the
    folder and how to put the files there by hand; the CLI prints it as one line, exit status 2.
    """


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
        num_workers: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            batch_size, default_workers() if num_workers is None else num_workers, seed
        )
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
            download(type(self), self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = str(self.root)
        train_aug = open_dataset(
            type(self), self.root, train=True, transform=self._transforms(True)
        )
        train_plain = self.dataset_cls(root, train=True, transform=self._transforms(False))
        n = len(train_aug)
        if self.val_size >= n:
            raise ConfigError(f"val_size={self.val_size} leaves no training data ({n} images)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_set = Subset(train_aug, order[self.val_size :])
        self.plain_train_set = Subset(train_plain, order[self.val_size :])
        self.val_set = Subset(train_plain, order[: self.val_size])
        self.test_set = open_dataset(
            type(self), self.root, train=False, transform=self._transforms(False)
        )


def default_workers() -> int:
    """Loader processes when a config names none: 4 (enough to keep a GPU fed with these small
    images), or one per CPU core this process may use where there are fewer."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(4, cores)


def download(data: type[TorchvisionData], root: Path) -> None:
    """Fetch the training and test files of ``data`` (a ``TorchvisionData`` class) into
    ``root`` with torchvision's download; raise :class:`DownloadError` when that fails."""
    folder, sources = _sources(data, root)
    created = [path for path in (folder, *folder.parents) if not path.exists()]
    for train in (True, False):
        try:
            data.dataset_cls(str(root), train=train, download=True)
        except (OSError, RuntimeError) as err:  # URLError and HTTPError are OSErrors
            for path in created:  # what the attempt left empty, so that no half folder remains
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise DownloadError(_download_advice(data, folder, sources, err)) from err


def open_dataset(data: type[TorchvisionData], root: Path, **kwargs: Any) -> Any:
    """``data.dataset_cls(root, **kwargs)``; files missing from its folder (a download cut off
    half-way) raise ``ConfigError`` with where the files are expected, not torchvision's error."""
    try:
        return data.dataset_cls(str(root), **kwargs)
    except RuntimeError as err:
        if "not found" not in str(err).lower():
            raise
        raise ConfigError(
            f"{data.__name__} is incomplete under {str(root)!r}: expected {data.how_to_get}. "
            "Pass --data.init_args.download=true to fetch the missing files."
        ) from None


def _sources(data: type[TorchvisionData], root: Path) -> tuple[Path, list[tuple[str, Any]]]:
    """The folder torchvision downloads ``data``'s files into and the (URL, MD5) of each file,
    from torchvision's own class attributes."""
    dataset: Any = data.dataset_cls
    mirrors = getattr(dataset, "mirrors", None)
    if mirrors:  # MNIST: four gzipped IDX files under MNIST/raw, from the first mirror that answers
        return root / data.folder / "raw", [
            (mirrors[0] + name, md5) for name, md5 in dataset.resources
        ]
    return root, [(dataset.url, dataset.tgz_md5)]  # CIFAR: one archive, unpacked where it lies


def _download_advice(
    data: type[TorchvisionData], folder: Path, sources: list[tuple[str, Any]], err: BaseException
) -> str:
    # The first file that is not there, whole, is the one that failed (torchvision fetches them
    # in order and checks each one's MD5 sum).
    failed = next(
        (url for url, md5 in sources if not check_integrity(folder / os.path.basename(url), md5)),
        sources[0][0],
    )
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    # MNIST's error lists each mirror with what it answered: the first mirror's answer is said.
    answers = [after for line, after in itertools.pairwise(lines) if line.endswith("got:")]
    reason = (answers or lines or [type(err).__name__])[0]
    if "corrupted" in reason:
        reason = "the file does not match its MD5 checksum"
    names = [os.path.basename(url) for url, _ in sources]
    if len(names) == 1:
        files = f"{failed}"
    else:
        base = sources[0][0][: -len(names[0])]
        files = f"{', '.join(names[:-1])} and {names[-1]} from {base}"
    return (
        f"could not download {data.__name__} from {failed} into {folder} ({reason}). "
        f"To place the files by hand, fetch {files} on a machine with a connection, put "
        f"{'it' if len(names) == 1 else 'them'} in {folder} and run again: with download: true "
        "they are checked and unpacked without a connection"
    )


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
        num_workers: int | None = None,
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
