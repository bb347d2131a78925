"""Skip blocks with nothing attached against hand-written blocks with the same weights.

Two shapes: the CIFAR ResNet-56 (conv blocks, where the arithmetic dominates) and a 20-layer
fully connected net of width 256 at batch 64 (small blocks, where any per-block Python shows).
Training-mode forward and backward, interleaved repeats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import Row, fwd_bwd, interleaved, rate


class HandBasicBlock(nn.Module):
    """He et al.'s basic block written out, option-A shortcut where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.stride != 1 or self.extra:
            x = x[:, :, :: self.stride, :: self.stride]
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + x)


class HandResNet(nn.Module):
    def __init__(self, n: int = 9, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        blocks, channels = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(HandBasicBlock(channels, width, 2 if (i == 0 and stage) else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1))


class HandMLP(nn.Module):
    def __init__(self, in_features: int, width: int, depth: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(in_features, width), nn.ReLU())
        self.blocks = nn.Sequential(
            *(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth - 2))
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x.flatten(1))))


def _copy_weights(source: nn.Module, target: nn.Module) -> None:
    """Same tensors in the same order (the two networks register their layers alike)."""
    ours = list(source.state_dict().values())
    theirs = target.state_dict()
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    target.load_state_dict(dict(zip(theirs, ours)))


def main(quick: bool = False) -> list[Row]:
    from skipnets.registry import create_model

    rows = []
    torch.manual_seed(0)
    cases = {
        "resnet56 blocks (batch 32, 16px)": (
            create_model("resnet56"),
            HandResNet(9),
            torch.randn(32, 3, 16, 16),
        ),
        "plain_mlp 20 x 256 blocks (batch 64)": (
            create_model("plain_mlp", depth=20, width=256, in_features=64),
            HandMLP(64, 256, 20, 10),
            torch.randn(64, 64),
        ),
    }
    for label, (ours, theirs, x) in cases.items():
        _copy_weights(ours, theirs)
        ours.train(), theirs.train()
        assert torch.allclose(ours(x), theirs(x), atol=1e-5), (
            "the two networks must compute the same"
        )
        calls = 3 if quick else 20
        best = interleaved(
            {
                "skipnets": lambda m=ours, x=x, n=calls: rate(
                    lambda: [fwd_bwd(m, x) for _ in range(n)], n
                ),
                "hand-written": lambda m=theirs, x=x, n=calls: rate(
                    lambda: [fwd_bwd(m, x) for _ in range(n)], n
                ),
            },
            1 if quick else 5,
        )
        rows.append(
            Row(
                f"skip blocks, nothing attached: {label}",
                "fwd+bwd/s",
                best["skipnets"],
                "hand-written blocks",
                best["hand-written"],
                ">= 0.99",
            )
        )
    return rows
