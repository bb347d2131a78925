"""Occlusion: the p(correct) maps agree with captum's Occlusion attributions, every map equals
occluded copies made and run one at a time, the probability drops exactly where the occluder
hides the marker a hand-built network relies on, and the callback writes its figure and CSV in a
Trainer, through ``skipnets analyse`` and for ``skipnets compare``."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion
from conftest import Wrapped, quiet_trainer
from skipnets_plugins.occlusion import Occlusion, occlusion_maps
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from skipnets.cli import main
from skipnets.errors import ConfigError
from skipnets.module import Classifier


def small_net(in_channels: int = 2, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, classes),
    ).eval()


def images(count: int, channels: int, side: int, seed: int) -> torch.Tensor:
    return torch.randn(count, channels, side, side, generator=torch.Generator().manual_seed(seed))


def test_p_correct_map_agrees_with_captum():
    # Overlapping windows: captum gives each pixel the mean drop in p(label) over the occluder
    # positions that cover it; the same number follows from our map.
    net = small_net()
    x, labels = images(3, 2, 8, seed=1), torch.tensor([0, 2, 1])
    size, stride, fill = 4, 2, 0.3
    maps = occlusion_maps(net, net[3], x, labels, size, stride, fill)
    assert maps.p_correct.shape == (3, 3, 3)

    oracle = CaptumOcclusion(lambda inputs: net(inputs).softmax(1))
    expected = oracle.attribute(
        x,
        sliding_window_shapes=(2, size, size),
        strides=(1, stride, stride),
        baselines=fill,
        target=labels,
    )
    drop = maps.baseline_p_correct[:, None, None] - maps.p_correct
    total, covered = torch.zeros(3, 8, 8), torch.zeros(8, 8)
    for i, top in enumerate(maps.tops.tolist()):
        for j, left in enumerate(maps.lefts.tolist()):
            total[:, top : top + size, left : left + size] += drop[:, i, j, None, None]
            covered[top : top + size, left : left + size] += 1
    assert drop.abs().max() > 1e-3  # the occluder matters at all
    for channel in range(2):
        torch.testing.assert_close(expected[:, channel], total / covered)


def test_every_map_equals_copies_occluded_one_at_a_time():
    # 9x9 images, a 4-pixel square every 3 pixels: corners 0 and 3 (the last strip is not
    # visited); per-channel fill; batches of 5 copies that straddle images.
    net = small_net()
    x, labels = images(2, 2, 9, seed=2), torch.tensor([1, 0])
    fill = torch.tensor([0.7, -0.4])[:, None, None]
    maps = occlusion_maps(net, net[1], x, labels, size=4, stride=3, fill=fill, batch_size=5)
    assert maps.tops.tolist() == maps.lefts.tolist() == [0, 3]

    def run(inputs):
        seen = []
        handle = net[1].register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            probs = net(inputs).softmax(1)
        handle.remove()
        return seen[0], probs

    features, probs = run(x)
    channel = features.flatten(2).max(2).values.argmax(1)
    assert maps.channel.tolist() == channel.tolist()
    torch.testing.assert_close(maps.baseline_p_correct, probs[[0, 1], labels])
    for i, top in enumerate((0, 3)):
        for j, left in enumerate((0, 3)):
            occluded = x.clone()
            occluded[:, :, top : top + 4, left : left + 4] = fill
            features, probs = run(occluded)
            for n in range(2):
                assert maps.activation[n, i, j].item() == pytest.approx(
                    features[n, channel[n]].sum().item(), rel=1e-5
                )
                assert maps.p_correct[n, i, j].item() == pytest.approx(
                    probs[n, labels[n]].item(), rel=1e-5
                )
                assert maps.predicted[n, i, j].item() == probs[n].argmax().item()


# -- a network built to rely on one marker --------------------------------------------------------
SIDE, MARK_ROWS, MARK_COLS = 10, (1, 4), (4, 7)  # a 3x3 marker, rows 1-3, columns 4-6


def marker_net() -> nn.Sequential:
    """Class 1 when some 3x3 window holds at least 7 bright pixels, as only the marker's own
    window can: a box filter, a threshold, a global max, and a steep read-out. The batch norm
    is the identity in evaluation mode (its statistics never move), not in training mode."""
    net = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1),
        nn.BatchNorm2d(1, momentum=0.0),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(1, 2),
    )
    with torch.no_grad():
        net[0].weight.fill_(1 / 9)
        net[0].bias.fill_(-0.5)
        net[5].weight.copy_(torch.tensor([[-50.0], [50.0]]))
        net[5].bias.copy_(torch.tensor([11.0, -11.0]))  # the boundary: 0.72 of the window
    return net


class MarkerData(L.LightningDataModule):
    """Faint noise; images of class 1 carry the marker, those of class 0 do not."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.tensor([1, 0, 1, 0, 1, 1])
        self.x = 0.002 * torch.randn(6, 1, SIDE, SIDE, generator=generator)
        self.x[self.labels == 1, :, slice(*MARK_ROWS), slice(*MARK_COLS)] = 1.0

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.labels), batch_size=6)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.labels), batch_size=4)


