"""Top activations projected back to pixel space: DeconvNet (Zeiler & Fergus 2013), guided
backpropagation (Springenberg et al. 2014), and feature refinement across a residual stage
(Chu et al. 2017)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from skipnets.data.analysis import AnalysisSplit, Split, analysis_split, check_split, inputs_of
from skipnets.errors import ConfigError
from skipnets.info import call_argument
from skipnets.nn import SkipBlock, network_name, skip_blocks
from skipnets.runs import plugin_dir
from skipnets_plugins._plotting import log_images, new_figure, write_csv

Method = Literal["deconvnet", "guided_backprop"]
METHODS = ("deconvnet", "guided_backprop")
COLUMNS = ("epoch", "layer", "channel", "rank", "sample", "value", "row", "col", "box")

__all__ = ["DeconvNet", "project", "top_activations", "unit_regions"]


# -- the projections --------------------------------------------------------------------------
class _DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward rectifies the signal coming down (Zeiler & Fergus)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clamp(min=0)


class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward passes what is positive both on the way up and on the way down."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0)


_RELU_NAMES = {"relu", "relu_"}


class _ReLURule(TorchFunctionMode):
    """Replaces every ReLU of the forward pass, module or functional, by one with another
    backward rule. (Hooks on ``nn.ReLU`` modules would miss the ``F.relu`` calls inside blocks.)"""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.function = _DeconvReLU if method == "deconvnet" else _GuidedReLU

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _RELU_NAMES and isinstance(args[0], Tensor):
            return self.function.apply(args[0])
        return func(*args, **kwargs)


class _Geometry(TorchFunctionMode):
    """A forward pass in which every path from a pixel to a unit carries a positive weight:
    convolutions average, max pools average their window, ReLUs and batch norms pass everything.
    The input gradient of a unit is then non-zero exactly on its receptive field."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if name in _RELU_NAMES or name == "batch_norm":
            return args[0]
        if name == "conv2d":
            weight = call_argument(args, kwargs, 1, "weight")
            fan_in = weight[0].numel()
            return F.conv2d(
                args[0],
                torch.full_like(weight, 1.0 / fan_in),
                None,
                call_argument(args, kwargs, 3, "stride", 1),
                call_argument(args, kwargs, 4, "padding", 0),
                call_argument(args, kwargs, 5, "dilation", 1),
                call_argument(args, kwargs, 6, "groups", 1),
            )
        if name == "max_pool2d" and not call_argument(args, kwargs, 6, "return_indices", False):
            kernel = call_argument(args, kwargs, 1, "kernel_size")
            return F.avg_pool2d(
                args[0],
                kernel,
                call_argument(args, kwargs, 2, "stride") or kernel,
                call_argument(args, kwargs, 3, "padding", 0),
                call_argument(args, kwargs, 5, "ceil_mode", False),
            )
        return func(*args, **kwargs)


