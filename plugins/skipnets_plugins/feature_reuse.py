"""Feature reuse in a DenseNet: how strongly each layer reads each earlier layer's feature maps
(Huang, Liu, van der Maaten & Weinberger 2017, "Densely Connected Convolutional Networks",
Fig. 5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.patches import Rectangle
from torch import nn

from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock, network_name, skip_blocks
from skipnets.papers import HUANG_2017
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

__all__ = ["DenseBlock", "FeatureReuse", "dense_blocks", "reuse_rows"]

COLUMNS = (
    "block",
    "source",
    "source_name",
    "channels",
    "target",
    "target_name",
    "mean_abs_weight",
    "normalised",
)


@dataclass(frozen=True)
class DenseBlock:
    """One dense block as its weights see it: the modules that read its concatenated feature
    maps (each layer's first convolution, then the layer after the block, a transition's
    convolution or the classifier) and the channels of each source in that concatenation (the
    block's input first, then each layer's new maps, in order)."""

    number: int
    layers: tuple[str, ...]
    readers: tuple[tuple[str, nn.Module], ...]
    sources: tuple[tuple[int, int], ...]

    @property
    def source_names(self) -> list[str]:
        return ["input", *self.layers]


class FeatureReuse(RunWhenTrained):
    """Heat map of the weights each layer of a dense block gives to each earlier layer.

    In a dense block layer ``l`` reads the concatenation ``[x_0, x_1, ..., x_{l-1}]`` of the
    block's input and every earlier layer's new feature maps, so its first convolution's weights
    split, along their input channels, into one slice per source. The colour of cell ``(s, l)``
    is the mean absolute weight of the slice that reads source ``s``: the slice's L1 norm divided
    by its number of weights, which normalises it by the number of input feature maps (Huang et
    al. 2017, Fig. 5). The column after the block's layers is what reads its whole output, the
    transition layer's convolution or, after the last block, the classifier, as the paper draws
    them. The paper's observations on DenseNet (L=40, k=12) on C10+: every layer spreads its
    weights over many inputs; the transition layers spread theirs over all layers of the block;
    in the second and third blocks the transition's output (the block input) gets the least
    weight; the classifier uses the whole block but leans towards the final feature maps.

    Read from the weights alone, no data: each figure column is scaled to its largest source, so
    that convolutions and the linear classifier share one colour scale (the CSV holds the raw
    means too). The blocks are found through the skip-block contract: consecutive ``dense``
    blocks in one container form a dense block, and the channel counts of every reader are
    checked against the concatenation (a model whose layers do not read it, or that has no dense
    blocks, is refused with a message). Runs when training ends, on the weights it ended with,
    and in a standalone ``validate``: ``skipnets analyse FeatureReuse --config C --ckpt_path K``.
    Only rank zero reads and writes.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: FeatureReuse

    Writes ``<run dir>/feature_reuse/feature_reuse.csv`` (block, source, source_name, channels,
    target, target_name, mean_abs_weight, normalised; sources and targets numbered within the
    block, source 0 the block's input, target ``L + 1`` the reader after the block) and
    ``feature_reuse.png`` (one heat map per dense block), and logs both.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []
        self.blocks: list[DenseBlock] = []
        self.output_dir: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        arch = getattr(pl_module, "hparams", {}).get("arch")
        self.blocks = dense_blocks(pl_module, f"model {arch!r}" if arch else None)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Read the map from the model's weights; rank zero writes and logs it (the weights are
        the same on every rank, so the others do nothing)."""
        if not trainer.is_global_zero:
            return []
        self.rows = reuse_rows(self.blocks)
        directory = plugin_dir(trainer, "feature_reuse")
        self.output_dir = directory
        write_csv(directory / "feature_reuse.csv", COLUMNS, self.rows)
        arch = getattr(pl_module, "hparams", {}).get("arch") or type(pl_module).__name__
        figure = plot_feature_reuse(self.rows, self.blocks, arch)
        save_figure(trainer, figure, directory / "feature_reuse.png", "feature_reuse/plot")
        log_rows(trainer, "feature_reuse/table", COLUMNS, self.rows)
        lines = [f"Feature reuse in {arch} ({len(self.blocks)} dense blocks):"]
        metrics: dict[str, float] = {}
        for block in self.blocks:
            summary = summarise(self.rows, block.number)
            metrics.update(
                {f"feature_reuse/block{block.number}_{k}": v for k, v in summary.items()}
            )
            lines.append(
                f"  block {block.number} ({len(block.layers)} layers, read by "
                f"{block.readers[-1][0]}): the reader's weakest source gets "
                f"{summary['reader_min']:.2f} of its strongest; late layers / early layers "
                f"{summary['reader_late_over_early']:.2f}; the block input is the least read "
                f"source of {100 * summary['input_least_read']:.0f}% of the targets"
            )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        lines.append(
            f"  results: {directory / 'feature_reuse.csv'}, {directory / 'feature_reuse.png'}"
        )
        rank_zero_info("\n".join(lines))
        return self.rows

    # -- comparing runs (skipnets compare FeatureReuse RUN ...) -------------------------------
    @classmethod
    def compare_runs(cls, runs: dict[str, Path], out: Path) -> list[Path]:
        """The weight the classifier gives each source of the last dense block, one line per
        run: how much each network's classifier leans on the final feature maps (Huang et al.
        2017, Fig. 5, the last column)."""

        def series(directory: Path):
            path = latest_result(directory / "feature_reuse", "feature_reuse.csv")
            if path is None:
                return None
            rows = read_rows(path)
            last = max(r["block"] for r in rows)
            rows = [r for r in rows if r["block"] == last]
            reader = max(r["target"] for r in rows)
            rows = sorted((r for r in rows if r["target"] == reader), key=lambda r: r["source"])
            return [r["source"] for r in rows], [r["normalised"] for r in rows]

        return overlay_runs(
            runs,
            out,
            "feature_reuse",
            series,
            title="classifier weight per source of the last dense block",
            xlabel="source layer (0: the block's input)",
            ylabel="mean |weight|, scaled to the largest source",
        )


def dense_blocks(model: nn.Module, what: str | None = None) -> list[DenseBlock]:
    """The dense blocks of ``model`` with the modules that read each one's feature maps and the
    channels of each source, checked against every reader's input channels."""
    what = what or f"the model ({type(model).__name__})"
    dense = [(name, m) for name, m in skip_blocks(model) if m.kind == "dense"]
    # A dense block nested in another's branch (a U-Net level) is not a layer of a dense block.
    dense = [(n, m) for n, m in dense if not any(n.startswith(f"{o}.") for o, _ in dense)]
    if not dense:
        raise ConfigError(
            f"FeatureReuse needs a DenseNet (dense blocks of layers that each read every earlier "
            f"layer's feature maps), and {what} has no dense layers; `skipnets models 'dense*'` "
            "lists the DenseNets"
        )
    groups: dict[str, list[tuple[str, SkipBlock]]] = {}
    for name, layer in dense:
        groups.setdefault(name.rpartition(".")[0], []).append((name, layer))
    modules = list(model.named_modules())
    position = {name: i for i, (name, _) in enumerate(modules)}
    blocks = []
    for number, layers in enumerate(groups.values(), start=1):
        readers = [_first_reader(name, layer, what) for name, layer in layers]
        last_name = layers[-1][0]
        after = _reader_after(modules, position[last_name], last_name)
        if after is None:
            raise ConfigError(
                f"FeatureReuse: nothing in {what} reads the output of the dense block ending at "
                f"{network_name(last_name)} (no convolution or linear layer after it)"
            )
        readers.append(after)
        widths = [_in_channels(module) for _, module in readers]
        sources = [(0, widths[0])]
        for index, (name, layer) in enumerate(layers):
            start = sources[-1][1]
            sources.append((start, start + _out_channels(layer)))
            reader, width = readers[index + 1][0], widths[index + 1]
            if width != sources[-1][1]:
                raise ConfigError(
                    f"FeatureReuse needs a DenseNet: {reader} reads {width} channels, but the "
                    f"dense block of {what} has {sources[-1][1]} after {network_name(name)}: its "
                    "layers do not read the concatenation of the block's input and every "
                    "earlier layer's maps"
                )
        blocks.append(
            DenseBlock(
                number,
                tuple(network_name(name) for name, _ in layers),
                tuple(readers),
                tuple(sources),
            )
        )
    return blocks


