"""Learning-rate schedules the papers use that torch does not ship as one class."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from skipnets.errors import ConfigError


class WarmupMultiStepLR(LambdaLR):
    """``MultiStepLR`` after a constant warm-up at a lower rate.

    He et al. 2016 train ResNet-110 (and 2016b the 164- and 1001-layer pre-activation nets) at
    0.01 for about 400 iterations before going back to 0.1: about one epoch of 352 iterations on
    CIFAR's 45k training images, so ``warmup_epochs=1, warmup_factor=0.1``. Stepped once per
    epoch, like the other schedulers in a config.

    .. code-block:: yaml

        lr_scheduler:
          class_path: skipnets.schedulers.WarmupMultiStepLR
          init_args: {milestones: [91, 136], gamma: 0.1, warmup_epochs: 1, warmup_factor: 0.1}
    """

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_epochs: int = 1,
        warmup_factor: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        if warmup_epochs < 0 or not 0 < warmup_factor <= 1:
            raise ConfigError("warmup_epochs must be >= 0 and warmup_factor in (0, 1]")
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return self.warmup_factor
        return self.gamma ** bisect_right(self.milestones, epoch)


class LinearWarmupDecayLR(LambdaLR):
    """Linear warm-up, then linear decay, stepped every batch: airbench's "triangle" schedule.

    Jordan (2024, airbench94) multiplies the learning rate by ``start_factor`` (0.2) at the
    first step, rises linearly to 1 at ``warmup_fraction`` (23 %) of the run, and falls
    linearly to ``end_factor`` (0.07) at its last step. The factor multiplies each parameter
    group's own learning rate, so groups keep their ratios (airbench's 64x rate for BatchNorm
    biases). Left out, ``total_steps`` is filled in by the ``Classifier`` with the run's
    optimizer steps.

    .. code-block:: yaml

        model: {lr_scheduler_interval: step}
        lr_scheduler:
          class_path: skipnets.schedulers.LinearWarmupDecayLR
          init_args: {warmup_fraction: 0.23, start_factor: 0.2, end_factor: 0.07}
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_fraction: float = 0.23,
        start_factor: float = 0.2,
        end_factor: float = 0.07,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None or total_steps < 1:
            raise ConfigError(
                "LinearWarmupDecayLR needs total_steps >= 1 (the Classifier fills it in with "
                f"the run's optimizer steps), got {total_steps}"
            )
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ConfigError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
        if start_factor < 0 or end_factor < 0:
            raise ConfigError("start_factor and end_factor must be >= 0")
        self.total_steps = total_steps
        self.warmup_steps = int(warmup_fraction * total_steps)
        self.start_factor = start_factor
        self.end_factor = end_factor
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_factor + (1 - self.start_factor) * step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        done = min(step - self.warmup_steps, decay_steps) / max(decay_steps, 1)
        return 1 + (self.end_factor - 1) * done
