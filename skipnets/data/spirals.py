"""Lang & Witbrock's (1988) two-spirals problem, generated."""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

from skipnets.data.base import DataModule
from skipnets.errors import ConfigError


def two_spirals(
    points_per_spiral: int = 97, offset: float = 0.0, noise: float = 0.0, seed: int = 0
):
    """The benchmark's points: spiral ``i`` at angle ``i * pi / 16`` and radius
    ``6.5 * (104 - i) / 104``, three turns; the second spiral is the first rotated by 180
    degrees. ``offset`` shifts ``i`` (0.5 gives the points between the training points)."""
    i = torch.arange(points_per_spiral, dtype=torch.float64) + offset
    angle = i * math.pi / 16
    radius = 6.5 * (104 - i) / 104
    first = torch.stack([radius * torch.sin(angle), radius * torch.cos(angle)], dim=1)
    points = torch.cat([first, -first]).float()
    if noise:
        points += noise * torch.randn(points.shape, generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([torch.zeros(points_per_spiral), torch.ones(points_per_spiral)]).long()
    return points, labels


class TwoSpirals(DataModule):
    """Two interleaved spirals, one class each (194 points in the original benchmark).

    Trains on the benchmark's points; validates and tests on the points half-way between them
    along each spiral, which measures whether the net learned the spirals or only the points.
    Coordinates are scaled by 1/6.5 into [-1, 1].
    """

    num_classes = 2
    input_shape = (2,)

    def __init__(
        self,
        points_per_spiral: int = 97,
        noise: float = 0.0,
        batch_size: int = 194,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if points_per_spiral < 2:
            raise ConfigError(f"points_per_spiral must be at least 2, got {points_per_spiral}")
        self.points_per_spiral = points_per_spiral
        self.noise = noise

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = two_spirals(self.points_per_spiral, noise=self.noise, seed=self.seed)
        self.train_set = TensorDataset(x / 6.5, y)
        x_between, y_between = two_spirals(self.points_per_spiral - 1, offset=0.5)
        self.val_set = self.test_set = TensorDataset(x_between / 6.5, y_between)
