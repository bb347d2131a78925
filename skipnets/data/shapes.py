"""Generated segmentation data: circles, squares and triangles on a noisy background."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from skipnets.data.base import DataModule
from skipnets.errors import ConfigError

CLASSES = ("background", "circle", "square", "triangle")


def make_shapes(
    count: int,
    image_size: int,
    channels: int = 1,
    max_shapes: int = 3,
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``count`` images (``count, channels, size, size``) and their per-pixel labels
    (``count, size, size``; 0 background, 1 circle, 2 square, 3 triangle).

    Each image holds 1 to ``max_shapes`` shapes of random kind, position, size (8-20% of the
    image side) and brightness on a background of random brightness, plus Gaussian noise of
    standard deviation ``noise``. Later shapes occlude earlier ones. Shapes are always brighter
    than the background but their brightness overlaps between kinds, so telling a square from a
    circle takes its outline, not its grey level.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return torch.rand(shape, generator=generator) * (high - low) + low

    coords = torch.arange(image_size, dtype=torch.float32) + 0.5
    ys, xs = coords[None, :, None], coords[None, None, :]
    background = uniform(count, channels, 1, 1, high=0.3)
    images = background.expand(count, channels, image_size, image_size).clone()
    labels = torch.zeros(count, image_size, image_size, dtype=torch.long)
    shape_count = torch.randint(1, max_shapes + 1, (count,), generator=generator)
    for slot in range(max_shapes):
        present = (shape_count > slot)[:, None, None]
        kind = torch.randint(1, len(CLASSES), (count,), generator=generator)[:, None, None]
        radius = uniform(count, low=0.08, high=0.2)[:, None, None] * image_size
        cx = uniform(count)[:, None, None] * image_size
        cy = uniform(count)[:, None, None] * image_size
        dx, dy = xs - cx, ys - cy
        circle = dx**2 + dy**2 <= radius**2
        half = radius * 0.85  # a square of about the circle's area
        square = (dx.abs() <= half) & (dy.abs() <= half)
        # Apex up, base of width 2 * radius at the bottom.
        triangle = (dy.abs() <= radius) & (dx.abs() <= (dy + radius) / 2)
        inside = torch.where(kind == 1, circle, torch.where(kind == 2, square, triangle)) & present
        labels = torch.where(inside, kind, labels)
        brightness = uniform(count, channels, 1, 1, low=0.5, high=1.0)
        images = torch.where(inside[:, None], brightness, images)
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images - 0.5, labels


class Shapes(DataModule):
    """A seeded segmentation problem that trains in seconds on a CPU (the U-Net's quickstart).

    ``num_classes`` is 4 (background, circle, square, triangle); the targets are ``(H, W)``
    class-index maps. Train, val and test sets come from different seeds, so no image repeats.

    .. code-block:: yaml

        model:
          class_path: skipnets.segmentation.Segmenter
          init_args: {arch: unet, arch_kwargs: {depth: 3, base_width: 16, padding: same}}
        data:
          class_path: Shapes
          init_args: {image_size: 64, num_train: 2000}
    """

    num_classes = len(CLASSES)
    classes = CLASSES

    def __init__(
        self,
        image_size: int = 64,
        channels: int = 1,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 200,
        max_shapes: int = 3,
        noise: float = 0.1,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if image_size < 8:
            raise ConfigError(f"image_size must be at least 8, got {image_size}")
        if channels < 1 or max_shapes < 1:
            raise ConfigError("channels and max_shapes must be at least 1")
        if min(num_train, num_val, num_test) < 1:
            raise ConfigError("num_train, num_val and num_test must be at least 1")
        if noise < 0:
            raise ConfigError(f"noise must be >= 0, got {noise}")
        self.image_size = image_size
        self.channels = channels
        self.sizes = (num_train, num_val, num_test)
        self.max_shapes = max_shapes
        self.noise = noise
        self.input_shape = (channels, image_size, image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        sets = [
            TensorDataset(
                *make_shapes(
                    count,
                    self.image_size,
                    self.channels,
                    self.max_shapes,
                    self.noise,
                    seed=self.seed * 3 + offset,
                )
            )
            for offset, count in enumerate(self.sizes)
        ]
        self.train_set, self.val_set, self.test_set = sets
