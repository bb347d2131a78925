"""The registry's deep fully connected nets behave as their papers say with their defaults: a
100-layer residual or highway MLP starts close to the identity, and at depth 50 both train on
the bundled digits with the default optimizer; the residual MLP has the parameters its layout
gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from torch import nn

from skipnets import create_model
from skipnets.data import Digits
from skipnets.module import Classifier


def digits_batch(size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    data = Digits(image_size=None, batch_size=size)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def stack_input_and_output(name: str, depth: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The activations entering the first block and leaving the last, at initialisation."""
    torch.manual_seed(0)
    model = create_model(name, depth=depth, in_features=64, **kwargs)
    x, _ = digits_batch()
    with torch.no_grad():
        start = model.stem(x)
        return start, model.blocks(start)


def test_residual_mlp_keeps_its_scale_at_depth_100():
    start, end = stack_input_and_output("residual_mlp", 100)
    assert 0.1 < end.std() / start.std() < 10
    # The block without its normalised last layer, y = x + relu(W x + b), explodes.
    start, end = stack_input_and_output("residual_mlp", 100, norm=False)
    assert end.std() / start.std() > 1e6


def test_highway_mlp_starts_by_carrying_its_input_at_depth_100():
    start, end = stack_input_and_output("highway_mlp", 100)
    assert F.cosine_similarity(start, end, dim=1).mean() > 0.85
    assert 0.1 < end.std() / start.std() < 10
    # The gate bias of the paper's shallower nets transforms the input away at this depth.
    start, end = stack_input_and_output("highway_mlp", 100, gate_bias=-2.0)
    assert F.cosine_similarity(start, end, dim=1).mean() < 0.7
    assert end.std() / start.std() < 0.1


def test_residual_mlp_parameter_count():
    depth, width, inputs, classes = 12, 32, 64, 10
    model = create_model("residual_mlp", depth=depth, width=width, in_features=inputs)
    block = width * width + width + 2 * width  # linear weight and bias, batch norm scale and shift
    expected = (
        (inputs * width + width) + (depth - 2) * block + 2 * width + (width * classes + classes)
    )
    assert sum(p.numel() for p in model.parameters()) == expected
    plain = create_model("plain_mlp", depth=depth, width=width, in_features=inputs)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())  # plain stays plain
    bare = create_model("residual_mlp", depth=depth, width=width, in_features=inputs, norm=False)
    assert sum(p.numel() for p in bare.parameters()) == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize("arch", ["residual_mlp", "highway_mlp"])
def test_depth_50_trains_on_digits_with_the_defaults(arch):
    torch.manual_seed(0)
    module = Classifier(arch, {"depth": 50}, num_classes=10, input_shape=(64,))
    x, y = digits_batch()

    def loss() -> float:
        module.eval()
        with torch.no_grad():
            value = F.cross_entropy(module(x), y).item()
        module.train()  # the Trainer keeps the modes it finds
        return value

    before = loss()
    quiet_trainer(max_epochs=2, num_sanity_val_steps=0, limit_val_batches=0).fit(
        module, datamodule=Digits(image_size=None)
    )
    after = loss()
    assert torch.isfinite(torch.tensor(after))
    assert after < 0.5 * before
