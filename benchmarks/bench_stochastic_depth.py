"""Stochastic depth in batch mode on ResNet-110 (p_L = 0.5, Huang's linear rule) against the
same network with every block kept: training steps per second.

A block dropped for the batch does not run its branch, so the expected speed-up is the compute
skipped: with the linear rule, block ``l`` of ``L`` is dropped with probability
``l / L * (1 - p_L)``, about a quarter of the blocks' work for ``p_L = 0.5`` (Huang et al. 2016
report about 25% shorter training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.common import Row, interleaved, rate


def _train_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def main(quick: bool = False) -> list[Row]:
    from skipnets.models.resnet import linear_decay
    from skipnets.nn import skip_blocks
    from skipnets.registry import create_model

    torch.manual_seed(0)
    plain = create_model("resnet110").train()
    dropped = create_model("resnet110").train()
    linear_decay(dropped, survival_prob_last=0.5, drop_mode="batch")
    generator = torch.Generator().manual_seed(0)
    blocks = [block for _, block in skip_blocks(dropped)]
    for block in blocks:
        block.drop_generator = generator
    expected_kept = sum(block.survival_prob for block in blocks) / len(blocks)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    steps = 4 if quick else 30
    best = interleaved(
        {
            "stochastic depth": lambda: rate(lambda: _train_steps(dropped, x, y, steps), steps),
            "all blocks": lambda: rate(lambda: _train_steps(plain, x, y, steps), steps),
        },
        1 if quick else 3,
    )
    expected = 1 / expected_kept
    return [
        Row(
            "StochasticDepth batch mode, resnet110 p_L=0.5 (batch 32, 16px)",
            "steps/s",
            best["stochastic depth"],
            "all blocks",
            best["all blocks"],
            f"~{expected:.2f} (blocks' compute kept: {expected_kept:.1%})",
        )
    ]
