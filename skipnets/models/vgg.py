"""VGG (Simonyan & Zisserman 2015): configurations A to E of the paper's Table 1, as data.

A configuration is a list: an ``int`` is a 3x3 convolution with that many filters (stride 1,
padding 1), ``("1x1", n)`` is configuration C's 1x1 convolution, ``"M"`` a 2x2 max pooling with
stride 2 and ``"LRN"`` the local response normalisation of A-LRN. Every convolution is followed
by a ReLU (and, in the ``_bn`` variants, by batch norm before it). The classifier is the paper's
three fully connected layers (4096, 4096, classes) with dropout 0.5 after the first two.

Module names and order follow torchvision, so ``vgg11`` ... ``vgg19`` and their ``_bn`` variants
load torchvision checkpoints with ``strict=True``. Like torchvision, the head starts with an
adaptive average pooling to 7x7: the identity at the paper's 224x224 input, and what lets the
net run on smaller images.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.models.alexnet import local_response_norm
from skipnets.papers import SIMONYAN_2015
from skipnets.registry import ImageInput, register_model, variant

Layer = int | str | tuple[str, int]

#: Table 1 of the paper, one column per configuration.
CONFIGS: dict[str, list[Layer]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [
        *[64, 64, "M", 128, 128, "M"],
        *[256, 256, ("1x1", 256), "M"],
        *[512, 512, ("1x1", 512), "M"],
        *[512, 512, ("1x1", 512), "M"],
    ],
    "D": [
        *[64, 64, "M", 128, 128, "M", 256, 256, 256, "M"],
        *[512, 512, 512, "M", 512, 512, 512, "M"],
    ],
    "E": [
        *[64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M"],
        *[512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
    ],
}


def make_layers(config: Sequence[Layer], in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2, stride=2))
        elif item == "LRN":
            layers.append(local_response_norm())
        else:
            kernel, width = (1, item[1]) if isinstance(item, tuple) else (3, item)
            layers.append(nn.Conv2d(channels, width, kernel, padding=kernel // 2))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """A VGG configuration: ``features`` (convolutions), ``avgpool``, ``classifier``."""

    def __init__(
        self,
        config: Sequence[Layer],
        num_classes: int = 1000,
        in_channels: int = 3,
        batch_norm: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ConfigError("num_classes and in_channels must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.features = make_layers(config, in_channels, batch_norm)
        width = [c[1] if isinstance(c, tuple) else c for c in config if c not in ("M", "LRN")][-1]
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(width * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        self.num_features = width
        for module in self.modules():
            # The paper's footnote: Glorot's initialisation trains the deep configurations
            # from scratch, without the pre-training from configuration A it first used.
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_vgg = dict(family="vgg", paper=SIMONYAN_2015, input=ImageInput(3, 224), has_skip=False)

#: name: (configuration, torchvision's name for it, summary).
VARIANTS: dict[str, tuple[str, str | None, str]] = {
    "vgg_a": ("A", "vgg11", "VGG configuration A (VGG-11): 8 convolutions, 133M parameters."),
    "vgg_a_lrn": (
        "A-LRN",
        None,
        "VGG configuration A-LRN: A with local response normalisation after the first layer.",
    ),
    "vgg_b": ("B", "vgg13", "VGG configuration B (VGG-13): 10 convolutions, 133M parameters."),
    "vgg_c": (
        "C",
        None,
        "VGG configuration C: B plus a 1x1 convolution at the end of stages 3-5 (134M).",
    ),
    "vgg_d": ("D", "vgg16", "VGG configuration D (VGG-16): 13 convolutions, 138M parameters."),
    "vgg_e": ("E", "vgg19", "VGG configuration E (VGG-19): 16 convolutions, 144M parameters."),
}
for name, (config, torchvision_name, summary) in VARIANTS.items():
    aliases = (torchvision_name,) if torchvision_name else ()
    plain = variant(name, VGG, summary, config=CONFIGS[config], batch_norm=False)
    register_model(plain, aliases=aliases, **_vgg)
    if config == "A-LRN":  # batch norm replaced LRN: no such variant
        continue
    summary = f"VGG configuration {config} with batch norm after every convolution" + (
        f" (torchvision's {torchvision_name}_bn)." if torchvision_name else "."
    )
    aliases = (f"{torchvision_name}_bn",) if torchvision_name else ()
    with_bn = variant(f"{name}_bn", VGG, summary, config=CONFIGS[config], batch_norm=True)
    register_model(with_bn, aliases=aliases, **_vgg)
