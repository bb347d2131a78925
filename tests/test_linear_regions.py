"""LinearRegions: exact counts where they are known (a constructed net with 2^L regions, one
hidden layer whose breakpoints are where its units switch, three lines cutting a plane into
seven), the refusal of networks that are not piecewise linear, and the callback in a real
Trainer, through `skipnets analyse` and `skipnets compare`."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import quiet_trainer
from skipnets_plugins.linear_regions import (
    LinearRegions,
    NotPiecewiseLinear,
    count_line,
    count_plane,
)
from torch import nn

from skipnets import Classifier, create_model
from skipnets.cli import main
from skipnets.data import TwoSpirals
from skipnets.errors import ConfigError

FROZEN = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def tent_net(layers: int) -> nn.Module:
    """Montúfar et al.'s folding in one dimension: each hidden layer of two units computes the
    tent map ``relu(2y) - relu(4y - 2)`` of the previous one, so ``layers`` layers cut (0, 1)
    into ``2 ** layers`` pieces with 2 units a layer."""
    model = create_model("plain_mlp", depth=layers + 1, width=2, in_features=1, num_classes=2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        linears[0].weight.copy_(torch.tensor([[2.0], [4.0]]))
        linears[0].bias.copy_(torch.tensor([0.0, -2.0]))
        for linear in linears[1:-1]:
            linear.weight.copy_(torch.tensor([[2.0, -2.0], [4.0, -4.0]]))
            linear.bias.copy_(torch.tensor([0.0, -2.0]))
        linears[-1].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
        linears[-1].bias.zero_()
    return model.eval()


def test_a_constructed_net_has_two_to_the_depth_regions_where_a_random_one_has_few():
    start, end = torch.tensor([0.0005]), torch.tensor([0.9995])  # off the knots k / 2^L
    counts = [
        count_line(tent_net(n), start, end, points=129, refine=2).regions for n in range(1, 7)
    ]
    assert counts == [2, 4, 8, 16, 32, 64]
    # On a grid too coarse for the last net, refining the steps that change finds them all.
    coarse = count_line(tent_net(6), start, end, points=33, refine=0)
    refined = count_line(tent_net(6), start, end, points=33, refine=2)
    assert coarse.regions < 64 == refined.regions and refined.coarse_regions == coarse.regions
    torch.manual_seed(0)
    random = create_model("plain_mlp", depth=7, width=2, in_features=1, num_classes=2).eval()
    assert count_line(random, start, end, points=129, refine=2).regions < 8


def test_one_hidden_layer_switches_where_its_units_cross_zero():
    torch.manual_seed(1)
    model = create_model("plain_mlp", depth=2, width=12, in_features=2, num_classes=3).eval()
    start, end = torch.tensor([-0.8, 0.3]), torch.tensor([0.9, -0.5])
    line = count_line(model, start, end, low=-1.0, high=2.0, points=512, refine=2)
    weight, bias = model.stem[0].weight.double(), model.stem[0].bias.double()
    along = weight @ (end - start).double()
    crossings = -(weight @ start.double() + bias) / along
    expected = crossings[(crossings > -1.0) & (crossings < 2.0)].sort().values
    assert line.regions == len(expected) + 1 > 3
    assert torch.allclose(line.breakpoints, expected, atol=line.resolution)
    assert line.length == pytest.approx(3 * float((end - start).norm()))


def test_three_lines_cut_the_plane_into_seven_regions():
    model = create_model("plain_mlp", depth=2, width=3, in_features=2, num_classes=2).eval()
    with torch.no_grad():  # x = 0, y = 0 and x + y = 0.5: three lines in general position
        model.stem[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.stem[0].bias.copy_(torch.tensor([0.0, 0.0, -0.5]))
    axes = (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    plane = count_plane(model, torch.zeros(2), axes, (-1.0, 1.0, -1.0, 1.0), points=64)
    assert plane.regions == 7
    assert plane.region.shape == (64, 64) and set(plane.region.unique().tolist()) == set(range(7))
    # Only the part of the plane left of x = -0.5 and below y = -0.5: one region.
    corner = count_plane(model, torch.zeros(2), axes, (-1.0, -0.6, -1.0, -0.6), points=16)
    assert corner.regions == 1


class Square(nn.Module):
    def forward(self, x):
        h = F.relu(x)  # functional: counted as a layer's pattern
        return h * x  # a product of two values that depend on the input


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return torch.where(x > 0, x, 0.1 * x) * self.scale + torch.maximum(x, 1 - x) / 2


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (create_model("plain_mlp", depth=3, width=4, in_features=2, activation="tanh"), "tanh"),
        (create_model("highway_mlp", depth=3, width=4, in_features=2), "sigmoid"),
        (Square(), "a product of two such values"),
    ],
)
def test_what_is_not_piecewise_linear_is_named(model, message):
    with pytest.raises(NotPiecewiseLinear, match=message):
        count_line(model.eval(), torch.tensor([-1.0, 0.5]), torch.tensor([1.0, 0.2]), points=8)


def test_functional_choices_and_constant_factors_count():
    # where(x > 0) switches each input at 0, maximum(x, 1 - x) at 0.5: x = (-1 + 2t, -2 + 3t)
    # crosses them at t = 1/2 and 3/4, 2/3 and 5/6.
    line = count_line(Scaled(), torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 1.0]), points=64)
    expected = torch.tensor([1 / 2, 2 / 3, 3 / 4, 5 / 6], dtype=torch.float64)
    assert line.regions == 5
    assert torch.allclose(line.breakpoints, expected, atol=1 / 63)


def _fit(tmp_path: Path, callback: LinearRegions, arch: str = "plain_mlp", **arch_kwargs):
    data = TwoSpirals(points_per_spiral=20)
    torch.manual_seed(0)
    module = Classifier(
        arch,
        arch_kwargs or {"depth": 3, "width": 6},
        num_classes=2,
        input_shape=(2,),
        optimizer=FROZEN,
    )
    trainer = quiet_trainer(
        max_epochs=1, default_root_dir=tmp_path, callbacks=[callback], num_sanity_val_steps=0
    )
    trainer.fit(module, datamodule=data)
    return module, data, trainer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    """Two hidden layers of 6 through one epoch at a learning rate of 0, with LinearRegions."""
    root = tmp_path_factory.mktemp("2x6")
    callback = LinearRegions(line_points=200, refine=1, plane_points=40)
    module, data, _ = _fit(root, callback)
    return root, callback, module, data


def test_fit_counts_at_initialisation_and_after_training(fitted):
    root, callback, module, data = fitted
    folder = root / "linear_regions"
    rows = read_rows(folder / "linear_regions.csv")
    assert [r["when"] for r in rows] == ["init", "trained"]
    assert {p.name for p in folder.iterdir()} == {
        "linear_regions.csv",
        "linear_regions_init.png",
        "linear_regions_trained.png",
    }
    assert (folder / "linear_regions_trained.png").stat().st_size > 20_000
    init, trained = rows
    # Two hidden layers of 6; a learning rate of 0: the same network, the same counts.
    assert (init["layers"], init["units"], init["widths"]) == ("2", "12", "6 6")
    assert init["line_regions"] == trained["line_regions"] and int(init["line_regions"]) > 2
    assert init["plane_regions"] == trained["plane_regions"] and int(init["plane_regions"]) > 3
    # What Montúfar et al. show 2 inputs and layers of 6, 6 can reach: 3^2 * (1 + 6 + 15).
    assert init["max_regions"] == "198"
    # The line runs through the val split's first sample and the one farthest from it.
    x = data.val_set.tensors[0]
    far = int((x - x[0]).norm(dim=1).argmax())
    assert init["samples"] == f"0 {far}"
    direct = count_line(module.model.eval(), x[0], x[far], -0.25, 1.25, points=200, refine=1)
    assert int(init["line_regions"]) == direct.regions
    assert float(init["line_length"]) == pytest.approx(1.5 * float((x[far] - x[0]).norm()))
    # A validate of the weights in memory writes beside what fit wrote, not over it.
    quiet_trainer(default_root_dir=root, callbacks=[callback]).validate(module, data)
    (again,) = read_rows(folder / "validate" / "linear_regions.csv")
    assert again["when"] == "checkpoint" and again["line_regions"] == init["line_regions"]
    assert len(read_rows(folder / "linear_regions.csv")) == 2


def test_a_network_that_is_not_piecewise_linear_stops_before_training(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"needs a piecewise-linear network.*`sigmoid`"):
        _fit(tmp_path, LinearRegions(line_points=8, plane_points=0), "highway_mlp")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"line_points": 2}, "line_points must be an integer >= 3"),
        ({"refine": -1}, "refine must be an integer >= 0"),
        ({"plane_points": 1}, "plane_points must be 0"),
        ({"samples": [3, 3]}, "samples must be 2 or 3 different positions"),
        ({"samples": [0]}, "samples must be 2 or 3"),
        ({"extend": -0.5}, "extend must be a number >= 0"),
        ({"split": "validation"}, "split must be one of"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LinearRegions(**kwargs)


def test_a_sample_beyond_the_split_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="sample 500 requested but the val split has 38"):
        _fit(tmp_path, LinearRegions(samples=[0, 500], plane_points=0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `skipnets fit` leaves it: one epoch of a 1 x 12 ReLU MLP with
    LinearRegions, its checkpoint, and a config that builds it."""
    root = tmp_path_factory.mktemp("1x12")
    callback = LinearRegions(line_points=100, refine=1, plane_points=20)
    _, _, trainer = _fit(root, callback, depth=2, width=12)
    trainer.save_checkpoint(root / "checkpoints" / "last.ckpt")
    (root / "config.yaml").write_text(
        textwrap.dedent(
            """\
            model:
              arch: plain_mlp
              arch_kwargs: {depth: 2, width: 12}
            data:
              class_path: TwoSpirals
              init_args: {points_per_spiral: 20}
            trainer:
              logger: false
              callbacks:
                - class_path: LinearRegions
                  init_args: {line_points: 100, refine: 1, plane_points: 20}
            """
        )
    )
    return root


