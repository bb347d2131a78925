"""A clean stop when the loss stops being a number, with advice that fits the model.

:class:`NonFiniteLossStop` stops training at the first loss that is nan or inf, before that step
touches the weights, and ends the run with :class:`TrainingDiverged`, whose message says what to
change. The advice asks the model itself: its skip blocks (the contract of ``skipnets.nn``) say
whether it has highway gates and where they started, and the registry says which of the
architecture's settings a config can change.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from skipnets.errors import SkipnetsError

__all__ = ["NonFiniteLossStop", "TrainingDiverged"]


class TrainingDiverged(SkipnetsError):
    """The loss became nan or inf; the message names the step and what to change."""


class NonFiniteLossStop(Callback):
    """Stops training at the first nan or inf loss, before the backward pass and the optimizer
    step, so the weights (and every checkpoint written so far) stay those of the last good step.

    The run ends with :class:`TrainingDiverged`: the CLI prints its message (the step, what to
    try: a lower learning rate, a more negative highway gate bias, fewer layers) and exits with
    status 2. Under DDP the ranks agree before stopping, so none is left waiting.
    """

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        # One host read of the scalar loss (on a GPU, the step's one synchronisation).
        finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(loss.isfinite().all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise TrainingDiverged(_divergence_message(trainer, pl_module, loss))


def _divergence_message(
    trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
) -> str:
    value = loss.detach().float().cpu()
    shown = "nan" if bool(torch.isnan(value).any()) else "inf"
    batch = trainer.fit_loop.epoch_loop.batch_idx + 1
    last = ""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            last = callback.last_model_path
    kept = (
        f"the last good checkpoint is {last} (resume with --ckpt_path last)"
        if last
        else "no checkpoint had been saved yet"
    )
    return (
        f"training diverged: the loss became {shown} at step {trainer.global_step} "
        f"(epoch {trainer.current_epoch}, batch {batch}); that step was not applied and "
        f"{kept}. Try {'; '.join(advice(trainer, pl_module))}"
    )


def advice(trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
    """What to change after a divergence, from what the model says of itself: its skip blocks
    (highway gates and where they started, how many blocks) and, for a registered
    architecture, which of its builder's settings a config can change."""
    from skipnets.nn import skip_blocks

    lrs = sorted({group["lr"] for opt in trainer.optimizers for group in opt.param_groups})
    tips = [f"a lower learning rate (optimizer.init_args.lr, now {', '.join(map(str, lrs))})"]
    settings = _settings(getattr(pl_module, "hparams", {}))
    blocks = [block for _, block in skip_blocks(pl_module)]
    gate_biases = sorted(
        {b.gate_bias for b in blocks if b.kind == "highway" and hasattr(b, "gate_bias")}
    )
    if gate_biases:
        where = "model.arch_kwargs.gate_bias" if "gate_bias" in settings else "its gate bias"
        now = ", ".join(f"{bias:g}" for bias in gate_biases)
        tips.append(f"a more negative highway gate bias ({where}, now {now})")
    if "depth" in settings:
        tips.append(f"fewer layers (model.arch_kwargs.depth, now {settings['depth']})")
    else:
        tips.append(
            f"a shallower model (this one has {len(blocks)} skip blocks)"
            if blocks
            else "a shallower model"
        )
    tips.append("gradient clipping (trainer.gradient_clip_val)")
    return tips


def _settings(hparams: Any) -> dict[str, Any]:
    """The registered builder's settings and their values in this run (the config's
    ``arch_kwargs`` over the builder's defaults); empty for a model outside the registry."""
    from skipnets.registry import model_info

    if not hasattr(hparams, "get") or not hparams.get("arch"):
        return {}
    try:
        builder = model_info(hparams["arch"]).builder
    except Exception:  # a model outside the registry
        return {}
    values = {
        name: parameter.default
        for name, parameter in inspect.signature(builder).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    values.update(hparams.get("arch_kwargs") or {})
    return values
