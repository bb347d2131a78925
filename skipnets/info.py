"""Model facts: parameters, FLOPs, receptive field, skip blocks and paper of any model.

    describe("resnet50")            # a registered name: built on the meta device, nothing allocated
    describe(my_model, input_shape=(3, 64, 64))
    print(describe("densenet121"))  # what ``skipnets models --details densenet121`` prints

FLOPs are torch's own count (``torch.utils.flop_counter``: convolutions and matrix products, a
multiply-add counted as two) for one input at the model's registered input size. The receptive
field is the theoretical one of the last feature map (``forward_features``), traced through every
convolution, pooling, strided slice and resize on the way, whatever module or function runs them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from skipnets.errors import ConfigError
from skipnets.nn import skip_blocks
from skipnets.registry import ImageInput, Paper, VectorInput, create_model, model_info

__all__ = ["ModelFacts", "call_argument", "describe", "receptive_field"]


@dataclass(frozen=True)
class ModelFacts:
    name: str
    family: str | None
    paper: Paper | None
    has_skip: bool | None
    input_shape: tuple[int, ...]
    parameters: int
    flops: int
    #: Theoretical receptive field (height, width) of the last feature map, in input pixels;
    #: None for models without spatial input.
    receptive_field: tuple[int, ...] | None
    skip_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def skip_blocks(self) -> int:
        return sum(self.skip_kinds.values())

    def __str__(self) -> str:
        def rows() -> Iterator[tuple[str, str]]:
            yield "name", self.name
            if self.family:
                yield "family", self.family
            yield "paper", str(self.paper) if self.paper else "-"
            yield "input", " x ".join(map(str, self.input_shape))
            yield "parameters", f"{self.parameters:,} ({_si(self.parameters)})"
            yield "FLOPs", f"{self.flops:,} ({_si(self.flops)}, one input, multiply-add = 2)"
            if self.receptive_field is not None:
                size = " x ".join(map(str, self.receptive_field))
                yield "receptive field", f"{size} input pixels (last feature map, theoretical)"
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.skip_kinds.items()))
            yield "skip blocks", f"{self.skip_blocks}" + (f" ({kinds})" if kinds else "")

        lines = list(rows())
        width = max(len(key) for key, _ in lines)
        return "\n".join(f"{key.ljust(width)}  {value}" for key, value in lines)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def describe(
    model: str | nn.Module, input_shape: Sequence[int] | None = None, **kwargs: Any
) -> ModelFacts:
    """The facts of a registered model (by name, built with ``kwargs``) or of a model instance.

    A name is built on the meta device, so even the biggest nets cost no memory (a model with an
    operation the meta device cannot run is built for real). ``input_shape`` (one input, without
    the batch dimension) defaults to the registered input of the model.
    """
    if isinstance(model, str):
        info = model_info(model)
        try:
            with torch.device("meta"):
                module = create_model(model, **kwargs)
            return _facts(module, model, info, input_shape)
        except (NotImplementedError, RuntimeError):
            pass
        return _run(_facts, create_model(model, **kwargs), model, info, input_shape)
    if kwargs:
        raise ConfigError("builder arguments go with a model name, not with a model instance")
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"describe() takes a model name or an nn.Module, not {type(model).__name__}"
        )
    registered = getattr(model, "registry_name", None)
    name = registered or type(model).__name__
    info = model_info(registered) if registered else None
    return _run(_facts, model, name, info, input_shape)


def _run(facts: Any, model: nn.Module, name: str, info: Any, input_shape: Any) -> ModelFacts:
    try:
        return facts(model, name, info, input_shape)
    except RuntimeError as err:
        raise ConfigError(f"{name} could not run on one input of that shape: {err}") from err


def _input_shape(
    model: nn.Module, registered: ImageInput | VectorInput | None, given: Sequence[int] | None
) -> tuple[int, ...]:
    if given is not None:
        shape = tuple(int(s) for s in given)
        if not shape or min(shape) < 1:
            raise ConfigError(f"input_shape must be positive sizes, got {tuple(given)}")
        return shape
    if isinstance(registered, ImageInput):
        return (
            getattr(model, "in_channels", registered.channels),
            registered.size,
            registered.size,
        )
    if isinstance(registered, VectorInput):
        features = getattr(model, "in_features", None) or registered.features
        if features is None:
            first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
            features = first.in_features if first is not None else None
        if features:
            return (int(features),)
    raise ConfigError(
        f"no registered input size for {type(model).__name__}; pass input_shape, e.g. (3, 32, 32)"
    )


def _facts(model: nn.Module, name: str, info: Any, input_shape: Sequence[int] | None) -> ModelFacts:
    shape = _input_shape(model, info.input if info is not None else None, input_shape)
    parameters = sum(p.numel() for p in model.parameters())
    with _evaluating(model):
        x = _example(model, shape)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        rf = receptive_field(model, shape) if len(shape) > 1 else None
    kinds = Counter(block.kind for _, block in skip_blocks(model))
    return ModelFacts(
        name=name,
        family=info.family if info else None,
        paper=info.paper if info else None,
        has_skip=info.has_skip if info else None,
        input_shape=shape,
        parameters=parameters,
        flops=counter.get_total_flops(),
        receptive_field=rf,
        skip_kinds=dict(kinds),
    )


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _example(model: nn.Module, shape: Sequence[int]) -> Tensor:
    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    return torch.zeros((1, *shape), device=device, dtype=dtype or torch.float32)


# -- receptive field -------------------------------------------------------------------------
def receptive_field(model: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Theoretical receptive field, per spatial axis, of ``model.forward_features`` (or of the
    model's output if it has none) for one input of ``input_shape`` (channels first).

    Every tensor on the way carries the receptive field and the stride (jump, in input pixels)
    of its positions; convolutions and poolings grow them, strided slices and resizes rescale the
    jump, and everything else (sums, concatenations, norms, activations) takes the largest of its
    inputs. Padding does not matter to the theoretical size.
    """
    if len(input_shape) < 2:
        raise ConfigError("the receptive field needs spatial input: (channels, height, ...)")
    forward = getattr(model, "forward_features", model)
    with _evaluating(model), torch.no_grad():
        x = _example(model, input_shape)
        tracer = _ReceptiveFieldTracer()
        tracer.mark(x, _Field.unit(len(input_shape) - 1))
        with tracer:
            out = forward(x)
        field_ = tracer.field_of(out)
    if field_ is None:
        raise ConfigError(f"could not trace the receptive field through {type(model).__name__}")
    return tuple(round(r) for r in field_.size)


