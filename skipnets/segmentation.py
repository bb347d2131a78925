"""``Segmenter``: trains any registered segmentation model (per-pixel classification)."""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.segmentation import DiceScore

from skipnets.errors import ConfigError
from skipnets.module import Classifier
from skipnets.registry import model_info


class Segmenter(Classifier):
    """Trains a segmentation model with per-pixel cross-entropy; logs pixel accuracy (``acc``),
    Dice and mean IoU (torchmetrics; per class over all pixels of the split, averaged over the
    classes, background included) for each split.

    .. code-block:: yaml

        model:
          class_path: skipnets.segmentation.Segmenter
          init_args:
            arch: unet
            arch_kwargs: {depth: 3, base_width: 16, padding: same}
        optimizer:
          class_path: torch.optim.SGD
          init_args: {lr: 0.01, momentum: 0.99}
        data:
          class_path: Shapes

    The model's output may be smaller than its input (U-Net with valid padding): the targets are
    then centre-cropped to the output, the region the output covers.

    Args:
        arch: registered segmentation model (``skipnets models`` lists them; task
            "segmentation").
        kwargs: ``Classifier``'s other arguments, with the same meaning; ``num_classes``
            defaults to the model's own.
    """

    def __init__(self, arch: str = "unet", **kwargs: Any) -> None:
        info = model_info(arch)
        if info.task != "segmentation":
            raise ConfigError(
                f"{arch} is a {info.task} model; Segmenter trains segmentation models "
                "(use the Classifier for classifiers)"
            )
        if kwargs.get("num_classes") is None:
            arch_kwargs = kwargs.get("arch_kwargs") or {}
            kwargs["num_classes"] = arch_kwargs.get("num_classes") or _default_classes(info.builder)
        super().__init__(arch=arch, **kwargs)

    @staticmethod
    def _split_metrics(num_classes: int) -> MetricCollection:
        # Dice and IoU per class over all pixels of the split, then averaged over the classes.
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "dice": DiceScore(
                    num_classes, average="macro", aggregation_level="global", input_format="index"
                ),
                "iou": MulticlassJaccardIndex(num_classes, average="macro"),
            }
        )

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, target = batch
        logits = self.model(x)
        target = _crop_to(target, logits)
        loss = F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)
        self.metrics[f"{split}_"].update(logits.detach().argmax(dim=1), target)
        if split != "train":
            self.losses[f"{split}_"].update(loss.detach(), weight=target.numel())
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.model(x).softmax(dim=1)


def _crop_to(target: Tensor, logits: Tensor) -> Tensor:
    """Centre-crop the ``(N, H, W)`` target to the logits' spatial size."""
    height, width = logits.shape[-2:]
    if target.shape[-2:] == (height, width):
        return target
    if target.shape[-2] < height or target.shape[-1] < width:
        raise ConfigError(
            f"the model's output ({height}x{width}) is larger than the targets "
            f"({target.shape[-2]}x{target.shape[-1]})"
        )
    top = (target.shape[-2] - height) // 2
    left = (target.shape[-1] - width) // 2
    return target[..., top : top + height, left : left + width]


def _default_classes(builder: Any) -> int | None:
    parameter = inspect.signature(builder).parameters.get("num_classes")
    return (
        None
        if parameter is None or parameter.default is inspect.Parameter.empty
        else parameter.default
    )
