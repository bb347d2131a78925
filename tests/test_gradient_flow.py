"""GradientFlow in a real Trainer: per-block and per-layer gradient norms equal a direct
backward pass, and the CSV and figure land in the run directory."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from skipnets_plugins.gradient_flow import GradientFlow
from torch.utils.data import DataLoader, TensorDataset

from skipnets.errors import ConfigError
from skipnets.module import Classifier

FROZEN = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}


def loaders():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=generator)
    y = torch.randint(0, 3, (40,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8), (x[:8], y[:8])


def fit(
    tmp_path: Path, callback: GradientFlow, logger=False, arch_kwargs: dict | None = None
) -> Classifier:
    torch.manual_seed(0)
    module = Classifier(
        "plain_mlp",
        arch_kwargs or {"depth": 6, "width": 10},
        num_classes=3,
        input_shape=(12,),
        optimizer=FROZEN,
    )
    train, _ = loaders()
    quiet_trainer(max_epochs=1, logger=logger, default_root_dir=tmp_path, callbacks=[callback]).fit(
        module, train_dataloaders=train
    )
    return module


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def direct_norms(module: Classifier, groups: dict[str, list[str]]) -> dict[str, float]:
    _, (x, y) = loaders()
    module.zero_grad()
    F.cross_entropy(module.model(x), y).backward()
    params = dict(module.model.named_parameters())
    return {
        name: math.sqrt(sum(params[p].grad.pow(2).sum().item() for p in members))
        for name, members in groups.items()
    }


# Lightning's note on the test's set-up: a bare Trainer on a few batches, without validation data.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings(
    "ignore:The number of training batches .* is smaller than the logging interval"
)
def test_block_norms_match_a_direct_backward(tmp_path):
    module = fit(tmp_path, GradientFlow(every_n_steps=2), logger=CSVLogger(tmp_path))
    folder = tmp_path / "lightning_logs" / "version_0" / "gradient_flow"
    rows = read_rows(folder / "gradient_flow.csv")
    assert (folder / "gradient_flow.png").stat().st_size > 10_000
    assert sorted({int(r["step"]) for r in rows}) == [0, 2, 4]
    step0 = [r for r in rows if r["step"] == "0"]
    names = ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert [r["name"] for r in step0] == names
    assert [int(r["stage"]) for r in step0] == [-1, 0, 0, 0, 0, -1]
    groups = {
        "stem": ["stem.0.weight", "stem.0.bias"],
        **{
            f"blocks.{i}": [f"blocks.{i}.linear.weight", f"blocks.{i}.linear.bias"]
            for i in range(4)
        },
        "head": ["head.weight", "head.bias"],
    }
    expected = direct_norms(module, groups)  # lr = 0: the weights of step 0
    assert [float(r["grad_norm"]) for r in step0] == pytest.approx(
        [expected[n] for n in names], rel=1e-4
    )
    weight = module.model.blocks[1].linear
    assert float(step0[2]["param_norm"]) == pytest.approx(
        math.sqrt(weight.weight.pow(2).sum().item() + weight.bias.pow(2).sum().item()), rel=1e-5
    )
    assert int(step0[0]["numel"]) == 12 * 10 + 10


# Lightning's note on the test's set-up: a bare Trainer without validation data.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_gradients_too_small_to_square_in_float32_are_not_reported_as_zero(tmp_path):
    # 50 sigmoid layers: the first layers' gradients are about 1e-31, whose float32 squares
    # underflow to zero (float32's smallest positive number is about 1e-45).
    module = fit(
        tmp_path,
        GradientFlow(every_n_steps=100, granularity="layer"),
        arch_kwargs={"depth": 50, "width": 10, "activation": "sigmoid"},
    )
    rows = read_rows(tmp_path / "gradient_flow" / "gradient_flow.csv")
    assert (tmp_path / "gradient_flow" / "gradient_flow.png").stat().st_size > 10_000
    _, (x, y) = loaders()
    module.zero_grad()
    F.cross_entropy(module.model(x), y).backward()  # lr = 0: the weights of step 0
    layers = dict(module.model.named_modules())
    first = layers["stem.0"]
    assert first.weight.grad.pow(2).sum() == 0  # what squaring in float32 reports
    for row in rows:
        grads = [p.grad.double() for p in layers[row["name"]].parameters()]
        expected = math.sqrt(sum(g.pow(2).sum().item() for g in grads))
        assert float(row["grad_norm"]) == pytest.approx(expected, rel=1e-6, abs=0)
    assert 0 < float(rows[0]["grad_norm"]) < 1e-25


# Lightning's note on the test's set-up: a bare Trainer without validation data.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_layer_granularity_names_every_parameterised_module(tmp_path):
    fit(tmp_path, GradientFlow(every_n_steps=100, granularity="layer"))
    rows = read_rows(tmp_path / "gradient_flow" / "gradient_flow.csv")
    assert [r["name"] for r in rows] == [
        "stem.0",
        *(f"blocks.{i}.linear" for i in range(4)),
        "head",
    ]
    assert {r["step"] for r in rows} == {"0"}


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="every_n_steps"):
        GradientFlow(every_n_steps=0)
    with pytest.raises(ConfigError, match="granularity"):
        GradientFlow(granularity="neuron")
