"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 images, no download needed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from skipnets.data.base import DataModule, split_indices
from skipnets.errors import ConfigError


class Digits(DataModule):
    """The UCI optical digits as shipped by scikit-learn (``sklearn.datasets.load_digits``).

    As 64-value vectors (``image_size: null``, for MLPs) or as 1-channel images resized to
    ``image_size`` pixels (8 keeps the original; 16, 28 or 32 suit the conv nets). Inputs are
    standardised with the training split's mean and standard deviation. The split is a seeded
    permutation: ``val_fraction`` and ``test_fraction`` of the 1,797 images, the rest for training.
    ``shift`` adds, for each training image, its copies moved by up to that many of the original
    8x8 pixels in each direction (zeros fill in): ``shift: 1`` gives 9 images per original.

    .. code-block:: yaml

        data:
          class_path: Digits
          init_args: {image_size: 16, batch_size: 64}
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int | None = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        shift: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if image_size is not None and image_size < 8:
            raise ConfigError(
                f"image_size must be at least 8 (the original size), got {image_size}"
            )
        if not 0 <= shift < 4:
            raise ConfigError(f"shift must be 0, 1, 2 or 3 pixels, got {shift}")
        self.image_size = image_size
        self.shift = shift
        self.fractions = (val_fraction, test_fraction)
        split_indices(10, self.fractions, seed)  # validate the fractions now, not at setup
        self.input_shape = (1, image_size, image_size) if image_size else (64,)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = split_indices(len(labels), self.fractions, self.seed)
        repeats = (2 * self.shift + 1) ** 2
        splits = [
            (
                self._resized(shifted_copies(images[train], self.shift)),
                labels[train].repeat(repeats),
            ),
            (self._resized(images[val]), labels[val]),
            (self._resized(images[test]), labels[test]),
        ]
        originals = splits[0][0][: len(train)]  # statistics of the training images, unshifted
        mean, std = originals.mean(), originals.std()
        self.train_set, self.val_set, self.test_set = (
            TensorDataset((x - mean) / std, y) for x, y in splits
        )

    def _resized(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size and self.image_size != 8:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return images if self.image_size else images.flatten(1)


def shifted_copies(images: torch.Tensor, shift: int) -> torch.Tensor:
    """``images`` followed by its copies moved by every (dy, dx) in ``[-shift, shift]^2``."""
    if shift == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (shift, shift, shift, shift))
    offsets = [
        (dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1) if dy or dx
    ]
    copies = [
        padded[..., shift - dy : shift - dy + height, shift - dx : shift - dx + width]
        for dy, dx in offsets
    ]
    return torch.cat([images, *copies])
