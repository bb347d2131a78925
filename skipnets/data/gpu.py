"""CIFAR-10/100 and MNIST held on the training device, augmented there a whole batch at a time.

The dataset is read once through torchvision's dataset classes (the real on-disk formats, the
same files as ``CIFAR10``/``CIFAR100``/``MNIST``) and kept as uint8 tensors on the device the
Trainer trains on. Each batch is gathered, randomly cropped from a zero-padded copy, flipped and
(optionally) cut out with a few batched tensor operations: no worker processes, no per-image
Python, no host-to-device copy. The random crop and flip follow the torchvision path's
distribution exactly (offsets uniform over ``0..2 * padding`` on each axis, padding with black
before normalisation, flip with probability one half).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from skipnets.data.analysis import AnalysisSplit, check_split, tensor_split
from skipnets.data.base import DataModule
from skipnets.data.vision import CIFAR10, CIFAR100, MNIST, TorchvisionData, download, open_dataset
from skipnets.errors import ConfigError

__all__ = [
    "GPUCIFAR10",
    "GPUCIFAR100",
    "GPUMNIST",
    "DeviceLoader",
    "GPUVisionData",
    "alternating_flips",
    "augment",
]


def _seed(*parts: int) -> int:
    # Generators are seeded from tuples; hash() of a tuple of ints is stable across runs.
    return hash(parts) & (2**63 - 1)


def augment(
    images: Tensor,
    generator: torch.Generator,
    crop_padding: int = 0,
    flip: bool | Tensor = False,
    cutout: int = 0,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    padding_mode: str = "constant",
) -> Tensor:
    """Random crop, flip, normalisation and cutout of a uint8 batch ``(N, C, H, W)``.

    Crop: pad by ``crop_padding`` and take an ``H x W`` window at an offset drawn uniformly
    from ``0..2 * crop_padding`` on each axis (torchvision's ``RandomCrop(padding=p)``). The
    padding is black (``padding_mode="constant"``) or the image mirrored at its border without
    repeating the edge pixel (``"reflect"``, torchvision's and airbench's reflect padding).
    Flip: mirror left-right with probability 0.5 (``flip=True``), or exactly the images where
    ``flip``, a boolean tensor of shape ``(N,)``, is true. Cutout (DeVries & Taylor 2017): zero a
    ``cutout x cutout`` square (after normalisation, so it takes the mean colour) centred at a
    uniformly drawn pixel, clipped at the border. Returns float32, normalised with
    ``mean``/``std`` (per channel, on the 0..1 scale) when given.
    """
    n, _, height, width = images.shape
    device = images.device
    if padding_mode not in ("constant", "reflect"):
        raise ConfigError(f"padding_mode must be 'constant' or 'reflect', not {padding_mode!r}")
    if crop_padding:
        p = crop_padding
        top = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device)
        left = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=device)
        reflect = padding_mode == "reflect"
        samples, row_table, col_table = _crop_tables(device, n, height, width, p, reflect)
        rows, cols = row_table[top][:, :, None], col_table[left][:, None, :]
        # Reflect: the padded copy's rows and columns, read straight from the image.
        source = images if reflect else torch.nn.functional.pad(images, (p, p, p, p))
        # Advanced indices around a slice put their dimensions first: (N, H, W, C).
        images = source[samples, :, rows, cols].permute(0, 3, 1, 2)
    if isinstance(flip, Tensor):
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    elif flip:
        mirrored = torch.rand(n, generator=generator, device=device) < 0.5
        images = torch.where(mirrored[:, None, None, None], images.flip(3), images)
    out = images.float().div_(255)
    if mean is not None and std is not None:  # (C,), or (C, 1, 1) as the data modules keep them
        mean = mean[:, None, None] if mean.ndim == 1 else mean
        std = std[:, None, None] if std.ndim == 1 else std
        out = out.sub_(mean).div_(std)
    if cutout:
        cy = torch.randint(0, height, (n, 1, 1), generator=generator, device=device)
        cx = torch.randint(0, width, (n, 1, 1), generator=generator, device=device)
        ys = torch.arange(height, device=device)[None, :, None]
        xs = torch.arange(width, device=device)[None, None, :]
        low = cutout // 2
        inside = (ys >= cy - low) & (ys < cy - low + cutout) & (xs >= cx - low)
        inside &= xs < cx - low + cutout
        out = out.masked_fill(inside[:, None], 0.0)
    return out.contiguous()


@functools.lru_cache(maxsize=32)
def _crop_tables(
    device: torch.device, n: int, height: int, width: int, padding: int, reflect: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The index tensors of a batch's crop that do not depend on its random offsets: the sample
    index ``(n, 1, 1)``, and for each offset ``0..2 * padding`` the rows and the columns it reads
    (of the padded copy, or of the image itself through the reflection). A batch then gathers
    its rows and columns with one indexing each instead of a dozen small operations."""
    with torch.inference_mode(False):  # kept for later batches, whatever mode this one runs in
        offsets = torch.arange(2 * padding + 1, device=device)[:, None]
        rows = offsets + torch.arange(height, device=device)
        cols = offsets + torch.arange(width, device=device)
        if reflect:
            rows, cols = _reflect(rows - padding, height), _reflect(cols - padding, width)
        return torch.arange(n, device=device)[:, None, None], rows, cols


def _reflect(index: Tensor, size: int) -> Tensor:
    """Indices of a reflect-padded axis mapped into ``0..size - 1``: -1 -> 1, size -> size - 2."""
    index = index.abs()
    return (size - 1) - ((size - 1) - index).abs()


def alternating_flips(seed: int, indices: Tensor, epoch: int) -> Tensor:
    """Which of the images ``indices`` to mirror in ``epoch`` under airbench's alternating flip.

    Jordan (2024) mirrors a random half of the training images in the first epoch and then
    flips every image's state each epoch, so that each image is seen both ways in any two
    consecutive epochs. The first epoch's half is a fixed bit per ``(seed, index)``: a 32-bit
    integer hash of the index offset by the seed (xor-shifts and multiplications, as murmur3's
    finaliser), so there is no state, and it is the same on every rank and after a resume.
    Epoch ``e`` mirrors the images whose bit differs from ``e``'s parity.
    """
    mask = 0xFFFFFFFF
    x = (indices.long() + ((seed * 0x9E3779B9) & mask)) & mask
    # Multipliers below 2**31 keep every product of 32-bit values within int64.
    for shift, multiplier in ((16, 0x5BD1E995), (13, 0x27D4EB2F)):
        x = ((x ^ (x >> shift)) * multiplier) & mask
    x = x ^ (x >> 16)
    return ((x >> 7) & 1).bool() ^ bool(epoch % 2)


def _takes_indices_and_epoch(transform: Callable[..., Tensor]) -> bool:
    try:
        return {"indices", "epoch"} <= set(inspect.signature(transform).parameters)
    except (TypeError, ValueError):  # a callable without a signature takes what it is given
        return False


class _Epoch:
    # Lightning calls ``loader.sampler.set_epoch(epoch)`` before each epoch (and on resume).
    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class DeviceLoader:
    """Batches of a dataset already on its device: this rank's share, in a seeded order.

    Not a ``DataLoader``, so Lightning does not put a ``DistributedSampler`` in: the loader
    shards itself. Training order: one permutation per epoch, from ``(seed, epoch)``, the same
    on every rank; rank ``r`` of ``w`` takes the ``r``-th of ``w`` equal slices (the last
    ``len % w`` samples of the permutation wait for another epoch), so ranks see disjoint data
    and the same number of batches. Evaluation: every sample exactly once across ranks, in order.
    Augmentation draws from a generator seeded with ``(seed, epoch, rank)``. A ``transform``
    that takes the keyword arguments ``indices`` and ``epoch`` also gets the batch's sample
    indices and the epoch (for augmentations keyed by image, like the alternating flip).

    ``state_dict`` records how far into the epoch it is; after a resume in the middle of an
    epoch the first pass skips the batches already trained on.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        transform: Callable[[Tensor, torch.Generator], Tensor],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.transform = transform
        self._transform_by_index = _takes_indices_and_epoch(transform)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = drop_last
        self.sampler = _Epoch()
        self.batch_sampler = None  # Lightning looks for one where it finds a sampler
        self._position = 0
        self._resume: tuple[int, int] | None = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def indices(self) -> Tensor:
        """This rank's sample indices for the current epoch, in the order they are served."""
        n, device = len(self.labels), self.labels.device
        if self.shuffle:
            generator = torch.Generator(device=device).manual_seed(_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=generator, device=device)
            share = n // self.world_size
            return order[self.rank * share : (self.rank + 1) * share]
        return torch.arange(n, device=device).tensor_split(self.world_size)[self.rank]

    def __len__(self) -> int:
        n = len(self.labels)
        count = n // self.world_size
        if not self.shuffle and self.rank < n % self.world_size:
            count += 1  # tensor_split gives the first n % world_size ranks one more
        full, rest = divmod(count, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.indices()
        skip = 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if epoch == self.epoch and 0 < batches < len(self):
                skip = batches
        generator = torch.Generator(device=self.labels.device)
        generator.manual_seed(_seed(self.seed, self.epoch, self.rank))
        self._position = skip
        for batch in range(skip, len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            self._position = batch + 1
            if self._transform_by_index:
                images = self.transform(
                    self.images[index], generator, indices=index, epoch=self.epoch
                )
            else:
                images = self.transform(self.images[index], generator)
            yield images, self.labels[index]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self._position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = (int(state_dict.get("epoch", 0)), int(state_dict.get("batches", 0)))


class GPUVisionData(DataModule):
    """A torchvision dataset kept on the training device; see the module docstring.

    Reads the files of ``source`` (its folder, normalisation, error messages, train/val split:
    the same seeded ``val_size`` images are held out as in the torchvision path).

    Args:
        root: folder holding the dataset's folder.
        download: fetch the files first (torchvision's download).
        val_size: training images held out for validation.
        augment: apply the training augmentation below (off: plain normalised images).
        crop_padding: random crop from a copy padded by this many pixels (0: no crop); default
            the torchvision path's (4 for CIFAR, none for MNIST).
        padding_mode: what the crop's padding holds: ``constant`` (black, torchvision's
            default) or ``reflect`` (the image mirrored at its border; airbench's translate-by-2
            is ``crop_padding: 2, padding_mode: reflect``).
        flip: random horizontal flip; default the torchvision path's (CIFAR yes, MNIST no).
            ``alternate``: airbench's alternating flip (Jordan 2024): a fixed random half of the
            training images is mirrored in the first epoch, and every image's flip state
            alternates from each epoch to the next (``alternating_flips``).
        cutout: side of the cutout square in pixels (0: off; 16 in DeVries & Taylor's CIFAR-10).
        batch_size: training batch size per device.
        eval_batch_size: batch size for validation and test (default: ``batch_size``).
        drop_last: drop each epoch's last, smaller training batch (one shape for ``compile``).
        seed: seeds the split, the order of each epoch and the augmentation.
    """

    source: type[TorchvisionData]

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        val_size: int = 5000,
        augment: bool = True,
        crop_padding: int | None = None,
        padding_mode: Literal["constant", "reflect"] = "constant",
        flip: bool | Literal["alternate"] | None = None,
        cutout: int = 0,
        batch_size: int = 512,
        eval_batch_size: int | None = None,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, 0, seed)
        source = self.source
        self.num_classes = source.num_classes
        self.input_shape = source.input_shape
        self.root = Path(root).expanduser()
        self.download = download
        if val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {val_size}")
        if crop_padding is not None and crop_padding < 0:
            raise ConfigError(f"crop_padding must be >= 0, got {crop_padding}")
        if padding_mode not in ("constant", "reflect"):
            raise ConfigError(
                f"padding_mode must be 'constant' (black) or 'reflect', not {padding_mode!r}"
            )
        if flip not in (None, True, False, "alternate"):
            raise ConfigError(f"flip must be true, false or 'alternate', not {flip!r}")
        if cutout < 0 or cutout > max(source.input_shape[1:]):
            raise ConfigError(f"cutout must be between 0 and the image size, got {cutout}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be positive, got {eval_batch_size}")
        self.val_size = val_size
        self.augment = augment
        self.crop_padding = self.default_crop_padding if crop_padding is None else crop_padding
        if padding_mode == "reflect" and self.crop_padding >= min(source.input_shape[1:]):
            raise ConfigError(
                f"reflect padding needs crop_padding below the image size, got {self.crop_padding}"
            )
        self.padding_mode = padding_mode
        self.flip = self.default_flip if flip is None else flip
        self.cutout = cutout
        self.eval_batch_size = eval_batch_size or batch_size
        self.drop_last = drop_last
        if not download and not (self.root / source.folder).is_dir():
            raise ConfigError(
                f"{type(self).__name__} not found: no {source.folder!r} folder under "
                f"{str(self.root)!r}. Pass --data.init_args.download=true to fetch it, "
                f"or point --data.init_args.root at a folder holding it ({source.how_to_get})."
            )
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self._flip_bits: Tensor | None = None

    default_crop_padding = 0
    default_flip = False

    def prepare_data(self) -> None:
        if self.download:
            download(self.source, self.root)

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        dataset = open_dataset(self.source, self.root, train=train)
        images = torch.as_tensor(dataset.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        device = self._device()
        if self._splits and self._splits["train"][0].device == device:
            return
        images, labels = self._read(train=True)
        n = len(labels)
        if self.val_size >= n:
            raise ConfigError(f"val_size={self.val_size} leaves no training data ({n} images)")
        # The torchvision path's split: the same seeded permutation, val first.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        train, val = order[self.val_size :], order[: self.val_size]
        test_images, test_labels = self._read(train=False)
        self._splits = {
            "train": (images[train].to(device), labels[train].to(device)),
            "val": (images[val].to(device), labels[val].to(device)),
            "test": (test_images.to(device), test_labels.to(device)),
        }
        # Shaped to broadcast over (N, C, H, W) as they are: no reshaping at every batch.
        self._mean = torch.tensor(self.source.mean, device=device).view(-1, 1, 1)
        self._std = torch.tensor(self.source.std, device=device).view(-1, 1, 1)
        self._flip_bits = None

    def _train_transform(
        self,
        images: Tensor,
        generator: torch.Generator,
        indices: Tensor | None = None,
        epoch: int = 0,
    ) -> Tensor:
        if not self.augment:
            return self._eval_transform(images, generator)
        flip: bool | Tensor = self.flip
        if flip == "alternate":
            if indices is None:
                raise ValueError("the alternating flip needs the images' dataset indices")
            flip = self._first_epoch_flips(indices.device)[indices]
            if epoch % 2:
                flip = ~flip
        return augment(
            images,
            generator,
            self.crop_padding,
            flip,
            self.cutout,
            self._mean,
            self._std,
            padding_mode=self.padding_mode,
        )

    def _first_epoch_flips(self, device: torch.device) -> Tensor:
        # Every training image's bit of ``alternating_flips`` for epoch 0, hashed once: each
        # batch then costs one gather (and a negation in odd epochs), not a dozen small kernels.
        cached = self._flip_bits
        if cached is None or cached.device != device:
            count = len(self._splits["train"][1])
            indices = torch.arange(count, device=device)
            cached = self._flip_bits = alternating_flips(self.seed, indices, epoch=0)
        return cached

    def _eval_transform(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return augment(images, generator, mean=self._mean, std=self._std)

    def _device_loader(self, split: str) -> DeviceLoader:
        if split not in self._splits:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run")
        trainer = self.trainer
        train = split == "train"
        return DeviceLoader(
            *self._splits[split],
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            transform=self._train_transform if train else self._eval_transform,
            seed=self.seed,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            drop_last=self.drop_last and train,
        )

    def analysis_split(
        self,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        max_samples: int | None = None,
    ) -> AnalysisSplit:
        """This rank's share of ``split`` for analysis, gathered on the device and normalised
        without augmentation (the evaluation transform, for the training split too)."""
        check_split(split, type(self).__name__)
        self.setup("fit")  # nothing to do when the splits are on the trainer's device already
        generator = torch.Generator(device=self._splits[split][0].device)
        return tensor_split(
            split,
            self._splits[split],
            lambda images: self._eval_transform(images, generator),
            batch_size=self.eval_batch_size,
            rank=rank,
            world_size=world_size,
            max_samples=max_samples,
        )

    def train_dataloader(self) -> DeviceLoader:  # type: ignore[override]
        return self._device_loader("train")

    def val_dataloader(self) -> DeviceLoader:  # type: ignore[override]
        return self._device_loader("val")

    def test_dataloader(self) -> DeviceLoader:  # type: ignore[override]
        return self._device_loader("test")

    def predict_dataloader(self) -> DeviceLoader:  # type: ignore[override]
        return self._device_loader("test")


class GPUCIFAR10(GPUVisionData):
    """CIFAR-10 on the device, with the ResNet paper's crop (4-pixel padding) and flip.

    .. code-block:: yaml

        data:
          class_path: GPUCIFAR10
          init_args: {root: data, batch_size: 512, cutout: 0}
    """

    source = CIFAR10
    default_crop_padding = 4
    default_flip = True


class GPUCIFAR100(GPUCIFAR10):
    """CIFAR-100 (100 fine classes) on the device, augmented as CIFAR-10."""

    source = CIFAR100


class GPUMNIST(GPUVisionData):
    """MNIST on the device; like the torchvision path, not augmented unless asked to be."""

    source = MNIST
