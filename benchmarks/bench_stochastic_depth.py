"""Stochastic depth in batch mode on ResNet-110 (p_L = 0.5, Huang's linear rule) against the
same network with every block kept: training steps per second.

A block dropped for the batch does not run its branch, so the expected speed-up is the compute
skipped: with the linear rule, block ``l`` of ``L`` is dropped with probability
``l / L * (1 - p_L)``, about a quarter of the blocks' work for ``p_L = 0.5`` (Huang et al. 2016
report about 25% shorter training).

A block's wall-clock cost is not its share of the multiply-adds: the CIFAR ResNet's stages do
the same arithmetic per block, but on a CPU a last-stage block (64 channels, 4x4 maps) takes
about a quarter less time than a first-stage one (16 channels, 16x16), and the linear rule drops
the last stage's blocks most. So the expectation is measured: the
same network with all of stage ``s`` dropped saves ``t_all - t_s``; the rule drops stage ``s``'s
blocks with mean probability ``d_s``, so a step is expected to take
``t_all - sum_s d_s (t_all - t_s)``, and the expected speed-up is ``t_all`` over that.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

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
    from skipnets.nn import skip_blocks
    from skipnets.registry import create_model

    torch.manual_seed(0)
    plain = create_model("resnet110").train()
    # Huang et al.'s linear decay to 0.5, blocks dropped whole (batch mode).
    dropped = create_model("resnet110_sd", survival_prob_last=0.5, drop_mode="batch").train()
    generator = torch.Generator().manual_seed(0)
    blocks = [block for _, block in skip_blocks(dropped)]
    for block in blocks:
        block.drop_generator = generator
    stages = sorted({block.stage for block in blocks})
    drop_rate = {
        stage: statistics.fmean(1 - b.survival_prob for b in blocks if b.stage == stage)
        for stage in stages
    }
    without_stage = {stage: create_model("resnet110").train() for stage in stages}
    for stage, model in without_stage.items():
        for _, block in skip_blocks(model):
            if block.stage == stage:
                block.survival_prob, block.drop_mode = 1e-12, "batch"  # dropped at every step
    expected_kept = sum(block.survival_prob for block in blocks) / len(blocks)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    steps = 4 if quick else 30

    def steps_per_second(model: torch.nn.Module) -> Callable[[], float]:
        return lambda: rate(lambda: _train_steps(model, x, y, steps), steps)

    best = interleaved(
        {
            "stochastic depth": steps_per_second(dropped),
            "all blocks": steps_per_second(plain),
            **{f"stage {s} dropped": steps_per_second(m) for s, m in without_stage.items()},
        },
        1 if quick else 3,
    )
    t_all = 1 / best["all blocks"]
    saved = {s: t_all - 1 / best[f"stage {s} dropped"] for s in stages}
    expected = t_all / (t_all - sum(drop_rate[s] * saved[s] for s in stages))
    shares = ", ".join(f"{saved[s] / t_all:.0%}" for s in stages)
    return [
        Row(
            "StochasticDepth batch mode, resnet110 p_L=0.5 (batch 32, 16px)",
            "steps/s",
            best["stochastic depth"],
            "all blocks",
            best["all blocks"],
            f"~{expected:.2f} (blocks kept: {expected_kept:.1%}; "
            f"stages' shares of a step: {shares})",
        )
    ]
