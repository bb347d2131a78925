"""An exponential moving average of the weights, updated on the device every few steps, with
airbench's lookahead option (Jordan 2024, arXiv:2404.00498, after hlb-CIFAR10)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from skipnets.errors import ConfigError

__all__ = ["EMA"]


class EMA(L.Callback):
    """An exponential moving average (EMA) of the module's weights and floating-point buffers.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: EMA          # airbench94's lookahead
              init_args: {decay: 0.95, every_n_steps: 5, decay_power: 3, start_epoch: 3,
                          lookahead: true}

    Every ``every_n_steps`` optimizer steps, from epoch ``start_epoch`` on, the average moves
    towards the weights: ``ema = rho * ema + (1 - rho) * weights`` with
    ``rho = decay ** every_n_steps * (step / total_steps) ** decay_power`` (so ``decay`` is the
    decay per optimizer step, whatever the update interval). The first update copies the weights.
    With ``decay_power > 0`` the average starts short and lengthens towards the end of the run
    (airbench: ``decay 0.95, decay_power 3``); 0 keeps it constant.

    The update is two fused ``torch._foreach`` operations over tensor lists gathered once, on
    the device: no host synchronisation and no work on the steps in between.

    Args:
        decay: decay per optimizer step, in [0, 1).
        every_n_steps: optimizer steps between updates.
        decay_power: exponent of the run's progress in ``rho`` (needs the run's length:
            ``trainer.max_epochs`` or ``trainer.max_steps``).
        start_epoch: the first epoch whose steps update the average.
        lookahead: after each update the weights are set to the average, and at the end of each
            epoch too (airbench's "lookahead" scheme: the average is where training goes on).
        use_at_eval: validation during ``fit`` runs on the average; the checkpoints' weights
            (``state_dict``) are the average, the trained weights being kept in this callback's
            state so that a resumed run goes on exactly; at the end of ``fit`` the module keeps
            the average, so ``test``, ``predict`` and every command that loads a checkpoint use
            it. Off: the module's own weights are used everywhere (with ``lookahead`` they are
            the average after every update anyway).
    """

    def __init__(
        self,
        decay: float = 0.999,
        every_n_steps: int = 1,
        decay_power: float = 0.0,
        start_epoch: int = 0,
        lookahead: bool = False,
        use_at_eval: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay is the decay per step and must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ConfigError(f"EMA every_n_steps must be >= 1, got {every_n_steps}")
        if decay_power < 0 or start_epoch < 0:
            raise ConfigError("EMA decay_power and start_epoch must be >= 0")
        if not (lookahead or use_at_eval):
            raise ConfigError(
                "EMA with lookahead: false and use_at_eval: false would average weights that "
                "nothing uses: set one of them"
            )
        self.decay = decay
        self.every_n_steps = every_n_steps
        self.decay_power = decay_power
        self.start_epoch = start_epoch
        self.lookahead = lookahead
        self.use_at_eval = use_at_eval
        self._names: list[str] = []
        # The module's own tensors (detached aliases: in-place updates reach the module).
        self._weights: list[Tensor] = []
        self._average: list[Tensor] | None = None  # None until the first update
        self._spare: list[Tensor] | None = None  # the weights while validation runs on the average
        self._total_steps = 0
        self._last_update_step = -1
        self._loaded: dict[str, Any] | None = None

    @property
    def averaged(self) -> dict[str, Tensor]:
        """The average by ``state_dict`` name (empty before the first update)."""
        return dict(zip(self._names, self._average or []))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Parameters and persistent floating buffers (BatchNorm's running statistics), each
        # once, under its state_dict name: what airbench averages, and what checkpoints hold.
        seen: set[int] = set()
        self._names, self._weights = [], []
        for name, tensor in pl_module.state_dict(keep_vars=True).items():
            if tensor.is_floating_point() and id(tensor) not in seen:
                seen.add(id(tensor))
                self._names.append(name)
                self._weights.append(tensor.detach())
        self._average = self._spare = None
        if self.decay_power > 0:
            total = trainer.estimated_stepping_batches
            if total == float("inf") or total < 1:
                raise ConfigError(
                    "EMA decay_power > 0 needs the run's length: set trainer.max_epochs or "
                    "trainer.max_steps"
                )
            self._total_steps = int(total)
        # A state loaded by test or validate (restored with their checkpoint) is not this fit's.
        loaded, self._loaded = self._loaded, None
        if loaded is not None and trainer.ckpt_path is not None:
            self._restore(loaded)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step  # optimizer steps done, this batch's included
        if (
            step % self.every_n_steps
            or step == self._last_update_step  # a micro-batch of gradient accumulation
            or trainer.current_epoch < self.start_epoch
        ):
            return
        self._last_update_step = step
        if self._average is None:
            self._average = [t.clone() for t in self._weights]
            return
        rho = self.decay**self.every_n_steps
        if self.decay_power > 0:
            rho *= min(step / self._total_steps, 1.0) ** self.decay_power
        torch._foreach_lerp_(self._average, self._weights, 1.0 - rho)
        if self.lookahead:
            torch._foreach_copy_(self._weights, self._average)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.lookahead and self._average is not None:
            torch._foreach_copy_(self._weights, self._average)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._swapping(trainer):
            return
        if self._spare is None:
            self._spare = [torch.empty_like(t) for t in self._weights]
        torch._foreach_copy_(self._spare, self._weights)
        torch._foreach_copy_(self._weights, self._average)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapping(trainer):
            torch._foreach_copy_(self._weights, self._spare)

    def _swapping(self, trainer: L.Trainer) -> bool:
        # Outside fit the module's weights already are the average (a checkpoint's, or the
        # module's own after on_train_end).
        return (
            self.use_at_eval and self._average is not None and trainer.state.fn == TrainerFn.FITTING
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.use_at_eval and self._average is not None:
            torch._foreach_copy_(self._weights, self._average)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.use_at_eval and self._average is not None and self._weights:
            # Validation ran on the average, so a checkpoint chosen by it holds the average.
            checkpoint["state_dict"] = {**checkpoint["state_dict"], **self.averaged}

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_update_step": self._last_update_step}
        if self._average is not None:
            state["average"] = self.averaged
            if self.use_at_eval:  # the checkpoint's state_dict holds the average instead
                state["weights"] = dict(zip(self._names, self._weights))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_fit_start, once the module is on its device.
        self._loaded = dict(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        self._last_update_step = int(state.get("last_update_step", -1))
        average = state.get("average")
        if average is None:
            return
        missing = sorted(set(self._names) - set(average))
        if missing:
            raise ConfigError(
                f"the checkpoint's EMA state lacks {', '.join(missing[:5])}: it was saved by "
                "another model; resume without the EMA callback or from a matching checkpoint"
            )
        self._average = [
            average[n].to(t.device, t.dtype) for n, t in zip(self._names, self._weights)
        ]
        weights = state.get("weights")
        if weights is not None:
            for name, tensor in zip(self._names, self._weights):
                tensor.copy_(weights[name])
