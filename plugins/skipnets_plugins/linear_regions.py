"""Linear regions of a piecewise-linear network, along a line and on a plane of inputs
(Montúfar, Pascanu, Cho & Bengio 2014, "On the Number of Linear Regions of Deep Neural
Networks"; Pascanu, Montúfar & Bengio 2013, "On the number of response regions of deep feed
forward networks with piece-wise linear activations")."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib import colormaps
from matplotlib.lines import Line2D
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from skipnets.data.analysis import Split, analysis_split, check_split, inputs_of
from skipnets.errors import ConfigError
from skipnets.info import call_argument
from skipnets.runs import plugin_dir
from skipnets_plugins._milestones import (
    MILESTONE_COLUMNS,
    MeasuredAtMilestones,
    arch_name,
    milestone_fields,
)
from skipnets_plugins._plotting import latest_result, new_figure, read_rows, save_figure, write_csv

__all__ = [
    "Anchors",
    "LineCount",
    "LinearRegions",
    "NotPiecewiseLinear",
    "PlaneCount",
    "choose_anchors",
    "count_line",
    "count_plane",
]

COLUMNS = (
    *MILESTONE_COLUMNS,
    "layers",
    "units",
    "widths",
    "samples",
    "line_regions",
    "line_regions_coarse",
    "line_points",
    "line_resolution",
    "line_length",
    "plane_regions",
    "plane_points",
    "plane_cell",
    "max_regions",
)
#: Each step of the line grid in which the activation pattern changes is cut into this many
#: equal parts, ``refine`` times over.
REFINE_FACTOR = 8
#: Elements (points x units) hashed at once: bounds the memory of one forward pass.
CHUNK_ELEMENTS = 1 << 22


# -- following the pieces of a forward pass --------------------------------------------------
class NotPiecewiseLinear(Exception):
    """The forward pass does something to its input that no activation pattern describes."""


def _names(text: str) -> list[str]:
    return text.split()


# Smooth functions: applied to a value that depends on the input, the network is not piecewise
# linear.
_SMOOTH = frozenset(
    _names(
        """sigmoid sigmoid_ tanh tanh_ gelu silu silu_ mish mish_ elu elu_ selu selu_ celu celu_
        softplus softsign logsigmoid tanhshrink hardswish hardswish_ glu softmax log_softmax
        softmin exp exp_ exp2 expm1 log log_ log2 log10 log1p sqrt sqrt_ rsqrt rsqrt_ reciprocal
        reciprocal_ square square_ sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh
        erf erfc erfinv sinc logit logsumexp norm vector_norm matrix_norm layer_norm group_norm
        instance_norm local_response_norm normalize rms_norm std var std_mean var_mean prod
        cumprod cosine_similarity pairwise_distance cdist dist scaled_dot_product_attention
        lp_pool1d lp_pool2d lp_pool3d"""
    )
)
# Piecewise linear, but choosing among values in ways this count does not follow.
_UNFOLLOWED = frozenset(
    _names(
        """sort msort topk amax amin median nanmedian kthvalue mode cummax cummin hardshrink
        softshrink unique fractional_max_pool2d fractional_max_pool3d"""
    )
)
# A product is linear in the input only while at most one factor depends on it (positions of
# the factors; None: every tensor argument).
_PRODUCTS: dict[str, tuple[int, ...] | None] = {
    **dict.fromkeys(
        _names(
            """mul mul_ multiply __mul__ __rmul__ __imul__ matmul __matmul__ __rmatmul__ mm bmm
            mv dot vdot inner outer ger kron tensordot einsum chain_matmul multi_dot"""
        )
    ),
    **dict.fromkeys(
        _names("linear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d"),
        (0, 1),
    ),
    "bilinear": (0, 1),
    **dict.fromkeys(_names("addmm addbmm baddbmm addmv addr addcmul addcmul_"), (1, 2)),
}
# Position of the divisor.
_DIVISOR = {
    **dict.fromkeys(
        _names(
            """div div_ divide true_divide floor_divide remainder fmod __truediv__ __itruediv__
            __floordiv__ __mod__"""
        ),
        1,
    ),
    **dict.fromkeys(_names("__rdiv__ __rtruediv__ __rfloordiv__ __rmod__"), 0),
    "addcdiv": 2,
    "addcdiv_": 2,
}
_POWERS = frozenset(_names("pow pow_ __pow__ __ipow__ float_power"))
# Piecewise constant in the input: the result is part of the activation pattern, not a value
# that depends on the input.
_DECISIONS = frozenset(
    _names(
        """gt lt ge le eq ne greater less greater_equal less_equal not_equal __gt__ __lt__
        __ge__ __le__ __eq__ __ne__ sign sgn signbit heaviside argmax argmin argsort floor ceil
        round trunc floor_ ceil_ round_ trunc_ isclose"""
    )
)
_RECTIFIERS = frozenset(
    _names(
        """relu relu_ leaky_relu leaky_relu_ prelu rrelu rrelu_ abs abs_ absolute threshold
        threshold_"""
    )
)
_CLAMPS = frozenset(
    _names(
        """hardtanh hardtanh_ relu6 hardsigmoid clamp clamp_ clip clip_ clamp_min clamp_min_
        clamp_max clamp_max_"""
    )
)
_EXTREMA = frozenset(_names("maximum minimum fmax fmin"))
_RANDOM = frozenset(
    _names("dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout")
)


class _Pieces(TorchFunctionMode):
    """Follows a forward pass: every choice it makes on values that depend on the input (which
    side of zero a ReLU's input is on, which entry a max pool takes, a comparison) is folded
    into two 64-bit hashes per sample, the activation pattern; anything that is not piecewise
    linear in the input raises ``NotPiecewiseLinear``.

    A value depends on the input when it is computed from the input or from such a value; the
    mode keeps those tensors alive for the pass, so that their ids stay theirs."""

    def __init__(self, inputs: Tensor, weights: Callable[[int, int], Tensor]) -> None:
        super().__init__()
        self._derived: dict[int, Tensor] = {id(inputs): inputs}
        self._weights = weights
        self.count = inputs.shape[0]
        self.hashes = torch.zeros(self.count, 2, dtype=torch.int64, device=inputs.device)
        #: Units of each recorded choice, per sample, in the order of the forward pass; and
        #: whether each was an elementwise rectifier on vectors (a fully connected layer).
        self.widths: list[int] = []
        self.vector_layers: list[bool] = []

    def _is_derived(self, value: Any) -> bool:
        return isinstance(value, Tensor) and id(value) in self._derived

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(self._is_derived(t) for t in tree_leaves((args, kwargs))):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        self._check(name, args, kwargs)
        if "max_pool" in name:
            return self._max_pool(func, name, args, kwargs)
        if name in _DECISIONS:
            result = func(*args, **kwargs)
            self._record(result, vector=False)
            return result  # piecewise constant: it does not carry the input on
        pattern, vector = self._pattern(name, args, kwargs)
        result = func(*args, **kwargs)
        if name in ("max", "min") and isinstance(result, tuple):
            pattern, vector = result[1], False  # the index chosen along the dimension
            self._mark(result[0])
        else:
            self._mark(result)
        if pattern is not None:
            self._record(pattern, vector)
        if name.endswith("_") or name in ("__setitem__", "__ior__", "__iand__"):
            self._mark(args[0])  # written in place: the target now depends on the input
        return result

    def _check(self, name: str, args: tuple, kwargs: dict) -> None:
        derived = [self._is_derived(t) for t in tree_leaves((args, kwargs))]
        if name in _SMOOTH:
            raise NotPiecewiseLinear(f"`{name}`, a smooth nonlinearity,")
        if name in _UNFOLLOWED:
            raise NotPiecewiseLinear(f"`{name}`, a choice among values that is not followed,")
        if name in _RANDOM and call_argument(args, kwargs, 2, "training", True):
            raise NotPiecewiseLinear(f"`{name}` in training mode, which is random,")
        if name == "batch_norm" and call_argument(args, kwargs, 5, "training", False):
            raise NotPiecewiseLinear(
                "`batch_norm` with statistics of the batch (track_running_stats=False), a "
                "division by a statistic of the input,"
            )
        if name in ("max", "min") and len(args) < 2 and "dim" not in kwargs:
            raise NotPiecewiseLinear(f"`{name}` over the whole batch,")
        if name in _PRODUCTS:
            positions = _PRODUCTS[name]
            operands = (
                [a for a in tree_leaves((args, kwargs)) if isinstance(a, Tensor)]
                if positions is None
                else [a for i, a in enumerate(args) if i in positions]
            )
            if sum(self._is_derived(a) for a in operands) > 1:
                raise NotPiecewiseLinear(f"`{name}`, a product of two such values,")
        if name in _DIVISOR:
            position = _DIVISOR[name]
            if len(args) > position and self._is_derived(args[position]):
                raise NotPiecewiseLinear(f"`{name}`, a division by such a value,")
        if name in _POWERS:
            exponent = call_argument(args, kwargs, 1, "exponent")
            linear = isinstance(exponent, (int, float)) and exponent == 1
            if self._is_derived(exponent) or (derived[0] and not linear):
                raise NotPiecewiseLinear(f"`{name}`, a power of such a value,")
        if name == "__rpow__":
            raise NotPiecewiseLinear("`__rpow__`, a power with such a value as exponent,")

    def _pattern(self, name: str, args: tuple, kwargs: dict) -> tuple[Tensor | None, bool]:
        """The pattern of an elementwise piecewise-linear function, read from its input before
        the call (which may overwrite it in place)."""
        x = args[0]
        if name in _RECTIFIERS:
            level = call_argument(args, kwargs, 1, "threshold", 0.0) if "threshold" in name else 0
            return x > level, x.ndim == 2
        if name in _CLAMPS:
            low, high = _clamp_bounds(name, args, kwargs)
            sides = [x > low if low is not None else None, x < high if high is not None else None]
            return torch.stack([s for s in sides if s is not None], -1), False
        two_tensors = len(args) > 1 and isinstance(args[1], Tensor)
        if name in _EXTREMA or (name in ("max", "min") and two_tensors):
            return torch.as_tensor(x > args[1]), False
        return None, False

    def _max_pool(self, func, name: str, args: tuple, kwargs: dict):
        """Max pooling with its switches (the index each window takes) as the pattern."""
        base = name.lstrip("_").removesuffix("_with_indices")
        with_indices = getattr(F, f"{base}_with_indices", None)
        if with_indices is None:
            raise NotPiecewiseLinear(f"`{name}`, a pooling whose switches are not followed,")
        wanted = bool(call_argument(args, kwargs, 6, "return_indices", False))
        kwargs = {**kwargs, "return_indices": True}
        values, indices = with_indices(*args, **kwargs)
        self._record(indices, vector=False)
        self._mark(values)
        return (values, indices) if wanted or name.endswith("with_indices") else values

    def _record(self, pattern: Tensor, vector: bool) -> None:
        if not isinstance(pattern, Tensor) or pattern.ndim == 0:
            raise NotPiecewiseLinear("a choice over the whole batch,")
        if pattern.shape[0] != self.count:
            raise NotPiecewiseLinear("a choice across samples,")
        flat = pattern.reshape(self.count, -1).long()
        weights = self._weights(len(self.widths), flat.shape[1])
        self.hashes += (flat.unsqueeze(-1) * weights).sum(1)  # wraps around: a hash mod 2^64
        self.widths.append(flat.shape[1])
        self.vector_layers.append(vector)

    def _mark(self, result: Any) -> None:
        for value in tree_leaves(result):
            if isinstance(value, Tensor):
                self._derived[id(value)] = value


def _clamp_bounds(name: str, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    if name.startswith("relu6"):
        return 0.0, 6.0
    if name.startswith("hardsigmoid"):
        return -3.0, 3.0
    if name.startswith("hardtanh"):
        return (
            call_argument(args, kwargs, 1, "min_val", -1.0),
            call_argument(args, kwargs, 2, "max_val", 1.0),
        )
    if name.startswith("clamp_min"):
        return call_argument(args, kwargs, 1, "min"), None
    if name.startswith("clamp_max"):
        return None, call_argument(args, kwargs, 1, "max")
    return call_argument(args, kwargs, 1, "min"), call_argument(args, kwargs, 2, "max")


class _Probe:
    """Activation-pattern hashes and outputs of a model for batches of inputs built from
    coordinates, in chunks small enough for the model's width, on the model's device and in
    the dtype of its parameters (no autocast: rounding to 16 bits would move the breakpoints)."""

    def __init__(self, model: nn.Module) -> None:
        parameter = next(model.parameters(), None)
        self.model = model
        self.device = parameter.device if parameter is not None else torch.device("cpu")
        self.dtype = parameter.dtype if parameter is not None else torch.float32
        self._weights: dict[tuple[int, int], Tensor] = {}
        self.widths: list[int] | None = None
        self.vector_layers: list[bool] = []
        self._chunk = 1

    def weights(self, call: int, units: int) -> Tensor:
        key = (call, units)
        if key not in self._weights:
            generator = torch.Generator().manual_seed(call)
            self._weights[key] = torch.randint(
                -(2**63), 2**63 - 1, (units, 2), generator=generator, dtype=torch.int64
            ).to(self.device)
        return self._weights[key]

    @torch.no_grad()
    def __call__(
        self, coords: Tensor, to_input: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``(hashes, outputs)`` on the CPU for the inputs ``to_input(coords[i])``."""
        hashes, outputs = [], []
        start = 0
        while start < len(coords):
            part = coords[start : start + self._chunk].to(self.device, self.dtype)
            x = to_input(part)
            with _Pieces(x, self.weights) as pieces:
                out = self.model(x)
            if self.widths is None:
                self.widths, self.vector_layers = pieces.widths, pieces.vector_layers
                units = max(1, sum(self.widths), math.prod(x.shape[1:]))
                self._chunk = max(1, min(8192, CHUNK_ELEMENTS // units))
            hashes.append(pieces.hashes.cpu())
            outputs.append(out.detach().to("cpu", torch.float64).reshape(len(x), -1))
            start += len(part)
        return torch.cat(hashes), torch.cat(outputs)


# -- counting ---------------------------------------------------------------------------------
@dataclass
class LineCount:
    """Regions along ``x(t) = start + t (end - start)`` for ``t`` in ``[low, high]``.

    ``regions`` counts changes of the activation pattern between neighbouring points of a grid
    of ``points``, each step in which it changes cut ``REFINE_FACTOR`` times finer ``refine``
    times over, plus one (activation regions are convex, so a line meets each at most once);
    two breakpoints closer than ``resolution`` (in ``t``) count as one, and a region narrower
    than a step of the first grid can be missed. ``coarse_regions`` is the count on the first
    grid alone. ``t`` and ``outputs`` are that grid and the network's outputs on it."""

    regions: int
    coarse_regions: int
    breakpoints: Tensor
    t: Tensor
    outputs: Tensor
    resolution: float
    length: float


@dataclass
class PlaneCount:
    """Distinct activation patterns at the ``points x points`` grid of a rectangle of a plane
    (each one region: activation regions are convex); a region that no grid point falls in,
    smaller than a cell, is not counted. ``region`` holds each grid point's region (0 ..
    regions - 1, rows along the second axis), ``predicted`` the class the network predicts."""

    regions: int
    region: Tensor
    predicted: Tensor
    extent: tuple[float, float, float, float]
    cell: float


def count_line(
    model: nn.Module,
    start: Tensor,
    end: Tensor,
    low: float = 0.0,
    high: float = 1.0,
    points: int = 4096,
    refine: int = 2,
    probe: _Probe | None = None,
) -> LineCount:
    """Linear regions of ``model`` (in evaluation mode) along the line through ``start`` and
    ``end`` (two inputs, without a batch dimension), for ``t`` from ``low`` to ``high``."""
    probe = probe or _Probe(model)
    origin = start.to(probe.device, probe.dtype)
    direction = end.to(probe.device, probe.dtype) - origin
    shape = (-1, *origin.shape)

    def hashes(t: Tensor) -> tuple[Tensor, Tensor]:
        flat_origin, flat_direction = origin.reshape(1, -1), direction.reshape(1, -1)
        return probe(t, lambda part: (flat_origin + part[:, None] * flat_direction).view(shape))

    t = torch.linspace(low, high, points, dtype=torch.float64)
    grid, outputs = hashes(t)
    changed = (grid[1:] != grid[:-1]).any(1)
    coarse = int(changed.sum())
    lo_t, hi_t, lo_h, hi_h = t[:-1][changed], t[1:][changed], grid[:-1][changed], grid[1:][changed]
    steps = torch.arange(1, REFINE_FACTOR, dtype=torch.float64) / REFINE_FACTOR
    for _ in range(refine):
        if not len(lo_t):
            break
        inner_t = lo_t[:, None] + (hi_t - lo_t)[:, None] * steps
        inner_h = hashes(inner_t.flatten())[0].view(len(lo_t), REFINE_FACTOR - 1, 2)
        seq_t = torch.cat([lo_t[:, None], inner_t, hi_t[:, None]], 1)
        seq_h = torch.cat([lo_h[:, None], inner_h, hi_h[:, None]], 1)
        step_changed = (seq_h[:, 1:] != seq_h[:, :-1]).any(-1)
        lo_t, hi_t = seq_t[:, :-1][step_changed], seq_t[:, 1:][step_changed]
        lo_h, hi_h = seq_h[:, :-1][step_changed], seq_h[:, 1:][step_changed]
    return LineCount(
        regions=len(lo_t) + 1,
        coarse_regions=coarse + 1,
        breakpoints=((lo_t + hi_t) / 2).sort().values,
        t=t,
        outputs=outputs,
        resolution=(high - low) / (points - 1) / REFINE_FACTOR**refine,
        length=float(direction.double().norm() * (high - low)),
    )


def count_plane(
    model: nn.Module,
    origin: Tensor,
    axes: tuple[Tensor, Tensor],
    extent: tuple[float, float, float, float],
    points: int = 256,
    probe: _Probe | None = None,
) -> PlaneCount:
    """Linear regions of ``model`` on the rectangle ``extent = (s0, s1, t0, t1)`` of the plane
    ``origin + s * axes[0] + t * axes[1]``, sampled at ``points x points`` inputs."""
    probe = probe or _Probe(model)
    base = origin.to(probe.device, probe.dtype).reshape(1, -1)
    u, v = (axis.to(probe.device, probe.dtype).reshape(1, -1) for axis in axes)
    s0, s1, t0, t1 = extent
    s = torch.linspace(s0, s1, points, dtype=torch.float64)
    t = torch.linspace(t0, t1, points, dtype=torch.float64)
    coords = torch.stack(torch.meshgrid(s, t, indexing="xy"), -1).reshape(-1, 2)

    def to_input(part: Tensor) -> Tensor:
        x = base + part[:, :1] * u + part[:, 1:] * v
        return x.view(-1, *origin.shape)

    hashes, outputs = probe(coords, to_input)
    _, region = torch.unique(hashes, dim=0, return_inverse=True)
    return PlaneCount(
        regions=int(region.max()) + 1,
        region=region.view(points, points),
        predicted=outputs.argmax(1).view(points, points),
        extent=extent,
        cell=max(s1 - s0, t1 - t0) / (points - 1),
    )


# -- where to look ------------------------------------------------------------------------------
@dataclass
class Anchors:
    """The samples that fix the line and the plane, and the samples drawn on the plane.

    The line runs through ``inputs[0]`` and ``inputs[1]``. For 2-D inputs the plane is the
    input space itself (``axes`` the coordinate axes, ``origin`` zero); otherwise it is the
    plane through all three anchors, ``origin = inputs[0]`` and orthonormal ``axes``.
    ``extent`` covers what is drawn with a margin; ``shown`` are the samples' plane
    coordinates and ``labels`` theirs (None without labels)."""

    positions: list[int]
    input_plane: bool
    inputs: Tensor
    origin: Tensor
    axes: tuple[Tensor, Tensor] | None
    extent: tuple[float, float, float, float] | None
    shown: Tensor | None
    labels: Tensor | None


def choose_anchors(
    trainer: L.Trainer,
    split: str,
    samples: Sequence[int] | None,
    max_samples: int,
    extend: float,
    owner: str,
    count: int = 3,
) -> Anchors:
    """The anchor samples: ``samples`` when given, else the first sample of the split, the one
    of the first ``max_samples`` farthest from it, and (for a plane) the one farthest from the
    line through those two. Every rank reads the same samples."""
    data = analysis_split(trainer, split, owner=owner)
    if data.size < 2:
        raise ConfigError(f"{owner}: the {split} split has {data.size} samples; it needs two")
    if samples is not None:
        bad = [p for p in samples if p >= data.size]
        if bad:
            raise ConfigError(
                f"{owner}: sample {bad[0]} requested but the {split} split has {data.size} samples"
            )
    pool_positions = list(range(min(data.size, max_samples)))
    for p in samples or []:
        if p not in pool_positions:
            pool_positions.append(p)
    batch = data.fetch(trainer, pool_positions)
    pool = inputs_of(batch).detach().double().cpu()
    labels = batch[1].cpu() if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
    flat = pool.flatten(1)
    if samples is not None:
        chosen = [pool_positions.index(p) for p in samples]
    else:
        chosen = [0, int((flat - flat[0]).norm(dim=1).argmax())]
    if count > 2 and len(chosen) == 2 and len(flat) > 2 and flat.shape[1] > 2:
        direction = flat[chosen[1]] - flat[chosen[0]]
        offsets = flat - flat[chosen[0]]
        along = offsets @ direction / direction.pow(2).sum().clamp_min(1e-300)
        chosen.append(int((offsets - along[:, None] * direction).norm(dim=1).argmax()))
    anchors = flat[chosen]
    if (anchors[1] - anchors[0]).norm() == 0:
        a, b = (pool_positions[i] for i in chosen[:2])
        raise ConfigError(
            f"{owner}: samples {a} and {b} of the {split} split are the same input, so there is "
            "no line through them; choose others with `samples`"
        )
    positions = [pool_positions[i] for i in chosen]
    axes = extent = shown = None
    shown_labels = labels
    dims = flat.shape[1]
    if dims == 2:
        axes = (flat.new_tensor([1.0, 0.0]), flat.new_tensor([0.0, 1.0]))
        origin = flat.new_zeros(2)
        shown = flat[: len(pool_positions)]
    elif dims > 2 and len(anchors) == 3:
        u = anchors[1] - anchors[0]
        u = u / u.norm()
        w = anchors[2] - anchors[0]
        w = w - (w @ u) * u
        if w.norm() <= 1e-9 * (anchors[2] - anchors[0]).norm().clamp_min(1e-300):
            raise ConfigError(
                f"{owner}: samples {positions} of the {split} split lie on one line, so they fix "
                "no plane; choose others with `samples`"
            )
        axes = (u, w / w.norm())
        origin = anchors[0]
        offsets = anchors - origin
        shown = torch.stack([offsets @ axes[0], offsets @ axes[1]], 1)
        shown_labels = labels[chosen] if labels is not None else None
    else:
        origin = anchors[0]
    if shown is not None:
        low, high = shown.min(0).values, shown.max(0).values
        margin = (high - low).max().clamp_min(1e-6) * extend
        extent = (
            float(low[0] - margin),
            float(high[0] + margin),
            float(low[1] - margin),
            float(high[1] + margin),
        )
    shape = pool.shape[1:]
    return Anchors(
        positions=positions,
        input_plane=dims == 2,
        inputs=anchors.view(-1, *shape),
        origin=origin.view(shape),
        axes=None if axes is None else (axes[0].view(shape), axes[1].view(shape)),
        extent=extent,
        shown=shown,
        labels=shown_labels,
    )


def max_regions(widths: Sequence[int], inputs: int) -> int | None:
    """How many regions Montúfar et al. (2014) show a ReLU net with ``inputs`` inputs and hidden
    layers of ``widths`` (each at least ``inputs`` wide) can have, by folding its input space:
    ``prod_{l<L} floor(n_l / n_0)^n_0 * sum_{j<=n_0} C(n_L, j)``, a lower bound on the largest
    number (exact for one layer); None when a layer is narrower than the input."""
    if not widths or min(widths) < inputs:
        return None
    folds = math.prod((n // inputs) ** inputs for n in widths[:-1])
    return folds * sum(math.comb(widths[-1], j) for j in range(inputs + 1))


# -- the callback ---------------------------------------------------------------------------
class LinearRegions(MeasuredAtMilestones):
    """Linear regions of a ReLU network along a line and on a plane of inputs (Montúfar 2014).

    As in Montúfar, Pascanu, Cho & Bengio 2014, "On the Number of Linear Regions of Deep
    Neural Networks" (Fig. 1: a deep net against a shallow one with as many units), and
    Pascanu, Montúfar & Bengio 2013: how many pieces the network cuts its input space into, and
    what they look like.

    A ReLU network computes a different affine function in each region of its input space
    where the activation pattern (which units are on, which entry each max pool takes) stays
    the same. Montúfar et al. show that the largest number of regions grows exponentially with
    depth for a fixed number of units; Hanin & Rolnick (2019, "Complexity of Linear Regions in
    Deep Networks") that at initialisation the number a line meets grows with the number of
    units, not exponentially with depth. This callback measures both settings' quantities:

    - **along a line**: the line through two samples of ``split``, over ``t`` from
      ``-extend`` to ``1 + extend`` (0 and 1 are the samples), at ``line_points`` points;
      every step in which the pattern changes is cut 8 times finer, ``refine`` times over, so
      breakpoints closer than ``length / ((line_points - 1) * 8^refine)`` count as one (the
      CSV gives this resolution, and the count on the first grid alone);
    - **on a plane**: for 2-D inputs (``TwoSpirals``) the input plane itself, over the data
      with a margin of ``extend`` times its size; otherwise the plane through three samples.
      Distinct patterns among ``plane_points x plane_points`` inputs, each region drawn in its
      own colour with the data on it (all samples of the plane for 2-D data, the three anchor
      samples otherwise), the line dashed and the decision boundary in black.

    By default the samples are the split's first, the one of its first ``max_samples``
    farthest from it, and the one farthest from the line through the two.

    The network must be piecewise linear in its input: linear layers and convolutions,
    batch norm in evaluation, ReLU-type activations (relu, leaky_relu, prelu, relu6, hardtanh,
    clamp, abs), max pooling, sums and concatenations. The forward pass is followed through
    ``__torch_function__``, so functional calls inside blocks count as modules do; a smooth
    nonlinearity (sigmoid, tanh, GELU, softmax, ...) or a product or quotient of two values
    that depend on the input (a highway gate) stops it with a ``ConfigError`` naming what.

    Measured at initialisation (``on_fit_start``, not when resuming), after every
    ``every_n_epochs`` training epochs, when training ends, and on a checkpoint in a standalone
    ``validate`` (``skipnets analyse LinearRegions --config ... --ckpt_path ...``). The model
    runs in evaluation mode on its device, in its parameters' dtype and without autocast.
    Every rank computes the same counts (no collective); rank zero writes.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: LinearRegions
              init_args: {split: val, line_points: 4096, plane_points: 256}

    Writes ``<run dir>/linear_regions/linear_regions.csv`` (one row per measurement: when,
    epoch, step, arch, depth, rectifier layers, units, their widths, the anchor samples, the
    line's regions, its count on the first grid, points, resolution and length, the plane's
    regions, grid and cell size, and the number Montúfar et al. show such widths can reach
    (``max_regions``) when every layer
    is a fully connected one at least as wide as the input) and
    ``linear_regions_<init|epoch<E>|trained>.png`` (the outputs along the line with the
    breakpoints, and the regions of the plane); on a checkpoint ``linear_regions/<checkpoint
    name>/linear_regions.{csv,png}``. ``skipnets compare LinearRegions RUN ...`` plots regions
    against depth.

    Args:
        split: the data module's split the samples come from.
        samples: positions in the split of the line's two samples and the plane's third;
            None: chosen as above.
        line_points: points of the first grid along the line.
        refine: times each step with a change is cut 8 times finer (0: the grid alone).
        plane_points: grid points per side of the plane; 0: no plane.
        extend: how far the line runs past its samples (in units of their distance) and the
            plane past what it shows (in units of its size).
        max_samples: samples of the split searched for the anchors and drawn on a 2-D plane.
        every_n_epochs: also measure after every this many training epochs; 0: at the start
            and the end only.
    """

    table = "linear_regions/table"
    columns = COLUMNS

    def __init__(
        self,
        split: Split = "val",
        samples: list[int] | None = None,
        line_points: int = 4096,
        refine: int = 2,
        plane_points: int = 256,
        extend: float = 0.25,
        max_samples: int = 256,
        every_n_epochs: int = 0,
    ) -> None:
        super().__init__(every_n_epochs)
        check_split(split, "LinearRegions")
        _check_samples(samples, (2, 3), "LinearRegions")
        _check_int(line_points, 3, "line_points", "LinearRegions")
        _check_int(refine, 0, "refine", "LinearRegions")
        _check_int(max_samples, 2, "max_samples", "LinearRegions")
        _check_int(every_n_epochs, 0, "every_n_epochs", "LinearRegions")
        _check_int(plane_points, 0, "plane_points", "LinearRegions")
        if plane_points == 1:
            raise ConfigError("LinearRegions: plane_points must be 0 (no plane) or at least 2")
        if not isinstance(extend, (int, float)) or isinstance(extend, bool) or extend < 0:
            raise ConfigError(f"LinearRegions: extend must be a number >= 0, got {extend!r}")
        self.split = split
        self.samples = list(samples) if samples is not None else None
        self.line_points = line_points
        self.refine = refine
        self.plane_points = plane_points
        self.extend = float(extend)
        self.max_samples = max_samples
        #: The latest measurement: its row, line and plane.
        self.line: LineCount | None = None
        self.plane: PlaneCount | None = None

    # -- the measurement ----------------------------------------------------------------------
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> dict:
        """Count the regions along the line and on the plane; rank zero writes the files."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            anchors = choose_anchors(
                trainer,
                self.split,
                self.samples,
                self.max_samples,
                self.extend,
                "LinearRegions",
                count=3 if self.plane_points else 2,
            )
            probe = _Probe(pl_module)
            try:
                line = count_line(
                    pl_module,
                    anchors.inputs[0],
                    anchors.inputs[1],
                    -self.extend,
                    1 + self.extend,
                    self.line_points,
                    self.refine,
                    probe,
                )
                plane = None
                if self.plane_points and anchors.axes is not None and anchors.extent:
                    plane = count_plane(
                        pl_module,
                        anchors.origin,
                        anchors.axes,
                        anchors.extent,
                        self.plane_points,
                        probe,
                    )
            except NotPiecewiseLinear as error:
                raise ConfigError(
                    f"LinearRegions needs a piecewise-linear network, but {arch_name(pl_module)} "
                    f"computes {error} of values that depend on its input. Use ReLU-type "
                    "activations (e.g. plain_mlp with activation: relu), or remove the callback"
                ) from None
        finally:
            pl_module.train(was_training)
        widths = probe.widths or []
        inputs = anchors.inputs[0].numel()
        row = {
            **milestone_fields(trainer, pl_module, when),
            "layers": len(widths),
            "units": sum(widths),
            "widths": " ".join(map(str, widths)),
            "samples": " ".join(map(str, anchors.positions)),
            "line_regions": line.regions,
            "line_regions_coarse": line.coarse_regions,
            "line_points": self.line_points,
            "line_resolution": line.resolution * line.length / (2 * self.extend + 1),
            "line_length": line.length,
            "plane_regions": plane.regions if plane else "",
            "plane_points": self.plane_points if plane else "",
            "plane_cell": plane.cell if plane else "",
            "max_regions": max_regions(widths, inputs)
            if all(probe.vector_layers) and widths
            else "",
        }
        if line.coarse_regions - 1 > (self.line_points - 1) // 2:
            rank_zero_warn(
                f"LinearRegions: the pattern changes in {line.coarse_regions - 1} of the "
                f"{self.line_points - 1} steps of the line's grid, so the count is limited by the "
                "grid; raise line_points or refine for an accurate count"
            )
        self.rows.append(row)
        self.line, self.plane = line, plane
        if trainer.is_global_zero:
            self._write(trainer, row, anchors, line, plane)
        return row

    def _write(self, trainer, row, anchors: Anchors, line: LineCount, plane) -> None:
        folder = output_folder(trainer, "linear_regions")
        write_csv(folder / "linear_regions.csv", COLUMNS, self.rows)
        name = "linear_regions" if row["when"] == "checkpoint" else f"linear_regions_{row['when']}"
        data = type(trainer.datamodule).__name__ if trainer.datamodule is not None else "data"
        title = f"Linear regions of {row['arch']} on {data} ({row['when']}, step {row['step']})"
        figure = plot_regions(title, anchors, line, plane, self.split)
        save_figure(trainer, figure, folder / f"{name}.png", "linear_regions/figure")
        plane_text = f", {row['plane_regions']} on the plane" if plane else ""
        rank_zero_info(
            f"LinearRegions ({row['when']}): {row['line_regions']} regions along the line"
            f"{plane_text}; {folder / 'linear_regions.csv'}"
        )

    # -- comparing runs (skipnets compare LinearRegions RUN ...) ------------------------------
    @classmethod
    def compare_runs(cls, runs: dict[str, Path], out: Path) -> list[Path]:
        """Regions against the number of rectifier layers, at initialisation (dashed) and at
        the end (solid), along the line and on the plane: for runs with the same number of
        units in all, Montúfar et al.'s comparison of depth (dotted: the number they show such
        widths can reach)."""
        measured = {}
        for label, directory in runs.items():
            path = latest_result(directory / "linear_regions", "linear_regions.csv")
            rows = read_rows(path) if path else []
            if not rows:
                measured[label] = None
                continue
            first = next((r for r in rows if r["when"] == "init"), None)
            last = next((r for r in reversed(rows) if r["when"] != "init"), None)
            measured[label] = [r for r in (first, last) if r is not None]
        missing = [f"{label} ({runs[label]})" for label, rows in measured.items() if rows is None]
        if missing:
            raise ConfigError(f"no linear_regions results in: {', '.join(missing)}")
        table = []
        for label, rows in measured.items():
            for r in rows:
                table.append(
                    {
                        "run": label,
                        "arch": r["arch"],
                        "layers": r["layers"],
                        "widths": r["widths"],
                        "units": r["units"],
                        "when": "init" if r["when"] == "init" else "trained",
                        "line_regions": r["line_regions"],
                        "plane_regions": r["plane_regions"],
                        "max_regions": r["max_regions"],
                    }
                )
        fig, axes = new_figure(1, 1, size=(7.0, 4.6))
        ax = axes[0][0]
        groups = sorted({(r["arch"], r["units"]) for r in table}, key=str)
        colours = {"line_regions": "tab:blue", "plane_regions": "tab:orange"}
        markers = "osd^v<>"
        for g, (arch, units) in enumerate(groups):
            members = sorted(
                (r for r in table if (r["arch"], r["units"]) == (arch, units)),
                key=lambda r: r["layers"],
            )
            for key, where in (("line_regions", "line"), ("plane_regions", "plane")):
                for when, style in (("init", "--"), ("trained", "-")):
                    points = [
                        (r["layers"], r[key]) for r in members if r["when"] == when and r[key] != ""
                    ]
                    if points:
                        x, y = zip(*points)
                        ax.plot(
                            x,
                            y,
                            style,
                            marker=markers[g % len(markers)],
                            color=colours[key],
                            label=f"{arch}, {units} units: {where}, {when}",
                        )
            bound = sorted(
                {(r["layers"], float(min(r["max_regions"], 10**300))) for r in members}
                - {(r["layers"], "") for r in members}
                if all(r["max_regions"] != "" for r in members)
                else set()
            )
            if bound:
                x, y = zip(*bound)
                ax.plot(
                    x,
                    y,
                    ":",
                    color="grey",
                    marker=markers[g % len(markers)],
                    label=f"{arch}, {units} units: reachable (Montúfar et al.)",
                )
        shapes: dict[int, set[str]] = {}
        for r in table:
            shapes.setdefault(r["layers"], set()).add(_shape(str(r["widths"])))
        ax.set_xticks(
            sorted(shapes),
            [" / ".join(sorted(shapes[n])) for n in sorted(shapes)],
            fontsize="small",
        )
        ax.set_yscale("log")
        ax.set_xlabel("rectifier layers (their widths)")
        ax.set_ylabel("linear regions")
        ax.set_title("linear regions against depth")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        png = out / "linear_regions.png"
        fig.savefig(png, dpi=120)
        columns = (
            "run",
            "arch",
            "layers",
            "widths",
            "units",
            "when",
            "line_regions",
            "plane_regions",
            "max_regions",
        )
        return [png, write_csv(out / "linear_regions.csv", columns, table)]


def plot_regions(title: str, anchors: Anchors, line: LineCount, plane, split: str):
    """The network's outputs along the line with its breakpoints, and the plane's regions."""
    panels = 2 if plane is not None else 1
    fig, axes = new_figure(1, panels, size=(5.4, 4.6))
    fig.suptitle(title)
    ax = axes[0][0]
    t = line.t.numpy()
    outputs = line.outputs.numpy()
    for k in range(min(outputs.shape[1], 10)):
        ax.plot(t, outputs[:, k], lw=1, label=f"output {k}")
    breakpoints = line.breakpoints.numpy()
    if len(breakpoints) <= 300:
        ax.vlines(breakpoints, 0, 1, transform=ax.get_xaxis_transform(), color="0.6", lw=0.4)
    else:
        low = outputs.min() - 0.05 * np.ptp(outputs)
        ax.plot(breakpoints, np.full_like(breakpoints, low), "|", color="0.4", ms=6)
    for x in (0, 1):
        ax.axvline(x, color="k", ls=":", lw=1)
    a, b = anchors.positions[:2]
    ax.set_xlabel(f"t along the line (0: {split} sample {a}, 1: sample {b})")
    ax.set_ylabel("network output")
    ax.set_title(f"{line.regions} regions along the line (grey: breakpoints)")
    if outputs.shape[1] <= 10:
        ax.legend(fontsize="x-small", loc="upper right")
    if plane is None:
        return fig
    ax = axes[0][1]
    region = plane.region.numpy()
    colours = np.random.default_rng(0).uniform(0.25, 0.95, size=(plane.regions, 3))
    s0, s1, t0, t1 = plane.extent
    ax.imshow(
        colours[region],
        origin="lower",
        extent=(s0, s1, t0, t1),
        interpolation="nearest",
        aspect="auto",
    )
    s = np.linspace(s0, s1, region.shape[1])
    tt = np.linspace(t0, t1, region.shape[0])
    predicted = plane.predicted.numpy()
    if predicted.min() != predicted.max():
        ax.contour(
            s, tt, predicted, levels=np.arange(predicted.max()) + 0.5, colors="k", linewidths=1.2
        )
    if anchors.shown is not None:
        shown = anchors.shown.numpy()
        labels = anchors.labels.numpy() if anchors.labels is not None else np.zeros(len(shown))
        cmap = colormaps["tab10"]
        ax.scatter(
            shown[:, 0],
            shown[:, 1],
            c=[cmap(int(k) % 10) for k in labels],
            s=14,
            edgecolors="k",
            linewidths=0.5,
            zorder=3,
        )
    ends = _line_on_plane(anchors, line)
    if ends is not None:
        ax.plot(ends[0], ends[1], "k--", lw=1)
    handles = [Line2D([], [], color="k", lw=1.2, label="decision boundary")]
    if ends is not None:
        handles.append(Line2D([], [], color="k", ls="--", lw=1, label="the line"))
    ax.legend(handles=handles, fontsize="x-small", loc="lower right")
    ax.set_xlim(s0, s1)
    ax.set_ylim(t0, t1)
    if anchors.input_plane:
        ax.set_xlabel("input 0")
        ax.set_ylabel("input 1")
    else:
        a, b, c = anchors.positions
        ax.set_xlabel(f"along sample {a} -> sample {b}")
        ax.set_ylabel(f"towards sample {c}")
    ax.set_title(f"{plane.regions} regions on the plane ({region.shape[0]}^2 points)")
    return fig


def _line_on_plane(anchors: Anchors, line: LineCount):
    """The line's ends in the plane's coordinates, when it lies in the plane."""
    if anchors.axes is None:
        return None
    u, v = (axis.flatten() for axis in anchors.axes)
    origin = anchors.origin.flatten()
    ends = []
    for t in (float(line.t[0]), float(line.t[-1])):
        x = anchors.inputs[0].flatten() + t * (anchors.inputs[1] - anchors.inputs[0]).flatten()
        ends.append((float((x - origin) @ u), float((x - origin) @ v)))
    return [e[0] for e in ends], [e[1] for e in ends]


def _shape(widths: str) -> str:
    """``2x24`` for layers of equal width, else the widths joined by dashes."""
    layers = widths.split()
    if len(set(layers)) == 1:
        return f"{len(layers)}x{layers[0]}"
    return "-".join(layers) if len(layers) <= 4 else f"{len(layers)} layers"


def output_folder(trainer: L.Trainer, plugin: str) -> Path:
    """``plugin_dir``; for a ``validate`` of weights in memory (no checkpoint to name a folder
    after), its ``validate/`` folder, so that it never writes over what ``fit`` wrote."""
    folder = plugin_dir(trainer, plugin)
    if trainer.state.fn != TrainerFn.FITTING and not trainer.ckpt_path:
        folder = folder / "validate"
        folder.mkdir(exist_ok=True)
    return folder


def _check_int(value: Any, minimum: int, name: str, owner: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")


def _check_samples(samples: Any, counts: tuple[int, ...], owner: str) -> None:
    if samples is None:
        return
    if (
        not isinstance(samples, (list, tuple))
        or len(samples) not in counts
        or any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in samples)
        or len(set(samples)) != len(samples)
    ):
        what = " or ".join(map(str, counts))
        raise ConfigError(
            f"{owner}: samples must be {what} different positions in the split (integers >= 0), "
            f"got {samples!r}"
        )