def overlap(first: int, last: int, span: tuple[int, int]) -> int:
    return max(0, min(last, span[1]) - max(first, span[0]))


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_probability_drops_where_the_occluder_hides_the_marker(tmp_path):
    callback = Occlusion(samples=[0, 1, 4], size=3, stride=1, fill=0.0, layer="2")
    quiet_trainer(
        max_epochs=1, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[callback]
    ).fit(Wrapped(marker_net(), lr=0.0), datamodule=MarkerData())
    folder = tmp_path / "occlusion"
    assert {p.name for p in folder.iterdir()} == {"occlusion.csv", "occlusion.png"}
    assert (folder / "occlusion.png").stat().st_size > 5_000
    rows = rows_of(folder / "occlusion.csv")
    assert len(rows) == 3 * 8 * 8
    assert {r["layer"] for r in rows} == {"2"}

    for sample in (0, 4):  # the marked images
        mine = [r for r in rows if int(r["sample"]) == sample]
        assert float(mine[0]["baseline_p_correct"]) > 0.99
        # Class 1 survives while at most 2 of the marker's 9 pixels are hidden.
        hidden = {
            (int(r["row"]), int(r["col"])): overlap(int(r["row"]), int(r["row"]) + 3, MARK_ROWS)
            * overlap(int(r["col"]), int(r["col"]) + 3, MARK_COLS)
            for r in mine
        }
        lost = {(int(r["row"]), int(r["col"])) for r in mine if float(r["p_correct"]) < 0.5}
        assert lost == {corner for corner, count in hidden.items() if count >= 3}
        for r in mine:
            corner = (int(r["row"]), int(r["col"]))
            if hidden[corner] == 0:
                assert float(r["p_correct"]) > 0.99
                assert float(r["activation"]) == pytest.approx(
                    float(r["baseline_activation"]), abs=0.01
                )
            if corner == (MARK_ROWS[0], MARK_COLS[0]):  # the marker wholly hidden
                assert float(r["p_correct"]) < 1e-3 and r["predicted"] == "0"
                assert float(r["activation"]) == 0.0 < float(r["baseline_activation"])
    unmarked = [r for r in rows if r["sample"] == "1"]
    assert min(float(r["p_correct"]) for r in unmarked) > 0.99
    assert {r["predicted"] for r in unmarked} == {"0"}


def test_bad_settings_are_clear_errors(tmp_path):
    for kwargs, message in (
        ({"split": "validation"}, "split must be one of"),
        ({"samples": 0}, "samples must be positive"),
        ({"samples": []}, "non-empty list of indices"),
        ({"size": 0}, "size must be a positive number of pixels"),
        ({"stride": -1}, "stride must be a positive number of pixels"),
        ({"fill": "grey"}, "fill must be 'mean' or a number"),
        ({"batch_size": 0}, "batch_size must be positive"),
    ):
        with pytest.raises(ConfigError, match=message):
            Occlusion(**kwargs)

    def fit(callback: Occlusion) -> None:
        quiet_trainer(
            max_epochs=1, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[callback]
        ).fit(Wrapped(marker_net(), lr=0.0), datamodule=MarkerData())

    with pytest.raises(ConfigError, match=r"no layer named 'blocks\.3'"):
        fit(Occlusion(layer="blocks.3"))
    with pytest.raises(ConfigError, match="image 6 of the val split requested"):
        fit(Occlusion(samples=[2, 6]))
    with pytest.raises(ConfigError, match="size=11 but the images are 10x10"):
        fit(Occlusion(size=11))
    with pytest.raises(ConfigError, match=r"layer 4 gives shape \(1,\), not feature maps"):
        fit(Occlusion(layer="4"))


def test_analyse_and_compare_on_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = Classifier("resnet20", num_classes=10, input_shape=(1, 8, 8))
    trainer = L.Trainer(logger=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    checkpoint = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(checkpoint)
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: {arch: resnet20}\n"
        "data: {class_path: Digits, init_args: {image_size: 8, batch_size: 64}}\n"
        f"trainer:\n  accelerator: cpu\n  logger: false\n  default_root_dir: {tmp_path / 'run'}\n"
        "  limit_val_batches: 1\n"
        "  callbacks:\n"
        "    - class_path: Occlusion\n"
        "      init_args: {samples: 2, split: test}\n"
    )
    common = [
        "analyse",
        "Occlusion",
        "--config",
        str(config),
        "--trainer.enable_progress_bar=false",
    ]
    assert main([*common, f"--ckpt_path={checkpoint}"]) == 0
    folder = tmp_path / "occlusion" / "trained"  # the folder that holds the checkpoint
    assert {p.name for p in folder.iterdir()} == {"occlusion.csv", "occlusion.png"}
    rows = rows_of(folder / "occlusion.csv")
    # 8x8 digits: a 2-pixel square every pixel, 7 x 7 positions; the last skip block.
    assert len(rows) == 2 * 49
    assert {(r["size"], r["layer"]) for r in rows} == {("2", "blocks.8")}
    assert {r["sample"] for r in rows} == {"0", "1"}

    out = tmp_path / "compared"
    assert main(["compare", "Occlusion", str(tmp_path), "--out", str(out)]) == 0
    lowest = {int(r["x"]): float(r["y"]) for r in rows_of(out / "occlusion.csv")}
    assert lowest == {
        s: pytest.approx(min(float(r["p_correct"]) for r in rows if r["sample"] == str(s)))
        for s in (0, 1)
    }
