"""The neocognitron (Fukushima 1988, "Neocognitron: A hierarchical neural network capable of
visual pattern recognition", Neural Networks 1(2)), with its cells as the paper defines them.

Four stages, each an S-layer (feature extraction) and a C-layer (tolerance to shift). An S-cell
of plane ``k`` at position ``n`` computes the paper's eq. (1)::

    u_S(k, n) = r * phi[(1 + sum_{kappa, nu} a(nu, kappa, k) u_C(kappa, n + nu))
                        / (1 + r / (1 + r) * b(k) * v_C(n)) - 1],        phi(x) = max(x, 0)

with non-negative excitatory weights ``a``, a non-negative inhibitory weight ``b`` and the
selectivity ``r`` of the layer. The divisive inhibition comes from a V-cell, the weighted root
mean square of the same inputs, ``v_C(n) = sqrt(sum_{kappa, nu} c(nu) u_C(kappa, n + nu)^2)``,
with fixed weights ``c`` that decrease away from the centre and sum to 1. A C-cell blurs and
subsamples the S-planes it is wired to with fixed weights ``d`` that also decrease away from the
centre, and saturates: ``u_C = psi[sum d(nu) u_S(n + nu)]``, ``psi(x) = phi(x) / (1 + phi(x))``.
Several S-planes may feed one C-plane (the paper merges S-planes that detect variants of one
feature); here each C-plane takes a fixed, contiguous group of S-planes.

The default layout follows descriptions of the 1988 numeral recogniser: a 19x19 input, maps of
19 -> 11 -> 7 -> 3 -> 1 cells across the C-layers, and 12/8, 38/19, 35/23, 11/10 S-/C-planes.

What differs from the original: the paper trains ``a`` and ``b`` layer by layer, reinforcing
the weights of the S-cell chosen for each training pattern in proportion to its inputs
(``delta a = q * c(nu) * u_C``, ``delta b = q * v_C``), with a teacher picking the features.
Here ``a`` and ``b`` are learned by backpropagation through the whole network, kept positive
by learning their logarithms. ``a`` starts log-normal (a few strong connections per cell, so
that the S-planes start out different) and ``b`` at a fifth of ``sqrt(sum(a^2 / c))``, the
value the paper's reinforcement leads to, so cells start broadly tuned and training sharpens
them. The class is read off the last C-layer by batch-standardising its responses and a linear
layer, where the paper takes its most active cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skipnets.errors import ConfigError
from skipnets.papers import FUKUSHIMA_1988
from skipnets.registry import ImageInput, register_model


def decreasing_profile(kernel: int, spread: float = 0.5) -> Tensor:
    """Fixed weights over a ``kernel`` x ``kernel`` window, largest at the centre, summing to 1."""
    offsets = torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2
    radius2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    scale = max((kernel - 1) / 2, 1.0)
    profile = torch.exp(-radius2 / (2 * (spread * scale) ** 2 + 1e-12))
    return profile / profile.sum()


class SLayer(nn.Module):
    """S-cells (eq. 1) with their V-cells, over all ``in_planes`` C-planes of the layer below."""

    def __init__(
        self,
        in_planes: int,
        planes: int,
        kernel: int,
        padding: int,
        selectivity: float,
        init_spread: float = 1.0,
        init_inhibition: float = 0.2,
        init_gain: float = 10.0,
    ) -> None:
        super().__init__()
        if selectivity <= 0:
            raise ConfigError(f"S-cell selectivity must be positive, got {selectivity}")
        self.selectivity = selectivity
        self.padding = padding
        fan_in = in_planes * kernel * kernel
        # Log-normal starting weights: without a few strong connections per cell, all S-planes
        # start out measuring the same local mean.
        log_a = torch.randn(planes, in_planes, kernel, kernel) * init_spread + math.log(
            init_gain / fan_in
        )
        c = decreasing_profile(kernel).expand(1, in_planes, kernel, kernel) / in_planes
        self.register_buffer("c", c.clone())
        # b = sqrt(sum(a^2 / c)) is where the paper's reinforcement (delta a = q c u, delta b =
        # q v) leads: the cell then fires when the c-weighted cosine between its input and a
        # exceeds about r / (1 + r). A fraction of it starts the cells broadly tuned.
        log_b = 0.5 * ((2 * log_a).exp() / c).sum(dim=(1, 2, 3)).log() + math.log(init_inhibition)
        self.log_a = nn.Parameter(log_a)
        self.log_b = nn.Parameter(log_b)

    @property
    def a(self) -> Tensor:
        return self.log_a.exp()

    @property
    def b(self) -> Tensor:
        return self.log_b.exp()

    def v_cells(self, u: Tensor) -> Tensor:
        # clamp: the root's gradient is infinite at 0, where no input is active.
        return F.conv2d(u * u, self.c, padding=self.padding).clamp_min(1e-12).sqrt()

    def forward(self, u: Tensor) -> Tensor:
        r = self.selectivity
        excitation = F.conv2d(u, self.a, padding=self.padding)
        inhibition = (r / (1 + r)) * self.b[:, None, None] * self.v_cells(u)
        return r * F.relu((1 + excitation) / (1 + inhibition) - 1)


class CLayer(nn.Module):
    """C-cells: fixed blurring weights ``d`` over a group of S-planes, then ``psi``."""

    def __init__(self, in_planes: int, planes: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        if planes > in_planes:
            raise ConfigError(
                f"a C-layer cannot have more planes ({planes}) than the S-layer below ({in_planes})"
            )
        self.stride = stride
        self.padding = padding
        wiring = torch.zeros(planes, in_planes)
        for plane, group in enumerate(torch.arange(in_planes).tensor_split(planes)):
            wiring[plane, group] = 1.0 / len(group)
        d = wiring[:, :, None, None] * decreasing_profile(kernel)
        self.register_buffer("d", d)

    def forward(self, u: Tensor) -> Tensor:
        x = F.relu(F.conv2d(u, self.d, stride=self.stride, padding=self.padding))
        return x / (1 + x)


#: One stage: S-planes, S kernel, S padding, C-planes, C kernel, C stride, C padding.
Stage = tuple[int, int, int, int, int, int, int]

STAGES_1988: tuple[Stage, ...] = (
    (12, 3, 1, 8, 5, 2, 3),  # 19x19 -> 11x11
    (38, 5, 2, 19, 5, 2, 3),  # 11x11 -> 7x7
    (35, 5, 2, 23, 5, 2, 1),  # 7x7 -> 3x3
    (11, 3, 0, 10, 1, 1, 0),  # 3x3 -> 1x1
)


class Neocognitron(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        selectivity: Sequence[float] = (4.0, 1.5, 1.5, 1.0),
        stages: Sequence[Stage] = STAGES_1988,
    ) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ConfigError("num_classes and in_channels must be positive")
        if len(selectivity) != len(stages):
            raise ConfigError(
                f"give one selectivity per stage ({len(stages)}), got {len(selectivity)}"
            )
        layers: list[nn.Module] = []
        planes = in_channels
        for r, (s_planes, s_kernel, s_pad, c_planes, c_kernel, stride, c_pad) in zip(
            selectivity, stages
        ):
            layers.append(SLayer(planes, s_planes, s_kernel, s_pad, r))
            layers.append(CLayer(s_planes, c_planes, c_kernel, stride, c_pad))
            planes = c_planes
        self.features = nn.Sequential(*layers)
        # The top C-cells' responses are small and close together; standardising them (batch
        # statistics) before the linear readout lets their differences reach the loss. Their
        # scale moves fast while a and b train: a high momentum keeps the running statistics
        # used at test time up to date.
        self.readout = nn.Sequential(
            nn.BatchNorm1d(planes, momentum=0.5), nn.Linear(planes, num_classes)
        )
        self.num_features = planes
        self.input_size = 19 if tuple(stages) == STAGES_1988 else None

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (1, 1):
            expected = f"{self.input_size}x{self.input_size} " if self.input_size else ""
            raise ConfigError(
                f"the neocognitron's last C-layer must be 1x1, got {tuple(x.shape[-2:])}: "
                f"give it {expected}images (for Digits: data.init_args.image_size=19)"
            )
        return self.readout(x.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(
    family="neocognitron", paper=FUKUSHIMA_1988, input=ImageInput(1, 19), has_skip=False
)
def neocognitron(
    num_classes: int = 10,
    in_channels: int = 1,
    selectivity: tuple[float, float, float, float] = (4.0, 1.5, 1.5, 1.0),
) -> Neocognitron:
    """Neocognitron: S-cells with V-cell divisive inhibition, blurring C-cells; backprop-trained."""
    return Neocognitron(num_classes, in_channels, selectivity)
