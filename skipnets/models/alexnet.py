"""AlexNet (Krizhevsky, Sutskever & Hinton 2012), its single-stream torchvision variant, and
ZF-Net (Zeiler & Fergus 2014).

All three are five convolutions and three fully connected layers; ``forward_features`` ends
after the last max pooling, ``forward_head`` is an adaptive average pooling to 6x6 (the identity
at the papers' input sizes; it lets the nets run on smaller images) and the classifier.
"""

from __future__ import annotations

from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.papers import KRIZHEVSKY_2012, ZEILER_2014
from skipnets.registry import ImageInput, register_model


def local_response_norm() -> nn.LocalResponseNorm:
    """AlexNet's response normalisation: ``b = a / (k + alpha * sum(a^2))^beta`` over 5 maps,
    k = 2, alpha = 1e-4, beta = 0.75.

    torch divides ``alpha`` by the window size (``alpha / n * sum``), the paper does not, hence
    ``alpha = 5 * 1e-4`` here.
    """
    return nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)


class ConvNet(nn.Module):
    """``features`` -> adaptive average pooling to 6x6 -> ``classifier``."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = classifier
        self.num_features = 256

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check(num_classes: int, in_channels: int, dropout: float) -> None:
    if num_classes < 1 or in_channels < 1:
        raise ConfigError("num_classes and in_channels must be positive")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")


def _dense_head(num_classes: int, dropout: float) -> nn.Sequential:
    """FC6 and FC7 (4096 units, ReLU, dropout on their outputs) and the class layer."""
    return nn.Sequential(
        nn.Linear(256 * 6 * 6, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(4096, num_classes),
    )


@register_model(family="alexnet", paper=KRIZHEVSKY_2012, input=ImageInput(3, 227), has_skip=False)
def alexnet(
    num_classes: int = 1000, in_channels: int = 3, two_groups: bool = True, dropout: float = 0.5
) -> ConvNet:
    """AlexNet as in the 2012 paper: LRN after conv1 and conv2, overlapping 3x3/2 pooling, and
    (``two_groups``) the two-GPU split: conv2, conv4 and conv5 see only their own GPU's half of
    the maps (grouped convolutions, 61.0M parameters; 62.4M without the split).

    The input is 227x227: the paper's figure says 224, but 11x11 kernels with stride 4 give its
    55x55 maps only from 227. Weights start from N(0, 0.01); the biases of conv2, conv4, conv5
    and the hidden dense layers start at 1, the others at 0, as in the paper.
    """
    _check(num_classes, in_channels, dropout)
    groups = 2 if two_groups else 1
    features = nn.Sequential(
        nn.Conv2d(in_channels, 96, 11, stride=4),
        nn.ReLU(inplace=True),
        local_response_norm(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(96, 256, 5, padding=2, groups=groups),
        nn.ReLU(inplace=True),
        local_response_norm(),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(256, 384, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=groups),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=groups),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2),
    )
    model = ConvNet(features, _dense_head(num_classes, dropout))
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for index, layer in enumerate(layers):
        nn.init.normal_(layer.weight, std=0.01)
        # conv2, conv4, conv5, fc6, fc7: a positive start for the ReLUs that follow.
        nn.init.constant_(layer.bias, 1.0 if index in (1, 3, 4, 5, 6) else 0.0)
    return model


@register_model(family="alexnet", paper=KRIZHEVSKY_2012, input=ImageInput(3, 224), has_skip=False)
def alexnet_tv(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> ConvNet:
    """AlexNet as torchvision ships it: one stream with 64/192/384/256/256 filters, no LRN,
    dropout before the dense layers; loads torchvision's ``alexnet`` checkpoints."""
    _check(num_classes, in_channels, dropout)
    features = nn.Sequential(
        nn.Conv2d(in_channels, 64, 11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2),
    )
    classifier = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(256 * 6 * 6, 4096),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(4096, 4096),
        nn.ReLU(inplace=True),
        nn.Linear(4096, num_classes),
    )
    return ConvNet(features, classifier)


@register_model(family="alexnet", paper=ZEILER_2014, input=ImageInput(3, 224), has_skip=False)
def zfnet(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> ConvNet:
    """ZF-Net (Zeiler & Fergus, Fig. 3): AlexNet with a 7x7 stride-2 first layer (instead of
    11x11 stride 4, which their deconvnet showed aliasing), a stride-2 second layer, and
    layers 3-5 densely connected (one GPU, no two-group split).

    Maps: 224 -> 110 (conv1) -> 55 (pool) -> 26 (conv2) -> 13 (pool) -> 13 -> 6. The pools use
    ceil mode to reach the paper's 55 and 13. Weights start from N(0, 0.01), biases at 0. The
    paper's renormalisation of conv filters whose RMS exceeds 0.1 is a training procedure and
    not part of the model.
    """
    _check(num_classes, in_channels, dropout)
    features = nn.Sequential(
        nn.Conv2d(in_channels, 96, 7, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        local_response_norm(),
        nn.Conv2d(96, 256, 5, stride=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        local_response_norm(),
        nn.Conv2d(256, 384, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
    )
    model = ConvNet(features, _dense_head(num_classes, dropout))
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
    return model