class _MaxPooling(TorchFunctionMode):
    """Records whether a forward pass max-pools (``nn.MaxPool2d`` or a functional call): the
    deconvnet projection needs the switches of max pooling to depend on the image at all."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if "max_pool" in getattr(func, "__name__", ""):
            self.seen = True
        return func(*args, **(kwargs or {}))


class _Reached(Exception):
    pass


def forward_to(model: nn.Module, layers: Sequence[nn.Module], x: Tensor) -> list[Tensor]:
    """The outputs of ``layers`` for input ``x``; the forward pass stops once all are seen."""
    found: dict[int, Tensor] = {}

    def hook(index: int):
        def save(module, args, output):
            found[index] = output
            if len(found) == len(layers):
                raise _Reached

        return save

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model(x)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(layers)) if i not in found]
    if missing:
        raise ConfigError(
            f"DeconvNet: layer {type(layers[missing[0]]).__name__} was not run by the forward pass"
        )
    return [found[i] for i in range(len(layers))]


def _select(out: Tensor, channels: Tensor, positions: Tensor) -> Tensor:
    flat = out.flatten(2)
    return flat[torch.arange(flat.shape[0], device=flat.device), channels, positions]


def project(
    model: nn.Module,
    layer: nn.Module,
    inputs: Tensor,
    channels: Tensor,
    positions: Tensor,
    method: Method = "deconvnet",
) -> Tensor:
    """Project unit ``(channels[n], positions[n])`` of ``layer``'s output, for each input ``n``,
    back to pixel space; ``positions`` index the flattened feature map.

    ``deconvnet``: the signal goes down through the transposed filters, unpools through the max
    pool switches of the forward pass and is rectified at every ReLU (Zeiler & Fergus 2013).
    ``guided_backprop``: at every ReLU it is also masked by where the forward pass was positive
    (Springenberg et al. 2014). The unit is seeded with 1 rather than its activation, which
    only changes the scale. Each input's projection depends on that input alone (eval mode).
    """
    if method not in METHODS:
        raise ConfigError(f"DeconvNet: method must be one of {', '.join(METHODS)}, not {method!r}")
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        with _ReLURule(method):
            (out,) = forward_to(model, [layer], x)
        (grad,) = torch.autograd.grad(_select(out, channels, positions).sum(), x)
    return grad


def unit_regions(
    model: nn.Module, layer: nn.Module, inputs: Tensor, positions: Tensor
) -> list[tuple[int, int, int, int]]:
    """``(top, left, bottom, right)`` (bottom/right exclusive) of the input region that can
    affect the unit at each flattened ``positions[n]`` of ``layer``'s output, clipped to the
    image: where one unit's receptive field lies in one image (for the theoretical size of a
    network's receptive field, see ``skipnets.info.receptive_field``)."""
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        with _Geometry():
            (out,) = forward_to(model, [layer], x)
        flat = out.flatten(2)
        units = flat[torch.arange(flat.shape[0]), :, positions].sum()
        (grad,) = torch.autograd.grad(units, x)
    boxes = []
    for mask in grad.abs().sum(1) > 0:
        rows = torch.nonzero(mask.any(1)).flatten()
        cols = torch.nonzero(mask.any(0)).flatten()
        if rows.numel() == 0:  # a unit no pixel reaches: show the whole image
            boxes.append((0, 0, mask.shape[0], mask.shape[1]))
        else:
            boxes.append((int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1))
    return boxes


