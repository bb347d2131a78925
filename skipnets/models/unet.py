"""U-Net (Ronneberger, Fischer & Brox 2015) for per-pixel classification.

The contracting path repeats two 3x3 convolutions with ReLU and a 2x2 max pooling, doubling the
width at each level (64, 128, 256, 512, 1024 for ``depth=5``); the expanding path upsamples with
a 2x2 up-convolution that halves the width, concatenates the encoder's maps of the same level,
and applies two 3x3 convolutions. A 1x1 convolution gives one score map per class.

The unusual thing is the paper's unpadded ("valid") convolutions: each one trims a pixel off
every border, so the output is smaller than the input (572 -> 388 for ``depth=5``) and the
encoder's maps are centre-cropped before they are concatenated. ``padding="same"`` keeps the
sizes instead. ``output_size(n)`` says what an ``n``x``n`` input gives.

The long skip connections are skip blocks of kind ``dense``: the block of level ``d`` takes that
level's encoder maps ``x``, its branch runs everything below (pool, deeper levels, up-conv), and
it outputs ``cat([crop(x), branch(x)])``. Lesioning a level therefore cuts off the levels below
it (their features become zeros), which is how one asks how much the deep, coarse path adds.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock
from skipnets.papers import RONNEBERGER_2015
from skipnets.registry import ImageInput, register_model

Padding = Literal["valid", "same"]


def double_conv(
    in_channels: int, out_channels: int, padding: int, batch_norm: bool
) -> nn.Sequential:
    layers: list[nn.Module] = []
    for channels in (in_channels, out_channels):
        layers.append(nn.Conv2d(channels, out_channels, 3, padding=padding, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def center_crop(x: Tensor, height: int, width: int) -> Tensor:
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class UNetLevel(SkipBlock):
    """The long skip connection of one level: ``cat([crop(x), up(deeper(pool(x)))])``."""

    kind = "dense"

    def __init__(
        self,
        level: int,
        widths: list[int],
        padding: int,
        batch_norm: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.stage = level
        self.shrink = 0 if padding else 4
        inner_width = widths[level + 1]
        self.pool = nn.MaxPool2d(2, stride=2)
        self.encode = double_conv(widths[level], inner_width, padding, batch_norm)
        bottom = level + 2 == len(widths)
        # The paper's dropout sits at the end of the contracting path.
        self.dropout = nn.Dropout(dropout) if bottom and dropout > 0 else nn.Identity()
        self.inner = None if bottom else UNetLevel(level + 1, widths, padding, batch_norm, dropout)
        self.decode = (
            None if bottom else double_conv(2 * inner_width, inner_width, padding, batch_norm)
        )
        self.up = nn.ConvTranspose2d(inner_width, widths[level], 2, stride=2)
        self.out_channels = 2 * widths[level]

    def branch(self, x: Tensor) -> Tensor:
        x = self.dropout(self.encode(self.pool(x)))
        if self.inner is not None:
            x = self.decode(self.inner(x))
        return self.up(x)

    def combine(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return torch.cat([center_crop(shortcut, *branch.shape[-2:]), branch], dim=1)

    def bypass(self, x: Tensor, shortcut: Tensor) -> Tensor:
        height, width = self.branch_size(x.shape[-2]), self.branch_size(x.shape[-1])
        zeros = x.new_zeros(x.shape[0], self.up.out_channels, height, width)
        return self.combine(shortcut, zeros)

    def branch_size(self, size: int) -> int:
        """The side of the branch's output for an input of side ``size``."""
        size = size // 2 - self.shrink
        if self.inner is not None:
            size = self.inner.branch_size(size) - self.shrink
        return 2 * size


@register_model(
    name="unet",
    family="unet",
    paper=RONNEBERGER_2015,
    input=ImageInput(1, 572),
    has_skip=True,
    task="segmentation",
)
class UNet(nn.Module):
    """U-Net: contracting and expanding paths joined by cropped, concatenated skip connections."""

    def __init__(
        self,
        num_classes: int = 2,
        in_channels: int = 1,
        depth: int = 5,
        base_width: int = 64,
        padding: Padding = "valid",
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1 or base_width < 1:
            raise ConfigError("num_classes, in_channels and base_width must be positive")
        if depth < 2:
            raise ConfigError(f"depth counts resolution levels and must be at least 2, got {depth}")
        if padding not in ("valid", "same"):
            raise ConfigError(f"padding must be 'valid' or 'same', not {padding!r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        pad = 0 if padding == "valid" else 1
        widths = [base_width * 2**level for level in range(depth)]
        self.padding = padding
        self.depth = depth
        self.stem = double_conv(in_channels, widths[0], pad, batch_norm)
        self.skip = UNetLevel(0, widths, pad, batch_norm, dropout)
        self.decode = double_conv(2 * widths[0], widths[0], pad, batch_norm)
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.num_features = widths[0]
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                # The paper: Gaussian with std sqrt(2 / N), N the inputs of one unit.
                fan_in = module.weight[0].numel()
                if isinstance(module, nn.ConvTranspose2d):
                    fan_in = module.weight.shape[0] * module.weight[0, 0].numel()
                nn.init.normal_(module.weight, std=(2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def output_size(self, size: int) -> int:
        """The side of the output for a ``size`` x ``size`` input (smaller for valid padding)."""
        shrink = self.skip.shrink
        out = self.skip.branch_size(size - shrink) - shrink
        if out < 1:
            raise ConfigError(f"a {size}x{size} input is too small for this U-Net")
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        return self.decode(self.skip(self.stem(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
