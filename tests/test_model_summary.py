"""Lightning's model summary at the start of ``fit`` counts the FLOPs of one input of the data's
shape, as ``skipnets models --details`` (``skipnets.info``) does: the modules give Lightning an
example input (``example_input_array``) built from their ``input_shape``."""

from __future__ import annotations

import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import summarize

from skipnets.data import Digits, Shapes
from skipnets.info import describe
from skipnets.module import Classifier
from skipnets.segmentation import Segmenter
from skipnets.testing import ShadowDevice


class RecordedSummary(ModelSummary):
    """The summary callback, keeping the FLOPs it would print."""

    flops: list[int] = []

    @staticmethod
    def summarize(*args, total_flops: int, **kwargs) -> None:
        RecordedSummary.flops.append(total_flops)


def test_the_summary_counts_the_flops_skipnets_info_counts() -> None:
    classifier = Classifier(arch="resnet20", num_classes=10, input_shape=(1, 16, 16))
    assert summarize(classifier).total_flops == describe(classifier.model, (1, 16, 16)).flops
    assert describe(classifier.model, (1, 16, 16)).flops == 20_129_024
    mlp = Classifier(arch="plain_mlp", num_classes=10, input_shape=(64,))
    assert summarize(mlp).total_flops == describe(mlp.model, (64,)).flops > 0
    unet = Segmenter(
        arch_kwargs={"depth": 2, "base_width": 4, "padding": "same"}, input_shape=(3, 32, 32)
    )
    assert summarize(unet).total_flops == describe(unet.model, (3, 32, 32)).flops > 0
    assert Classifier(arch="plain_mlp", num_classes=10).example_input_array is None  # no shape
    # A compiled network would compile once more for a batch of one: no example, no FLOPs.
    compiled = Classifier(arch="resnet20", num_classes=10, input_shape=(1, 16, 16), compile=True)
    assert compiled.example_input_array is None
    classifier.example_input_array = torch.zeros(2, 1, 8, 8)  # one set by hand wins
    assert summarize(classifier).total_flops == 2 * describe(classifier.model, (1, 8, 8)).flops


def test_the_summary_runs_where_the_model_is_in_its_dtype(tmp_path) -> None:
    """Under ShadowDevice the model is float64 while Lightning holds it "on the device": the
    example input follows it, as it follows a model on a GPU or in "true" half precision."""
    unet = {"depth": 2, "base_width": 4, "padding": "same"}
    shapes = Shapes(image_size=32, num_train=8, num_val=8, num_test=8, batch_size=8)
    digits = Digits(image_size=None, batch_size=64)
    RecordedSummary.flops = []
    for data, model in (
        (digits, Classifier("plain_mlp", num_classes=10, input_shape=digits.input_shape)),
        (shapes, Segmenter(arch_kwargs=unet, num_classes=4, input_shape=shapes.input_shape)),
    ):
        trainer = quiet_trainer(
            strategy=ShadowDevice(),
            accelerator="auto",
            callbacks=[RecordedSummary()],
            enable_model_summary=True,
            max_steps=1,
            limit_val_batches=1,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(model, datamodule=data)
        assert RecordedSummary.flops[-1] == describe(model.model, data.input_shape).flops > 0
    assert len(RecordedSummary.flops) == 2
