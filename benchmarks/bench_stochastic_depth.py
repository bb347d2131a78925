"""Stochastic depth in batch mode on ResNet-110 (p_L = 0.5, Huang's linear rule) against the
same network with every block kept: training steps per second.

A block dropped for the batch does not run its branch, so the expected speed-up is the compute
skipped: with the linear rule, block ``l`` of ``L`` is dropped with probability
``l / L * (1 - p_L)``, about a quarter of the blocks' work for ``p_L = 0.5`` (Huang et al. 2016
report about 25% shorter training).

A step also runs what no rule drops (the stem, the head, the loss, the optimiser on the kept
blocks' parameters, every dropped block's shortcut), so the expectation is measured, not only
counted: the same network with every block dropped gives that fixed part, ``t_none``, and the
blocks' share is ``t_all - t_none``, spread evenly over the blocks (the CIFAR ResNet's blocks
do the same number of multiply-adds in every stage). The expected time of a step is
``t_none + kept * (t_all - t_none)``, and the expected speed-up is ``t_all`` over it.
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
    no_blocks = create_model("resnet110").train()
    generator = torch.Generator().manual_seed(0)
    blocks = [block for _, block in skip_blocks(dropped)]
    for block in blocks:
        block.drop_generator = generator
    for _, block in skip_blocks(no_blocks):
        block.survival_prob, block.drop_mode = 1e-12, "batch"  # dropped at every step
    expected_kept = sum(block.survival_prob for block in blocks) / len(blocks)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    steps = 4 if quick else 30
    best = interleaved(
        {
            "stochastic depth": lambda: rate(lambda: _train_steps(dropped, x, y, steps), steps),
            "all blocks": lambda: rate(lambda: _train_steps(plain, x, y, steps), steps),
            "no blocks": lambda: rate(lambda: _train_steps(no_blocks, x, y, steps), steps),
        },
        1 if quick else 3,
    )
    t_all, t_none = 1 / best["all blocks"], 1 / best["no blocks"]
    expected = t_all / (t_none + expected_kept * (t_all - t_none))
    return [
        Row(
            "StochasticDepth batch mode, resnet110 p_L=0.5 (batch 32, 16px)",
            "steps/s",
            best["stochastic depth"],
            "all blocks",
            best["all blocks"],
            f"~{expected:.2f} (blocks kept: {expected_kept:.1%}; "
            f"blocks' share of a step: {1 - t_none / t_all:.1%})",
        )
    ]
