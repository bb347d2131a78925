"""Building blocks: the skip-block contract and the blocks several families share."""

from skipnets.nn.blocks import (
    BasicBlock,
    Highway,
    HighwayLinear,
    PadShortcut,
    PlainLinear,
    ResidualLinear,
    activation,
    conv3x3,
    projection,
)
from skipnets.nn.skip import Observer, SkipBlock, skip_blocks

__all__ = [
    "BasicBlock",
    "Highway",
    "HighwayLinear",
    "Observer",
    "PadShortcut",
    "PlainLinear",
    "ResidualLinear",
    "SkipBlock",
    "activation",
    "conv3x3",
    "projection",
    "skip_blocks",
]
