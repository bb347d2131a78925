"""Stochastic depth (Huang, Sun, Liu, Sedra, Weinberger 2016, "Deep Networks with Stochastic
Depth"), scheduled over training time as in NASNet's ScheduledDropPath (Zoph et al. 2018)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.nn.parallel import DistributedDataParallel

from skipnets.errors import ConfigError
from skipnets.nn import (
    SkipBlock,
    check_drop_mode,
    check_survival_prob,
    linear_decay,
    skip_blocks,
)

__all__ = ["StochasticDepth"]

DROPPABLE_KINDS = ("residual", "highway", "dense")


def _import_function(path: str) -> Callable[..., float]:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"schedule must be 'constant', 'linear' or the import path of a function "
            f"(package.module.function); could not import {path!r}: {err}"
        ) from None
    if not callable(function):
        raise ConfigError(f"schedule {path!r} is not a function")
    return function


class StochasticDepth(Callback):
    """Randomly skips whole blocks during training; the network is used at full depth at test time.

    Block ``l`` of ``L`` droppable blocks survives a training step with probability ``p_l``. The
    depth rule gives the target ``p_l``: Huang's linear decay ``p_l = 1 - (l / L) (1 - p_L)``
    (default, ``p_L = 0.5``), the same ``p`` for every block, or one value per block. A schedule
    scales the drop rate ``1 - p_l`` over training time: constant, a linear warm-up from 0 over
    ``warmup`` epochs or steps, or a function of your own.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: StochasticDepth
              init_args: {survival_prob: 0.5, rule: linear, drop_mode: batch, scaling: test}

    Works on every model built from skip blocks: residual blocks fall back to their shortcut,
    highway layers to ``x`` (transform gate closed), dense layers add zeros instead of new
    features. Plain layers have no path to fall back on and are never dropped.

    Under DDP in ``batch`` mode every rank must drop the same blocks in a step, or DDP waits for
    gradients that some ranks never compute: the blocks share one generator, seeded identically
    on every rank, and the strategy must be ``ddp_find_unused_parameters_true`` since a dropped
    block's parameters get no gradient in that step.

    Args:
        survival_prob: ``p_L`` of the linear rule, the ``p`` of every block for ``uniform``, or
            a list with one survival probability per droppable block in depth order. Each in
            (0, 1].
        rule: ``linear`` or ``uniform`` (for a single ``survival_prob``); a list is used as is.
        schedule: ``constant``; ``linear`` (the drop rate grows from 0 to its target over
            ``warmup`` epochs or steps); or the import path of a function
            ``fn(epoch: float, step: int) -> float`` returning the fraction of the target drop
            rate to use, in [0, 1] (``epoch`` counts fractions of epochs, ``step`` optimizer steps).
        warmup: length of the linear warm-up, in ``warmup_unit``.
        warmup_unit: ``epoch`` or ``step``.
        drop_mode: ``batch``: one decision per block per mini-batch, and a dropped branch is not
            computed (Huang; the real speed-up); ``sample``: one decision per sample (timm's
            ``drop_path``; no speed-up).
        scaling: ``test``: a kept branch is used as is in training and scaled by ``p_l`` at test
            time (Huang); ``inverted``: divided by ``p_l`` in training, used as is at test time.
        kinds: block kinds to drop (any of ``residual``, ``highway``, ``dense``).
        seed: seed of the shared generator behind the ``batch`` decisions; by default drawn on
            rank zero and broadcast.
    """

    def __init__(
        self,
        survival_prob: float | list[float] = 0.5,
        rule: Literal["linear", "uniform"] | None = None,
        schedule: str = "constant",
        warmup: int = 0,
        warmup_unit: Literal["epoch", "step"] = "epoch",
        drop_mode: Literal["batch", "sample"] = "batch",
        scaling: Literal["test", "inverted"] = "test",
        kinds: Sequence[str] = ("residual",),
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(survival_prob, (list, tuple)):
            if rule is not None:
                raise ConfigError(
                    "survival_prob is a list, which is its own depth rule: leave rule unset"
                )
            if not survival_prob:
                raise ConfigError("survival_prob is an empty list")
            self.targets: list[float] | None = [
                check_survival_prob(p, f"survival_prob[{i}]") for i, p in enumerate(survival_prob)
            ]
        else:
            self.targets = None
            check_survival_prob(survival_prob, "survival_prob")
        if rule not in (None, "linear", "uniform"):
            raise ConfigError(f"rule must be 'linear' or 'uniform', not {rule!r}")
        self.survival_prob = survival_prob
        self.rule = rule or "linear"
        if warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {warmup}")
        if warmup_unit not in ("epoch", "step"):
            raise ConfigError(f"warmup_unit must be 'epoch' or 'step', not {warmup_unit!r}")
        if schedule == "linear" and warmup == 0:
            raise ConfigError(
                "schedule 'linear' needs warmup > 0 (epochs or steps, see warmup_unit)"
            )
        self.schedule = schedule
        self.warmup = warmup
        self.warmup_unit = warmup_unit
        self._schedule_fn = (
            None if schedule in ("constant", "linear") else _import_function(schedule)
        )
        check_drop_mode(drop_mode, scaling)
        self.drop_mode = drop_mode
        self.scaling = scaling
        bad = sorted(set(kinds) - set(DROPPABLE_KINDS))
        if bad or not kinds:
            raise ConfigError(
                f"kinds must be a non-empty subset of {', '.join(DROPPABLE_KINDS)}, got "
                f"{list(kinds)}; plain layers have no path to fall back on and are never dropped"
            )
        self.kinds = tuple(kinds)
        self.seed = seed
        self.blocks: list[tuple[str, SkipBlock]] = []
        self.others = 0  # skip blocks that are never dropped (other kinds)
        self.current: list[float] = []
        self.generator: torch.Generator | None = None
        self._restored: dict[str, Any] | None = None

    # -- setup --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # DDP has wrapped the model by now; its wrapper says whether it allows parameters
        # without gradient, which every block dropped whole leaves.
        wrapper = trainer.strategy.model
        if (
            self.drop_mode == "batch"
            and isinstance(wrapper, DistributedDataParallel)
            and not wrapper.find_unused_parameters
        ):
            raise ConfigError(
                "StochasticDepth in batch mode leaves the dropped blocks' parameters without "
                "gradient: use trainer.strategy=ddp_find_unused_parameters_true (or drop_mode=sample)"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.blocks:
            return
        all_blocks = list(skip_blocks(pl_module))
        blocks = [(n, b) for n, b in all_blocks if b.kind in self.kinds and b.bypassable]
        if not blocks:
            found = sorted({b.kind for _, b in all_blocks})
            raise ConfigError(
                f"StochasticDepth drops skip blocks of kind {', '.join(self.kinds)}, but "
                f"{_describe(pl_module)} has "
                + (f"only {', '.join(found)} blocks" if found else "no skip blocks")
            )
        if self.targets is not None and len(self.targets) != len(blocks):
            raise ConfigError(
                f"survival_prob lists {len(self.targets)} probabilities but the model has "
                f"{len(blocks)} droppable blocks"
            )
        if self.targets is None:
            p = float(self.survival_prob)
            self.targets = (
                linear_decay(len(blocks), p) if self.rule == "linear" else [p] * len(blocks)
            )
        self.blocks = blocks
        self.others = len(all_blocks) - len(blocks)
        # The process seed (seed_everything's) keeps runs reproducible; rank zero's wins.
        seed = self.seed if self.seed is not None else torch.initial_seed() % 2**63
        self.generator = torch.Generator().manual_seed(int(trainer.strategy.broadcast(seed, src=0)))
        for _, block in blocks:
            block.drop_mode = self.drop_mode
            block.scaling = self.scaling
            block.drop_generator = self.generator
        if self._restored is not None:
            self._apply_state(self._restored)
        else:
            self._set(self._probabilities(self._fraction(0.0, 0)))

    # -- the schedule -------------------------------------------------------------------------
    def _fraction(self, epoch: float, step: int) -> float:
        """The fraction of the target drop rate in use at this point of training."""
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "linear":
            elapsed = epoch if self.warmup_unit == "epoch" else step
            return min(1.0, elapsed / self.warmup)
        fraction = float(self._schedule_fn(epoch=epoch, step=step))
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(
                f"schedule {self.schedule} returned {fraction} at epoch {epoch:.3g}, step {step}: "
                "it must return a fraction of the drop rate in [0, 1]"
            )
        return fraction

    def _probabilities(self, fraction: float) -> list[float]:
        return [1.0 - fraction * (1.0 - p) for p in self.targets or []]

    def _set(self, probabilities: list[float]) -> None:
        self.current = probabilities
        for (_, block), p in zip(self.blocks, probabilities):
            block.survival_prob = p

    @property
    def expected_blocks(self) -> float:
        """Expected number of skip blocks that run in a training step (Huang's expected depth)."""
        return self.others + sum(self.current)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        batches = trainer.num_training_batches
        within = batch_idx / batches if batches and batches != float("inf") else 0.0
        self._set(
            self._probabilities(self._fraction(trainer.current_epoch + within, trainer.global_step))
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        active = self.others + sum(
            block.last_kept if block.survival_prob < 1.0 else 1.0 for _, block in self.blocks
        )
        if isinstance(active, torch.Tensor):
            active = active.float()
        pl_module.log("stochastic_depth/active_blocks", active, on_step=True, on_epoch=False)
        pl_module.log(
            "stochastic_depth/expected_blocks", self.expected_blocks, on_step=True, on_epoch=False
        )

    # -- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "survival_probs": list(self.current),
            "targets": list(self.targets or []),
            "generator": self.generator.get_state() if self.generator is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        if self.blocks:
            self._apply_state(self._restored)

    def _apply_state(self, state: dict[str, Any]) -> None:
        probabilities = [float(p) for p in state["survival_probs"]]
        if len(probabilities) != len(self.blocks):
            raise ConfigError(
                f"the checkpoint's stochastic depth state has {len(probabilities)} blocks but "
                f"the model has {len(self.blocks)}: it comes from another architecture"
            )
        self._set(probabilities)
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restored = None


def _describe(pl_module: LightningModule) -> str:
    arch = pl_module.hparams.get("arch")
    return f"model {arch!r}" if arch else f"the model ({type(pl_module).__name__})"