def _first_reader(name: str, layer: SkipBlock, what: str) -> tuple[str, nn.Module]:
    for inner, module in layer.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return network_name(f"{name}.{inner}"), module
    raise ConfigError(
        f"FeatureReuse: the dense layer {network_name(name)} of {what} has no convolution or "
        "linear layer whose weights read its input"
    )


def _reader_after(
    modules: list[tuple[str, nn.Module]], start: int, block_name: str
) -> tuple[str, nn.Module] | None:
    """The first convolution or linear layer registered after ``block_name``'s own modules."""
    for name, module in modules[start + 1 :]:
        if name.startswith(f"{block_name}."):
            continue
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            return network_name(name), module
    return None


def _in_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ConfigError(
                f"FeatureReuse: a grouped convolution ({module}) does not read every input map"
            )
        return module.in_channels
    return module.in_features  # type: ignore[return-value]


def _out_channels(layer: SkipBlock) -> int:
    """The maps a layer adds: the output width of the last convolution or linear layer in it."""
    last = [m for m in layer.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    return last.out_channels if isinstance(last, nn.Conv2d) else last.out_features


@torch.no_grad()
def reuse_rows(blocks: Sequence[DenseBlock]) -> list[dict[str, Any]]:
    """One row per (source, target) pair that is connected: the mean absolute weight with
    which the target reads the source's channels, and that value over the target's largest."""
    per_channel = []
    for block in blocks:
        for _, module in block.readers:
            weight = module.weight.detach()
            # Mean |w| of each input channel; a source's slice mean is the mean over its channels.
            per_channel.append(weight.abs().float().mean(dim=[0, *range(2, weight.ndim)]))
    means = torch.cat(per_channel).double().cpu().numpy()  # one transfer from the device
    rows: list[dict[str, Any]] = []
    offset = 0
    for block in blocks:
        names = block.source_names
        for target, (reader_name, module) in enumerate(block.readers, start=1):
            width = _in_channels(module)
            column = means[offset : offset + width]
            offset += width
            values = [float(column[a:b].mean()) for a, b in block.sources[:target]]
            largest = max(values)
            for source, value in enumerate(values):
                a, b = block.sources[source]
                rows.append(
                    {
                        "block": block.number,
                        "source": source,
                        "source_name": names[source],
                        "channels": b - a,
                        "target": target,
                        "target_name": reader_name,
                        "mean_abs_weight": value,
                        "normalised": value / largest if largest > 0 else 0.0,
                    }
                )
    return rows


def summarise(rows: Sequence[dict[str, Any]], block: int) -> dict[str, float]:
    """For the reader after the block: its weakest source's scaled weight and the mean weight
    of the last third of the layers over the first third's; and the share of targets (with
    at least two sources) whose least-read source is the block's input."""
    rows = [r for r in rows if r["block"] == block]
    reader = max(r["target"] for r in rows)
    column = {r["source"]: r["normalised"] for r in rows if r["target"] == reader}
    layers = len(column) - 1
    third = max(layers // 3, 1)
    early = [column[s] for s in range(1, third + 1)]
    late = [column[s] for s in range(layers - third + 1, layers + 1)]
    targets = list(range(2, reader + 1))
    least = 0
    for target in targets:
        values = {r["source"]: r["normalised"] for r in rows if r["target"] == target}
        least += min(values, key=values.get) == 0  # type: ignore[arg-type]
    return {
        "reader_min": min(column.values()),
        "reader_late_over_early": (sum(late) / len(late)) / max(sum(early) / len(early), 1e-30),
        "input_least_read": least / len(targets) if targets else float("nan"),
    }


def plot_feature_reuse(rows: Sequence[dict[str, Any]], blocks: Sequence[DenseBlock], arch: str):
    """Huang et al.'s Fig. 5: per dense block, source layer (rows, 0 the block's input) against
    target layer (columns; the last one, framed, reads the whole block)."""
    figure, grid = new_figure(1, len(blocks), size=(4.2, 4.2))
    figure.suptitle(
        f"Feature reuse in {arch}, after {HUANG_2017.authors.split(',')[0]} et al. 2017"
    )
    image = None
    for ax, block in zip(grid[0], blocks):
        count = len(block.layers)
        heat = np.full((count + 1, count + 1), np.nan)
        for r in rows:
            if r["block"] == block.number:
                heat[r["source"], r["target"] - 1] = r["normalised"]
        image = ax.imshow(heat, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.add_patch(Rectangle((count - 0.5, -0.5), 1, count + 1, fill=False, ec="k", lw=1.5))
        reader = block.readers[-1][0]
        label = "C" if isinstance(block.readers[-1][1], nn.Linear) else "T"
        step = max(1, (count + 1) // 8)
        columns = [*range(0, count, step), count]
        ax.set_xticks(columns, [*(str(c + 1) for c in columns[:-1]), label])
        ax.set_yticks(range(0, count + 1, step))
        ax.set_title(f"dense block {block.number} (framed, {label}: {reader})", fontsize="small")
        ax.set_xlabel("target layer (l)")
        ax.set_ylabel("source layer (s)")
    if image is not None:
        figure.colorbar(
            image, ax=list(grid[0]), label="mean |weight|, scaled to the column's largest"
        )
    return figure
