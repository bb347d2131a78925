"""A second device on a machine with only a CPU, for tests that must catch device mistakes.

For skipnets' own tests and for plugin authors: a plugin that passes its tests under
``ShadowDevice`` (and ``ShadowDDP``) does its work where the model is, as it must on a GPU.

On a GPU, a tensor on the wrong device fails loudly: ``Input type (torch.cuda.FloatTensor) and
weight type (torch.FloatTensor) should be the same``. On a CPU-only machine every tensor is on
the one device, so code that runs the model before Lightning has moved it, after Lightning has
moved it back, or on a batch that never went through the trainer's transfer, passes unnoticed.

``ShadowDevice`` makes the device visible in the dtype instead. While Lightning holds the model
"on the device" (from ``model_to_device`` until ``teardown``) its floating-point parameters and
buffers are float64, and every batch Lightning (or a plugin, through the trainer) moves to the
device becomes float64. Before and after, the model is float32, as a model is on the CPU before
and after a GPU run. Mixing the two fails the way a device mix-up fails on a GPU: a forward pass
of a float32 batch through the float64 model, or of a moved batch through the model outside its
time on the device, raises ``RuntimeError`` (``expected ... Double ... Float``).

Use it as ``Trainer(strategy=ShadowDevice(), ...)``, or in a config as
``trainer.strategy: {class_path: skipnets.testing.ShadowDevice}``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import Tensor

__all__ = ["ShadowDDP", "ShadowDevice"]


def _on_device(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.double() if t.is_floating_point() else t)


class _Shadow:
    """What both strategies add: the model and the batches in float64 while on the device."""

    def model_to_device(self) -> None:
        super().model_to_device()  # type: ignore[misc]
        self.model.to(torch.float64)  # type: ignore[attr-defined]

    def batch_to_device(self, batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
        batch = super().batch_to_device(batch, device, dataloader_idx)  # type: ignore[misc]
        return _on_device(batch)

    def teardown(self) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        super().teardown()  # type: ignore[misc]
        if module is not None:
            module.to(torch.float32)  # back "on the CPU"


class ShadowDevice(_Shadow, SingleDeviceStrategy):
    """One process, the model in float64 while Lightning holds it on the device."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("accelerator", CPUAccelerator())
        super().__init__(device=torch.device("cpu"), **kwargs)


class ShadowDDP(_Shadow, DDPStrategy):
    """DDP on CPU processes (gloo), the model in float64 while Lightning holds it there."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(**kwargs)
