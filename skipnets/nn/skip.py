"""The skip-block contract every research plugin relies on.

A skip block computes ``out = combine(shortcut(x), branch(x))``:

=============  ==========================  ==========================================
kind           combine                     bypass (lesioned / dropped)
=============  ==========================  ==========================================
``residual``   ``shortcut + branch``       ``shortcut(x)``
``highway``    ``shortcut + branch``,      ``x`` (transform gate closed, T = 0)
               branch ``t * (h - x)``
``dense``      ``cat([x, branch], dim=1)`` ``cat([x, zeros])`` (no new features)
``plain``      ``branch``                  ``x`` (only for same-shape layers)
=============  ==========================  ==========================================

A highway layer's ``t * h + (1 - t) * x`` is ``x + t * (h - x)``: its branch computes the gated
difference ``t * (h - x)`` and the residual ``combine`` adds it, so dropping or observing the
branch means the same thing for every kind.

Plugins never look at a family; they set ``survival_prob``/``drop_mode``/``scaling``,
``lesioned``, ``gradient_path``, or attach an observer that sees ``x`` and ``branch(x)`` of each
forward. With none of these in use, ``forward`` takes a fast path that costs what a hand-written
block costs.

``gradient_path`` leaves the forward values as they are and chooses the path the backward pass
takes through the block: ``branch`` or ``shortcut`` detaches the other path's output before
``combine``, so the gradient reaching ``x`` is the part that flowed through the chosen path (Veit
et al. 2016 sample the paths of a residual net this way); a boolean tensor chooses per sample.
Both parts add up to the gradient of the intact block.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from skipnets.errors import ConfigError

__all__ = [
    "Observer",
    "SkipBlock",
    "check_drop_mode",
    "check_survival_prob",
    "linear_decay",
    "skip_blocks",
]

#: ``observer(block, x, branch_out)``, called after the branch ran, before ``combine``.
Observer = Callable[["SkipBlock", Tensor, Tensor], None]

Kind = Literal["residual", "highway", "dense", "plain"]
DropMode = Literal["batch", "sample"]
Scaling = Literal["test", "inverted"]
GradientPath = Literal["both", "branch", "shortcut"]

#: The parts of a block that are methods: assigning a module to one of these names is a mistake.
_METHODS = frozenset({"branch", "shortcut", "combine", "bypass"})


class SkipBlock(nn.Module):
    """Base class for every block that has, or could have, a skip path.

    Subclasses call ``super().__init__()`` first and implement the method ``branch`` and, where
    they differ from a residual block, ``shortcut``, ``combine`` and ``bypass`` (methods too:
    assigning a module to one of these names is an error). ``kind`` is a class attribute;
    builders set ``stage`` (the resolution stage the block belongs to) after construction.

    Stochastic depth (Huang et al. 2016): with ``survival_prob`` p < 1, during training the branch
    is kept with probability p, either once per mini-batch (``drop_mode="batch"``; a dropped
    branch is not computed at all) or per sample (``"sample"``, like timm's drop_path). With
    ``scaling="test"`` (Huang) a kept branch is used as is in training and multiplied by p at test
    time; with ``"inverted"`` it is divided by p in training and used as is at test time.
    """

    kind: Kind = "residual"

    def __init__(self) -> None:
        if type(self).branch is SkipBlock.branch:
            raise TypeError(
                f"{type(self).__name__} must define the method `def branch(self, x)`: keep "
                "the layers under other names and call them there (self.layer = "
                "nn.Linear(...); def branch(self, x): return self.layer(x))"
            )
        super().__init__()
        self.stage = 0
        self.survival_prob = 1.0
        self.drop_mode: DropMode = "batch"
        self.scaling: Scaling = "test"
        #: Generator for the drop decisions (None: torch's default). Ranks that must agree on
        #: which blocks run (batch mode under DDP) share a seeded one.
        self.drop_generator: torch.Generator | None = None
        #: Fraction of the last training batch whose branch ran (1.0 when nothing is dropped).
        self.last_kept: float | Tensor = 1.0
        #: False for blocks whose output shape differs from their input and that have no
        #: shortcut to fall back on (a plain downsampling layer): they cannot be lesioned.
        self.bypassable = True
        self._lesioned = False
        self._gradient_path: GradientPath | Tensor = "both"
        # Lesioned or a gradient path chosen: one flag, so that the fast path checks no more.
        self._altered = False
        self._observers: OrderedDict[int, Observer] = OrderedDict()

    # -- what subclasses define -------------------------------------------------------------
    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define branch(self, x)")

    def shortcut(self, x: Tensor) -> Tensor:
        return x

    def combine(self, shortcut: Tensor, branch: Tensor) -> Tensor:
        return shortcut + branch

    def bypass(self, x: Tensor, shortcut: Tensor) -> Tensor:
        """The block's output with its branch removed."""
        return shortcut

    def __setattr__(self, name: str, value: object) -> None:
        if name in _METHODS and isinstance(value, nn.Module):
            raise TypeError(
                f"{type(self).__name__}.{name} is a method of SkipBlock, not a module attribute: "
                f"keep the {type(value).__name__} under another name (self.layer = ...) and "
                f"call it from `def {name}(self, ...)`, e.g. def branch(self, x): "
                "return self.layer(x)"
            )
        super().__setattr__(name, value)

    # -- the contract -----------------------------------------------------------------------
    @property
    def lesioned(self) -> bool:
        """When true the block is its identity path: see the table in the module docstring."""
        return self._lesioned

    @lesioned.setter
    def lesioned(self, value: bool) -> None:
        if value and not self.bypassable:
            raise ConfigError(
                f"{type(self).__name__} changes the shape of its input and has no shortcut: "
                "it cannot be lesioned"
            )
        self._lesioned = bool(value)
        self._altered = self._lesioned or self._routed

    @property
    def gradient_path(self) -> GradientPath | Tensor:
        """The path the backward pass takes: ``both`` (the default), or only the ``branch`` or
        only the ``shortcut``, the other one's output being detached; or a 1-D boolean tensor on
        the activations' device, one entry per sample of the batch (``True``: the branch), for
        a path per sample. The forward values do not change. It applies while the branch runs;
        a block without it (lesioned, or dropped by stochastic depth) passes the gradient
        through its identity path as always."""
        return self._gradient_path

    @gradient_path.setter
    def gradient_path(self, value: GradientPath | Tensor) -> None:
        if isinstance(value, Tensor):
            if value.dtype != torch.bool or value.ndim != 1:
                raise ConfigError(
                    "a per-sample gradient_path is a 1-D boolean tensor (True: the branch), "
                    f"not a {value.dtype} tensor of shape {tuple(value.shape)}"
                )
        elif value not in ("both", "branch", "shortcut"):
            raise ConfigError(
                f"gradient_path must be 'both', 'branch' or 'shortcut', not {value!r}"
            )
        self._gradient_path = value
        self._altered = self._lesioned or self._routed

    @property
    def _routed(self) -> bool:
        route = self._gradient_path
        return not (isinstance(route, str) and route == "both")

    @property
    def observed(self) -> bool:
        """Whether any observer is attached."""
        return bool(self._observers)

    def observe(self, observer: Observer) -> RemovableHandle:
        """Call ``observer(block, x, branch_out)`` on every forward that runs the branch.

        It is called after the branch and before ``combine``, in training and evaluation, with
        ``branch_out`` as stochastic depth leaves it (the ``sample`` mask and the scaling by
        ``survival_prob`` applied); not when the block is lesioned, nor when a ``batch``-mode
        drop skips the branch. The observer sees the tensors of this forward only, still in the
        autograd graph; whatever it keeps alive is its own responsibility. Returns a handle
        whose ``remove()`` detaches it.
        """
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = observer
        return handle

    @property
    def fast_path(self) -> bool:
        """Whether the forward takes the fast path, ``combine(shortcut(x), branch(x))`` and
        nothing else: not lesioned, routed or observed, and without stochastic depth. What
        repeats a recorded forward (``model.cuda_graphs``) uses the recording only while every
        block takes it."""
        return not (self._altered or self._observers or self.survival_prob < 1.0)

    def forward(self, x: Tensor) -> Tensor:
        if self.fast_path:
            return self.combine(self.shortcut(x), self.branch(x))
        return self._forward_general(x)

    def _forward_general(self, x: Tensor) -> Tensor:
        shortcut = self.shortcut(x)
        if self._lesioned:
            return self.bypass(x, shortcut)
        p = self.survival_prob
        if p < 1.0 and self.training:
            if self.drop_mode == "batch":
                keep = bool(torch.rand((), generator=self.drop_generator) < p)
                self.last_kept = 1.0 if keep else 0.0
                if not keep:
                    return self.bypass(x, shortcut)
                out = self.branch(x)
                if self.scaling == "inverted":
                    out = out / p
            else:
                out = self.branch(x)
                mask_shape = (out.shape[0],) + (1,) * (out.ndim - 1)
                mask = torch.empty(mask_shape, device=out.device, dtype=out.dtype).bernoulli_(p)
                self.last_kept = mask.mean()
                out = out * (mask / p if self.scaling == "inverted" else mask)
        else:
            out = self.branch(x)
            if p < 1.0 and self.scaling == "test":
                out = out * p
        for observer in tuple(self._observers.values()):
            observer(self, x, out)
        route = self._gradient_path
        if isinstance(route, Tensor):
            # torch.where keeps every value and lets each sample's gradient through one side.
            take_branch = route.view(-1, *(1,) * (out.ndim - 1))
            out = torch.where(take_branch, out, out.detach())
            take_branch = route.view(-1, *(1,) * (shortcut.ndim - 1))
            shortcut = torch.where(take_branch, shortcut.detach(), shortcut)
        elif route == "branch":
            shortcut = shortcut.detach()
        elif route == "shortcut":
            out = out.detach()
        return self.combine(shortcut, out)

    def extra_repr(self) -> str:
        extras = [f"kind={self.kind}", f"stage={self.stage}"]
        if self.survival_prob < 1.0:
            extras.append(f"survival_prob={self.survival_prob:.3g}, drop_mode={self.drop_mode}")
        if self._lesioned:
            extras.append("lesioned=True")
        if self._routed:
            route = self._gradient_path
            extras.append(f"gradient_path={route if isinstance(route, str) else 'per sample'}")
        return ", ".join(extras)


def skip_blocks(model: nn.Module) -> Iterator[tuple[str, SkipBlock]]:
    """Yield ``(name, block)`` for every skip block of ``model``, in depth order.

    Depth order is registration order, which every skipnets builder keeps equal to the order of
    the forward pass; ``block.stage`` gives the block's stage.
    """
    for name, module in model.named_modules():
        if isinstance(module, SkipBlock):
            yield name, module


def network_name(name: str) -> str:
    """A module's name inside the network: ``blocks.0`` for the ``model.blocks.0`` that
    ``skip_blocks`` finds in a skipnets ``Classifier`` (whose network is its ``model``). Every
    plugin names blocks and layers this way in its files, figures and messages."""
    return name.removeprefix("model.")


# -- stochastic depth: the rule and the checks that the builders and the plugin share -------
def linear_decay(num_blocks: int, survival_prob_last: float = 0.5) -> list[float]:
    """Huang et al.'s linear decay rule: block ``l`` of ``L`` survives with probability
    ``p_l = 1 - (l / L) (1 - p_L)``, ``p_L`` being ``survival_prob_last``."""
    check_survival_prob(survival_prob_last, "survival_prob_last")
    drop = 1.0 - survival_prob_last
    return [1.0 - (depth / num_blocks) * drop for depth in range(1, num_blocks + 1)]


def check_survival_prob(value: float, name: str = "survival_prob") -> float:
    """``value`` as a float, or a ``ConfigError`` naming ``name`` unless it is in (0, 1]."""
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1], got {value}")
    return float(value)


def check_drop_mode(drop_mode: str, scaling: str) -> None:
    """A ``ConfigError`` unless ``drop_mode`` and ``scaling`` are values ``SkipBlock`` knows."""
    if drop_mode not in ("batch", "sample"):
        raise ConfigError(f"drop_mode must be 'batch' or 'sample', not {drop_mode!r}")
    if scaling not in ("test", "inverted"):
        raise ConfigError(f"scaling must be 'test' or 'inverted', not {scaling!r}")
