"""Norm ratio of each skip block's branch to its input (Jastrzebski et al. 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.ticker import MaxNLocator
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock, network_name, skip_blocks
from skipnets.runs import plugin_dir
from skipnets_plugins._plotting import (
    log_rows,
    mark_stages,
    new_figure,
    overlay_runs,
    read_rows,
    save_figure,
    write_csv,
)

COLUMNS = (
    "step",
    "epoch",
    "split",
    "block_index",
    "block",
    "stage",
    "ratio",
    "cosine",
    "samples",
)

# Per block: ratio sum, ratio count, cosine sum, cosine count.
_RATIO, _COUNT, _COS, _COS_COUNT = range(4)


class NormRatio(Callback):
    """Ratio ``||F(h)|| / ||h||`` of each skip block's branch to its input (Jastrzebski 2018).

    The measure of Jastrzebski et al. 2018, "Residual connections encourage iterative
    inference" (arXiv:1710.04773), with L2 norms.

    ``h`` is a block's input and ``F(h)`` its branch output; the ratio is computed per sample and
    averaged. Blocks are observed through the skip-block contract (``SkipBlock.observe``), so no
    block runs twice, and only on the steps that are sampled: on all other steps no observer is
    attached and the blocks take their fast path. Only per-block sums leave the observer; no
    activation outlives the step. Under DDP the sums are added across ranks before averaging.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: NormRatio
              init_args: {every_n_steps: 50, cosine: true}

    .. code-block:: python

        trainer = L.Trainer(callbacks=[NormRatio(every_n_steps=50)])

    Writes ``<run dir>/norm_ratio/norm_ratio.csv`` (columns: step, epoch, split, block_index,
    block, stage, ratio, cosine, samples) and ``norm_ratio.png`` (ratio against block index, one
    curve per epoch and one panel per split, stage boundaries dashed, like the paper's Fig. 2)
    after every training epoch, and logs the figure (and, at the end of fit, the table) to W&B.

    Args:
        every_n_steps: measure on training batches whose ``global_step`` is a multiple of this.
            0 turns training measurements off.
        validation: measure on the whole validation set after each validation epoch.
        cosine: also record the cosine between ``F(h)`` and the loss gradient at ``h`` (the
            paper's second measure; negative means the block moves ``h`` down the gradient).
            Training steps only, and only blocks whose branch has the shape of its input.
    """

    def __init__(self, every_n_steps: int = 50, validation: bool = True, cosine: bool = False):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ConfigError(f"NormRatio: every_n_steps must be an integer, got {every_n_steps!r}")
        if every_n_steps < 0:
            raise ConfigError(f"NormRatio: every_n_steps must be >= 0, got {every_n_steps}")
        if every_n_steps == 0 and not validation:
            raise ConfigError(
                "NormRatio with every_n_steps=0 and validation=false measures nothing; "
                "enable one of them"
            )
        self.every_n_steps = every_n_steps
        self.validation = validation
        self.cosine = cosine
        self.rows: list[dict[str, Any]] = []
        self._blocks: list[tuple[str, SkipBlock]] = []
        self._handles: list[RemovableHandle] = []
        self._sums: Tensor | None = None
        self._step = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._blocks = [(network_name(name), block) for name, block in skip_blocks(pl_module)]
        if not self._blocks:
            raise ConfigError(
                f"NormRatio needs skip blocks (skipnets.nn.SkipBlock), and "
                f"{type(pl_module).__name__} has none; use a skipnets architecture or remove "
                "the callback"
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._detach()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        self._detach()

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))

    # -- training ----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        n = self.every_n_steps
        if n and trainer.global_step % n == 0:
            self._attach(trainer, pl_module, cosine=self.cosine)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._handles:
            self._collect(trainer, "train")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            log_rows(trainer, "norm_ratio/table", COLUMNS, self.rows)

    # -- validation --------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.validation and not trainer.sanity_checking:
            self._attach(trainer, pl_module, cosine=False)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._handles:
            self._collect(trainer, "val")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # trainer.validate(): no training epoch end
            self._write(trainer)

    # -- comparing runs (skipnets compare NormRatio RUN ...) ----------------------------------
    @classmethod
    def compare_runs(cls, runs: dict[str, Path], out: Path) -> list[Path]:
        """The last epoch's norm ratio per block, one line per run (on the validation set when
        it was measured, else on training batches)."""

        def series(directory: Path):
            path = directory / "norm_ratio" / "norm_ratio.csv"
            if not path.is_file():
                return None
            rows = read_rows(path)
            split = "val" if any(r["split"] == "val" for r in rows) else "train"
            curves = epoch_curves(rows, split)
            if not curves:
                return None
            curve = curves[max(curves)]
            return list(range(len(curve))), [float(v) for v in curve]

        return overlay_runs(
            runs,
            out,
            "norm_ratio",
            series,
            title="norm ratio ||F(h)|| / ||h||, last epoch",
            xlabel="block index",
            ylabel="ratio",
        )

    # -- measuring ---------------------------------------------------------------------------
    def _attach(self, trainer: L.Trainer, pl_module: L.LightningModule, cosine: bool) -> None:
        self._detach()
        self._step = trainer.global_step  # the step being taken, before the optimizer counts it
        self._sums = torch.zeros(len(self._blocks), 4, device=pl_module.device, dtype=torch.float64)
        for index, (_, block) in enumerate(self._blocks):
            self._handles.append(block.observe(partial(self._observe, index, cosine)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _observe(self, index: int, cosine: bool, block: SkipBlock, x: Tensor, out: Tensor) -> None:
        sums = self._sums
        assert sums is not None
        with torch.no_grad():
            ratio = out.detach().flatten(1).float().norm(dim=1) / x.detach().flatten(
                1
            ).float().norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
            sums[index, _RATIO] += ratio.sum()
            sums[index, _COUNT] += ratio.numel()
        if cosine and torch.is_grad_enabled() and x.requires_grad and out.shape == x.shape:
            # The hook holds F(h) only until the backward pass reaches h, then both are released.
            x.register_hook(partial(_cosine_hook, sums, index, out.detach()))

    def _collect(self, trainer: L.Trainer, split: str) -> None:
        self._detach()
        sums = trainer.strategy.reduce(self._sums, reduce_op="sum").cpu()
        self._sums = None
        step, epoch = self._step, trainer.current_epoch
        for index, (name, block) in enumerate(self._blocks):
            count, cos_count = sums[index, _COUNT].item(), sums[index, _COS_COUNT].item()
            self.rows.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "split": split,
                    "block_index": index,
                    "block": name,
                    "stage": block.stage,
                    "ratio": sums[index, _RATIO].item() / count if count else float("nan"),
                    "cosine": sums[index, _COS].item() / cos_count if cos_count else float("nan"),
                    "samples": int(count),
                }
            )

    def _write(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        folder = plugin_dir(trainer, "norm_ratio")
        write_csv(folder / "norm_ratio.csv", COLUMNS, self.rows)
        stages = [block.stage for _, block in self._blocks]
        fig = plot_norm_ratio(self.rows, stages)
        save_figure(trainer, fig, folder / "norm_ratio.png", "norm_ratio/figure")


def _cosine_hook(sums: Tensor, index: int, branch: Tensor, grad: Tensor) -> None:
    with torch.no_grad():
        cos = F.cosine_similarity(branch.flatten(1).float(), grad.flatten(1).float(), dim=1)
        sums[index, _COS] += cos.sum()
        sums[index, _COS_COUNT] += cos.numel()


def epoch_curves(rows: Sequence[dict[str, Any]], split: str) -> dict[int, np.ndarray]:
    """Mean ratio per block for each epoch of ``split`` (several sampled steps are averaged)."""
    curves: dict[int, dict[int, list[float]]] = {}
    for row in rows:
        if row["split"] == split and row["samples"]:
            curves.setdefault(row["epoch"], {}).setdefault(row["block_index"], []).append(
                row["ratio"]
            )
    result = {}
    for epoch, blocks in sorted(curves.items()):
        size = max(blocks) + 1
        curve = np.full(size, np.nan)
        for index, values in blocks.items():
            curve[index] = float(np.mean(values))
        result[epoch] = curve
    return result


def plot_norm_ratio(rows: Sequence[dict[str, Any]], stages: Sequence[int]):
    splits = [s for s in ("train", "val") if any(r["split"] == s for r in rows)]
    fig, axes = new_figure(1, len(splits), size=(5.5, 3.8))
    epochs = [r["epoch"] for r in rows]
    norm = Normalize(min(epochs), max(max(epochs), min(epochs) + 1))
    cmap = colormaps["viridis"]
    for ax, split in zip(axes[0], splits):
        for epoch, curve in epoch_curves(rows, split).items():
            ax.plot(np.arange(len(curve)), curve, marker=".", color=cmap(norm(epoch)))
        boundaries = mark_stages(ax, stages)
        ax.set_title({"train": "training batches", "val": "validation set"}[split])
        ax.set_xlabel("block index" + (" (dashed: stage boundary)" if boundaries else ""))
        ax.set_ylabel(r"$\|F(h)\|_2 \,/\, \|h\|_2$")
        ax.grid(alpha=0.3)
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes[0].tolist(), label="epoch")
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig
