"""The 1988 "dense" net: Lang & Witbrock's two-spirals network.

Lang & Witbrock (1988, "Learning to Tell Two Spirals Apart") solved the two-spirals problem with
a 2-5-5-5-1 network of 138 weights in which every layer, the output included, is connected to the
input and to every earlier layer: the same connectivity DenseNet gave convolutional nets in 2017.
Here each hidden layer is a ``dense`` skip block (its units are appended to what it sees), and
the classifier reads the input and every hidden unit. Training is by backprop, as in the paper;
there is one output unit per class rather than a single logistic unit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock, activation_layer
from skipnets.papers import LANG_WITBROCK_1988
from skipnets.registry import VectorInput, register_model


class CascadeLayer(SkipBlock):
    """``width`` units that see everything computed so far, appended to it."""

    kind = "dense"

    def __init__(self, in_features: int, width: int, activation: str = "tanh") -> None:
        super().__init__()
        self.width = width
        self.linear = nn.Linear(in_features, width)
        self.act = activation_layer(activation)

    def branch(self, x: Tensor) -> Tensor:
        return self.act(self.linear(x))

    def combine(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return torch.cat([shortcut, branch], dim=1)

    def bypass(self, x: Tensor, shortcut: Tensor) -> Tensor:
        return torch.cat([shortcut, x.new_zeros(x.shape[0], self.width)], dim=1)


class CascadeMLP(nn.Module):
    """Hidden layers with shortcut connections from the input and all earlier layers."""

    def __init__(
        self, in_features: int, num_classes: int, depth: int, width: int, activation: str = "tanh"
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_features < 1 or num_classes < 1:
            raise ConfigError("depth, width, in_features and num_classes must be positive")
        self.in_features, self.num_classes = in_features, num_classes
        layers = []
        for stage in range(depth):
            layer = CascadeLayer(in_features + stage * width, width, activation)
            layer.stage = stage
            layers.append(layer)
        self.layers = nn.Sequential(*layers)
        self.num_features = in_features + depth * width
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layers(x.flatten(1))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(family="cascade", paper=LANG_WITBROCK_1988, input=VectorInput(2), has_skip=True)
def cascade_mlp(
    depth: int = 3,
    width: int = 5,
    activation: str = "tanh",
    in_features: int = 2,
    num_classes: int = 2,
) -> CascadeMLP:
    """Lang & Witbrock's two-spirals net: every layer sees the input and all earlier layers."""
    return CascadeMLP(in_features, num_classes, depth, width, activation)