@dataclass(frozen=True)
class _Field:
    size: tuple[float, ...]
    jump: tuple[float, ...]

    @staticmethod
    def unit(dims: int) -> _Field:
        return _Field((1.0,) * dims, (1.0,) * dims)

    def window(
        self, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
    ) -> _Field:
        size = tuple(
            r + (k - 1) * d * j for r, k, d, j in zip(self.size, kernel, dilation, self.jump)
        )
        return _Field(size, tuple(j * s for j, s in zip(self.jump, stride)))

    def rescale(self, factors: Sequence[float]) -> _Field:
        return _Field(self.size, tuple(j * f for j, f in zip(self.jump, factors)))


def _tuple(value: Any, dims: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * dims
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)
    return values * dims if len(values) == 1 else values


_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_T = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_MAX_POOL = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVG_POOL = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}
_ADAPTIVE = {
    F.adaptive_avg_pool1d: 1,
    F.adaptive_avg_pool2d: 2,
    F.adaptive_avg_pool3d: 3,
    F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2,
    F.adaptive_max_pool3d: 3,
}


class _ReceptiveFieldTracer(TorchFunctionMode):
    """Propagates a ``_Field`` from every traced tensor to the results computed from it."""

    def __init__(self) -> None:
        super().__init__()
        self._fields: dict[int, _Field] = {}
        self._alive: list[Tensor] = []  # keeps ids unique while tracing

    def mark(self, tensor: Tensor, field_: _Field) -> None:
        self._fields[id(tensor)] = field_
        self._alive.append(tensor)

    def field_of(self, value: Any) -> _Field | None:
        return self._fields.get(id(value)) if isinstance(value, Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [f for f in map(self.field_of, _flatten((args, kwargs))) if f is not None]
        if not inputs:
            return out
        field_ = self._through(func, args, kwargs, inputs, out)
        if field_ is not None:
            for tensor in _flatten(out):
                if isinstance(tensor, Tensor):
                    self.mark(tensor, field_)
        return out

    def _through(self, func, args, kwargs, inputs: list[_Field], out: Any) -> _Field | None:
        x = args[0] if args else None
        own = self.field_of(x)
        if own is not None:
            if func in _CONV:
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                dims = _CONV[func]
                stride = call_argument(args, kwargs, 3, "stride", 1)
                dilation = call_argument(args, kwargs, 5, "dilation", 1)
                return own.window(weight.shape[2:], _tuple(stride, dims), _tuple(dilation, dims))
            if func in _CONV_T:
                weight = args[1] if len(args) > 1 else kwargs["weight"]
                dims = _CONV_T[func]
                stride = _tuple(call_argument(args, kwargs, 3, "stride", 1), dims)
                dilation = _tuple(call_argument(args, kwargs, 7, "dilation", 1), dims)
                finer = own.rescale([1 / s for s in stride])
                return finer.window(weight.shape[2:], (1,) * dims, dilation)
            if func in _MAX_POOL or func in _AVG_POOL:
                dims = _MAX_POOL.get(func) or _AVG_POOL[func]
                kernel = _tuple(call_argument(args, kwargs, 1, "kernel_size", 1), dims)
                stride = call_argument(args, kwargs, 2, "stride", None)
                stride = kernel if stride is None or stride == [] else _tuple(stride, dims)
                dilation = call_argument(args, kwargs, 4, "dilation", 1) if func in _MAX_POOL else 1
                return own.window(kernel, stride, _tuple(dilation, dims))
            if func in _ADAPTIVE and isinstance(out, (Tensor, tuple)):
                result = out[0] if isinstance(out, tuple) else out
                dims = _ADAPTIVE[func]
                sizes_in, sizes_out = x.shape[-dims:], result.shape[-dims:]
                stride = [max(i // o, 1) for i, o in zip(sizes_in, sizes_out)]
                kernel = [i - (o - 1) * s for i, o, s in zip(sizes_in, sizes_out, stride)]
                return own.window(kernel, stride, (1,) * dims)
            if func is F.interpolate and isinstance(out, Tensor):
                dims = x.ndim - 2
                return own.rescale([i / o for i, o in zip(x.shape[-dims:], out.shape[-dims:])])
            if func is Tensor.__getitem__:
                steps = _slice_steps(x, args[1])
                if steps is not None:
                    return own.rescale(steps[-len(own.jump) :])
        same = [f for f in inputs if len(f.size) == len(inputs[0].size)]
        return _Field(
            tuple(max(sizes) for sizes in zip(*(f.size for f in same))),
            tuple(max(jumps) for jumps in zip(*(f.jump for f in same))),
        )


def call_argument(
    args: Sequence[Any], kwargs: dict[str, Any], position: int, name: str, default: Any = None
) -> Any:
    """The argument ``name`` of a call seen as ``(args, kwargs)`` (a ``__torch_function__``
    override sees calls so), passed by position ``position`` or by keyword; else ``default``."""
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def _slice_steps(x: Tensor, index: Any) -> list[int] | None:
    """Per-dimension steps of a basic slicing index, or None if it is not one."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (isinstance(i, slice) or i is Ellipsis) for i in items):
        return None
    if items.count(Ellipsis) > 1:
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (x.ndim - len(items) + 1)
    items += [slice(None)] * (x.ndim - len(items))
    return [i.step or 1 for i in items]


def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value
