"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, Sec. II-B), layer by layer as the paper has it.

C1 (6 maps, 5x5) -> S2 (2x2 subsampling) -> C3 (16 maps, 5x5, partially connected) -> S4 ->
C5 (120 maps, 5x5, giving 1x1 on the 32x32 input) -> F6 (84 units) -> output. Every unit
squashes with the paper's scaled tanh ``1.7159 * tanh(2/3 * a)``; a subsampling unit adds its
four inputs, multiplies by a trainable coefficient and adds a trainable bias.

The unusual thing is C3's connection table (Table I): each of its 16 maps sees only 3, 4 or all
6 of S2's maps, which breaks symmetry and cuts C3 to 1,516 trainable parameters. It is
implemented exactly (only the 1,500 connected weights exist) and on by default; ``c3_table=False``
connects every C3 map to every S2 map. With the table the net has the paper's 60,000 trainable
parameters: 156 + 12 + 1,516 + 32 + 48,120 + 10,164.

The output layer is the paper's Euclidean RBF units: ``y_i = sum_j (x_j - w_ij)^2`` against
fixed +1/-1 code vectors of 84 entries (the paper drew them as 7x12 bitmaps of the characters;
here they are seeded random codes of the same size). The logits are ``-y_i``, so a softmax
cross-entropy plays the part of the paper's MAP criterion. ``head="linear"`` gives a trainable
linear output layer instead.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.papers import LECUN_1998
from skipnets.registry import ImageInput, register_model

#: Table I: the S2 maps each C3 map takes its input from.
C3_TABLE: tuple[tuple[int, ...], ...] = (
    (0, 1, 2),
    (1, 2, 3),
    (2, 3, 4),
    (3, 4, 5),
    (0, 4, 5),
    (0, 1, 5),
    (0, 1, 2, 3),
    (1, 2, 3, 4),
    (2, 3, 4, 5),
    (0, 3, 4, 5),
    (0, 1, 4, 5),
    (0, 1, 2, 5),
    (0, 1, 3, 4),
    (1, 2, 4, 5),
    (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)


class ScaledTanh(nn.Module):
    """The paper's squashing function ``A tanh(S a)`` with A = 1.7159, S = 2/3 (Appendix A)."""

    def forward(self, x: Tensor) -> Tensor:
        return 1.7159 * torch.tanh(x * (2.0 / 3.0))


class Subsample(nn.Module):
    """S2/S4: the sum of each 2x2 block, times a per-map coefficient, plus a per-map bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))

    def forward(self, x: Tensor) -> Tensor:
        total = F.avg_pool2d(x, 2) * 4
        return total * self.weight[:, None, None] + self.bias[:, None, None]


class PartialConv2d(nn.Module):
    """A convolution in which output map ``o`` sees only the input maps ``table[o]``.

    Only the connected kernels are parameters; the full weight is assembled at each forward.
    """

    def __init__(self, table: tuple[tuple[int, ...], ...], in_channels: int, kernel: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = len(table)
        self.kernel = kernel
        pairs = [(o, i) for o, inputs in enumerate(table) for i in inputs]
        self.register_buffer("out_index", torch.tensor([o for o, _ in pairs]), persistent=False)
        self.register_buffer("in_index", torch.tensor([i for _, i in pairs]), persistent=False)
        self.weight = nn.Parameter(torch.empty(len(pairs), kernel, kernel))
        self.bias = nn.Parameter(torch.empty(self.out_channels))
        self.fan_in = [len(inputs) * kernel**2 for inputs in table]

    def full_weight(self) -> Tensor:
        shape = (self.out_channels, self.in_channels, self.kernel, self.kernel)
        dense = self.weight.new_zeros(shape)
        return dense.index_put((self.out_index, self.in_index), self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.full_weight(), self.bias)


class EuclideanRBF(nn.Module):
    """Output units ``y_i = ||x - w_i||^2`` against fixed +/-1 codes; returns ``-y`` as logits."""

    def __init__(self, in_features: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, 2, (num_classes, in_features), generator=generator) * 2 - 1
        self.register_buffer("codes", codes.float())

    def forward(self, x: Tensor) -> Tensor:
        return -((x[:, None, :] - self.codes) ** 2).sum(-1)


class LeNet5(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        c3_table: bool = True,
        head: Literal["rbf", "linear"] = "rbf",
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ConfigError("num_classes and in_channels must be positive")
        if head not in ("rbf", "linear"):
            raise ConfigError(f"head must be 'rbf' or 'linear', not {head!r}")
        c3 = PartialConv2d(C3_TABLE, 6, 5) if c3_table else nn.Conv2d(6, 16, 5)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),  # C1
            ScaledTanh(),
            Subsample(6),  # S2
            ScaledTanh(),
            c3,  # C3
            ScaledTanh(),
            Subsample(16),  # S4
            ScaledTanh(),
            nn.Conv2d(16, 120, 5),  # C5
            ScaledTanh(),
        )
        self.f6 = nn.Linear(120, 84)
        self.act = ScaledTanh()
        self.output = EuclideanRBF(84, num_classes) if head == "rbf" else nn.Linear(84, num_classes)
        self.num_features = 120
        self._init_weights()

    def _init_weights(self) -> None:
        """Uniform in (-2.4/F, 2.4/F), F the fan-in of the unit (Appendix A)."""
        for module in self.modules():
            if isinstance(module, PartialConv2d):
                limit = torch.tensor([2.4 / f for f in module.fan_in], device=module.bias.device)
                with torch.no_grad():
                    module.weight.uniform_(-1, 1).mul_(limit[module.out_index][:, None, None])
                    module.bias.uniform_(-1, 1).mul_(limit)
            elif isinstance(module, (nn.Conv2d, nn.Linear, Subsample)):
                fan_in = 4 if isinstance(module, Subsample) else module.weight[0].numel()
                nn.init.uniform_(module.weight, -2.4 / fan_in, 2.4 / fan_in)
                nn.init.uniform_(module.bias, -2.4 / fan_in, 2.4 / fan_in)

    def forward_features(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < 32:
            raise ConfigError(
                f"LeNet-5 takes 32x32 images, got {tuple(x.shape[-2:])}; resize the data "
                "(for Digits: data.init_args.image_size=32)"
            )
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (1, 1):
            raise ConfigError(
                f"LeNet-5 takes 32x32 images, so that C5 is 1x1; got a {tuple(x.shape[-2:])} C5 "
                "map. Resize the data (for Digits: data.init_args.image_size=32)"
            )
        return self.output(self.act(self.f6(x.flatten(1))))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(family="lenet", paper=LECUN_1998, input=ImageInput(1, 32), has_skip=False)
def lenet5(
    num_classes: int = 10,
    in_channels: int = 1,
    c3_table: bool = True,
    head: Literal["rbf", "linear"] = "rbf",
) -> LeNet5:
    """LeNet-5: C1-S2-C3-S4-C5-F6 on 32x32 images, C3's partial connection table, RBF output."""
    return LeNet5(num_classes, in_channels, c3_table, head)
