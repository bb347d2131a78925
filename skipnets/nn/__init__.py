"""Building blocks: the skip-block contract and the blocks several families share."""

from skipnets.nn.blocks import (
    BasicBlock,
    Highway,
    HighwayLinear,
    PadShortcut,
    PlainLinear,
    ResidualLinear,
    activation_layer,
    conv3x3,
    projection,
)
from skipnets.nn.skip import (
    Observer,
    SkipBlock,
    check_drop_mode,
    check_survival_prob,
    linear_decay,
    network_name,
    skip_blocks,
)

__all__ = [
    "BasicBlock",
    "Highway",
    "HighwayLinear",
    "Observer",
    "PadShortcut",
    "PlainLinear",
    "ResidualLinear",
    "SkipBlock",
    "activation_layer",
    "check_drop_mode",
    "check_survival_prob",
    "conv3x3",
    "linear_decay",
    "network_name",
    "projection",
    "skip_blocks",
]
