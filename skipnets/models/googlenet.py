"""GoogLeNet (Szegedy et al. 2015, "Going Deeper with Convolutions"), Table 1 and Fig. 3.

A stem (7x7/2 convolution, 3x3/2 max pooling, LRN, 1x1 and 3x3 convolutions, LRN, pooling),
nine inception modules (3a-3b, 4a-4e, 5a-5b) with max pooling between the stages, global average
pooling, dropout 0.4 and one linear layer. An inception module concatenates four branches: 1x1;
1x1 then 3x3; 1x1 then 5x5; 3x3 max pooling then a 1x1 projection.

Two auxiliary classifiers (after 4a and 4d: 5x5/3 average pooling, a 1x1 convolution with 128
filters, a 1024-unit dense layer, dropout 0.7, a linear layer) exist when ``aux_logits`` is set.
They run only in training; their logits of the last training forward are kept in
``aux_outputs`` and ``aux_loss(target)`` gives the paper's discounted loss
``0.3 * (CE(aux1) + CE(aux2))`` for a training step to add.

The unusual thing: the paper's third branch is a 5x5 convolution, but torchvision's GoogLeNet
uses a 3x3 there (a known discrepancy, kept for the sake of its pretrained weights). ``torchvision_compat
=True`` builds torchvision's network instead - the 3x3 branch, batch norm after every
convolution (eps 1e-3, no conv biases), no LRN, a 2x2 pool before stage 5, dropout 0.2, adaptive
4x4 pooling in the auxiliary heads - with torchvision's module names, so its checkpoints load
with ``strict=True``. Its ``transform_input`` turns ImageNet-normalised input into the [-1, 1]
scaling the original weights expect, as torchvision does for its pretrained model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.papers import SZEGEDY_2015
from skipnets.registry import ImageInput, register_model

#: Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}

#: The stride-2 max pooling that follows these modules (in the order of the forward pass).
_POOL_AFTER = {"3b": "maxpool3", "4e": "maxpool4"}


class ConvUnit(nn.Module):
    """Convolution and ReLU; with ``batch_norm`` a bias-free convolution, batch norm, ReLU."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, batch_norm: bool, **kwargs
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, bias=not batch_norm, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3) if batch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True)


class Inception(nn.Module):
    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, int, int, int, int, int],
        batch_norm: bool,
        wide_kernel: int,
    ) -> None:
        super().__init__()
        ch1, red3, ch3, red5, ch5, proj = widths
        self.branch1 = ConvUnit(in_channels, ch1, 1, batch_norm)
        self.branch2 = nn.Sequential(
            ConvUnit(in_channels, red3, 1, batch_norm),
            ConvUnit(red3, ch3, 3, batch_norm, padding=1),
        )
        self.branch3 = nn.Sequential(
            ConvUnit(in_channels, red5, 1, batch_norm),
            ConvUnit(red5, ch5, wide_kernel, batch_norm, padding=wide_kernel // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
            ConvUnit(in_channels, proj, 1, batch_norm),
        )
        self.out_channels = ch1 + ch3 + ch5 + proj

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.branch1, self.branch2, self.branch3, self.branch4)
        return torch.cat([branch(x) for branch in branches], dim=1)


