"""Residual networks: He et al. 2016 (CIFAR and ImageNet), the plain nets they are compared with,
pre-activation ResNets (He et al. 2016b), wide ResNets (Zagoruyko & Komodakis 2016) and ResNets
with stochastic depth (Huang et al. 2016).

CIFAR ResNets: a 3x3 conv with 16 filters, three stages of ``n`` basic blocks with 16, 32 and 64
filters (the first block of stages 2 and 3 strides by 2), global average pooling and a linear
classifier; depth ``6n + 2``. The unusual bit users check: option-A shortcuts (subsample and
zero-pad, no parameters), which is what gives the paper's parameter counts. The plain nets of
Fig. 6 are the same layout with the shortcuts removed, so they have exactly the same parameters.

ImageNet ResNets keep torchvision's module names, so a torchvision state dict loads as it is.
The one thing to know: the paper strides the bottleneck's first 1x1 convolution; torchvision
("v1.5") strides its 3x3 convolution, which is the default here (``stride_at="1x1"`` gives the
paper's). The two have the same parameters but not the same receptive field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import (
    BasicBlock,
    SkipBlock,
    check_drop_mode,
    check_survival_prob,
    linear_decay,
    skip_blocks,
)
from skipnets.nn.blocks import ShortcutType, conv3x3, projection
from skipnets.papers import HE_2016, HE_2016B, HUANG_2016, ZAGORUYKO_2016
from skipnets.registry import ImageInput, register_model, variant

StrideAt = Literal["3x3", "1x1"]


def init_conv_bn(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, unit scale and zero shift for batch norm."""
    if any(p.is_meta for p in model.parameters()):
        return  # meta tensors hold no values, and random init on them is slow
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _check_classes(num_classes: int, in_channels: int) -> None:
    if num_classes < 1 or in_channels < 1:
        raise ConfigError(
            f"num_classes and in_channels must be positive, got {num_classes} and {in_channels}"
        )


# -- CIFAR ResNets and plain nets ------------------------------------------------------------
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
        _check_classes(num_classes, in_channels)
        if len(blocks_per_stage) != len(widths) or min(blocks_per_stage) < 1:
            raise ConfigError("need at least one block in each stage, and one width per stage")
        self.num_classes, self.in_channels = num_classes, in_channels
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


def cifar_resnet(
    depth: int, num_classes: int = 10, in_channels: int = 3, shortcut: ShortcutType = "A"
) -> CifarResNet:
    """A CIFAR ResNet of depth ``6n + 2``: ``n`` basic blocks per stage."""
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(
            f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), not {depth}"
        )
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], num_classes, in_channels, shortcut=shortcut)


_cifar = dict(family="resnet", paper=HE_2016, input=ImageInput(3, 32), has_skip=True)

#: He et al. 2016, Table 6: the depths of the CIFAR-10 experiments.
for depth in (20, 32, 44, 56, 110, 1202):
    summary = f"ResNet-{depth} for CIFAR: {(depth - 2) // 6} basic blocks per stage."
    register_model(variant(f"resnet{depth}", cifar_resnet, summary, depth=depth), **_cifar)


