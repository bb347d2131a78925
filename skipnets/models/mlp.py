"""Fully connected deep networks: plain, highway, and their shared layout.

Layout (``depth`` counts layers with weights): a plain input layer from ``in_features`` to
``width``, ``depth - 2`` same-shape blocks, and a linear classifier.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import HighwayLinear, PlainLinear, ResidualLinear, SkipBlock, activation_layer
from skipnets.papers import HE_2016, SRIVASTAVA_2015
from skipnets.registry import VectorInput, register_model, variant


class MLP(nn.Module):
    """Input layer, a stack of same-shape skip blocks, linear head."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int,
        width: int,
        make_block: Callable[[], SkipBlock],
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ConfigError(f"depth must be at least 2 (input layer and head), got {depth}")
        if width < 1 or in_features < 1 or num_classes < 1:
            raise ConfigError("width, in_features and num_classes must be positive")
        self.stem = nn.Sequential(nn.Linear(in_features, width), activation_layer(activation))
        self.blocks = nn.Sequential(*(make_block() for _ in range(depth - 2)))
        self.head = nn.Linear(width, num_classes)
        self.num_features = width
        self.in_features, self.num_classes = in_features, num_classes
        gain_name = activation if activation in ("relu", "tanh", "sigmoid") else "relu"
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # Variance-preserving init, as both papers use for their plain baselines.
                nn.init.xavier_normal_(module.weight, gain=nn.init.calculate_gain(gain_name))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x.flatten(1)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def same_shape_mlp(
    block: type[PlainLinear],
    depth: int = 10,
    width: int = 64,
    activation: str = "relu",
    norm: bool = False,
    in_features: int = 784,
    num_classes: int = 10,
) -> MLP:
    """An MLP whose same-shape layers are ``block(width, activation, norm)``."""
    return MLP(
        in_features, num_classes, depth, width, lambda: block(width, activation, norm), activation
    )


#: name: (same-shape layer, family, paper, summary); the two differ only in the skip path.
SAME_SHAPE = {
    "plain_mlp": (
        PlainLinear,
        "plain",
        SRIVASTAVA_2015,
        "Plain fully connected net: the baseline that gets harder to train as it gets deeper.",
    ),
    "residual_mlp": (
        ResidualLinear,
        "resnet",
        HE_2016,
        "Residual fully connected net ``y = x + act(W x + b)``: plain_mlp plus identity shortcuts.",
    ),
}
for name, (block, family, paper, summary) in SAME_SHAPE.items():
    register_model(
        variant(name, same_shape_mlp, summary, block=block),
        family=family,
        paper=paper,
        input=VectorInput(),
        has_skip=block.kind != "plain",
    )


@register_model(family="highway", paper=SRIVASTAVA_2015, input=VectorInput(), has_skip=True)
def highway_mlp(
    depth: int = 10,
    width: int = 64,
    activation: str = "relu",
    gate_bias: float = -2.0,
    in_features: int = 784,
    num_classes: int = 10,
) -> MLP:
    """Highway network: gated skip layers ``t*h + (1-t)*x``, gate bias initialised negative."""
    return MLP(
        in_features,
        num_classes,
        depth,
        width,
        lambda: HighwayLinear(width, activation, gate_bias),
        activation,
    )
