"""Forward and backward of the zoo's large networks against torchvision's (or, for the CIFAR
wide ResNet, a plain reference written here), same batch, same input, same process.

Small inputs keep it to seconds on a CPU: ImageNet networks at 64x64 (their adaptive pooling
takes any size), WRN-28-10 at 16x16. Models missing from the registry are reported, not run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import Row, fwd_bwd, interleaved, rate


class _ReferenceWideBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.project = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.project is None else self.project(o)
        return shortcut + self.conv2(F.relu(self.bn2(self.conv1(o))))


class ReferenceWRN(nn.Module):
    """WRN-d-k of Zagoruyko & Komodakis 2016 as their reference code lays it out: pre-activation
    basic blocks, 1x1 projections where the shape changes, BN-ReLU-pool-linear head."""

    def __init__(self, depth: int = 28, k: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for stage in range(3):
            for i in range(n):
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(
                    _ReferenceWideBlock(
                        widths[stage if i == 0 else stage + 1], widths[stage + 1], stride
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return build


CASES: dict[str, tuple[Callable[[], nn.Module], str, dict, tuple[int, int, int], int]] = {
    # name: (baseline builder, baseline name, skipnets kwargs, input shape, batch)
    "resnet50": (_torchvision("resnet50"), "torchvision resnet50", {}, (3, 64, 64), 8),
    "wrn_28_10": (ReferenceWRN, "reference WRN-28-10", {}, (3, 16, 16), 4),
    "densenet121": (_torchvision("densenet121"), "torchvision densenet121", {}, (3, 64, 64), 8),
    "vgg16": (_torchvision("vgg16"), "torchvision vgg16", {}, (3, 64, 64), 4),
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(quick: bool = False) -> list[Row]:
    from skipnets.registry import create_model, list_models

    rows = []
    registered = set(list_models())
    for name, (baseline_builder, baseline_name, kwargs, shape, batch) in CASES.items():
        label = f"fwd+bwd {name} (batch {batch}, {shape[1]}px)"
        if name not in registered:
            rows.append(Row(label, "img/s", None, baseline_name, None, ">= 1.0", "not registered"))
            continue
        torch.manual_seed(0)
        ours = create_model(name, **kwargs).train()
        theirs = baseline_builder().train()
        x = torch.randn(batch, *shape)
        steps = 1 if quick else 2
        best = interleaved(
            {
                "skipnets": lambda m=ours, x=x, n=steps: rate(
                    lambda: [fwd_bwd(m, x) for _ in range(n)], len(x) * n
                ),
                baseline_name: lambda m=theirs, x=x, n=steps: rate(
                    lambda: [fwd_bwd(m, x) for _ in range(n)], len(x) * n
                ),
            },
            1 if quick else 3,
        )
        same = _params(ours) == _params(theirs)
        note = (
            "same parameter count" if same else f"{_params(ours)} vs {_params(theirs)} parameters"
        )
        rows.append(
            Row(
                label, "img/s", best["skipnets"], baseline_name, best[baseline_name], ">= 1.0", note
            )
        )
        del ours, theirs
    return rows
