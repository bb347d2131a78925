"""ShatteredGradients: the autocorrelation of white and brown noise, gradients that are each
point's own, the paper's result (a deep plain net with batch norm shatters, a residual one does
not), and the callback in a real Trainer, on a checkpoint and in `skipnets compare`."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer
from skipnets_plugins.shattered_gradients import (
    ShatteredGradients,
    autocorrelation,
    correlation_length,
    line_gradients,
    line_normalised,
)

from skipnets import Classifier, create_model
from skipnets.cli import main
from skipnets.data import TwoSpirals
from skipnets.errors import ConfigError

FROZEN = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}
ONE = torch.ones(1, dtype=torch.float64)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_white_noise_is_uncorrelated_and_brown_noise_is_not():
    generator = torch.Generator().manual_seed(0)
    white = torch.randn(4096, generator=generator, dtype=torch.float64)
    acf = autocorrelation(white[:, None], 8)
    assert abs(float(acf[1])) < 0.05 and correlation_length(acf) == 1
    brown = white.cumsum(0)
    acf = autocorrelation(brown[:, None], 2000)
    assert acf[1] > 0.99 and correlation_length(acf) > 100
    # For one series, the usual estimate; for several, their sums over the components.
    m = brown.mean()
    lag3 = ((brown[:-3] - m) * (brown[3:] - m)).sum() / (brown - m).pow(2).sum()
    assert float(acf[3]) == pytest.approx(float(lag3), rel=1e-12)
    pair = torch.stack([white, brown], 1)
    centred = pair - pair.mean(0)
    expected = (centred[:-1] * centred[1:]).sum() / centred.pow(2).sum()
    assert float(autocorrelation(pair, 1)[1]) == pytest.approx(float(expected), rel=1e-12)
    assert torch.isnan(autocorrelation(torch.ones(10, 2), 3)).all()


def test_each_gradient_is_that_of_its_own_point():
    torch.manual_seed(0)
    model = create_model("plain_mlp", depth=4, width=16, in_features=2, num_classes=3).eval()
    projection = torch.tensor([0.6, -0.8, 0.0], dtype=torch.float64)
    start, end = torch.tensor([-1.0, 0.5]), torch.tensor([1.0, -0.2])
    line = line_gradients(model, start, end, -0.5, 1.5, 9, projection)
    for i, t in enumerate(line.t.tolist()):
        x = (start + t * (end - start)).requires_grad_(True)
        (model(x[None])[0] @ projection.float()).backward()
        assert torch.allclose(line.gradients[i].float(), x.grad, atol=1e-6)
    unit = (end - start).double() / (end - start).norm()
    assert torch.allclose(line.derivative, line.gradients @ unit)
    logit = line_gradients(model, start, end, -0.5, 1.5, 9, logit=2)
    x = start.clone().sub_(0.5 * (end - start)).requires_grad_(True)
    model(x[None])[0, 2].backward()
    assert torch.allclose(logit.gradients[0].float(), x.grad, atol=1e-6)


def _lag1(model, line_statistics: bool) -> float:
    start, end = torch.tensor([-2.0]), torch.tensor([2.0])
    line = line_gradients(model, start, end, 0, 1, 256, ONE, line_statistics=line_statistics)
    return float(autocorrelation(line.gradients, 1)[1])


def test_deep_plain_nets_shatter_and_residual_nets_do_not():
    """Balduzzi et al.'s Figs. 1-2 on a 1-D input from -2 to 2 at 256 points: at depth 24, the
    gradient of a plain ReLU net with batch norm is white noise, a residual net's is not."""
    torch.manual_seed(0)
    shallow = create_model("plain_mlp", depth=2, width=64, in_features=1, num_classes=1)
    plain = create_model("plain_mlp", depth=24, width=64, in_features=1, num_classes=1, norm=True)
    residual = create_model("residual_mlp", depth=24, width=64, in_features=1, num_classes=1)
    assert _lag1(shallow.eval(), True) > 0.8
    assert abs(_lag1(plain.eval(), True)) < 0.3
    assert _lag1(residual.eval(), True) > 0.8
    # With the running statistics of a new net (zero mean, unit variance) batch norm does
    # nothing, and the plain net's gradient stays correlated.
    assert _lag1(plain.eval(), False) > 0.7


