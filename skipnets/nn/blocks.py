"""Skip blocks shared by several families: fully connected plain/highway layers and the
post-activation basic residual block (which, without its shortcut, is the plain CNN layer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn.skip import SkipBlock

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def activation_layer(name: str) -> nn.Module:
    """A new activation module by name (``relu``, ``tanh``, ...), for builders' ``activation``."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


class PlainLinear(SkipBlock):
    """A same-shape fully connected layer ``y = act(norm(W x + b))`` with no skip path.

    As a ``plain`` skip block it can be lesioned (it then passes ``x`` through), which is how one
    shows that removing a layer of a plain network is catastrophic.
    """

    kind = "plain"

    def __init__(self, width: int, activation: str = "relu", norm: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=not norm)
        # None rather than nn.Identity: a module call per layer is a visible cost in deep MLPs.
        self.norm = nn.BatchNorm1d(width) if norm else None
        self.act = activation_layer(activation)

    def branch(self, x: Tensor) -> Tensor:
        h = self.linear(x)
        return self.act(h if self.norm is None else self.norm(h))

    def combine(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return branch

    def bypass(self, x: Tensor, shortcut: Tensor) -> Tensor:
        return x


class ResidualLinear(PlainLinear):
    """A fully connected residual block with one weight layer: ``y = x + BN(act(W x + b))``.

    He et al.'s block ends its branch in a batch norm before the sum; its scale starts at zero
    (Goyal et al. 2017), so every block starts as the identity, however many there are. Without
    it (``norm=False``: ``y = x + act(W x + b)``, plain_mlp's parameters exactly) each block adds
    its branch's variance to the sum's, and the activations of a deep net grow with depth at
    initialisation (geometrically with ReLU).
    """

    kind = "residual"

    def __init__(self, width: int, activation: str = "relu", norm: bool = True) -> None:
        super().__init__(width, activation, norm=False)
        self.norm = nn.BatchNorm1d(width) if norm else None
        if self.norm is not None:
            nn.init.zeros_(self.norm.weight)

    def branch(self, x: Tensor) -> Tensor:
        h = self.act(self.linear(x))
        return h if self.norm is None else self.norm(h)

    def combine(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return shortcut + branch

    def bypass(self, x: Tensor, shortcut: Tensor) -> Tensor:
        return shortcut


class Highway(SkipBlock):
    """A highway layer (Srivastava et al. 2015): ``y = t * h + (1 - t) * x``.

    ``h = act(transform(x))`` and the transform gate ``t = sigmoid(gate(x))``, where ``transform``
    and ``gate`` are same-shape layers (linear or convolutional). The gate bias starts negative
    (``gate_bias``, -1 to -3 in the paper) so that the layer begins close to the identity. Written
    as a branch on a shortcut: ``y = x + t * (h - x)``. While observed, the gate of the last
    forward is kept (detached) in ``last_gate`` for plotting gate activity.
    """

    kind = "highway"

    def __init__(
        self,
        transform: nn.Module,
        gate: nn.Module,
        activation: str = "relu",
        gate_bias: float = -2.0,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.gate = gate
        self.act = activation_layer(activation)
        nn.init.constant_(self.gate.bias, gate_bias)
        #: The transform gate's starting bias, which decides how closed the gate starts.
        self.gate_bias = float(gate_bias)
        self.last_gate: Tensor | None = None

    def branch(self, x: Tensor) -> Tensor:
        h = self.act(self.transform(x))
        t = torch.sigmoid(self.gate(x))
        if self._observers:
            self.last_gate = t.detach()
        return t * (h - x)


class HighwayLinear(Highway):
    """A fully connected highway layer of ``width`` units."""

    def __init__(self, width: int, activation: str = "relu", gate_bias: float = -2.0) -> None:
        super().__init__(nn.Linear(width, width), nn.Linear(width, width), activation, gate_bias)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the new channels (no weights)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra - before))


ShortcutType = Literal["A", "B", "none"]


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Option B: a strided 1x1 convolution and batch norm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(SkipBlock):
    """Two 3x3 conv-BN layers, ReLU after the sum (He et al. 2016, post-activation).

    ``shortcut="A"`` pads with zeros where the shape changes (the CIFAR nets), ``"B"`` projects
    with a 1x1 convolution, ``"none"`` gives the plain network's two-layer block: then the block
    is ``plain`` and can be lesioned only where its shape does not change.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, shortcut: ShortcutType = "A"
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        same_shape = stride == 1 and in_channels == out_channels
        if shortcut == "none":
            self.kind = "plain"
            self.bypassable = same_shape
            self.downsample: nn.Module = nn.Identity()
        elif same_shape:
            self.downsample = nn.Identity()
        elif shortcut == "A":
            self.downsample = PadShortcut(in_channels, out_channels, stride)
        elif shortcut == "B":
            self.downsample = projection(in_channels, out_channels, stride)
        else:
            raise ConfigError(f"shortcut must be 'A', 'B' or 'none', not {shortcut!r}")

    def branch(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def shortcut(self, x: Tensor) -> Tensor:
        return self.downsample(x)

    def combine(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        if self.kind == "plain":
            return F.relu(branch)
        return F.relu(shortcut + branch)

    def bypass(self, x: Tensor, shortcut: Tensor) -> Tensor:
        return x if self.kind == "plain" else shortcut