def test_analyse_a_checkpoint_on_the_device(trained: Path, capsys):
    analyse = [
        "analyse",
        "LinearRegions",
        "--config",
        str(trained / "config.yaml"),
        "--ckpt_path",
        str(trained / "checkpoints" / "last.ckpt"),
        "--trainer.enable_progress_bar=false",
        "--trainer.strategy.class_path=skipnets.testing.ShadowDevice",  # on "the device"
    ]
    assert main(analyse) == 0
    assert "linear_regions/last/linear_regions.csv" in capsys.readouterr().out
    (measured,) = read_rows(trained / "linear_regions" / "last" / "linear_regions.csv")
    init, after = read_rows(trained / "linear_regions" / "linear_regions.csv")
    assert (init["when"], after["when"], measured["when"]) == ("init", "trained", "checkpoint")
    assert measured["line_regions"] == after["line_regions"]
    assert measured["plane_regions"] == after["plane_regions"]
    assert (trained / "linear_regions" / "last" / "linear_regions.png").is_file()


def test_compare_regions_against_depth(trained: Path, fitted, tmp_path: Path, capsys):
    deep = fitted[0]
    out = tmp_path / "out"
    assert main(["compare", "LinearRegions", str(trained), str(deep), "--out", str(out)]) == 0
    rows = read_rows(out / "linear_regions.csv")
    assert {(r["layers"], r["widths"], r["units"], r["when"]) for r in rows} == {
        ("1", "12", "12", "init"),
        ("1", "12", "12", "trained"),
        ("2", "6 6", "12", "init"),
        ("2", "6 6", "12", "trained"),
    }
    assert all(int(r["line_regions"]) >= 1 and int(r["plane_regions"]) >= 1 for r in rows)
    assert (out / "linear_regions.png").stat().st_size > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", "LinearRegions", str(trained), str(empty), "--out", str(out)]) == 2
    assert "no linear_regions results in: empty" in capsys.readouterr().err
