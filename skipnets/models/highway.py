"""Convolutional highway networks (Srivastava, Greff & Schmidhuber 2015).

A highway layer computes ``y = t * h + (1 - t) * x`` with ``h = act(conv_H(x))`` and the transform
gate ``t = sigmoid(conv_T(x) + b_T)``; ``b_T`` starts negative (``gate_bias``) so that every layer
begins close to the identity, which is what lets deep highway nets train by plain SGD.

Layout: a plain conv stem, then stages of same-shape highway layers; between stages a plain 3x3
conv changes the width and a 2x2 max pool halves the resolution (the paper's CIFAR nets follow
the same pattern; their exact widths are in its supplementary material). Global average pooling
and a linear classifier close the net.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import Highway, activation_layer
from skipnets.papers import SRIVASTAVA_2015
from skipnets.registry import ImageInput, register_model


class HighwayConv(Highway):
    """A convolutional highway layer; ``last_gate`` holds one gate value per sample, channel and
    position while observed."""

    def __init__(
        self, channels: int, kernel_size: int = 3, activation: str = "relu", gate_bias: float = -2.0
    ) -> None:
        padding = kernel_size // 2
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size, padding=padding),
            nn.Conv2d(channels, channels, kernel_size, padding=padding),
            activation,
            gate_bias,
        )


class HighwayCNN(nn.Module):
    """Stem, stages of highway layers joined by conv + max-pool transitions, pooled linear head."""

    def __init__(
        self,
        layers_per_stage: int,
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        activation: str = "relu",
        gate_bias: float = -2.0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ConfigError("num_classes and in_channels must be positive")
        if not widths or min(widths) < 1 or layers_per_stage < 1:
            raise ConfigError("need at least one stage, positive widths and one layer per stage")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd, got {kernel_size}")
        self.num_classes, self.in_channels = num_classes, in_channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], kernel_size, padding=kernel_size // 2),
            activation_layer(activation),
        ]
        for stage, width in enumerate(widths):
            if stage > 0:
                layers += [
                    nn.Conv2d(widths[stage - 1], width, kernel_size, padding=kernel_size // 2),
                    activation_layer(activation),
                    nn.MaxPool2d(2),
                ]
            for _ in range(layers_per_stage):
                block = HighwayConv(width, kernel_size, activation, gate_bias)
                block.stage = stage
                layers.append(block)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.num_features = widths[-1]
        meta = any(p.is_meta for p in self.parameters())  # no values to initialise
        for module in () if meta else self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(family="highway", paper=SRIVASTAVA_2015, input=ImageInput(3, 32), has_skip=True)
def highway_cnn(
    depth: int = 19,
    widths: Sequence[int] = (32, 64, 128),
    activation: str = "relu",
    gate_bias: float = -2.0,
    kernel_size: int = 3,
    num_classes: int = 10,
    in_channels: int = 3,
) -> HighwayCNN:
    """Convolutional highway net; ``depth`` counts the stem, transitions, highway layers and head."""
    stages = len(widths)
    highway_layers = depth - stages - 1
    if stages < 1 or highway_layers < stages or highway_layers % stages:
        raise ConfigError(
            f"depth {depth} with {stages} stages leaves {highway_layers} highway layers; "
            f"depth - {stages + 1} must be a positive multiple of {stages}"
        )
    return HighwayCNN(
        highway_layers // stages,
        tuple(widths),
        num_classes,
        in_channels,
        activation,
        gate_bias,
        kernel_size,
    )
