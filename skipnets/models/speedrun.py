"""A ResNet-9 for fast CIFAR-10 training (Page 2018, "How to train your ResNet").

Prep conv, then three conv-pool stages (conv, 2x2 max pool, batch norm, activation); stages 1
and 3 are followed by a residual block of two conv-BN-activation layers, added to its input with
no activation after the sum. Global max pooling and a bias-free linear head whose output is
scaled by ``logit_scale`` (0.125 in Page's runs: it keeps early softmax outputs soft without a
smaller learning rate). The widths default to Page's (64, 128, 256, 512); smaller ones trade
accuracy for speed as airbench does.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock, activation_layer
from skipnets.papers import PAGE_2018
from skipnets.registry import ImageInput, register_model


def conv_bn(
    in_channels: int, out_channels: int, activation: str, pool: bool = False
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(out_channels), activation_layer(activation)]
    return nn.Sequential(*layers)


class Residual(SkipBlock):
    """``x + act(bn(conv(act(bn(conv(x))))))``: Page's residual block, identity shortcut."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            conv_bn(channels, channels, activation), conv_bn(channels, channels, activation)
        )

    def branch(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SpeedrunResNet(nn.Module):
    """Page's ResNet-9 layout; see the module docstring."""

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
        logit_scale: float = 0.125,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or min(widths) < 1:
            raise ConfigError(f"widths needs four positive channel counts, got {list(widths)}")
        if num_classes < 1 or in_channels < 1:
            raise ConfigError("num_classes and in_channels must be positive")
        prep, w1, w2, w3 = widths
        self.prep = conv_bn(in_channels, prep, activation)
        self.layer1 = nn.Sequential(
            conv_bn(prep, w1, activation, pool=True), Residual(w1, activation)
        )
        self.layer2 = conv_bn(w1, w2, activation, pool=True)
        self.layer3 = nn.Sequential(
            conv_bn(w2, w3, activation, pool=True), Residual(w3, activation)
        )
        self.layer1[1].stage, self.layer3[1].stage = 0, 2
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(w3, num_classes, bias=False)
        self.logit_scale = logit_scale
        self.num_features = w3

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer3(self.layer2(self.layer1(self.prep(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1)) * self.logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(family="speedrun", paper=PAGE_2018, input=ImageInput(3, 32), has_skip=True)
def speedrun_resnet9(
    widths: Sequence[int] = (64, 128, 256, 512),
    activation: str = "relu",
    logit_scale: float = 0.125,
    num_classes: int = 10,
    in_channels: int = 3,
) -> SpeedrunResNet:
    """ResNet-9 for fast CIFAR training: 8 conv layers, two residual blocks, max-pooled head."""
    return SpeedrunResNet(widths, num_classes, in_channels, activation, logit_scale)
