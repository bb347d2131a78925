"""DeconvNet: projections equal a hand-written unpool/ReLU/transposed-conv chain and captum's
neuron attributions, receptive fields have the size the layer arithmetic gives, and the callback
finds the true top activations and draws its figures in a real Trainer."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop
from conftest import Wrapped, quiet_trainer
from skipnets_plugins.deconvnet import DeconvNet, project, unit_regions
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from skipnets.errors import ConfigError
from skipnets.models.resnet import CifarResNet
from skipnets.module import Classifier


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
    ).eval()


def hand_written(net: nn.Sequential, x: torch.Tensor, channel, row, col, guided: bool):
    """Zeiler & Fergus's chain, step by step: rectify, transposed conv, unpool, rectify,
    transposed conv. Guided backpropagation also masks by the forward activations."""
    conv1, conv2 = net[0], net[3]
    a1 = F.relu(conv1(x))
    pooled, switches = F.max_pool2d(a1, 2, return_indices=True)
    a2 = F.relu(conv2(pooled))
    signal = torch.zeros_like(a2)
    signal[torch.arange(x.shape[0]), channel, row, col] = 1.0
    signal = F.relu(signal) * ((a2 > 0) if guided else 1)
    signal = F.conv_transpose2d(signal, conv2.weight, padding=1)
    signal = F.max_unpool2d(signal, switches, 2, output_size=a1.shape[-2:])
    signal = F.relu(signal) * ((a1 > 0) if guided else 1)
    return F.conv_transpose2d(signal, conv1.weight, padding=1)


@pytest.mark.parametrize("method", ["deconvnet", "guided_backprop"])
def test_projection_equals_hand_written_chain(method):
    net = small_net()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    channel, row, col = torch.tensor([1, 2, 3]), torch.tensor([2, 0, 3]), torch.tensor([1, 3, 3])
    mine = project(net, net[4], x, channel, row * 4 + col, method)
    with torch.no_grad():
        expected = hand_written(net, x, channel, row, col, guided=method == "guided_backprop")
    assert expected.abs().sum() > 0
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


# captum's own notes on what it does to the input and the ReLUs while it attributes.
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU activations")
def test_projection_agrees_with_captum():
    net = small_net()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    channel, position = torch.full((4,), 2), torch.full((4,), 1 * 4 + 2)
    for method, oracle in (
        ("deconvnet", NeuronDeconvolution(net, net[4])),
        ("guided_backprop", NeuronGuidedBackprop(net, net[4])),
    ):
        expected = oracle.attribute(x, neuron_selector=(2, 1, 2))
        torch.testing.assert_close(project(net, net[4], x, channel, position, method), expected)


def test_functional_relus_are_rectified_too():
    # BasicBlock applies F.relu, which module hooks cannot see; the projection must not be
    # the plain gradient, which is signed after a rectifying layer.
    net = CifarResNet([1, 1, 1], in_channels=1, widths=(4, 4, 4)).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    target, channel, position = net.blocks[1], torch.tensor([0, 1]), torch.tensor([5, 6])
    deconv = project(net, target, x, channel, position, "deconvnet")
    guided = project(net, target, x, channel, position, "guided_backprop")
    x = x.clone().requires_grad_(True)
    out = {}
    handle = target.register_forward_hook(lambda m, a, o: out.setdefault("y", o))
    net(x)
    handle.remove()
    (plain,) = torch.autograd.grad(out["y"].flatten(2)[[0, 1], channel, position].sum(), x)
    assert not torch.allclose(deconv, plain)
    assert not torch.allclose(guided, plain)


def test_unit_regions_follows_the_layer_arithmetic():
    # conv 3x3 -> max pool 2 -> conv 3x3: 8 input pixels per unit, stride 2, clipped at borders.
    net = small_net()
    x = torch.randn(2, 1, 8, 8)
    boxes = unit_regions(net, net[4], x, torch.tensor([2 * 4 + 1, 0]))
    assert boxes == [(1, 0, 8, 7), (0, 0, 5, 5)]
    assert unit_regions(net, net[0], x, torch.tensor([3 * 8 + 4, 0])) == [
        (2, 3, 5, 6),
        (0, 0, 2, 2),
    ]


class Data(L.LightningDataModule):
    def __init__(self, shape=(1, 8, 8)) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(40, *shape, generator=generator)
        self.y = torch.randint(0, 4, (40,), generator=generator)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=10)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:24], self.y[:24]), batch_size=10)


def run(tmp_path: Path, callback: DeconvNet, model: nn.Module | None = None, shape=(1, 8, 8)):
    torch.manual_seed(0)
    module = Wrapped(
        model or CifarResNet([1, 2, 1], num_classes=4, in_channels=1, widths=(4, 6, 8))
    )
    quiet_trainer(
        max_epochs=1, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[callback]
    ).fit(module, datamodule=Data(shape))
    return module


def test_callback_finds_the_top_activations_and_draws(tmp_path):
    callback = DeconvNet(channels=2, refinement_stage=1, refinement_channels=2)
    module = run(tmp_path, callback)
    folder = tmp_path / "deconvnet" / "epoch000"
    names = {p.name for p in folder.iterdir()}
    expected = {"filters.png", "top_activations.csv"}
    for layer in ("blocks_0", "blocks_2", "blocks_3"):  # the last block of each stage
        expected |= {f"{layer}_guided_backprop.png"}  # a ResNet has no max-pool switches
    expected |= {"refinement_stage1_guided_backprop.png"}
    assert names == expected
    assert all((folder / n).stat().st_size > 2_000 for n in names)

    with open(folder / "top_activations.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 9
    data = Data()
    with torch.no_grad():
        module.eval()
        maps = {}
        for name in ("blocks.0", "blocks.2", "blocks.3"):
            handle = module.model.get_submodule(name).register_forward_hook(
                lambda m, a, o, name=name: maps.__setitem__(name, o)
            )
            module(data.x[:24])
            handle.remove()
    for layer, fmap in maps.items():
        mine = [r for r in rows if r["layer"] == layer]
        for channel in {int(r["channel"]) for r in mine}:
            per_sample = fmap[:, channel].flatten(1).max(1).values
            best = per_sample.topk(9)
            ranked = sorted(
                (r for r in mine if int(r["channel"]) == channel), key=lambda r: int(r["rank"])
            )
            assert [float(r["value"]) for r in ranked] == pytest.approx(
                best.values.tolist(), rel=1e-5
            )
            assert [int(r["sample"]) for r in ranked] == best.indices.tolist()
            top = ranked[0]
            assert fmap[int(top["sample"]), channel, int(top["row"]), int(top["col"])].item() == (
                pytest.approx(float(top["value"]))
            )
        # The channels drawn are the layer's strongest.
        strongest = fmap.flatten(2).max(2).values.max(0).values.topk(2).indices
        assert {int(r["channel"]) for r in mine} == set(strongest.tolist())


@pytest.mark.filterwarnings(
    "ignore:DeconvNet. Wrapped has no max pooling:UserWarning"
)  # on purpose
def test_named_layers_channels_and_errors(tmp_path):
    callback = DeconvNet(
        layers=["blocks.1"], channels=[0, 5], methods=["deconvnet"], refinement_stage=-1, top_k=3
    )
    run(tmp_path, callback)
    folder = tmp_path / "deconvnet" / "epoch000"
    assert {p.name for p in folder.iterdir()} == {
        "filters.png",
        "blocks_1_deconvnet.png",
        "top_activations.csv",
    }
    with pytest.raises(ConfigError, match="methods"):
        DeconvNet(methods=["saliency"])
    with pytest.raises(ConfigError, match=r"no layer named 'blocks\.9'"):
        run(tmp_path, DeconvNet(layers=["blocks.9"]))
    with pytest.raises(ConfigError, match=r"channel 7 requested but layer blocks\.1 has 6"):
        run(tmp_path, DeconvNet(layers=["blocks.1"], channels=[7]))
    with pytest.raises(ConfigError, match="refinement_stage=5"):
        run(tmp_path, DeconvNet(refinement_stage=5))
    vector_net = nn.Sequential(nn.Linear(12, 4))
    with pytest.raises(ConfigError, match="image inputs and a convolutional network"):
        run(tmp_path, DeconvNet(layers=["0"], refinement_stage=-1), vector_net, shape=(12,))


def pooling_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*small_net(), nn.Flatten(), nn.Linear(4 * 4 * 4, 4))


def test_without_max_pooling_the_default_is_guided_backprop_only(tmp_path):
    # Why: with no max-pool switches, the deconvnet projection of one unit is the same picture
    # for every image; guided backpropagation's is not.
    net = CifarResNet([1, 1, 1], in_channels=1, widths=(4, 4, 4)).eval()
    images = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    layer, channel, position = net.blocks[2], torch.tensor([1, 1]), torch.tensor([3, 3])
    deconv = project(net, layer, images, channel, position, "deconvnet")
    guided = project(net, layer, images, channel, position, "guided_backprop")
    torch.testing.assert_close(deconv[0], deconv[1])
    assert not torch.allclose(guided[0], guided[1])

    callback = DeconvNet(channels=1, refinement_stage=-1, top_k=2)
    run(tmp_path, callback)
    assert callback.methods == ["guided_backprop"]
    drawn = {p.name for p in (tmp_path / "deconvnet" / "epoch000").glob("*.png")}
    assert drawn == {
        "filters.png",
        "blocks_0_guided_backprop.png",
        "blocks_2_guided_backprop.png",
        "blocks_3_guided_backprop.png",
    }


def test_asking_for_deconvnet_without_max_pooling_warns(tmp_path):
    callback = DeconvNet(
        layers=["blocks.1"], channels=1, methods=["deconvnet"], refinement_stage=-1, top_k=2
    )
    with pytest.warns(UserWarning, match="no max pooling.*use methods: \\[guided_backprop\\]"):
        run(tmp_path, callback)
    assert callback.methods == ["deconvnet"]  # asked for, so drawn
    assert (tmp_path / "deconvnet" / "epoch000" / "blocks_1_deconvnet.png").exists()


def test_a_network_that_max_pools_keeps_both_projections(tmp_path):
    callback = DeconvNet(channels=1, top_k=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*max pool.*")
        run(tmp_path, callback, pooling_net())
    assert callback.methods == ["deconvnet", "guided_backprop"]
    drawn = {p.name for p in (tmp_path / "deconvnet" / "epoch000").glob("*.png")}
    assert drawn == {
        "filters.png",
        *(
            f"{layer}_{method}.png"
            for layer in ("0", "3")
            for method in ("deconvnet", "guided_backprop")
        ),
    }


def test_command_line_on_a_checkpoint(tmp_path):
    from skipnets.cli import main

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
        "  callbacks:\n"
        "    - class_path: DeconvNet\n"
        "      init_args: {channels: 1, max_samples: 40, methods: [guided_backprop],"
        " refinement_channels: 1}\n"
    )
    common = ["deconvnet", "--config", str(config), "--trainer.enable_progress_bar=false"]
    assert main(common) == 2  # no checkpoint given: one message, status 2
    assert main([*common, f"--ckpt_path={checkpoint}"]) == 0
    folder = tmp_path / "deconvnet" / "trained"  # the folder that holds the checkpoint
    assert {p.name for p in folder.iterdir()} == {
        "filters.png",
        "blocks_2_guided_backprop.png",
        "blocks_5_guided_backprop.png",
        "blocks_8_guided_backprop.png",
        "refinement_stage2_guided_backprop.png",
        "top_activations.csv",
    }
