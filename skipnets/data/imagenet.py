"""ImageNet (or any image folder in its layout) through torchvision's ``ImageFolder``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.transforms import v2 as T

from skipnets.data.base import DataModule
from skipnets.errors import ConfigError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

#: The principal components of ImageNet's RGB pixels, for AlexNet's colour augmentation.
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

Augmentation = Literal["random_resized_crop", "scale_jitter", "none"]


class Lighting(torch.nn.Module):
    """AlexNet's colour augmentation (Krizhevsky et al. 2012, Sec. 4.1): add
    ``sum_i alpha_i * lambda_i * p_i`` to every pixel, ``alpha_i ~ N(0, std)``, with the
    eigenvalues ``lambda_i`` and eigenvectors ``p_i`` of the RGB pixel covariance."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std
        self.eigenvalues = torch.tensor(PCA_EIGENVALUES)
        self.eigenvectors = torch.tensor(PCA_EIGENVECTORS)

    def forward(self, image: Tensor) -> Tensor:
        alpha = torch.randn(3) * self.std
        shift = self.eigenvectors @ (alpha * self.eigenvalues)
        return image + shift.to(image)[:, None, None]


def _class_folders(path: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


class ImageNet(DataModule):
    """ImageNet from a folder: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG``.

    The official validation images serve as the test split (the labelled ImageNet test set is not
    public); ``val_size`` images held out of the training folder (seeded) are the validation
    split used for checkpointing and schedules. ``num_classes`` is the number of class folders.

    Augmentation for training (``augmentation``):

    - ``random_resized_crop``: a random crop of 8-100% of the area and 3/4-4/3 aspect ratio,
      resized to ``image_size`` (the Inception recipe; torchvision's reference training), flip.
    - ``scale_jitter``: the shorter side resized to a random size in ``scale_range``, then a
      random ``image_size`` crop and flip (VGG's training; ``(256, 256)`` is its fixed S = 256).
    - ``none``: the evaluation transform.

    ``lighting`` > 0 adds AlexNet's PCA colour noise with that standard deviation (0.1 in the
    paper). Evaluation resizes the shorter side to ``resize_size`` (default
    ``image_size * 256 / 224``) and takes the central ``image_size`` crop. Images are normalised
    with ImageNet's channel means and standard deviations.

    .. code-block:: yaml

        data:
          class_path: ImageNet
          init_args: {root: /data/imagenet, batch_size: 256, num_workers: 16}
    """

    def __init__(
        self,
        root: str = "data/imagenet",
        image_size: int = 224,
        resize_size: int | None = None,
        augmentation: Augmentation = "random_resized_crop",
        scale_range: tuple[int, int] = (256, 512),
        lighting: float = 0.0,
        val_size: int = 10000,
        batch_size: int = 256,
        num_workers: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.root = Path(root).expanduser()
        missing = [name for name in ("train", "val") if not (self.root / name).is_dir()]
        if missing:
            raise ConfigError(
                f"ImageNet not found: no {' or '.join(repr(m) for m in missing)} folder under "
                f"{str(self.root)!r}. Point --data.init_args.root at a folder holding "
                "train/<class>/*.JPEG and val/<class>/*.JPEG (the validation images sorted into "
                "one folder per class)"
            )
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        if augmentation not in ("random_resized_crop", "scale_jitter", "none"):
            raise ConfigError(
                f"augmentation must be random_resized_crop, scale_jitter or none, not {augmentation!r}"
            )
        low, high = scale_range
        if not image_size <= low <= high:
            raise ConfigError(
                f"scale_range must satisfy image_size <= low <= high, got {tuple(scale_range)}"
            )
        if lighting < 0 or val_size < 0:
            raise ConfigError("lighting and val_size must be >= 0")
        self.classes = _class_folders(self.root / "train")
        if not self.classes:
            raise ConfigError(f"{str(self.root / 'train')!r} has no class folders")
        self.num_classes = len(self.classes)
        self.input_shape = (3, image_size, image_size)
        self.image_size = image_size
        self.resize_size = resize_size or round(image_size * 256 / 224)
        self.augmentation = augmentation
        self.scale_range = (low, high)
        self.lighting = lighting
        self.val_size = val_size

    def _transform(self, train: bool) -> T.Compose:
        size = self.image_size
        if train and self.augmentation == "random_resized_crop":
            steps = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
        elif train and self.augmentation == "scale_jitter":
            low, high = self.scale_range
            steps = [
                T.RandomShortestSize(list(range(low, high + 1)), antialias=True),
                T.RandomCrop(size),
                T.RandomHorizontalFlip(),
            ]
        else:
            steps = [T.Resize(self.resize_size, antialias=True), T.CenterCrop(size)]
        steps += [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
        if train and self.lighting > 0:
            steps.append(Lighting(self.lighting))
        steps.append(T.Normalize(MEAN, STD))
        return T.Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_dir, val_dir = self.root / "train", self.root / "val"
        if _class_folders(val_dir) != self.classes:
            raise ConfigError(
                f"the class folders of {str(val_dir)!r} differ from those of {str(train_dir)!r}"
            )
        train_aug = datasets.ImageFolder(str(train_dir), transform=self._transform(True))
        train_plain = datasets.ImageFolder(str(train_dir), transform=self._transform(False))
        n = len(train_aug)
        if self.val_size >= n:
            raise ConfigError(f"val_size={self.val_size} leaves no training images ({n} found)")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.train_set = Subset(train_aug, order[self.val_size :])
        self.plain_train_set = Subset(train_plain, order[self.val_size :])
        self.val_set = Subset(train_plain, order[: self.val_size])
        self.test_set = datasets.ImageFolder(str(val_dir), transform=self._transform(False))
