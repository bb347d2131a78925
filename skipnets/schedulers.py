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
