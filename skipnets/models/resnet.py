"""Residual networks (He et al. 2016).

CIFAR ResNets: a 3x3 conv with 16 filters, three stages of ``n`` basic blocks with 16, 32 and 64
filters (the first block of stages 2 and 3 strides by 2), global average pooling and a linear
classifier; depth ``6n + 2``. The unusual bit users check: option-A shortcuts (subsample and
zero-pad, no parameters), which is what gives the paper's parameter counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import BasicBlock
from skipnets.nn.blocks import ShortcutType, conv3x3
from skipnets.registry import ImageInput, Paper, register_model

HE_2016 = Paper(
    "Deep Residual Learning for Image Recognition", "He, Zhang, Ren, Sun", 2016, "1512.03385"
)


def init_conv_bn(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, unit scale and zero shift for batch norm."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CifarResNet(nn.Module):
    """The CIFAR layout of He et al. 2016, Sec. 4.2, for any number of blocks per stage."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        shortcut: ShortcutType = "A",
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != len(widths) or min(blocks_per_stage) < 1:
            raise ConfigError("need at least one block in each stage, and one width per stage")
        self.stem = nn.Sequential(
            conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        blocks: list[BasicBlock] = []
        channels = widths[0]
        for stage, (count, width) in enumerate(zip(blocks_per_stage, widths)):
            for i in range(count):
                block = BasicBlock(channels, width, 2 if (i == 0 and stage > 0) else 1, shortcut)
                block.stage = stage
                blocks.append(block)
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        init_conv_bn(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3, **kwargs) -> CifarResNet:
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(
            f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), not {depth}"
        )
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], num_classes, in_channels, **kwargs)


_cifar = dict(family="resnet", paper=HE_2016, input=ImageInput(3, 32), has_skip=True)


@register_model(**_cifar)
def resnet20(
    num_classes: int = 10, in_channels: int = 3, shortcut: ShortcutType = "A"
) -> CifarResNet:
    """ResNet-20 for CIFAR: 3 basic blocks per stage."""
    return cifar_resnet(20, num_classes, in_channels, shortcut=shortcut)


@register_model(**_cifar)
def resnet32(
    num_classes: int = 10, in_channels: int = 3, shortcut: ShortcutType = "A"
) -> CifarResNet:
    """ResNet-32 for CIFAR: 5 basic blocks per stage."""
    return cifar_resnet(32, num_classes, in_channels, shortcut=shortcut)


@register_model(**_cifar)
def resnet44(
    num_classes: int = 10, in_channels: int = 3, shortcut: ShortcutType = "A"
) -> CifarResNet:
    """ResNet-44 for CIFAR: 7 basic blocks per stage."""
    return cifar_resnet(44, num_classes, in_channels, shortcut=shortcut)


@register_model(**_cifar)
def resnet56(
    num_classes: int = 10, in_channels: int = 3, shortcut: ShortcutType = "A"
) -> CifarResNet:
    """ResNet-56 for CIFAR: 9 basic blocks per stage."""
    return cifar_resnet(56, num_classes, in_channels, shortcut=shortcut)


@register_model(**_cifar)
def resnet110(
    num_classes: int = 10, in_channels: int = 3, shortcut: ShortcutType = "A"
) -> CifarResNet:
    """ResNet-110 for CIFAR: 18 basic blocks per stage."""
    return cifar_resnet(110, num_classes, in_channels, shortcut=shortcut)


@register_model(**_cifar)
def resnet1202(
    num_classes: int = 10, in_channels: int = 3, shortcut: ShortcutType = "A"
) -> CifarResNet:
    """ResNet-1202 for CIFAR: 200 basic blocks per stage."""
    return cifar_resnet(1202, num_classes, in_channels, shortcut=shortcut)
