"""Network in Network (Lin, Chen & Yan 2014), the CIFAR-10 model.

Three mlpconv layers, each a spatial convolution followed by two 1x1 convolutions (the
"micro network", a small MLP slid over the image), all with ReLUs. The unusual thing is the
head: no fully connected layer. The last 1x1 convolution emits one map per class and global
average pooling turns each map into that class's score, so ``forward_head`` has no parameters.

Layer sizes follow the authors' released CIFAR-10 model: 192-160-96 (5x5), max pooling,
192-192-192 (5x5), average pooling, 192-192-classes (3x3); 3x3 stride-2 pools in Caffe's
ceil mode (32 -> 16 -> 8), dropout 0.5 after the first two mlpconv layers. The released
model's hand-set Gaussian initial weights are not in the paper; He initialisation is used.
"""

from __future__ import annotations

from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.papers import LIN_2014
from skipnets.registry import ImageInput, register_model


def mlpconv(in_channels: int, widths: tuple[int, int, int], kernel: int) -> list[nn.Module]:
    """One mlpconv layer: a ``kernel`` x ``kernel`` convolution, then two 1x1 convolutions."""
    first, second, third = widths
    return [
        nn.Conv2d(in_channels, first, kernel, padding=kernel // 2),
        nn.ReLU(inplace=True),
        nn.Conv2d(first, second, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(second, third, 1),
        nn.ReLU(inplace=True),
    ]


class NiN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ConfigError("num_classes and in_channels must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.features = nn.Sequential(
            *mlpconv(in_channels, (192, 160, 96), 5),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            nn.Dropout(dropout),
            *mlpconv(96, (192, 192, 192), 5),
            nn.AvgPool2d(3, stride=2, ceil_mode=True, count_include_pad=False),
            nn.Dropout(dropout),
            *mlpconv(192, (192, 192, num_classes), 3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = num_classes
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.pool(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(family="nin", paper=LIN_2014, input=ImageInput(3, 32), has_skip=False)
def nin(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5) -> NiN:
    """Network in Network for CIFAR: three mlpconv layers, global average pooling as the head."""
    return NiN(num_classes, in_channels, dropout)