@register_model(**_cifar)
def residual_cnn(depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """The CIFAR ResNet at any depth ``6n + 2`` (``resnet20`` ... are its table depths):
    ``plain_cnn``'s counterpart with option-A shortcuts, for studies across depth."""
    return cifar_resnet(depth, num_classes, in_channels)


@register_model(family="plain", paper=HE_2016, input=ImageInput(3, 32), has_skip=False)
def plain_cnn(depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """The plain-20/32/44/56/110 nets of He et al. 2016 Fig. 6: the CIFAR ResNet without shortcuts."""
    return cifar_resnet(depth, num_classes, in_channels, shortcut="none")


# -- stochastic depth --------------------------------------------------------------------------
def stochastic_depth_resnet(
    depth: int,
    num_classes: int = 10,
    in_channels: int = 3,
    survival_prob_last: float = 0.5,
    drop_mode: Literal["batch", "sample"] = "batch",
    scaling: Literal["test", "inverted"] = "test",
) -> CifarResNet:
    """A CIFAR ResNet whose blocks start with Huang et al.'s linear decay rule.

    These are the paper's defaults for a model used on its own; a config configures stochastic
    depth with the ``StochasticDepth`` plugin, which sets every block's probability itself.
    """
    check_survival_prob(survival_prob_last, "survival_prob_last")  # before a long build
    check_drop_mode(drop_mode, scaling)
    model = cifar_resnet(depth, num_classes, in_channels)
    blocks = [block for _, block in skip_blocks(model)]
    for block, survival_prob in zip(blocks, linear_decay(len(blocks), survival_prob_last)):
        block.survival_prob, block.drop_mode, block.scaling = survival_prob, drop_mode, scaling
    return model


_sd = dict(family="stochastic_depth", paper=HUANG_2016, input=ImageInput(3, 32), has_skip=True)

for depth in (110, 1202):
    summary = (
        f"ResNet-{depth} with stochastic depth: linear decay to p_L = 0.5, "
        "one gate per block per batch."
    )
    register_model(
        variant(f"resnet{depth}_sd", stochastic_depth_resnet, summary, depth=depth), **_sd
    )


# -- ImageNet ResNets --------------------------------------------------------------------------
class Bottleneck(SkipBlock):
    """1x1 reduce, 3x3, 1x1 expand (by 4), batch norm after each, ReLU after the sum.

    ``stride_at`` places a stage's stride on the 3x3 conv (torchvision's v1.5) or on the first
    1x1 conv (He et al. 2016).
    """

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, stride: int = 1, stride_at: StrideAt = "3x3"
    ) -> None:
        super().__init__()
        if stride_at not in ("3x3", "1x1"):
            raise ConfigError(f"stride_at must be '3x3' or '1x1', not {stride_at!r}")
        out_channels = width * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_at == "1x1" else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride_1x1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        same_shape = stride == 1 and in_channels == out_channels
        self.downsample = (
            nn.Identity() if same_shape else projection(in_channels, out_channels, stride)
        )

    def branch(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def shortcut(self, x: Tensor) -> Tensor:
        return self.downsample(x)

    def combine(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return F.relu(shortcut + branch)


class ResNet(nn.Module):
    """The ImageNet layout of He et al. 2016, Table 1, with torchvision's module names.

    A 7x7 stride-2 conv and a 3x3 stride-2 max pool, four stages (64, 128, 256, 512 base widths;
    stages 2-4 stride by 2 in their first block, which projects its shortcut: option B), global
    average pooling and a linear classifier.
    """

    def __init__(
        self,
        bottleneck: bool,
        blocks_per_stage: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stride_at: StrideAt = "3x3",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        _check_classes(num_classes, in_channels)
        self.num_classes, self.in_channels = num_classes, in_channels
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for stage, count in enumerate(blocks_per_stage):
            width = 64 * 2**stage
            blocks: list[SkipBlock] = []
            for i in range(count):
                stride = 2 if (i == 0 and stage > 0) else 1
                if bottleneck:
                    block: SkipBlock = Bottleneck(channels, width, stride, stride_at)
                    channels = width * Bottleneck.expansion
                else:
                    block = BasicBlock(channels, width, stride, shortcut="B")
                    channels = width
                block.stage = stage
                blocks.append(block)
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        init_conv_bn(self)
        if zero_init_residual:
            # Goyal et al. 2017: each block starts as the identity.
            for _, block in skip_blocks(self):
                nn.init.zeros_(block.bn3.weight if bottleneck else block.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_imagenet = dict(family="resnet", paper=HE_2016, input=ImageInput(3, 224), has_skip=True)

#: He et al. 2016, Table 1: bottleneck blocks or not, and the blocks of each stage.
IMAGENET: dict[str, tuple[bool, tuple[int, int, int, int]]] = {
    "resnet18": (False, (2, 2, 2, 2)),
    "resnet34": (False, (3, 4, 6, 3)),
    "resnet50": (True, (3, 4, 6, 3)),
    "resnet101": (True, (3, 4, 23, 3)),
    "resnet152": (True, (3, 8, 36, 3)),
}
for name, (bottleneck, blocks) in IMAGENET.items():
    kind = "bottleneck" if bottleneck else "basic"
    summary = f"ResNet-{name[6:]} for ImageNet: {kind} blocks {list(blocks)}."
    # A basic block has no 1x1 convolution to put the stride on.
    fixed = {} if bottleneck else {"stride_at": "3x3"}
    register_model(
        variant(name, ResNet, summary, bottleneck=bottleneck, blocks_per_stage=blocks, **fixed),
        **_imagenet,
    )


# -- pre-activation and wide ResNets -----------------------------------------------------------
class PreActBlock(SkipBlock):
    """Pre-activation unit (He et al. 2016b): BN-ReLU-conv twice (``bottleneck=False``) or
    BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 expanding by 4 (``bottleneck=True``).

    Nothing follows the addition, so the shortcut is a clean identity. Where the shape changes,
    the first BN-ReLU is shared: it runs once, before the split, and a 1x1 convolution projects
    the shortcut, as in the authors' code (so observers see the activated input there).
    ``dropout`` sits between the two 3x3 convs (the wide ResNet's dropout).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        bottleneck: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.shared_preact = stride != 1 or in_channels != out_channels
        self.bn1 = nn.BatchNorm2d(in_channels)
        if bottleneck:
            width = out_channels // 4
            # Stride on the first 1x1, as in the authors' code.
            self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv2 = conv3x3(width, width)
            self.bn3: nn.Module | None = nn.BatchNorm2d(width)
            self.conv3: nn.Module | None = nn.Conv2d(width, out_channels, 1, bias=False)
        else:
            self.conv1 = conv3x3(in_channels, out_channels, stride)
            self.bn2 = nn.BatchNorm2d(out_channels)
            self.conv2 = conv3x3(out_channels, out_channels)
            self.bn3 = self.conv3 = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.downsample = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if self.shared_preact
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.shared_preact:
            x = F.relu(self.bn1(x))
        return super().forward(x)

    def branch(self, x: Tensor) -> Tensor:
        out = self.conv1(x if self.shared_preact else F.relu(self.bn1(x)))
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        if self.conv3 is not None:
            out = self.conv3(F.relu(self.bn3(out)))
        return out

    def shortcut(self, x: Tensor) -> Tensor:
        return self.downsample(x)


class PreActResNet(nn.Module):
    """A 3x3 stem conv, three stages of pre-activation units (the first unit of stages 2 and 3
    strides by 2), a final BN-ReLU, global average pooling and a linear classifier."""

    def __init__(
        self,
        blocks_per_stage: int,
        widths: Sequence[int],
        bottleneck: bool,
        num_classes: int = 10,
        in_channels: int = 3,
        stem_width: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_classes(num_classes, in_channels)
        self.num_classes, self.in_channels = num_classes, in_channels
        self.stem = conv3x3(in_channels, stem_width)
        blocks: list[PreActBlock] = []
        channels = stem_width
        for stage, width in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if (i == 0 and stage > 0) else 1
                block = PreActBlock(channels, width, stride, bottleneck, dropout)
                block.stage = stage
                blocks.append(block)
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        init_conv_bn(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.blocks(self.stem(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def preact_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """Basic units (depth ``6n + 2``) up to 110 layers, bottlenecks (``9n + 2``) above, as in
    the paper (ResNet-110 basic; ResNet-164 and ResNet-1001 bottleneck, 64-128-256 wide)."""
    if depth <= 110:
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"a basic pre-act ResNet has depth 6n + 2, not {depth}")
        return PreActResNet((depth - 2) // 6, (16, 32, 64), False, num_classes, in_channels)
    if (depth - 2) % 9:
        raise ConfigError(f"a bottleneck pre-act ResNet has depth 9n + 2 (164, 1001), not {depth}")
    return PreActResNet((depth - 2) // 9, (64, 128, 256), True, num_classes, in_channels)


_preact = dict(family="preact_resnet", paper=HE_2016B, input=ImageInput(3, 32), has_skip=True)

#: He et al. 2016b: the depths of its CIFAR experiments.
PREACT = {
    110: "Pre-activation ResNet-110 for CIFAR: 18 basic units per stage.",
    164: "Pre-activation ResNet-164 for CIFAR: 18 bottleneck units per stage (1.7M parameters).",
    1001: "Pre-activation ResNet-1001 for CIFAR: 111 bottleneck units per stage.\n\n"
    "The paper's 10.2M counts the convolution and classifier weights; with batch norm it is 10.3M.",
}
for depth, summary in PREACT.items():
    register_model(variant(f"preact_resnet{depth}", preact_resnet, summary, depth=depth), **_preact)


_wide = dict(family="wide_resnet", paper=ZAGORUYKO_2016, input=ImageInput(3, 32), has_skip=True)


@register_model(**_wide)
def wide_resnet(
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
    num_classes: int = 10,
    in_channels: int = 3,
) -> PreActResNet:
    """WRN-d-k: pre-activation basic units, stages 16k, 32k, 64k wide, (d - 4) / 6 units each."""
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError(f"a wide ResNet has depth 6n + 4 (16, 28, 40, ...), not {depth}")
    if widen_factor < 1:
        raise ConfigError(f"widen_factor must be at least 1, got {widen_factor}")
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    return PreActResNet((depth - 4) // 6, widths, False, num_classes, in_channels, 16, dropout)


#: Zagoruyko & Komodakis 2016, Table 5: (depth, widen factor), parameters on CIFAR-10.
WIDE = {(16, 8): "11.0M", (28, 10): "36.5M", (40, 4): "8.9M"}
for (depth, widen_factor), count in WIDE.items():
    name = f"wrn_{depth}_{widen_factor}"
    summary = f"WRN-{depth}-{widen_factor} ({count} parameters on CIFAR-10)."
    register_model(
        variant(name, wide_resnet, summary, depth=depth, widen_factor=widen_factor), **_wide
    )