def test_the_line_statistics_are_held_fixed_and_then_restored():
    torch.manual_seed(0)
    model = create_model("residual_mlp", depth=4, width=8, in_features=2).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    for m in norms:
        m.running_mean.uniform_()
    before = [
        (m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in norms
    ]
    x = torch.randn(16, 2) * 5 + 3
    training = copy.deepcopy(model).train()  # batch statistics: what a training step computes
    with line_normalised(model, x):
        assert not any(m.training for m in norms) and not model.training
        # The norms normalise as a training step on these 16 inputs does; and one input alone
        # gives what it gives among the others.
        assert torch.allclose(model(x), training(x), atol=1e-5)
        assert torch.allclose(model(x[3:4]), model(x)[3:4], atol=1e-6)
    assert all(not m.training and m.momentum == 0.1 for m in norms)
    for m, (mean, var, count) in zip(norms, before):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert int(m.num_batches_tracked) == count
    # Each point's gradient is its own: the same as one point's with the statistics fixed.
    start, end = torch.tensor([-1.0, 0.5]), torch.tensor([1.0, -0.2])
    line = line_gradients(model, start, end, 0, 1, 5, logit=1, line_statistics=True)
    points = start + line.t.float()[:, None] * (end - start)
    with line_normalised(model, points):
        x = points[2:3].clone().requires_grad_(True)
        model(x)[0, 1].backward()
    assert torch.allclose(line.gradients[2].float(), x.grad[0], atol=1e-5)


def _fit(root: Path, callback: ShatteredGradients, arch: str = "plain_mlp", **arch_kwargs):
    data = TwoSpirals(points_per_spiral=20)
    torch.manual_seed(0)
    module = Classifier(
        arch,
        arch_kwargs or {"depth": 4, "width": 16, "norm": True},
        num_classes=2,
        input_shape=(2,),
        optimizer=FROZEN,
    )
    trainer = quiet_trainer(
        max_epochs=1, default_root_dir=root, callbacks=[callback], num_sanity_val_steps=0
    )
    trainer.fit(module, datamodule=data)
    return module, data, trainer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    """A plain ReLU net of depth 4 with batch norm, one epoch at a learning rate of 0."""
    root = tmp_path_factory.mktemp("plain4")
    return root, *_fit(root, ShatteredGradients(points=64))


def test_fit_measures_at_initialisation_and_after_training(fitted):
    tmp_path, module, data, trainer = fitted
    folder = tmp_path / "shattered_gradients"
    assert {p.name for p in folder.iterdir()} == {
        "shattered_gradients.csv",
        "gradients.csv",
        "autocorrelation.csv",
        "shattered_gradients_init.png",
        "shattered_gradients_trained.png",
    }
    assert (folder / "shattered_gradients_init.png").stat().st_size > 20_000
    init, trained = read_rows(folder / "shattered_gradients.csv")
    assert (init["when"], trained["when"]) == ("init", "trained")
    assert init["output"] == "random projection of the logits (seed 0)"
    assert init["depth"] == "4" and init["batch_norm"] == "batch"
    assert init["lag1"] == trained["lag1"]  # a learning rate of 0: the same network
    assert len(read_rows(folder / "gradients.csv")) == 2 * 64
    acf = read_rows(folder / "autocorrelation.csv")
    assert [int(r["lag"]) for r in acf] == [*range(33), *range(33)]
    assert float(acf[0]["autocorrelation"]) == pytest.approx(1.0)
    # The same numbers from the functions: the line through the val split's first sample and
    # the one farthest from it, the fixed projection of seed 0.
    x = data.val_set.tensors[0]
    far = int((x - x[0]).norm(dim=1).argmax())
    assert init["samples"] == f"0 {far}"
    projection = torch.randn(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit = projection / projection.norm()
    model = module.model.eval()
    line = line_gradients(model, x[0], x[far], -0.25, 1.25, 64, unit, line_statistics=True)
    assert float(init["lag1"]) == pytest.approx(float(autocorrelation(line.gradients, 1)[1]))
    derivative = [float(r["derivative"]) for r in read_rows(folder / "gradients.csv")[:64]]
    assert derivative == pytest.approx(line.derivative.tolist(), rel=1e-5, abs=1e-9)

    # On a checkpoint (what `skipnets analyse` runs): results beside the fit's, in a folder
    # named after the checkpoint.
    checkpoint = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(checkpoint)
    analysis = ShatteredGradients(points=64, output=1, batch_norm="running")
    validator = quiet_trainer(default_root_dir=tmp_path, callbacks=[analysis])
    validator.validate(module, datamodule=data, ckpt_path=str(checkpoint))
    (row,) = read_rows(folder / "weights" / "shattered_gradients.csv")
    assert (row["when"], row["output"], row["batch_norm"]) == ("checkpoint", "logit 1", "running")
    assert (folder / "weights" / "shattered_gradients.png").is_file()
    assert len(read_rows(folder / "shattered_gradients.csv")) == 2  # the fit's, untouched


def test_compare_lag1_against_depth(fitted, tmp_path: Path, capsys):
    residual = tmp_path / "residual"
    _fit(residual, ShatteredGradients(points=32), "residual_mlp", depth=6, width=8)
    runs = [str(fitted[0]), str(residual)]
    out = tmp_path / "out"
    assert main(["compare", "ShatteredGradients", *runs, "--out", str(out)]) == 0
    rows = read_rows(out / "shattered_gradients.csv")
    assert [(r["arch"], r["depth"], r["when"]) for r in rows] == [
        ("plain_mlp", "4", "init"),
        ("plain_mlp", "4", "trained"),
        ("residual_mlp", "6", "init"),
        ("residual_mlp", "6", "trained"),
    ]
    assert all(-1 <= float(r["lag1"]) <= 1 for r in rows)
    assert (out / "shattered_gradients.png").stat().st_size > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", "ShatteredGradients", runs[0], str(empty), "--out", str(out)]) == 2
    assert "no shattered_gradients results in" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"points": 3}, "points must be an integer >= 4"),
        ({"output": "logits"}, "output must be 'projection' or the index of a logit"),
        ({"output": -1}, "output must be 'projection'"),
        ({"max_lag": 300}, "max_lag must be below points"),
        ({"samples": [0, 1, 2]}, "samples must be 2 different positions"),
        ({"batch_norm": "train"}, "batch_norm must be 'batch' or 'running'"),
        ({"extend": "far"}, "extend must be a number"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ShatteredGradients(**kwargs)


def test_a_logit_the_model_lacks_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match="output=5 but the model has 2 outputs"):
        _fit(tmp_path, ShatteredGradients(points=8, output=5))
