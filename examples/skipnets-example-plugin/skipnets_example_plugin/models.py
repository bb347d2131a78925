"""A residual MLP built from the skip-block contract, so every skipnets plugin works on it."""

from __future__ import annotations

from torch import Tensor, nn

from skipnets import register_model
from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock
from skipnets.registry import VectorInput


class ResidualLinear(SkipBlock):
    """``y = x + W2 relu(W1 norm(x))``: a pre-norm residual block of two linear layers.

    Subclassing ``SkipBlock`` and defining ``branch`` is all it takes: the shortcut (identity),
    the sum, stochastic depth, lesioning and observers come from the base class.
    """

    kind = "residual"

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def branch(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(self.norm(x)).relu())


class ResMLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, depth: int, width: int) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ConfigError(f"depth and width must be positive, got {depth} and {width}")
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*(ResidualLinear(width, 2 * width) for _ in range(depth)))
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x.flatten(1)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def register() -> None:
    """Called by skipnets through the ``skipnets.models`` entry point."""

    @register_model(family="example", input=VectorInput(), has_skip=True)
    def example_resmlp(
        depth: int = 4, width: int = 64, in_features: int = 64, num_classes: int = 10
    ) -> ResMLP:
        """Residual MLP: pre-norm blocks of two linear layers on flat inputs."""
        return ResMLP(in_features, num_classes, depth, width)
