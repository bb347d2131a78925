"""The training step's forward and backward pass as CUDA graphs (``model.cuda_graphs``).

A small network on a fast GPU waits for the host: every one of its few hundred kernels is
launched from Python, one at a time, and the host work of a step (Lightning's loop, the
optimizer, the metrics) adds to it. ``torch.cuda.make_graphed_callables`` records the network's
forward and backward kernels once and then launches each pass as one graph, so the host gets
ahead of the GPU and its other work no longer sets the pace.

A graph repeats exactly the kernels it recorded, on the tensors it recorded. ``TrainingGraph``
uses it only for steps that are the same every time: the recorded batch shape and dtype, every
module in training mode, the same parameters and buffers (the same memory, the same
``requires_grad``), no module hooks but the channels-last conversion, and no skip block that is
lesioned, routed, observed or dropped by stochastic depth. Any other step runs the network as
usual: the graph is an optimisation, never a change of what is computed.

The backward graph writes each parameter's gradient into memory of its own, which autograd
hands to the parameter when its gradient is unset; the optimizer's ``zero_grad`` (to ``None``,
torch's default and Lightning's) before each backward pass keeps it so. Accumulating gradients
over several batches would add a gradient to itself: the Classifier runs the network itself on
every step that accumulates. A gradient holds until the next step's forward pass (Lightning
clears gradients after it): read gradients in the hooks of the step that made them.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from skipnets.nn.skip import SkipBlock

Grapher = Callable[..., Any]


def _make_graphed_callables(*args: Any, **kwargs: Any) -> Any:
    return torch.cuda.make_graphed_callables(*args, **kwargs)


_TORCHS_GRAPHER = _make_graphed_callables


class _Network(nn.Module):
    """The network behind a module with no hooks of its own, as ``make_graphed_callables``
    requires (the network's own hooks, such as the channels-last conversion, run inside)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x)


class TrainingGraph:
    """Runs ``network``'s training forward (and so its backward) from CUDA graphs.

    Call it with a training batch's inputs: it returns the logits from the graph, or ``None``
    when this step must run the network itself (``unrecorded`` counts those steps by reason). The
    graphs are recorded at the first call that can use them; recording runs the network three
    times more on that batch, and the running statistics of its normalisation layers are put
    back afterwards, so the step's result is the one the network gives without graphs.

    Args:
        network: the network, on its CUDA device.
        allowed_hooks: the ids of hook functions that may be registered on its modules (they run
            inside the graph, so they must only compute on tensors).
        grapher: what records the graphs (default ``torch.cuda.make_graphed_callables``).
    """

    def __init__(
        self,
        network: nn.Module,
        allowed_hooks: frozenset[int] = frozenset(),
        grapher: Grapher | None = None,
    ) -> None:
        self.network = network
        self.allowed_hooks = allowed_hooks
        self.grapher = grapher or _make_graphed_callables
        self.modules = tuple(network.modules())
        self.slots = [
            (table, name)
            for module in self.modules
            for table in (module._parameters, module._buffers)
            for name in table
        ]
        self.blocks = tuple(m for m in self.modules if isinstance(m, SkipBlock))
        self.graphed: nn.Module | None = None
        self.sample: Tensor | None = None
        #: The parameters and buffers the graphs were recorded with (kept alive), and their state.
        self.recorded: list[Tensor | None] | None = None
        self.recorded_state: tuple[list[bool], int] | None = None
        #: Why recording failed; it is not tried again.
        self.failed: str | None = None
        self.replays = 0
        #: How many recorded outputs let go of their autograd graph (see release_recording).
        self.released = 0
        #: Steps that ran the network itself, by reason.
        self.unrecorded: Counter[str] = Counter()

    def __call__(self, x: Tensor, off: str | None = None) -> Tensor | None:
        """The logits of ``x`` from the graphs, or None: the network must run itself, for the
        caller's reason ``off`` or for one of the graph's own."""
        reason = off or self.failed or self._dynamic(x)
        if reason is None and self.graphed is None and not self._record(x):
            reason = self.failed
        if reason is not None:
            self.unrecorded[reason] += 1
            return None
        self.replays += 1
        return self.graphed(x)

    def summary(self) -> str:
        """One line: how many steps ran from the graphs, and why the others did not."""
        others = sum(self.unrecorded.values())
        line = f"{self.replays:,} training steps ran from CUDA graphs, {others:,} without"
        if others:
            reasons = "; ".join(f"{n:,}: {r}" for r, n in self.unrecorded.most_common(3))
            line += f" ({reasons})"
        return line

    # -- what a graph cannot repeat -------------------------------------------------------
    def _dynamic(self, x: Tensor) -> str | None:
        """Why this step cannot be the recorded one, or None."""
        if not isinstance(x, Tensor):
            return f"the network's input is a {type(x).__name__}, not a tensor"
        sample = self.sample
        if sample is not None and (
            x.shape != sample.shape or x.dtype != sample.dtype or x.device != sample.device
        ):
            return f"a batch of shape {tuple(x.shape)}, not the recorded {tuple(sample.shape)}"
        if _global_hooks():
            return "global module hooks are registered"
        for module in self.modules:  # the network itself first
            if not module.training:
                return f"{type(module).__name__} is in evaluation mode"
            hooks = _hooks(module)
            if hooks and not all(id(h) in self.allowed_hooks for h in hooks):
                return f"a hook is registered on {type(module).__name__}"
        for block in self.blocks:
            if not block.fast_path:
                return f"{type(block).__name__} is lesioned, routed, observed or dropped"
        if self.recorded is not None and self._changed():
            # Replaced (Lightning's SWA swaps BatchNorm statistics, a move reallocates) or
            # switched to or from training: the graphs would read and write the old ones.
            return "the network's parameters or buffers changed since the graphs were recorded"
        return None

    def _held(self) -> list[Tensor | None]:
        return [table[name] for table, name in self.slots]

    def _state(self, held: list[Tensor | None]) -> tuple[list[bool], int]:
        """Which of ``held`` train, and where the first one's memory is (a move changes all)."""
        first = next((t for t in held if t is not None), None)
        trains = [t is not None and t.requires_grad for t in held]
        return trains, first.data_ptr() if first is not None else 0

    def _changed(self) -> bool:
        """Whether a parameter or buffer is another tensor than the recorded one (the objects the
        modules hold), trains or not as it did, or has moved."""
        held = self._held()
        if any(now is not then for now, then in zip(held, self.recorded)):
            return True
        return self._state(held) != self.recorded_state

    # -- recording --------------------------------------------------------------------------
    def _record(self, x: Tensor) -> bool:
        buffers = list(self.network.buffers())
        saved = [b.detach().clone() for b in buffers]
        sample = x.detach().clone()
        kwargs: dict[str, Any] = {"allow_unused_input": True}
        if _accepts(self.grapher, "capture_error_mode"):
            # Other threads (a DataLoader's pin-memory thread) may call CUDA meanwhile.
            kwargs["capture_error_mode"] = "thread_local"
        try:
            with warnings.catch_warnings():
                # Before torch 2.12 the warm-up passes run on one stream and the recording on
                # another, while the last warm-up's outputs keep their gradient accumulators:
                # recording the backward pass hands gradients across the two streams (one wait,
                # recorded in the graph), and autograd warns once per process. After recording,
                # release_recording gives the training steps accumulators of their own stream.
                warnings.filterwarnings(
                    "ignore", "The AccumulateGrad node's stream does not match", UserWarning
                )
                graphed = self.grapher(_Network(self.network), (sample,), **kwargs)
        except Exception as error:  # any failure: the network runs as usual
            self.failed = f"recording the graphs failed: {type(error).__name__}: {error}"
            warnings.warn(
                f"model.cuda_graphs: {self.failed}; the network runs as usual", stacklevel=2
            )
            return False
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
        self.released = release_recording(graphed)
        self.graphed, self.sample = graphed, sample
        self.recorded = self._held()
        self.recorded_state = self._state(self.recorded)
        return True

    # -- copies ------------------------------------------------------------------------------
    # A copied or pickled module holds no graphs: recorded ones belong to this network's tensors.
    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        return None

    def __reduce__(self) -> tuple[Callable[[], None], tuple[()]]:
        return _nothing, ()


def _nothing() -> None:
    return None


def release_recording(graphed: Any) -> int:
    """Let the recorded forward pass's autograd graph go; returns how many outputs let go.

    ``make_graphed_callables`` keeps the outputs of the forward pass it recorded, and with them
    that pass's autograd graph, whose gradient accumulators (one per parameter) belong to the
    recording stream. Every later backward pass then hands its gradients from the current stream
    to those accumulators: autograd makes the streams wait for each other, parameter by
    parameter, and warns that "The AccumulateGrad node's stream does not match". Detaching the
    kept outputs (found in the closures of the graphed forward) frees that graph; the next step
    makes new accumulators on its own stream. Replaying is unaffected: it returns detached
    copies of those outputs and never reads their graph."""
    released, seen = 0, set()
    todo = [getattr(graphed, "forward", graphed)]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Tensor):
            if item.grad_fn is not None:
                try:
                    item.detach_()
                except RuntimeError:  # a view: it keeps its graph
                    continue
                released += 1
        elif isinstance(item, (tuple, list)):
            todo.extend(item)
        elif isinstance(item, staticmethod):
            todo.append(item.__func__)
        elif inspect.isfunction(item):
            todo.extend(cell.cell_contents for cell in item.__closure__ or () if _filled(cell))
        elif isinstance(item, type) and issubclass(item, torch.autograd.Function):
            todo.extend(vars(item).values())
    return released


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def pinning_conflict(loaders: Any, grapher: Grapher | None = None) -> str | None:
    """Why recording graphs would break the training loaders, or None.

    A ``DataLoader`` with workers and ``pin_memory`` pins each batch in a thread of this
    process. While a graph records, CUDA refuses other threads' allocations unless the recording
    is local to its own thread, which ``make_graphed_callables`` offers from torch 2.12 on
    (``capture_error_mode``); before that, the pinning thread would fail.
    """
    if _accepts(grapher or _make_graphed_callables, "capture_error_mode"):
        return None
    pending, pinning = [loaders], 0
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif isinstance(item, DataLoader) and item.pin_memory and item.num_workers > 0:
            pinning += 1
    if not pinning:
        return None
    return (
        f"the training DataLoader pins memory in a thread (pin_memory with workers), which "
        f"CUDA refuses while a graph records in torch {torch.__version__}; torch 2.12 or later "
        "records without that limit"
    )


def _hooks(module: nn.Module) -> list[Any]:
    found: list[Any] = []
    for table in (
        module._forward_pre_hooks,
        module._forward_hooks,
        module._backward_hooks,
        module._backward_pre_hooks,
    ):
        if table:
            found.extend(table.values())
    return found


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return any(
        getattr(torch_module, name, None)
        for name in (
            "_global_forward_pre_hooks",
            "_global_forward_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )


def _accepts(function: Callable[..., Any], name: str) -> bool:
    target = torch.cuda.make_graphed_callables if function is _TORCHS_GRAPHER else function
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
