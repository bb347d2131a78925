"""airbench94 (Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU", arXiv:2404.00498).

A small VGG-like network whose unusual parts all serve speed:

- **A frozen whitening layer.** The first layer is a 2x2 convolution without padding whose 24
  filters are the 12 eigenvectors of the covariance of the training images' 2x2 patches, each
  scaled by ``1 / sqrt(eigenvalue + 5e-4)``, and their negatives (so that the GELU after it keeps
  both signs). Its weights come from data (``init_from_data``) and are never trained; its bias
  (zero at first) is trained for the first 3 epochs only (``parameter_epochs``).
- **Identity-initialised convolutions.** Each 3x3 convolution starts with its first ``in``
  filters set to the identity (``dirac_``): an implicit residual path at initialisation. The
  second convolution of each block keeps its input's shape, so it is a ``plain`` skip block here
  (lesioning it passes its input through).
- **BatchNorm without a trained scale**: its weight stays at 1 (frozen) and only its bias trains;
  ``eps`` is 1e-12. Airbench's "momentum 0.6" is the weight of the *old* running statistic
  (Keras' convention): PyTorch's ``momentum`` weighs the new batch, so the layers here get
  ``momentum=1 - 0.6 = 0.4`` (airbench's own code does the same conversion).
- Three blocks ``conv -> 2x2 max pool -> BN -> GELU -> conv -> BN -> GELU`` of widths 64, 256 and
  256, then a global max pool, a linear head without bias and logits scaled by 1/9.

The rest of airbench's recipe (alternating flip, lookahead EMA, test-time augmentation, decoupled
hyperparameters) lives in the data module, the ``EMA`` callback and the ``Classifier``; see
``configs/papers/airbench94_cifar10.yaml``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock
from skipnets.papers import JORDAN_2024
from skipnets.registry import ImageInput, register_model

WHITENING_EPS = 5e-4  # added to each eigenvalue before scaling its eigenvector


def batch_norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm with a frozen unit scale; ``momentum`` in airbench's (Keras') convention."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - momentum)
    norm.weight.requires_grad_(False)
    return norm


def identity_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 'same' convolution without bias whose first ``in_channels`` filters are the
    identity and the rest PyTorch's default initialisation."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:in_channels])
    return conv


class SameShapeLayer(SkipBlock):
    """``gelu(bn(conv(x)))`` with as many channels out as in: a plain skip block."""

    kind = "plain"

    def __init__(self, channels: int, momentum: float) -> None:
        super().__init__()
        self.conv = identity_conv(channels, channels)
        self.norm = batch_norm(channels, momentum)
        self.act = nn.GELU()

    def branch(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))

    def combine(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return branch

    def bypass(self, x: Tensor, shortcut: Tensor) -> Tensor:
        return x


class ConvGroup(nn.Module):
    """``conv -> 2x2 max pool -> BN -> GELU``, then a same-shape ``conv -> BN -> GELU``."""

    def __init__(self, in_channels: int, out_channels: int, momentum: float, stage: int) -> None:
        super().__init__()
        self.conv = identity_conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm = batch_norm(out_channels, momentum)
        self.act = nn.GELU()
        self.layer = SameShapeLayer(out_channels, momentum)
        self.layer.stage = stage

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.act(self.norm(self.pool(self.conv(x)))))


class Airbench(nn.Module):
    """airbench94's network; see the module docstring.

    Data-dependent initialisation: ``init_from_data(images)`` sets the whitening filters from a
    batch of normalised training images (the ``Classifier`` calls it at the start of ``fit``
    with ``init_data_size`` of them). ``parameter_epochs`` names the parameters trained for only
    the first N epochs (the ``Classifier`` stops updating them after that).
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 256, 256),
        num_classes: int = 10,
        in_channels: int = 3,
        batchnorm_momentum: float = 0.6,
        logit_scale: float = 1 / 9,
        whiten_bias_epochs: int = 3,
        whitening_images: int = 5000,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ConfigError(f"widths needs three positive channel counts, got {list(widths)}")
        if num_classes < 1 or in_channels < 1:
            raise ConfigError("num_classes and in_channels must be positive")
        if not 0.0 <= batchnorm_momentum < 1.0:
            raise ConfigError(
                f"batchnorm_momentum is the weight of the old running statistics (airbench: "
                f"0.6) and must be in [0, 1), got {batchnorm_momentum}"
            )
        if whiten_bias_epochs < 0 or whitening_images < 1:
            raise ConfigError("whiten_bias_epochs must be >= 0 and whitening_images positive")
        kernel = 2
        whiten_width = 2 * in_channels * kernel * kernel
        self.whiten = nn.Conv2d(in_channels, whiten_width, kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        with torch.no_grad():
            self.whiten.bias.zero_()
        self.act = nn.GELU()
        channels = [whiten_width, *widths]
        self.blocks = nn.Sequential(
            *(
                ConvGroup(channels[i], channels[i + 1], batchnorm_momentum, stage=i)
                for i in range(3)
            )
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.init_data_size = whitening_images
        self.parameter_epochs = {"whiten.bias": whiten_bias_epochs}

    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        """Set the whitening filters from normalised training images ``(N, C, H, W)``.

        The filters are the eigenvectors of the (uncentred) covariance of every 2x2 patch of the
        images, largest eigenvalue first, each divided by ``sqrt(eigenvalue + 5e-4)``, followed
        by their negatives.
        """
        weight = self.whiten.weight
        _, channels, kh, kw = weight.shape
        if images.ndim != 4 or images.shape[1] != channels:
            raise ConfigError(
                f"init_from_data needs images of shape (N, {channels}, H, W), "
                f"got {tuple(images.shape)}"
            )
        patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # N, C, H', W', kh, kw
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * kh * kw)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        filters = eigenvectors.T / (eigenvalues + WHITENING_EPS).sqrt()[:, None]
        filters = filters.reshape(-1, channels, kh, kw)
        weight.copy_(torch.cat([filters, -filters]).to(weight.dtype))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.act(self.whiten(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1)) * self.logit_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(family="airbench", paper=JORDAN_2024, input=ImageInput(3, 32), has_skip=False)
def airbench94(
    widths: Sequence[int] = (64, 256, 256),
    batchnorm_momentum: float = 0.6,
    logit_scale: float = 1 / 9,
    whiten_bias_epochs: int = 3,
    whitening_images: int = 5000,
    num_classes: int = 10,
    in_channels: int = 3,
) -> Airbench:
    """airbench94: frozen 2x2 patch-whitening layer, GELU, three conv blocks, logits / 9."""
    return Airbench(
        widths,
        num_classes,
        in_channels,
        batchnorm_momentum,
        logit_scale,
        whiten_bias_epochs,
        whitening_images,
    )