class AuxHead(nn.Module):
    """An auxiliary classifier: pool to 4x4, 1x1 conv (128), dense (1024), dropout, linear."""

    def __init__(
        self, in_channels: int, num_classes: int, batch_norm: bool, paper_pooling: bool
    ) -> None:
        super().__init__()
        self.paper_pooling = paper_pooling
        self.conv = ConvUnit(in_channels, 128, 1, batch_norm)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(0.7)

    def forward(self, x: Tensor) -> Tensor:
        # The paper's 5x5/3 average pooling maps 14x14 (224x224 input) to 4x4; torchvision
        # pools adaptively. The adaptive pooling after the paper's keeps other inputs working.
        if self.paper_pooling and min(x.shape[-2:]) >= 5:
            x = F.avg_pool2d(x, 5, stride=3)
        x = F.adaptive_avg_pool2d(x, 4)
        x = self.conv(x).flatten(1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


@register_model(
    name="googlenet",
    family="googlenet",
    paper=SZEGEDY_2015,
    input=ImageInput(3, 224),
    has_skip=False,
)
class GoogLeNet(nn.Module):
    """GoogLeNet (Inception v1): nine inception modules with the paper's 5x5 branch; options for
    the auxiliary classifiers and for torchvision's 3x3-branch, batch-norm variant."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        aux_logits: bool = False,
        torchvision_compat: bool = False,
        transform_input: bool = False,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ConfigError("num_classes and in_channels must be positive")
        if transform_input and (not torchvision_compat or in_channels != 3):
            raise ConfigError("transform_input needs torchvision_compat=True and RGB input")
        dropout = (0.2 if torchvision_compat else 0.4) if dropout is None else dropout
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        bn = torchvision_compat
        self.transform_input = transform_input
        self.aux_logits = aux_logits
        self.conv1 = ConvUnit(in_channels, 64, 7, bn, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = ConvUnit(64, 64, 1, bn)
        self.conv3 = ConvUnit(64, 192, 3, bn, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        # The paper's stem normalises after the first pooling and after conv3 (as in Caffe's
        # model: 5 maps, alpha 1e-4, beta 0.75, k 1).
        self.norm1 = None if bn else nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        self.norm2 = None if bn else nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        channels = 192
        self.stages: list[str] = []
        for name, widths in INCEPTION.items():
            module = Inception(channels, widths, bn, 3 if torchvision_compat else 5)
            self.add_module(f"inception{name}", module)
            self.stages.append(f"inception{name}")
            channels = module.out_channels
            if name in _POOL_AFTER:
                # torchvision pools 2x2 before stage 5 where the paper pools 3x3/2.
                kernel = 2 if (name == "4e" and torchvision_compat) else 3
                pool = nn.MaxPool2d(kernel, stride=2, ceil_mode=True)
                self.add_module(_POOL_AFTER[name], pool)
                self.stages.append(_POOL_AFTER[name])
        if aux_logits:
            self.aux1 = AuxHead(512, num_classes, bn, paper_pooling=not torchvision_compat)
            self.aux2 = AuxHead(528, num_classes, bn, paper_pooling=not torchvision_compat)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.aux_outputs: tuple[Tensor, Tensor] | None = None
        for module in self.modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if torchvision_compat:  # torchvision's own initialisation
                nn.init.trunc_normal_(module.weight, std=0.01, a=-2, b=2)
            else:  # the Caffe reference model's: Xavier weights, biases 0.2
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0.0 if torchvision_compat else 0.2)

    def _transform(self, x: Tensor) -> Tensor:
        # ImageNet mean/std normalisation -> (x - 0.5) / 0.5, per channel.
        mean = x.new_tensor([0.485, 0.456, 0.406])[:, None, None]
        std = x.new_tensor([0.229, 0.224, 0.225])[:, None, None]
        return x * (std / 0.5) + (mean - 0.5) / 0.5

    def forward_features(self, x: Tensor) -> Tensor:
        if self.transform_input:
            x = self._transform(x)
        x = self.maxpool1(self.conv1(x))
        if self.norm1 is not None:
            x = self.norm1(x)
        x = self.conv3(self.conv2(x))
        if self.norm2 is not None:
            x = self.norm2(x)
        x = self.maxpool2(x)
        aux = []
        for name in self.stages:
            x = getattr(self, name)(x)
            if self.training and self.aux1 is not None and name in ("inception4a", "inception4d"):
                aux.append((self.aux1 if name == "inception4a" else self.aux2)(x))
        self.aux_outputs = (aux[0], aux[1]) if aux else None
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.avgpool(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def aux_loss(self, target: Tensor, weight: float = 0.3) -> Tensor:
        """The auxiliary classifiers' loss for the last training forward (0 when there is none)."""
        if self.aux_outputs is None:
            return target.new_zeros((), dtype=torch.float32)
        return weight * sum(F.cross_entropy(logits, target) for logits in self.aux_outputs)
