"""HighwayGates in a real Trainer: biases, mean gate activity, one example's gates and outputs
equal a direct computation, for fully connected and convolutional highway layers."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from skipnets_plugins.highway_gates import HighwayGates
from torch.utils.data import DataLoader, TensorDataset

from skipnets.errors import ConfigError
from skipnets.models.highway import HighwayConv
from skipnets.module import Classifier


class Data(L.LightningDataModule):
    def __init__(self, shape) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(30, *shape, generator=generator)
        self.y = torch.randint(0, 3, (30,), generator=generator)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:12], self.y[:12]), batch_size=5)


def trainer(tmp_path: Path, callback: HighwayGates) -> L.Trainer:
    return quiet_trainer(
        max_epochs=2, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[callback]
    )


def read_rows(tmp_path: Path) -> list[dict[str, str]]:
    with open(tmp_path / "highway_gates" / "highway_gates.csv") as f:
        return list(csv.DictReader(f))


def fit(tmp_path: Path, arch: str, arch_kwargs: dict, shape, callback: HighwayGates):
    torch.manual_seed(0)
    module = Classifier(arch, arch_kwargs, num_classes=3, input_shape=shape)
    data = Data(shape)
    trainer(tmp_path, callback).fit(module, datamodule=data)
    return module, data, read_rows(tmp_path)


def direct(blocks, h: torch.Tensor):
    """Each block's gate ``sigmoid(W_T h + b_T)`` and output, per unit, block by block."""
    gates, outputs = [], []
    for block in blocks:
        t = torch.sigmoid(block.gate(h))
        h = block(h)
        gates.append(t.flatten(2).mean(2) if t.ndim > 2 else t)
        outputs.append(h.flatten(2).mean(2) if h.ndim > 2 else h)
    return gates, outputs


def test_fully_connected_gates_match_direct_computation(tmp_path):
    callback = HighwayGates(split="val", example_index=3, every_n_epochs=1)
    module, data, rows = fit(tmp_path, "highway_mlp", {"depth": 5, "width": 6}, (7,), callback)
    assert (tmp_path / "highway_gates" / "highway_gates_epoch000.png").stat().st_size > 5_000
    assert (tmp_path / "highway_gates" / "highway_gates_epoch001.png").exists()
    assert sorted({r["epoch"] for r in rows}) == ["0", "1"]  # end of training adds nothing new
    last = [r for r in rows if r["epoch"] == "1"]
    assert len(last) == 3 * 6  # three highway layers of six units
    model = module.model.eval()
    with torch.no_grad():
        gates, outputs = direct(model.blocks, model.stem(data.x[:12]))
    for layer, block in enumerate(model.blocks):
        mine = [r for r in last if r["layer"] == str(layer)]
        assert [float(r["gate_bias"]) for r in mine] == pytest.approx(block.gate.bias.tolist())
        assert [float(r["mean_gate"]) for r in mine] == pytest.approx(
            gates[layer].mean(0).tolist(), rel=1e-5
        )
        assert [float(r["example_gate"]) for r in mine] == pytest.approx(
            gates[layer][3].tolist(), rel=1e-5
        )
        assert [float(r["example_output"]) for r in mine] == pytest.approx(
            outputs[layer][3].tolist(), rel=1e-5, abs=1e-6
        )
        assert block.last_gate is None  # nothing kept after the scan
    assert all(not block.observed for block in model.blocks)


class ConvNet(L.LightningModule):
    """A plain conv stem and two convolutional highway layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU())
        self.blocks = torch.nn.Sequential(HighwayConv(4), HighwayConv(4))
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


# Lightning's note on the test's set-up: a bare LightningModule without validation.
@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_convolutional_gates_average_over_positions(tmp_path):
    torch.manual_seed(0)
    module, data = ConvNet(), Data((1, 6, 6))
    trainer(tmp_path, HighwayGates(split="train", max_samples=20)).fit(module, datamodule=data)
    rows = read_rows(tmp_path)
    assert {r["epoch"] for r in rows} == {"1"}
    assert len(rows) == 2 * 4
    module.eval()
    with torch.no_grad():
        gates, _ = direct(module.blocks, module.stem(data.x[:20]))
    for layer in range(2):
        mine = [float(r["mean_gate"]) for r in rows if r["layer"] == str(layer)]
        assert mine == pytest.approx(gates[layer].mean(0).tolist(), rel=1e-5)


def test_bad_arguments_and_models_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="split"):
        HighwayGates(split="holdout")
    with pytest.raises(ConfigError, match="max_samples"):
        HighwayGates(max_samples=0)
    with pytest.raises(ConfigError, match="needs highway layers"):
        fit(tmp_path, "plain_mlp", {"depth": 4, "width": 5}, (7,), HighwayGates())
    with pytest.raises(ConfigError, match="example_index=99"):
        fit(tmp_path, "highway_mlp", {"depth": 4, "width": 5}, (7,), HighwayGates(example_index=99))
