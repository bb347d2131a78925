"""Fully connected deep networks: plain, residual and highway, and their shared layout.

Layout (``depth`` counts layers with weights): a plain input layer from ``in_features`` to
``width``, ``depth - 2`` same-shape blocks, and a linear classifier.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import HighwayLinear, PlainLinear, ResidualLinear, SkipBlock, activation_layer
from skipnets.papers import HE_2016, SRIVASTAVA_2015
from skipnets.registry import VectorInput, register_model


class MLP(nn.Module):
    """Input layer, a stack of same-shape skip blocks, linear head; with ``final_norm`` a batch
    norm on the features between the last block and the head."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int,
        width: int,
        make_block: Callable[[], SkipBlock],
        activation: str = "relu",
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ConfigError(f"depth must be at least 2 (input layer and head), got {depth}")
        if width < 1 or in_features < 1 or num_classes < 1:
            raise ConfigError("width, in_features and num_classes must be positive")
        self.stem = nn.Sequential(nn.Linear(in_features, width), activation_layer(activation))
        self.blocks = nn.Sequential(*(make_block() for _ in range(depth - 2)))
        self.norm = nn.BatchNorm1d(width) if final_norm else None
        self.head = nn.Linear(width, num_classes)
        self.num_features = width
        self.in_features, self.num_classes = in_features, num_classes
        gain_name = activation if activation in ("relu", "tanh", "sigmoid") else "relu"
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # Variance-preserving init, as both papers use for their plain baselines.
                nn.init.xavier_normal_(module.weight, gain=nn.init.calculate_gain(gain_name))

    def forward_features(self, x: Tensor) -> Tensor:
        features = self.blocks(self.stem(x.flatten(1)))
        return features if self.norm is None else self.norm(features)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(family="plain", paper=SRIVASTAVA_2015, input=VectorInput(), has_skip=False)
def plain_mlp(
    depth: int = 10,
    width: int = 64,
    activation: str = "relu",
    norm: bool = False,
    in_features: int = 784,
    num_classes: int = 10,
) -> MLP:
    """Plain fully connected net: the baseline that gets harder to train as it gets deeper."""
    return MLP(
        in_features,
        num_classes,
        depth,
        width,
        lambda: PlainLinear(width, activation, norm),
        activation,
    )


@register_model(family="resnet", paper=HE_2016, input=VectorInput(), has_skip=True)
def residual_mlp(
    depth: int = 10,
    width: int = 64,
    activation: str = "relu",
    norm: bool = True,
    in_features: int = 784,
    num_classes: int = 10,
) -> MLP:
    """Residual fully connected net: blocks ``y = x + BN(act(W x + b))`` that start as the identity.

    He et al.'s block closes its branch with a batch norm before the sum. Its scale starts at
    zero (Goyal et al. 2017), so at initialisation every block passes its input on unchanged, and
    a batch norm on the features before the head (as pre-activation ResNets end, He et al.
    2016b) keeps the logits' scale while the many blocks' contributions grow in training: with
    both, the net trains at depth 100 with SGD at learning rates 0.01 to 0.1. ``norm=False``
    gives ``y = x + act(W x + b)`` with no final norm, plain_mlp's parameters plus identity
    shortcuts, whose activations grow with depth at initialisation (with ReLU, by about 1e11 at
    depth 50) so that it does not train deep.
    """
    return MLP(
        in_features,
        num_classes,
        depth,
        width,
        lambda: ResidualLinear(width, activation, norm),
        activation,
        final_norm=norm,
    )


@register_model(family="highway", paper=SRIVASTAVA_2015, input=VectorInput(), has_skip=True)
def highway_mlp(
    depth: int = 10,
    width: int = 64,
    activation: str = "relu",
    gate_bias: float = -5.0,
    in_features: int = 784,
    num_classes: int = 10,
) -> MLP:
    """Highway network: gated skip layers ``t*h + (1-t)*x``, gate bias initialised negative.

    Srivastava et al. start the transform gates' bias ``b_T`` negative (-1 to -3 for their
    nets) so that a deep net is at first biased towards carrying its input, and more negative
    the deeper the net. A layer passes about ``1 - sigmoid(b_T)`` of its input on, so the share
    of the input that reaches the head through the ``depth - 2`` highway layers is about
    ``(1 - sigmoid(b_T)) ** (depth - 2)``: at the default -5 (99.3 % a layer) still 52 % at depth
    100, so the net starts close to the identity and trains at depth 50 to 100; at -2 (88 % a
    layer) 0.0004 %, and such a net does not train at depth 50.
    """
    return MLP(
        in_features,
        num_classes,
        depth,
        width,
        lambda: HighwayLinear(width, activation, gate_bias),
        activation,
    )
