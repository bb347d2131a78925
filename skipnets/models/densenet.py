"""Densely connected networks (Huang et al. 2017).

Each layer adds ``growth_rate`` new feature maps to everything before it in its dense block:
``x_{l+1} = cat([x_l, H_l(x_l)])``, with ``H_l`` = BN-ReLU-conv3x3, or with the bottleneck (B)
BN-ReLU-conv1x1 (4k maps)-BN-ReLU-conv3x3. Transitions between blocks are BN-ReLU-conv1x1-avgpool,
keeping ``compression`` (C) of the maps. The ImageNet nets keep torchvision's module names, so a
torchvision state dict loads as it is.

Every dense layer is a ``dense`` skip block: lesioned or dropped, it adds zeros instead of new
maps, without running its branch. Each layer concatenates once, as torchvision does; the memory of
a forward still grows with the square of the depth, since each layer's input is kept for the
backward pass, exactly as in torchvision's implementation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock
from skipnets.papers import HUANG_2017
from skipnets.registry import ImageInput, register_model, variant


class DenseLayer(SkipBlock):
    """One composite function ``H_l``, whose ``growth_rate`` maps are appended to its input."""

    kind = "dense"

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bottleneck_width: int | None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.growth_rate = growth_rate
        self.dropout = dropout
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        if bottleneck_width:
            self.conv1: nn.Conv2d = nn.Conv2d(in_channels, bottleneck_width, 1, bias=False)
            self.norm2: nn.Module | None = nn.BatchNorm2d(bottleneck_width)
            self.relu2: nn.Module | None = nn.ReLU()
            self.conv2: nn.Module | None = nn.Conv2d(
                bottleneck_width, growth_rate, 3, padding=1, bias=False
            )
        else:
            self.conv1 = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)
            self.norm2 = self.relu2 = self.conv2 = None

    def branch(self, x: Tensor) -> Tensor:
        # Dropout (if any) follows every convolution but the stem's, as in the paper.
        out = self._drop(self.conv1(self.relu1(self.norm1(x))))
        if self.conv2 is None:
            return out
        return self._drop(self.conv2(self.relu2(self.norm2(out))))

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def combine(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return torch.cat([shortcut, branch], dim=1)

    def bypass(self, x: Tensor, shortcut: Tensor) -> Tensor:
        shape = (x.shape[0], self.growth_rate, *x.shape[2:])
        return torch.cat([shortcut, x.new_zeros(shape)], dim=1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1x1-avgpool2x2 between dense blocks (dropout after the conv, if any)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        if dropout:
            self.drop = nn.Dropout(dropout)
        self.pool = nn.AvgPool2d(2, stride=2)


class DenseNet(nn.Module):
    """Stem, dense blocks joined by transitions, a final BN-ReLU, global pooling, classifier.

    ``imagenet_stem`` picks the 7x7 stride-2 conv and 3x3 max pool of the ImageNet nets over the
    single 3x3 conv of the CIFAR nets. ``bn_size`` times ``growth_rate`` is the bottleneck width
    (0: no bottleneck).
    """

    def __init__(
        self,
        layers_per_block: Sequence[int],
        growth_rate: int,
        stem_width: int,
        bn_size: int = 4,
        compression: float = 1.0,
        num_classes: int = 10,
        in_channels: int = 3,
        imagenet_stem: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ConfigError("num_classes and in_channels must be positive")
        if growth_rate < 1 or not layers_per_block or min(layers_per_block) < 1:
            raise ConfigError("growth_rate and the layers of every dense block must be positive")
        if not 0.0 < compression <= 1.0:
            raise ConfigError(f"compression must be in (0, 1], got {compression}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes, self.in_channels = num_classes, in_channels
        if imagenet_stem:
            stem = [
                ("conv0", nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(stem_width)),
                ("relu0", nn.ReLU()),
                ("pool0", nn.MaxPool2d(3, stride=2, padding=1)),
            ]
        else:
            stem = [("conv0", nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False))]
        self.features = nn.Sequential(OrderedDict(stem))
        channels = stem_width
        bottleneck_width = bn_size * growth_rate if bn_size else None
        for i, count in enumerate(layers_per_block):
            block = nn.Sequential()
            for j in range(count):
                layer = DenseLayer(channels, growth_rate, bottleneck_width, dropout)
                layer.stage = i
                block.add_module(f"denselayer{j + 1}", layer)
                channels += growth_rate
            self.features.add_module(f"denseblock{i + 1}", block)
            if i < len(layers_per_block) - 1:
                out = int(channels * compression)
                self.features.add_module(f"transition{i + 1}", Transition(channels, out, dropout))
                channels = out
        self.features.add_module(f"norm{len(layers_per_block) + 1}", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels
        meta = any(p.is_meta for p in self.parameters())  # no values to initialise
        for module in () if meta else self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return F.relu(self.features(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_cifar = dict(family="densenet", paper=HUANG_2017, input=ImageInput(3, 32), has_skip=True)
_imagenet = dict(family="densenet", paper=HUANG_2017, input=ImageInput(3, 224), has_skip=True)
#: The CIFAR builders called dropout ``drop_rate`` (torchvision's name) before.
_renamed = {"drop_rate": "dropout"}


@register_model(**_cifar, renamed=_renamed)
def densenet(
    depth: int = 40,
    growth_rate: int = 12,
    bottleneck: bool = False,
    compression: float = 1.0,
    dropout: float = 0.0,
    num_classes: int = 10,
    in_channels: int = 3,
) -> DenseNet:
    """CIFAR DenseNet of depth L: three dense blocks of (L - 4) / 3 layers, or (L - 4) / 6
    bottleneck layers; the stem has 16 maps, or 2k with bottleneck and compression (BC)."""
    per_layer = 2 if bottleneck else 1
    if depth < 4 + 3 * per_layer or (depth - 4) % (3 * per_layer):
        form = "6n + 4" if bottleneck else "3n + 4"
        raise ConfigError(
            f"a CIFAR DenseNet{'-B' if bottleneck else ''} has depth {form}, not {depth}"
        )
    n = (depth - 4) // (3 * per_layer)
    stem = 2 * growth_rate if bottleneck and compression < 1 else 16
    return DenseNet(
        [n, n, n],
        growth_rate,
        stem,
        bn_size=4 if bottleneck else 0,
        compression=compression,
        num_classes=num_classes,
        in_channels=in_channels,
        dropout=dropout,
    )


#: Huang et al. 2017, Table 2: depth L, growth rate k, and the parameters it reports.
CIFAR = {
    "densenet_40_12": (40, 12, "1.0M"),
    "densenet_100_12": (100, 12, "7.0M"),
    "densenet_100_24": (100, 24, "27.2M"),
}
CIFAR_BC = {  # with bottleneck layers and compression 0.5
    "densenet_bc_100_12": (100, 12, "0.8M"),
    "densenet_bc_250_24": (250, 24, "15.3M"),
    "densenet_bc_190_40": (190, 40, "25.6M"),
}
for table, bc in ((CIFAR, False), (CIFAR_BC, True)):
    for name, (depth, growth_rate, count) in table.items():
        summary = f"DenseNet{'-BC' if bc else ''} (L={depth}, k={growth_rate}), {count} parameters."
        fixed = dict(
            depth=depth, growth_rate=growth_rate, bottleneck=bc, compression=0.5 if bc else 1.0
        )
        register_model(variant(name, densenet, summary, **fixed), **_cifar, renamed=_renamed)


def imagenet_densenet(
    layers_per_block: Sequence[int],
    growth_rate: int,
    stem_width: int,
    num_classes: int = 1000,
    in_channels: int = 3,
) -> DenseNet:
    """An ImageNet DenseNet-BC: 7x7 stem, bottleneck layers, compression 0.5."""
    return DenseNet(
        layers_per_block,
        growth_rate,
        stem_width,
        bn_size=4,
        compression=0.5,
        num_classes=num_classes,
        in_channels=in_channels,
        imagenet_stem=True,
    )


#: The layers of each dense block and the growth rate k (the stem is 2k wide): Huang et al.
#: 2017, Table 1, and the k = 48 DenseNet-161 of the authors' release (torchvision's too).
IMAGENET = {
    "densenet121": ((6, 12, 24, 16), 32),
    "densenet161": ((6, 12, 36, 24), 48),
    "densenet169": ((6, 12, 32, 32), 32),
    "densenet201": ((6, 12, 48, 32), 32),
}
for name, (layers, growth_rate) in IMAGENET.items():
    summary = (
        f"DenseNet-{name[8:]} (BC, k={growth_rate}) for ImageNet: dense blocks of "
        f"{', '.join(map(str, layers))} layers."
    )
    fixed = dict(layers_per_block=layers, growth_rate=growth_rate, stem_width=2 * growth_rate)
    register_model(variant(name, imagenet_densenet, summary, **fixed), **_imagenet)
