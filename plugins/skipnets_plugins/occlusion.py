"""Occlusion sensitivity: a grey square slid over an image, and what the network makes of each
occluded copy (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks",
Fig. 7)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from matplotlib import colormaps
from matplotlib.patches import Patch, Rectangle
from torch import Tensor, nn

from skipnets.data.analysis import AnalysisSplit, Split, analysis_split, check_split, inputs_of
from skipnets.errors import ConfigError
from skipnets.nn import network_name, skip_blocks
from skipnets.runs import plugin_dir
from skipnets_plugins._milestones import RunWhenTrained
from skipnets_plugins._plotting import (
    latest_result,
    log_rows,
    new_figure,
    overlay_runs,
    read_rows,
    save_figure,
    write_csv,
)

__all__ = ["Occlusion", "OcclusionMaps", "occluder_corners", "occlusion_maps"]

COLUMNS = (
    "sample",
    "label",
    "row",
    "col",
    "size",
    "layer",
    "channel",
    "activation",
    "p_correct",
    "predicted",
    "baseline_activation",
    "baseline_p_correct",
    "baseline_predicted",
)


# -- the measurement --------------------------------------------------------------------------
@dataclass(frozen=True)
class OcclusionMaps:
    """What a network makes of each occluded copy of ``N`` images, on an ``R x C`` grid of
    occluder positions (the square's top-left corners ``tops[i], lefts[j]``, in pixels).

    Attributes:
        tops, lefts: ``(R,)`` and ``(C,)`` corner rows and columns.
        channel: ``(N,)`` each image's strongest feature map of the layer: the one with the
            largest single activation in the un-occluded image.
        activation: ``(N, R, C)`` total activation (sum over positions) of that feature map.
        p_correct: ``(N, R, C)`` softmax probability of the image's label.
        predicted: ``(N, R, C)`` the most probable class.
        baseline_activation, baseline_p_correct, baseline_predicted: ``(N,)`` the same for the
            un-occluded images.
    """

    tops: Tensor
    lefts: Tensor
    channel: Tensor
    activation: Tensor
    p_correct: Tensor
    predicted: Tensor
    baseline_activation: Tensor
    baseline_p_correct: Tensor
    baseline_predicted: Tensor


def occluder_corners(height: int, width: int, size: int, stride: int) -> tuple[Tensor, Tensor]:
    """Top rows and left columns of a ``size``-pixel square moved by ``stride`` pixels, kept
    wholly inside the image (a last strip narrower than ``stride`` is not visited)."""
    return torch.arange(0, height - size + 1, stride), torch.arange(0, width - size + 1, stride)


class _Outputs:
    """Forward passes that also return one layer's output, read by a forward hook."""

    def __init__(self, model: nn.Module, layer: nn.Module, context: Callable) -> None:
        self.model, self.layer, self.context = model, layer, context

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        seen: list[Tensor] = []
        handle = self.layer.register_forward_hook(lambda module, args, out: seen.append(out))
        try:
            with self.context():
                logits = self.model(x)
        finally:
            handle.remove()
        if not seen:
            raise ConfigError(
                f"Occlusion: layer {type(self.layer).__name__} was not run by the forward pass"
            )
        return seen[-1].float(), logits.float()


@torch.no_grad()
def occlusion_maps(
    model: nn.Module,
    layer: nn.Module,
    images: Tensor,
    labels: Tensor,
    size: int,
    stride: int,
    fill: float | Tensor = 0.0,
    batch_size: int = 256,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> OcclusionMaps:
    """Occlude ``images`` ``(N, C, H, W)`` with a ``size`` x ``size`` square of value ``fill``
    (a number, or a tensor that broadcasts to ``(C, H, W)``, such as per-channel values of shape
    ``(C, 1, 1)``) at every ``stride`` pixels, and record ``layer``'s strongest feature map,
    the probability of ``labels`` and the most probable class for each copy.

    The occluded copies are made on the images' device, ``batch_size`` at a time, each batch in
    one forward pass (``model`` in evaluation mode; the caller sets it). ``forward_context``
    wraps every forward pass (the precision plugin's autocast, in a Trainer).
    """
    count, _, height, width = images.shape
    tops, lefts = (t.to(images.device) for t in occluder_corners(height, width, size, stride))
    if tops.numel() == 0 or lefts.numel() == 0:
        raise ConfigError(
            f"Occlusion: a {size}-pixel occluder does not fit in {height}x{width} images"
        )
    positions = tops.numel() * lefts.numel()
    corner_rows = tops.repeat_interleave(lefts.numel())
    corner_cols = lefts.repeat(tops.numel())
    fill = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    labels = labels.to(images.device)
    outputs = _Outputs(model, layer, forward_context)

    features, logits = outputs(images)
    if features.ndim != 4:
        raise ConfigError(
            f"Occlusion: the chosen layer gives shape {tuple(features.shape[1:])}, not feature "
            "maps (channels, height, width); choose a convolutional layer"
        )
    everywhere = torch.arange(count, device=images.device)
    channel = features.flatten(2).max(2).values.argmax(1)
    probs = logits.softmax(1)
    baseline_activation = features[everywhere, channel].sum((1, 2))
    baseline_p = probs[everywhere, labels]
    baseline_predicted = probs.argmax(1)

    pixel_rows = torch.arange(height, device=images.device)
    pixel_cols = torch.arange(width, device=images.device)
    activation, p_correct, predicted = [], [], []
    for start in range(0, count * positions, batch_size):
        copy = torch.arange(start, min(start + batch_size, count * positions), device=images.device)
        image, position = copy // positions, copy % positions
        top, left = corner_rows[position, None], corner_cols[position, None]
        in_rows = (pixel_rows >= top) & (pixel_rows < top + size)  # (B, H)
        in_cols = (pixel_cols >= left) & (pixel_cols < left + size)  # (B, W)
        square = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)  # (B, 1, H, W)
        features, logits = outputs(torch.where(square, fill, images[image]))
        probs = logits.softmax(1)
        batch = torch.arange(copy.numel(), device=images.device)
        activation.append(features[batch, channel[image]].sum((1, 2)))
        p_correct.append(probs[batch, labels[image]])
        predicted.append(probs.argmax(1))

    grid = (count, tops.numel(), lefts.numel())
    return OcclusionMaps(
        tops=tops,
        lefts=lefts,
        channel=channel,
        activation=torch.cat(activation).view(grid),
        p_correct=torch.cat(p_correct).view(grid),
        predicted=torch.cat(predicted).view(grid),
        baseline_activation=baseline_activation,
        baseline_p_correct=baseline_p,
        baseline_predicted=baseline_predicted,
    )


# -- the callback -----------------------------------------------------------------------------
class Occlusion(RunWhenTrained):
    """Occlusion sensitivity maps of a few images (Zeiler & Fergus 2014, Fig. 7).

    A grey square is slid over each of the first ``samples`` images of a split (or the images
    at the given indices); for each position of the square, three maps over the image record
    what the network makes of the occluded copy, as in Fig. 7 of Zeiler & Fergus 2014,
    "Visualizing and Understanding Convolutional Networks" (arXiv:1311.2901):

    (b) the total activation of the strongest feature map of ``layer`` (the map with the largest
    activation in the un-occluded image), (d) the probability of the correct class, (e) the most
    probable class. A network that has learnt the object, not its surroundings, loses the
    correct class only when the square covers the object's discriminative part.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: Occlusion
              init_args: {split: val, samples: 6, size: 4, stride: 1}

    .. code-block:: python

        trainer = L.Trainer(callbacks=[Occlusion(samples=[3, 17], fill=0.0)])

    Runs when training ends, on the weights it ended with (on the model's device), and in a
    standalone ``validate`` on a checkpoint (``skipnets analyse Occlusion --config ...
    --ckpt_path ...``). The occluded copies are built on the model's device and go through the
    network ``batch_size`` at a time. Under DDP, rank zero alone computes and writes.

    Writes ``<run dir>/occlusion/`` (on a checkpoint: ``occlusion/<checkpoint name>/``):
    ``occlusion.png`` (one row per image: the image with the occluder's size marked, then the
    three maps, each value drawn where the square's centre was) and ``occlusion.csv`` (one row
    per image and occluder position: sample index in the split, label, the square's top row
    and left column, its size, layer, strongest channel, its total activation, p(correct), the
    predicted class, and the same three for the un-occluded image); logs the figure, the table
    and three summary numbers (mean un-occluded p(correct), mean over images of the lowest
    p(correct) over positions, fraction of positions that change the predicted class).

    Args:
        split: the data module's split the images come from.
        samples: how many images, the first of the split; or a list of their indices in it.
        size: the square's side in pixels. Default: a quarter of the image's shorter side
            (8 for 32x32 CIFAR, 4 for the 16x16 digits, 2 for the original 8x8 ones).
        stride: pixels between positions of the square. Default: half of ``size``.
        fill: the square's value in the model's input space: ``mean``, each channel's mean over
            the images analysed (grey, the paper's choice; about 0 for standardised inputs), or
            a number.
        layer: the module whose feature maps are followed (``blocks.8`` or ``model.blocks.8``).
            Default: the last skip block; for a network without skip blocks, its last ``Conv2d``.
        batch_size: occluded copies per forward pass.
    """

    def __init__(
        self,
        split: Split = "val",
        samples: int | list[int] = 4,
        size: int | None = None,
        stride: int | None = None,
        fill: float | Literal["mean"] = "mean",
        layer: str | None = None,
        batch_size: int = 256,
    ) -> None:
        check_split(split, "Occlusion")
        if isinstance(samples, bool) or not isinstance(samples, (int, list)):
            raise ConfigError(
                f"Occlusion: samples must be a number or a list of indices, not {samples!r}"
            )
        if isinstance(samples, int) and samples < 1:
            raise ConfigError(f"Occlusion: samples must be positive, got {samples}")
        if isinstance(samples, list) and (
            not samples or any(not isinstance(s, int) or s < 0 for s in samples)
        ):
            raise ConfigError(
                f"Occlusion: samples must be a non-empty list of indices >= 0, got {samples}"
            )
        for name, value in (("size", size), ("stride", stride)):
            if value is not None and value < 1:
                raise ConfigError(
                    f"Occlusion: {name} must be a positive number of pixels, got {value}"
                )
        if batch_size < 1:
            raise ConfigError(f"Occlusion: batch_size must be positive, got {batch_size}")
        if isinstance(fill, str) and fill != "mean":
            raise ConfigError(f"Occlusion: fill must be 'mean' or a number, not {fill!r}")
        if not isinstance(fill, str) and not math.isfinite(fill):
            raise ConfigError(f"Occlusion: fill must be a finite number, got {fill}")
        self.split = split
        self.samples = samples
        self.size = size
        self.stride = stride
        self.fill = fill
        self.layer = layer
        self.batch_size = batch_size
        self._layer: tuple[str, nn.Module] | None = None
        #: Rows of ``occlusion.csv`` from the latest run (rank zero).
        self.rows: list[dict[str, Any]] = []
        #: The maps of the latest run (rank zero), on the model's device.
        self.maps: OcclusionMaps | None = None

    # -- checked at setup, and with one forward pass before anything trains ---------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        modules = dict(pl_module.named_modules())
        if self.layer is not None:
            name = _resolve(self.layer, modules)
        else:
            blocks = [n for n, _ in skip_blocks(pl_module)]
            convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
            if not blocks and not convs:
                raise ConfigError(
                    f"Occlusion needs a convolutional network; {type(pl_module).__name__} has no "
                    "skip blocks and no Conv2d layers"
                )
            name = (blocks or convs)[-1]
        self._layer = (network_name(name), modules[name])
        size = analysis_split(trainer, self.split, owner="Occlusion").size
        wanted = self._indices()
        if max(wanted) >= size:
            raise ConfigError(
                f"Occlusion: image {max(wanted)} of the {self.split} split requested "
                f"(samples={self.samples}), but it has {size}"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_inputs(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._check_inputs(trainer, pl_module)

    def _check_inputs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One image through the model on its device: labelled images that the occluder fits
        in, and feature maps at the chosen layer."""
        split = analysis_split(trainer, self.split, owner="Occlusion")
        images, _ = _labelled(split.fetch(trainer, self._indices()[:1]), self.split)
        self._geometry(images)
        assert self._layer is not None
        was_training = pl_module.training
        pl_module.eval()
        try:
            features, _ = _Outputs(
                pl_module, self._layer[1], trainer.precision_plugin.forward_context
            )(images)
        finally:
            pl_module.train(was_training)
        if features.ndim != 4:
            raise ConfigError(
                f"Occlusion: layer {self._layer[0]} gives shape {tuple(features.shape[1:])}, not "
                "feature maps (channels, height, width); choose a convolutional layer"
            )

    def _geometry(self, images: Tensor) -> tuple[int, int]:
        if images.ndim != 4:
            raise ConfigError(
                "Occlusion needs image inputs (channels, height, width), got inputs of shape "
                f"{tuple(images.shape[1:])}"
            )
        side = min(images.shape[-2:])
        size = self.size if self.size is not None else max(1, round(side / 4))
        if size > side:
            raise ConfigError(
                f"Occlusion: size={size} but the images are {images.shape[-2]}x"
                f"{images.shape[-1]} pixels; choose a smaller occluder"
            )
        return size, self.stride if self.stride is not None else max(1, size // 2)

    def _indices(self) -> list[int]:
        return list(range(self.samples)) if isinstance(self.samples, int) else list(self.samples)

    # -- the analysis (RunWhenTrained: when training ends, and on a checkpoint) ----------------
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Occlude the images and write the figure and CSV; only rank zero does anything.
        Returns the files written."""
        if not trainer.is_global_zero:
            return []
        assert self._layer is not None
        split = analysis_split(trainer, self.split, owner="Occlusion")
        indices = self._indices()
        images, labels = _labelled(split.fetch(trainer, indices), self.split)
        size, stride = self._geometry(images)
        fill: float | Tensor = (
            images.mean((0, 2, 3))[:, None, None] if self.fill == "mean" else float(self.fill)
        )
        was_training = pl_module.training
        pl_module.eval()
        try:
            maps = occlusion_maps(
                pl_module,
                self._layer[1],
                images,
                labels,
                size,
                stride,
                fill,
                self.batch_size,
                trainer.precision_plugin.forward_context,
            )
        finally:
            pl_module.train(was_training)
        self.maps = maps
        return self._report(trainer, split, indices, images, labels, maps, size, stride)

    # -- output ---------------------------------------------------------------------------------
    def _report(
        self,
        trainer: L.Trainer,
        split: AnalysisSplit,
        indices: list[int],
        images: Tensor,
        labels: Tensor,
        maps: OcclusionMaps,
        size: int,
        stride: int,
    ) -> list[Path]:
        maps = OcclusionMaps(*(t.detach().cpu() for t in _fields(maps)))
        labels = labels.cpu()
        layer = self._layer[0] if self._layer else ""
        self.rows = []
        for n, sample in enumerate(indices):
            for i, top in enumerate(maps.tops.tolist()):
                for j, left in enumerate(maps.lefts.tolist()):
                    self.rows.append(
                        {
                            "sample": sample,
                            "label": int(labels[n]),
                            "row": top,
                            "col": left,
                            "size": size,
                            "layer": layer,
                            "channel": int(maps.channel[n]),
                            "activation": float(maps.activation[n, i, j]),
                            "p_correct": float(maps.p_correct[n, i, j]),
                            "predicted": int(maps.predicted[n, i, j]),
                            "baseline_activation": float(maps.baseline_activation[n]),
                            "baseline_p_correct": float(maps.baseline_p_correct[n]),
                            "baseline_predicted": int(maps.baseline_predicted[n]),
                        }
                    )
        folder = plugin_dir(trainer, "occlusion")
        csv_path = write_csv(folder / "occlusion.csv", COLUMNS, self.rows)
        names = _class_names(trainer)
        figure = _figure(
            images.detach().float().cpu(), labels, indices, maps, size, stride, layer, names
        )
        figure.suptitle(
            f"Occlusion sensitivity ({self.split} split, {size}x{size} occluder every {stride} px)"
        )
        png = save_figure(trainer, figure, folder / "occlusion.png", "occlusion/figure", dpi=110)
        log_rows(trainer, "occlusion/table", COLUMNS, self.rows)

        summary = _summary(maps)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"occlusion/{key}": value for key, value in summary.items()},
                step=trainer.global_step,
            )
        positions = maps.tops.numel() * maps.lefts.numel()
        rank_zero_info(
            f"Occlusion on {len(indices)} images of the {self.split} split, layer {layer}, "
            f"{size}x{size} occluder at {positions} positions: p(correct) "
            f"{summary['p_correct']:.3f} un-occluded, {summary['min_p_correct']:.3f} at the "
            f"worst position (means over images); the most probable class changes at "
            f"{100 * summary['changed_fraction']:.1f}% of positions\n"
            f"  results: {csv_path}, {png}"
        )
        return [csv_path, png]

    # -- comparing runs (skipnets compare Occlusion RUN ...) ----------------------------------
    @classmethod
    def compare_runs(cls, runs: dict[str, Path], out: Path) -> list[Path]:
        """The lowest p(correct) over occluder positions for each image analysed, one line per
        run: how far one square can push each network off the right answer."""

        def series(directory: Path):
            path = latest_result(directory / "occlusion", "occlusion.csv")
            if path is None:
                return None
            lowest: dict[int, float] = {}
            for row in read_rows(path):
                sample = int(row["sample"])
                lowest[sample] = min(lowest.get(sample, math.inf), float(row["p_correct"]))
            samples = sorted(lowest)
            return samples, [lowest[s] for s in samples]

        return overlay_runs(
            runs,
            out,
            "occlusion",
            series,
            title="lowest p(correct class) over occluder positions",
            xlabel="image (index in the split)",
            ylabel="p(correct)",
        )


def _fields(maps: OcclusionMaps) -> list[Tensor]:
    return [getattr(maps, name) for name in OcclusionMaps.__dataclass_fields__]


def _summary(maps: OcclusionMaps) -> dict[str, float]:
    """Mean un-occluded p(correct), mean over images of the lowest p(correct) over positions,
    and the fraction of (image, position) pairs whose most probable class is not the
    un-occluded image's."""
    changed = maps.predicted != maps.baseline_predicted[:, None, None]
    return {
        "p_correct": float(maps.baseline_p_correct.mean()),
        "min_p_correct": float(maps.p_correct.flatten(1).min(1).values.mean()),
        "changed_fraction": float(changed.float().mean()),
    }


def _labelled(batch: Any, split: str) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ConfigError(
            f"Occlusion needs labelled images, batches of (images, classes); the {split} split "
            "gives unlabelled batches"
        )
    images, labels = inputs_of(batch), batch[1]
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise ConfigError(
            f"Occlusion needs one class index per image; the {split} split's targets have "
            f"shape {tuple(getattr(labels, 'shape', ()))}"
        )
    return images, labels


def _resolve(name: str, modules: dict[str, nn.Module]) -> str:
    for candidate in (name, f"model.{name}"):
        if candidate and candidate in modules:
            return candidate
    suggestions = [network_name(n) for n in modules if n and "." in n][:8]
    raise ConfigError(
        f"Occlusion: no layer named {name!r}; names look like {', '.join(suggestions)}"
    )


def _class_names(trainer: L.Trainer) -> Sequence[str] | None:
    classes = getattr(trainer.datamodule, "classes", None)
    if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
        return classes
    return None


# -- the figure -------------------------------------------------------------------------------
def _picture(image: Tensor) -> np.ndarray:
    """(C, H, W) -> an (H, W, 3) picture in [0, 1], stretched to its own range."""
    low, high = image.min(), image.max()
    image = (image - low) / (high - low).clamp_min(1e-12)
    if image.shape[0] != 3:
        image = image.mean(0, keepdim=True).expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


def _figure(
    images: Tensor,
    labels: Tensor,
    indices: list[int],
    maps: OcclusionMaps,
    size: int,
    stride: int,
    layer: str,
    names: Sequence[str] | None,
):
    """One row per image: the image, then the maps (b), (d), (e) of Zeiler & Fergus's Fig. 7,
    each value drawn over the image where the occluder's centre was."""
    height, width = images.shape[-2:]
    centre = (size - 1) / 2
    tops, lefts = maps.tops.numpy() + centre, maps.lefts.numpy() + centre
    half_rows = stride / 2 if len(tops) > 1 else size / 2
    half_cols = stride / 2 if len(lefts) > 1 else size / 2
    extent = (
        lefts[0] - half_cols,
        lefts[-1] + half_cols,
        tops[-1] + half_rows,
        tops[0] - half_rows,
    )
    palette = colormaps["tab20"]

    def name(label: int) -> str:
        return names[label] if names is not None and label < len(names) else str(label)

    def colour(label: int) -> tuple[float, ...]:
        # tab20's strong colours (those of tab10) for the first ten classes, its pale ones next.
        return palette((2 * label + (label // 10) % 2) % 20)[:3]

    fig, axes = new_figure(len(indices), 4, size=(2.7, 2.3))
    for n, sample in enumerate(indices):
        label = int(labels[n])
        row = axes[n]
        row[0].imshow(_picture(images[n]), interpolation="nearest")
        row[0].add_patch(
            Rectangle((-0.5, -0.5), size, size, fill=False, edgecolor="red", linewidth=1.2)
        )
        row[0].set_title(
            f"image {sample}, class {name(label)}\np(correct) "
            f"{float(maps.baseline_p_correct[n]):.2f}, predicted "
            f"{name(int(maps.baseline_predicted[n]))}",
            fontsize=8,
        )
        shown = row[1].imshow(
            maps.activation[n].numpy(), extent=extent, cmap="viridis", interpolation="nearest"
        )
        fig.colorbar(shown, ax=row[1], shrink=0.8)
        row[1].set_title(
            f"(b) {layer} channel {int(maps.channel[n])}\ntotal activation", fontsize=8
        )
        shown = row[2].imshow(
            maps.p_correct[n].numpy(),
            extent=extent,
            cmap="magma",
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
        )
        fig.colorbar(shown, ax=row[2], shrink=0.8)
        row[2].set_title(f"(d) p({name(label)})", fontsize=8)
        predicted = maps.predicted[n].numpy()
        colours = np.array([colour(c) for c in range(int(predicted.max()) + 1)])
        row[3].imshow(colours[predicted], extent=extent, interpolation="nearest")
        row[3].legend(
            handles=[
                Patch(color=colours[c], label=name(int(c))) for c in np.unique(predicted).tolist()
            ],
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize=7,
            frameon=False,
        )
        row[3].set_title("(e) most probable class", fontsize=8)
        for ax in row:
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
    return fig
