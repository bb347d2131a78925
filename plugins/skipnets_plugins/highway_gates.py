"""Transform-gate biases and activity of highway layers (Srivastava et al. 2015, Fig. 2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from skipnets.data.analysis import Split, analysis_split, check_split, inputs_of
from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock, network_name, skip_blocks
from skipnets.runs import plugin_dir
from skipnets_plugins._milestones import on_a_checkpoint
from skipnets_plugins._plotting import log_rows, new_figure, save_figure, write_csv

COLUMNS = (
    "epoch",
    "step",
    "layer",
    "block",
    "unit",
    "gate_bias",
    "mean_gate",
    "example_gate",
    "example_output",
)


class HighwayGates(Callback):
    """Transform-gate biases, gate activity and outputs of highway layers (Srivastava 2015).

    As in Fig. 2 of Srivastava, Greff & Schmidhuber 2015, "Training Very Deep Networks"
    (arXiv:1507.06228).

    For every highway layer (skip blocks of kind ``highway``, fully connected or convolutional)
    and every unit: the transform-gate bias ``b_T``, the mean gate activity ``t`` over a dataset
    split, and for one example the gate activity and the layer's output. A convolutional layer's
    unit is a channel; its values are averaged over positions. The gate is read from the block's
    ``last_gate``, which the block fills while it is observed (``SkipBlock.observe``). Under DDP
    each rank scans its share of the split and the sums are added across ranks.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: HighwayGates
              init_args: {split: train, max_samples: 10000, every_n_epochs: 5}

    .. code-block:: python

        trainer = L.Trainer(callbacks=[HighwayGates(split="val")])

    Writes ``<run dir>/highway_gates/highway_gates.csv`` (epoch, step, layer, block, unit,
    gate_bias, mean_gate, example_gate, example_output) and ``highway_gates_epoch<E>.png`` (four
    panels, layer against unit, as in the paper), logging the figure and, at the end of fit, the
    table. On a trained checkpoint: ``skipnets analyse HighwayGates --config ... --ckpt_path ...``.

    Args:
        split: the data module's split to average gate activity over (the paper: training set).
        max_samples: use at most this many samples of the split (the paper: 10,000); None: all.
        example_index: index in the split of the single example shown.
        every_n_epochs: also measure after every this many training epochs; 0: only at the end
            of training.
    """

    def __init__(
        self,
        split: Split = "train",
        max_samples: int | None = 10_000,
        example_index: int = 0,
        every_n_epochs: int = 0,
    ) -> None:
        check_split(split, "HighwayGates")
        if max_samples is not None and max_samples < 1:
            raise ConfigError(f"HighwayGates: max_samples must be positive, got {max_samples}")
        if example_index < 0:
            raise ConfigError(f"HighwayGates: example_index must be >= 0, got {example_index}")
        if every_n_epochs < 0:
            raise ConfigError(f"HighwayGates: every_n_epochs must be >= 0, got {every_n_epochs}")
        self.split = split
        self.max_samples = max_samples
        self.example_index = example_index
        self.every_n_epochs = every_n_epochs
        self.rows: list[dict[str, Any]] = []
        self._blocks: list[tuple[str, SkipBlock]] = []
        self._measured_step: int | None = None
        self._last_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._blocks = [
            (network_name(name), block)
            for name, block in skip_blocks(pl_module)
            if block.kind == "highway"
        ]
        if not self._blocks:
            raise ConfigError(
                f"HighwayGates needs highway layers (skip blocks of kind 'highway'); "
                f"{type(pl_module).__name__} has none. Use a highway architecture "
                "(highway_mlp, highway_cnn) or remove the callback"
            )
        for name, block in self._blocks:
            if not hasattr(block, "last_gate"):
                raise ConfigError(
                    f"HighwayGates: highway block {name} ({type(block).__name__}) does not keep "
                    "its gate in `last_gate`; it cannot be plotted"
                )
        size = analysis_split(trainer, self.split, owner="HighwayGates").size
        if self.example_index >= size:
            raise ConfigError(
                f"HighwayGates: example_index={self.example_index} but the {self.split} split "
                f"has {size} samples"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_epoch = trainer.current_epoch
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._measured_step != trainer.global_step:  # trained since the last measurement
            self.measure(trainer, pl_module, epoch=self._last_epoch)
        if trainer.is_global_zero and self.rows:
            log_rows(trainer, "highway_gates/table", COLUMNS, self.rows)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A standalone `validate` (``skipnets analyse HighwayGates``): the checkpoint's weights.
        if on_a_checkpoint(trainer):
            self.measure(trainer, pl_module)
            if trainer.is_global_zero and self.rows:
                log_rows(trainer, "highway_gates/table", COLUMNS, self.rows)

    @torch.no_grad()
    def measure(
        self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int | None = None
    ) -> list[dict[str, Any]]:
        """Scan the split, record one row per layer and unit, write the files on rank zero."""
        epoch = trainer.current_epoch if epoch is None else epoch
        self._measured_step = trainer.global_step
        device = pl_module.device
        count = len(self._blocks)
        sums: list[Tensor | None] = [None] * count
        samples = torch.zeros((), device=device, dtype=torch.float64)
        captured: dict[int, tuple[Tensor, Tensor]] = {}

        def capture(index: int):
            def hook(block, args, output):
                captured[index] = (block.last_gate, output)

            return hook

        handles = [block.observe(_keep_gate) for _, block in self._blocks]
        handles += [
            block.register_forward_hook(capture(i)) for i, (_, block) in enumerate(self._blocks)
        ]
        was_training = pl_module.training
        pl_module.eval()
        try:
            split = analysis_split(trainer, self.split, self.max_samples, "HighwayGates")
            for batch, _ in split.on_device(trainer):
                pl_module(inputs_of(batch))
                for i in range(count):
                    gate = per_unit(captured[i][0]).double()
                    sums[i] = gate.sum(0) if sums[i] is None else sums[i] + gate.sum(0)
                samples += gate.shape[0]
            pl_module(inputs_of(split.fetch(trainer, [self.example_index])))
            example = [
                (per_unit(g)[0], per_unit(out)[0]) for g, out in (captured[i] for i in range(count))
            ]
        finally:
            for handle in handles:
                handle.remove()
            for _, block in self._blocks:
                block.last_gate = None
            captured.clear()
            pl_module.train(was_training)

        widths = [e[0].numel() for e in example]
        if any(s is None for s in sums):  # an empty shard on this rank
            sums = [torch.zeros(w, device=device, dtype=torch.float64) for w in widths]
        totals = trainer.strategy.reduce(torch.cat([*sums, samples.reshape(1)]), reduce_op="sum")
        means = torch.split(totals[:-1] / totals[-1].clamp_min(1), widths)
        new_rows = []
        for layer, ((name, block), mean, (gate, output)) in enumerate(
            zip(self._blocks, means, example)
        ):
            bias = _gate_bias(block, gate.numel())
            for unit in range(gate.numel()):
                new_rows.append(
                    {
                        "epoch": epoch,
                        "step": trainer.global_step,
                        "layer": layer,
                        "block": name,
                        "unit": unit,
                        "gate_bias": bias[unit],
                        "mean_gate": mean[unit].item(),
                        "example_gate": gate[unit].item(),
                        "example_output": output[unit].item(),
                    }
                )
        self.rows.extend(new_rows)
        if trainer.is_global_zero:
            folder = plugin_dir(trainer, "highway_gates")
            write_csv(folder / "highway_gates.csv", COLUMNS, self.rows)
            fig = plot_highway_gates(new_rows)
            name = f"highway_gates_epoch{epoch:03d}.png"
            save_figure(trainer, fig, folder / name, "highway_gates/figure")
        return new_rows


def _keep_gate(block: SkipBlock, x: Tensor, out: Tensor) -> None:
    """An observer that does nothing: being observed makes a highway block keep ``last_gate``."""


def per_unit(t: Tensor) -> Tensor:
    """``(N, units)``: feature maps averaged over their positions."""
    return t.flatten(2).mean(2) if t.ndim > 2 else t


def _gate_bias(block: SkipBlock, width: int) -> list[float]:
    bias = getattr(getattr(block, "gate", None), "bias", None)
    if bias is None or bias.numel() != width:
        return [float("nan")] * width
    return bias.detach().cpu().tolist()


def plot_highway_gates(rows: Sequence[dict[str, Any]]):
    layers = max(r["layer"] for r in rows) + 1
    units = max(r["unit"] for r in rows) + 1
    panels = (
        ("gate_bias", "transform gate biases", "RdBu_r"),
        ("mean_gate", "mean transform gate activity", "viridis"),
        ("example_gate", "gate activity, one example", "viridis"),
        ("example_output", "block outputs, one example", "RdBu_r"),
    )
    fig, axes = new_figure(1, 4, size=(3.2, 0.4 + 0.22 * max(layers, 8)))
    for ax, (column, title, cmap) in zip(axes[0], panels):
        grid = np.full((layers, units), np.nan)
        for r in rows:
            grid[r["layer"], r["unit"]] = r[column]
        kwargs: dict[str, Any] = (
            {"vmin": 0.0, "vmax": 1.0} if "gate" in column and column != "gate_bias" else {}
        )
        if cmap == "RdBu_r" and np.isfinite(grid).any():
            bound = float(np.nanmax(np.abs(grid))) or 1.0
            kwargs = {"vmin": -bound, "vmax": bound}
        image = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest", **kwargs)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("unit")
        ax.set_ylabel("layer (0: input side)")
        fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
