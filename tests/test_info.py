"""Model facts: parameters, FLOPs, receptive fields, skip blocks, paper; `skipnets models --details`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from skipnets.cli import main
from skipnets.errors import ConfigError
from skipnets.info import describe, receptive_field
from skipnets.registry import create_model


def convs(*layers: tuple[int, int, int]) -> nn.Sequential:
    """A stack of 1-channel convs, each given as (kernel, stride, dilation)."""
    return nn.Sequential(*(nn.Conv2d(1, 1, k, stride=s, dilation=d) for k, s, d in layers))


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **kwargs)


# -- receptive field ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ([(3, 1, 1)] * 3, 7),  # three 3x3 convs see what one 7x7 sees
        ([(3, 2, 1), (3, 1, 1)], 7),  # after a stride of 2 each tap is 2 pixels apart
        ([(3, 1, 2)], 5),  # dilation 2
        ([(7, 2, 1), (3, 2, 1), (3, 1, 1)], 7 + 2 * 2 + 2 * 4),
    ],
)
def test_receptive_field_of_conv_stacks(layers, expected):
    assert receptive_field(convs(*layers), (1, 64, 64)) == (expected, expected)


def test_non_square_kernels_and_pools():
    model = nn.Sequential(nn.Conv2d(1, 1, (1, 7)), nn.MaxPool2d(2), nn.Conv2d(1, 1, (3, 1)))
    assert receptive_field(model, (1, 32, 32)) == (1 + 1 + 2 * 2, 7 + 1)


class Strided(nn.Module):
    """Subsampling by slicing (like option-A shortcuts) and resizing (like U-Net's decoder)."""

    def __init__(self, upsample: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 1, 3), nn.Conv2d(1, 1, 3)
        self.upsample = upsample

    def forward_features(self, x):
        x = self.a(x)
        if self.upsample:
            x = F.interpolate(F.max_pool2d(x, 2), scale_factor=2)
        else:
            x = x[:, :, ::2, ::2]
        return self.b(x)


def test_slices_and_resizes_change_the_spacing():
    assert receptive_field(Strided(upsample=False), (1, 32, 32)) == (3 + 2 * 2,) * 2
    # pooling by 2 adds one tap 1 pixel apart; after upsampling taps are 1 pixel apart again
    assert receptive_field(Strided(upsample=True), (1, 32, 32)) == (3 + 1 + 2,) * 2


def test_sums_and_concatenations_take_the_widest_input():
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide, self.narrow = nn.Conv2d(1, 1, 5, padding=2), nn.Conv2d(1, 1, 1)

        def forward(self, x):
            return torch.cat([self.narrow(x), self.wide(x) + x], dim=1)

    assert receptive_field(TwoPaths(), (1, 16, 16)) == (5, 5)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("resnet18", {}, 435),
        ("resnet50", {}, 427),  # torchvision's v1.5: the stride on the 3x3 conv
        ("resnet50", {"stride_at": "1x1"}, 483),  # the paper's net (Araujo et al. 2019: 483)
        ("resnet20", {}, 81),  # 3 + 6*2 + (2 + 5*4) + (4 + 5*8)
        ("plain_cnn", {"depth": 20}, 81),
    ],
)
def test_known_receptive_fields(name, kwargs, expected):
    model = meta_model(name, **kwargs)
    size = 224 if name.startswith("resnet") and name != "resnet20" else 32
    assert receptive_field(model, (3, size, size)) == (expected, expected)


def test_vgg16_receptive_field():
    with torch.device("meta"):
        features = torchvision.models.vgg16().features
    assert receptive_field(features, (3, 224, 224)) == (212, 212)  # conv5_3 sees 196, pool5 212


# -- describe --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
        ("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
        ("densenet121", torchvision.models.DenseNet121_Weights.IMAGENET1K_V1),
    ],
)
def test_describe_agrees_with_torchvisions_metadata(name, weights):
    facts = describe(name)
    assert facts.parameters == weights.meta["num_params"]
    # torchvision lists multiply-adds (GFLOPS in its tables); torch's counter counts two per MAC
    assert round(facts.flops / 2 / 1e9, 3) == weights.meta["_ops"]
    assert facts.input_shape == (3, 224, 224)


def test_describe_a_densenet():
    facts = describe("densenet_bc_100_12")
    assert facts.family == "densenet" and facts.has_skip
    assert facts.paper is not None and facts.paper.arxiv == "1608.06993"
    assert facts.skip_kinds == {"dense": 48} and facts.skip_blocks == 48
    assert facts.input_shape == (3, 32, 32)
    assert round(facts.parameters / 1e6, 1) == 0.8
    text = str(facts)
    for piece in ("densenet_bc_100_12", "arXiv:1608.06993", "48 (48 dense)", "receptive field"):
        assert piece in text


def test_describe_plain_and_vector_models():
    plain = describe("plain_cnn")
    assert plain.skip_kinds == {"plain": 9} and plain.has_skip is False
    assert plain.flops == describe("resnet20").flops
    cascade = describe("cascade_mlp")
    assert cascade.input_shape == (2,) and cascade.receptive_field is None
    # three tanh layers of 5 and the head, two FLOPs per weight
    assert cascade.flops == 2 * (2 * 5 + 7 * 5 + 12 * 5 + 17 * 2)
    assert "receptive field" not in str(cascade)


def test_describe_an_instance():
    model = create_model("highway_cnn", depth=7, widths=(8, 16))
    model.train()
    facts = describe(model, input_shape=(3, 16, 16))
    assert model.training  # left as it was
    assert facts.name == "highway_cnn" and facts.family == "highway"
    assert facts.input_shape == (3, 16, 16)
    assert facts.skip_kinds == {"highway": 4}
    assert facts.parameters == sum(p.numel() for p in model.parameters())
    # stem, two highway layers, transition (+ pool), two highway layers: all 3x3
    assert facts.receptive_field == (1 + 2 * 3 + 2 + 1 + 2 * 2 * 2, 1 + 2 * 3 + 2 + 1 + 2 * 2 * 2)

    unregistered = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(ConfigError, match="input_shape"):
        describe(unregistered)
    facts = describe(unregistered, input_shape=(3, 5, 5))
    assert facts.family is None and facts.paper is None
    assert facts.flops == 2 * (3 * 3 * 3) * 4 * 3 * 3
    with pytest.raises(ConfigError):
        describe(42)


def test_cli_details(skipnets_cli):
    result = skipnets_cli("models", "--details", "resnet18")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "resnet18" in out and "arXiv:1512.03385" in out and "11,689,512" in out
    assert "435 x 435" in out and "8 (8 residual)" in out and "3,628,146,688" in out


def test_cli_details_of_an_unknown_name(capsys):
    assert main(["models", "--details", "resnet19"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "resnet18" in err


def test_describe_with_builder_arguments_and_bad_shapes():
    paper = describe("resnet50", stride_at="1x1")
    assert paper.receptive_field == (483, 483)
    assert paper.parameters == describe("resnet50").parameters
    small = describe("resnet20", input_shape=(3, 16, 16))
    classifier = 2 * 64 * 10  # the same at any input size; the convolutions scale with area
    assert (small.flops - classifier) * 4 == describe("resnet20").flops - classifier
    with pytest.raises(ConfigError, match="could not run"):
        describe("resnet20", input_shape=(5, 32, 32))  # five channels into a 3-channel stem
    with pytest.raises(ConfigError, match="model name"):
        describe(create_model("cascade_mlp"), width=3)