@torch.no_grad()
def top_activations(
    model: nn.Module, layers: Sequence[nn.Module], batches, k: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """For each layer, ``(values, samples, positions)`` of shape ``(k, channels)``: the ``k``
    largest per-sample maxima of each feature map, best first, over ``batches`` of
    ``(inputs, sample indices)``; ``positions`` index the flattened map."""
    best: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * len(layers)
    for inputs, indices in batches:
        outs = forward_to(model, layers, inputs)
        for i, out in enumerate(outs):
            values, positions = out.flatten(2).max(dim=2)  # (B, C)
            samples = indices.to(values.device).view(-1, 1).expand_as(values)
            best[i] = _merge(best[i], (values, samples, positions), k)
    if any(b is None for b in best):
        raise ConfigError("DeconvNet: the chosen split is empty")
    return best  # type: ignore[return-value]


def _merge(old, new, k: int):
    if old is not None:
        new = tuple(torch.cat([a, b]) for a, b in zip(old, new))
    values, samples, positions = new
    top = values.topk(min(k, values.shape[0]), dim=0)
    return top.values, samples.gather(0, top.indices), positions.gather(0, top.indices)


# -- the callback -----------------------------------------------------------------------------
class DeconvNet(Callback):
    """Top activations projected to pixel space: DeconvNet, guided backprop, refinement.

    What the units of chosen layers respond to: for each chosen feature map, the ``top_k``
    strongest activations over a dataset split, each projected back to pixel space and shown
    next to the input patch it sees (its receptive field), in grids like Fig. 2 of Zeiler &
    Fergus 2013, "Visualizing and Understanding Convolutional Networks" (arXiv:1311.2901).

    Projections (``methods``): ``deconvnet`` (unpool with the max-pool switches, rectify at each
    ReLU, transposed filters) and ``guided_backprop`` (Springenberg et al. 2014, "Striving for
    Simplicity", arXiv:1412.6806). Both are implemented here by swapping the backward rule of
    every ReLU through a ``TorchFunctionMode``, which also catches the functional ``F.relu``
    calls inside skip blocks; captum's ``NeuronDeconvolution``/``NeuronGuidedBackprop`` (which
    hook ``nn.ReLU`` modules only) are the oracle in the tests. The receptive field is found from
    the input gradient of a positive-weight copy of the forward pass. The first convolution's
    filters are shown directly. Feature refinement (Chu, Yang & Tadinada 2017, "Visualizing
    Residual Networks", arXiv:1701.02362): the same channels after each block of one stage.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: DeconvNet
              init_args: {layers: [blocks.2, blocks.8], channels: 8, split: val}

    .. code-block:: python

        trainer = L.Trainer(callbacks=[DeconvNet(every_n_epochs=10)])

    Runs at the end of training, every ``every_n_epochs``, and in a standalone ``validate`` on a
    checkpoint (``skipnets deconvnet --config ... --ckpt_path ...``).

    Writes, per run of the analysis, ``<run dir>/deconvnet/epoch<E>/`` (in ``validate``:
    ``deconvnet/<checkpoint name>/``): ``filters.png``,
    ``<layer>_<method>.png`` per layer and method, ``refinement_stage<S>_<method>.png``, and
    ``top_activations.csv`` (layer, channel, rank, sample index, value, row and column of the
    unit, receptive-field box); the images are logged to W&B.

    Args:
        layers: module names whose outputs are analysed (``blocks.8`` or ``model.blocks.8``).
            Default: the last skip block of every stage; for nets without skip blocks, every
            ``Conv2d``.
        channels: feature maps per layer: a number (the maps with the strongest activations)
            or a list of channel indices.
        top_k: activations shown per feature map (9 in the paper).
        split: the data module's split searched for top activations.
        max_samples: search at most this many samples of the split; None: all.
        methods: projections to draw: ``deconvnet``, ``guided_backprop``. Default: both for
            networks that max-pool, ``guided_backprop`` alone for those that do not (every
            ResNet here). Without max-pool switches nothing in the deconvnet's way down depends
            on the image, so a unit projects the same pattern for every input; asking for
            ``deconvnet`` on such a network warns.
        refinement_stage: stage whose blocks the refinement figure follows; None: the last stage;
            -1: no refinement figure. Needs skip blocks.
        refinement_channels: channels followed through the stage (the strongest at its end).
        every_n_epochs: also run after every this many training epochs; 0: only at the end of
            training.
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        channels: int | list[int] = 8,
        top_k: int = 9,
        split: Split = "val",
        max_samples: int | None = None,
        methods: list[Method] | None = None,
        refinement_stage: int | None = None,
        refinement_channels: int = 2,
        every_n_epochs: int = 0,
    ) -> None:
        check_split(split, "DeconvNet")
        if methods is not None:
            bad = [m for m in methods if m not in METHODS]
            if bad or not methods:
                raise ConfigError(
                    f"DeconvNet: methods must be a non-empty list of {', '.join(METHODS)}, "
                    f"got {methods}"
                )
        if isinstance(channels, int) and channels < 1:
            raise ConfigError(f"DeconvNet: channels must be positive, got {channels}")
        if isinstance(channels, list) and (not channels or min(channels) < 0):
            raise ConfigError(f"DeconvNet: channels must be non-negative indices, got {channels}")
        for name, value in (("top_k", top_k), ("refinement_channels", refinement_channels)):
            if value < 1:
                raise ConfigError(f"DeconvNet: {name} must be positive, got {value}")
        if max_samples is not None and max_samples < 1:
            raise ConfigError(f"DeconvNet: max_samples must be positive, got {max_samples}")
        if every_n_epochs < 0:
            raise ConfigError(f"DeconvNet: every_n_epochs must be >= 0, got {every_n_epochs}")
        self.layers = layers
        self.channels = channels
        self.top_k = top_k
        self.split = split
        self.max_samples = max_samples
        self.requested_methods = list(methods) if methods is not None else None
        #: The projections drawn: the requested ones, or the default for the model once seen.
        self.methods = list(methods) if methods is not None else list(METHODS)
        self._warned_no_switches = False
        self.refinement_stage = refinement_stage
        self.refinement_channels = refinement_channels
        self.every_n_epochs = every_n_epochs
        self._layers: list[tuple[str, nn.Module]] = []
        self._stage_blocks: list[tuple[str, nn.Module]] = []
        self._first_conv: nn.Conv2d | None = None
        self._widths: list[int] = []
        self._last_step: int | None = None
        self._last_epoch = 0
        #: Rows of ``top_activations.csv`` from the latest run.
        self.rows: list[dict[str, Any]] = []

    # -- names checked at setup; shapes and channels once the model is on its device -----------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        modules = dict(pl_module.named_modules())
        blocks = list(skip_blocks(pl_module))
        if self.layers is None:
            chosen = [
                name
                for i, (name, block) in enumerate(blocks)
                if i + 1 == len(blocks) or blocks[i + 1][1].stage != block.stage
            ]
            if not chosen:
                chosen = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not chosen:
                raise ConfigError(
                    f"DeconvNet: {type(pl_module).__name__} has no convolutions to visualise"
                )
        else:
            chosen = [_resolve(name, modules) for name in self.layers]
        self._layers = [(network_name(name), modules[name]) for name in chosen]

        stage_blocks: list[tuple[str, SkipBlock]] = []
        if self.refinement_stage != -1 and blocks:
            wanted = blocks[-1][1].stage if self.refinement_stage is None else self.refinement_stage
            stage_blocks = [(n, b) for n, b in blocks if b.stage == wanted]
            if not stage_blocks:
                stages = sorted({b.stage for _, b in blocks})
                raise ConfigError(
                    f"DeconvNet: refinement_stage={self.refinement_stage} but the model's stages "
                    f"are {stages}; choose one, or -1 for no refinement figure"
                )
        elif self.refinement_stage not in (None, -1):
            raise ConfigError(
                "DeconvNet: refinement_stage needs skip blocks; set it to -1 for this model"
            )
        self._stage_blocks = [(network_name(n), b) for n, b in stage_blocks]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_shapes(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._check_shapes(trainer, pl_module)

    def _check_shapes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One sample through the model on its device: the chosen layers must give feature maps
        with the requested channels, before any training step runs."""
        split = analysis_split(trainer, self.split, owner="DeconvNet")
        if split.size == 0:
            raise ConfigError(f"DeconvNet: the {self.split} split is empty")
        x = inputs_of(split.fetch(trainer, [0]))
        convs: list[nn.Conv2d] = []
        hooks = [
            m.register_forward_hook(lambda mod, a, o: convs.append(mod))
            for m in pl_module.modules()
            if isinstance(m, nn.Conv2d)
        ]
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), _MaxPooling() as pooling:
                pl_module(x)
                outs = forward_to(pl_module, [m for _, m in self._layers + self._stage_blocks], x)
        finally:
            for h in hooks:
                h.remove()
            pl_module.train(was_training)
        if x.ndim != 4 or not convs:
            raise ConfigError(
                "DeconvNet needs image inputs and a convolutional network; "
                f"{type(pl_module).__name__} got inputs of shape {tuple(x.shape[1:])}"
            )
        self._first_conv = convs[0]
        self._widths = [out.shape[-1] for out in outs]
        self._choose_methods(type(pl_module).__name__, max_pools=pooling.seen)
        for (name, _), out in zip(self._layers + self._stage_blocks, outs):
            if out.ndim != 4:
                raise ConfigError(
                    f"DeconvNet: layer {name} gives shape {tuple(out.shape[1:])}, not feature "
                    "maps (channels, height, width); choose a convolutional layer"
                )
            if isinstance(self.channels, list) and max(self.channels) >= out.shape[1]:
                raise ConfigError(
                    f"DeconvNet: channel {max(self.channels)} requested but layer {name} has "
                    f"{out.shape[1]} channels"
                )

    def _choose_methods(self, model: str, max_pools: bool) -> None:
        if max_pools:
            self.methods = self.requested_methods or list(METHODS)
        elif self.requested_methods is None:
            self.methods = ["guided_backprop"]
            rank_zero_info(
                f"DeconvNet: {model} has no max pooling, so the deconvnet projection would be the "
                "same for every image; drawing guided backpropagation only"
            )
        else:
            self.methods = self.requested_methods
            if "deconvnet" in self.methods and not self._warned_no_switches:
                self._warned_no_switches = True
                rank_zero_warn(
                    f"DeconvNet: {model} has no max pooling, and without max-pool switches the "
                    "deconvnet projection of a unit does not depend on the image (only on where "
                    "the unit is); use methods: [guided_backprop]"
                )

    # -- when it runs ---------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_epoch = trainer.current_epoch
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self.visualise(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_step != trainer.global_step:
            self.visualise(trainer, pl_module, epoch=self._last_epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A standalone `validate` (``skipnets deconvnet``): the checkpoint's weights are loaded.
        if trainer.state.fn == TrainerFn.VALIDATING:
            # plugin_dir adds the checkpoint's name; a validate of in-memory weights gets one.
            self.visualise(trainer, pl_module, folder=None if trainer.ckpt_path else "validate")

    # -- the analysis ---------------------------------------------------------------------------
    def visualise(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        epoch: int | None = None,
        folder: str | None = None,
    ) -> list[str]:
        """Search the split (each rank its share), merge the top activations across ranks, and
        draw the figures on rank zero into ``deconvnet/<folder>`` (default while fitting:
        ``epoch<E>``; on a checkpoint: ``deconvnet/<checkpoint name>``). Returns the paths
        written (empty on other ranks)."""
        epoch = trainer.current_epoch if epoch is None else epoch
        if folder is None and trainer.state.fn == TrainerFn.FITTING:
            folder = f"epoch{epoch:03d}"
        self._last_step = trainer.global_step
        watched = self._layers + self._stage_blocks
        was_training = pl_module.training
        pl_module.eval()
        try:
            # Validation hooks run under inference mode, which rules out the backward passes.
            with torch.inference_mode(False):
                split = analysis_split(trainer, self.split, self.max_samples, "DeconvNet")
                batches = ((inputs_of(batch), index) for batch, index in split.on_device(trainer))
                tops = top_activations(pl_module, [m for _, m in watched], batches, self.top_k)
                tops = [_gather(trainer, top, self.top_k) for top in tops]
                if not trainer.is_global_zero:
                    return []
                return self._draw(trainer, pl_module, split, watched, tops, epoch, folder)
        finally:
            pl_module.train(was_training)

    def _draw(self, trainer, pl_module, split: AnalysisSplit, watched, tops, epoch, name):
        folder = plugin_dir(trainer, "deconvnet") / (name or "")
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        self.rows = []

        def analyse(layer_index: int, channel: int, method: str):
            """Inputs, projections and receptive fields of one feature map's top units."""
            module = watched[layer_index][1]
            _, samples, positions = (t[:, channel] for t in tops[layer_index])
            x = inputs_of(split.fetch(trainer, samples))
            proj = project(
                pl_module, module, x, torch.full_like(positions, channel), positions, method
            )
            return x, proj, unit_regions(pl_module, module, x, positions)

        # The first layer's filters, as they are.
        if self._first_conv is not None:
            path = folder / "filters.png"
            _filters_figure(self._first_conv.weight.detach().cpu()).savefig(path, dpi=110)
            written.append(path)

        for li, (name, _) in enumerate(self._layers):
            chosen = self._pick_channels(tops[li][0])
            boxes_by_channel = {}
            for method in self.methods:
                panels = []
                for channel in chosen:
                    x, proj, boxes = analyse(li, channel, method)
                    boxes_by_channel[channel] = boxes
                    panels.append((channel, _mosaic(proj, boxes, signed=True), _mosaic(x, boxes)))
                path = folder / f"{_file_name(name)}_{method}.png"
                _grid_figure(panels, f"{name}: {method}, top {self.top_k} of {self.split}").savefig(
                    path, dpi=110
                )
                written.append(path)
            self._record(li, name, epoch, chosen, tops, boxes_by_channel)

        if self._stage_blocks:
            offset = len(self._layers)
            last = tops[offset + len(self._stage_blocks) - 1][0]
            strongest = last[0].topk(min(self.refinement_channels, last.shape[1])).indices.tolist()
            stage = self._stage_blocks[0][1].stage
            for method in self.methods:
                rows = []
                for bi, (name, _) in enumerate(self._stage_blocks):
                    row = []
                    for channel in strongest:
                        x, proj, boxes = analyse(offset + bi, channel, method)
                        row.append((channel, _mosaic(proj, boxes, 1, True), _mosaic(x, boxes, 1)))
                    rows.append((name, row))
                path = folder / f"refinement_stage{stage}_{method}.png"
                _refinement_figure(rows, f"stage {stage}, {method}").savefig(path, dpi=110)
                written.append(path)

        csv_path = write_csv(folder / "top_activations.csv", COLUMNS, self.rows)
        log_images(trainer, "deconvnet/figures", written)
        return [str(p) for p in [*written, csv_path]]

    def _pick_channels(self, values: Tensor) -> list[int]:
        if isinstance(self.channels, list):
            return list(self.channels)
        strongest = values[0].topk(min(self.channels, values.shape[1])).indices
        return sorted(strongest.tolist())

    def _record(self, li, name, epoch, chosen, tops, boxes_by_channel) -> None:
        values, samples, positions = tops[li]
        width = self._widths[li]
        for channel in chosen:
            for rank in range(values.shape[0]):
                position = int(positions[rank, channel])
                self.rows.append(
                    {
                        "epoch": epoch,
                        "layer": name,
                        "channel": channel,
                        "rank": rank,
                        "sample": int(samples[rank, channel]),
                        "value": float(values[rank, channel]),
                        "row": position // width,
                        "col": position % width,
                        "box": " ".join(map(str, boxes_by_channel[channel][rank])),
                    }
                )


def _gather(trainer: L.Trainer, top, k: int):
    """Merge every rank's top ``k`` into the global top ``k``."""
    if trainer.world_size == 1:
        return top
    gathered = [trainer.strategy.all_gather(t) for t in top]  # (world, k, C)
    merged = tuple(g.reshape(-1, g.shape[-1]) for g in gathered)
    return _merge(None, merged, k)


def _resolve(name: str, modules: dict[str, nn.Module]) -> str:
    for candidate in (name, f"model.{name}"):
        if candidate in modules and candidate:
            return candidate
    suggestions = [network_name(n) for n in modules if n and "." in n][:8]
    raise ConfigError(
        f"DeconvNet: no layer named {name!r}; names look like {', '.join(suggestions)}"
    )


def _file_name(name: str) -> str:
    return name.replace(".", "_") or "model"


# -- pictures ---------------------------------------------------------------------------------
def _to_rgb(image: Tensor, signed: bool) -> np.ndarray:
    """(C, H, W) -> (H, W, 3) in [0, 1]: signed maps centre zero at grey, images stretch."""
    image = image.detach().float().cpu()
    if signed:
        scale = image.abs().max().clamp_min(1e-12)
        image = 0.5 + 0.5 * image / scale
    else:
        low, high = image.min(), image.max()
        image = (image - low) / (high - low).clamp_min(1e-12)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] != 3:
        image = image.mean(0, keepdim=True).expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


def _mosaic(
    images: Tensor,
    boxes: Sequence[tuple[int, int, int, int]],
    rows: int | None = None,
    signed: bool = False,
) -> np.ndarray:
    """Crops of ``images`` to their boxes, tiled ``rows`` high with a white gap."""
    count = images.shape[0]
    rows = rows or math.ceil(math.sqrt(count))
    cols = math.ceil(count / rows)
    tile_h = max(b[2] - b[0] for b in boxes)
    tile_w = max(b[3] - b[1] for b in boxes)
    gap = 1
    canvas = np.ones((rows * (tile_h + gap) - gap, cols * (tile_w + gap) - gap, 3))
    for i, (image, (top, left, bottom, right)) in enumerate(zip(images, boxes)):
        # Normalise over the whole image, then crop, so patches keep their real contrast.
        crop = _to_rgb(image, signed)[top:bottom, left:right]
        r, c = divmod(i, cols)
        y, x = r * (tile_h + gap), c * (tile_w + gap)
        canvas[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
    return canvas


def _grid_figure(panels, title: str):
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = new_figure(rows, 2 * columns, size=(1.6, 1.8))
    for ax in axes.flat:
        ax.set_axis_off()
    for i, (channel, projection, patches) in enumerate(panels):
        r, c = divmod(i, columns)
        axes[r][2 * c].imshow(projection, interpolation="nearest")
        axes[r][2 * c].set_title(f"channel {channel}", fontsize=8)
        axes[r][2 * c + 1].imshow(patches, interpolation="nearest")
        axes[r][2 * c + 1].set_title("input patches", fontsize=8)
    fig.suptitle(title)
    return fig


def _refinement_figure(rows, title: str):
    columns = len(rows[0][1])
    fig, axes = new_figure(len(rows), 2 * columns, size=(4.0, 0.9))
    for r, (name, row) in enumerate(rows):
        for c, (channel, projection, patches) in enumerate(row):
            for j, image in enumerate((projection, patches)):
                ax = axes[r][2 * c + j]
                ax.imshow(image, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"channel {channel}" + (" patches" if j else ""), fontsize=8)
            axes[r][0].set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(f"feature refinement, {title}")
    return fig


def _filters_figure(weight: Tensor):
    count = weight.shape[0]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    fig, axes = new_figure(rows, columns, size=(0.8, 0.8))
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(count):
        axes[i // columns][i % columns].imshow(
            _to_rgb(weight[i], signed=True), interpolation="nearest"
        )
    fig.suptitle(f"first-layer filters ({weight.shape[2]}x{weight.shape[3]})")
    return fig
