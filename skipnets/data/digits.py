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
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if image_size is not None and image_size < 8:
            raise ConfigError(f"image_size must be at least 8 (the original size), got {image_size}")
        self.image_size = image_size
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
        if self.image_size and self.image_size != 8:
            size = (self.image_size, self.image_size)
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        inputs = images if self.image_size else images.flatten(1)
        train, val, test = split_indices(len(labels), self.fractions, self.seed)
        mean, std = inputs[train].mean(), inputs[train].std()
        inputs = (inputs - mean) / std
        self.train_set = TensorDataset(inputs[train], labels[train])
        self.val_set = TensorDataset(inputs[val], labels[val])
        self.test_set = TensorDataset(inputs[test], labels[test])
