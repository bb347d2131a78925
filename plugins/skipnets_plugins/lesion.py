"""Lesion studies: how much a trained network needs each of its blocks (Srivastava, Greff,
Schmidhuber 2015, "Training Very Deep Networks", Fig. 4; Veit, Wilber, Belongie 2016, "Residual
Networks Behave Like Ensembles of Relatively Shallow Networks")."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.ticker import MaxNLocator
from torch import nn

from skipnets.data.analysis import AnalysisSplit, Split, analysis_split, check_split, inputs_of
from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock, network_name, skip_blocks
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

__all__ = ["Lesion", "LesionResult"]


@dataclass(frozen=True)
class LesionResult:
    """One row of ``lesion.csv``. ``lesion`` is ``single``, ``delete`` (``k`` random blocks,
    draw ``draw``) or ``swap`` (a block and the next); the block fields of a ``delete`` or
    ``swap`` row list every block involved, separated by ``;``."""

    lesion: str
    k: int
    draw: int
    block_index: str
    block_name: str
    kind: str
    stage: str
    loss: float
    accuracy: float
    baseline_loss: float
    baseline_accuracy: float


COLUMNS = [f.name for f in fields(LesionResult)]


class Lesion(RunWhenTrained):
    """Evaluates the trained model with each skip block lesioned, against the intact model.

    A lesioned block keeps only its identity path: a residual block its shortcut, a highway
    layer ``y = x`` (transform gate closed), a dense layer adds no new features, a same-shape
    plain layer passes its input through (which shows why plain networks break). Plain layers
    that change the shape have nothing to fall back on and are left out, with a note. Also
    deletes ``k`` random blocks at once for ``k = 1 .. max_deletions`` (Veit et al.'s curve) and,
    optionally, swaps each pair of adjacent blocks whose shapes allow it.

    Runs when training ends, on the weights it ended with (on the model's device, before
    Lightning moves the model back to the CPU), and in a standalone ``validate`` (which is
    what ``skipnets lesion --config ... --ckpt_path ...`` runs). Writes
    ``<run dir>/lesion/lesion.csv`` and ``lesion.png`` (metric against block index with the
    baseline dashed, and the k-deletion curve) and logs both to W&B as a table and an image.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: Lesion
              init_args: {split: val, max_deletions: 8, draws: 5}

    Metrics are summed over every rank's share of the split, so the numbers under DDP are the
    ones of a single process; only rank zero writes.

    Args:
        split: the data to evaluate on: ``train``, ``val`` or ``test`` (the data module's split,
            read in order, without shuffling or training augmentation).
        max_deletions: the largest ``k`` of the k-random-deletion curve (clipped to the number
            of blocks that can be lesioned); 0 leaves the curve out.
        draws: different random sets of blocks per ``k`` (every set, when there are fewer).
        swaps: also evaluate with each pair of adjacent same-shape blocks swapped.
        limit_batches: evaluate on at most this many batches per rank (None: the whole split).
        seed: seed of the random deletions.
    """

    def __init__(
        self,
        split: Split = "val",
        max_deletions: int = 10,
        draws: int = 5,
        swaps: bool = False,
        limit_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_split(split, "Lesion")
        if max_deletions < 0:
            raise ConfigError(f"max_deletions must be >= 0, got {max_deletions}")
        if draws < 1:
            raise ConfigError(f"draws must be at least 1, got {draws}")
        if limit_batches is not None and limit_batches < 1:
            raise ConfigError(f"limit_batches must be positive or null, got {limit_batches}")
        self.split = split
        self.max_deletions = max_deletions
        self.draws = draws
        self.swaps = swaps
        self.limit_batches = limit_batches
        self.seed = seed
        self.results: list[LesionResult] = []
        self.skipped: list[str] = []
        self.output_dir: Path | None = None
        self.chance: float | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not any(True for _ in skip_blocks(pl_module)):
            arch = pl_module.hparams.get("arch")
            what = f"model {arch!r}" if arch else f"the model ({type(pl_module).__name__})"
            raise ConfigError(
                f"Lesion needs a model built from skip blocks, but {what} has none "
                "(`skipnets models` marks the architectures with skip connections)"
            )

    # -- the study ----------------------------------------------------------------------------
    def run(self, trainer: Trainer, pl_module: LightningModule) -> list[LesionResult]:
        """Evaluate every lesion on this trainer's data; rank zero writes and logs the results."""
        data = analysis_split(trainer, self.split, owner="Lesion")
        blocks = list(skip_blocks(pl_module))
        was_training = pl_module.training
        pl_module.eval()
        try:
            self.results = self._study(trainer, pl_module, data, blocks)
        finally:
            for _, block in blocks:
                block.lesioned = False
            pl_module.train(was_training)
        if trainer.is_global_zero:
            self._report(trainer, pl_module)
        return self.results

    def _study(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        data: AnalysisSplit,
        blocks: list[tuple[str, SkipBlock]],
    ) -> list[LesionResult]:
        def evaluate() -> tuple[float, float]:
            return self._evaluate(trainer, pl_module, data)

        base_loss, base_acc = evaluate()
        self.baseline = (base_loss, base_acc)
        results: list[LesionResult] = []

        def record(lesion: str, k: int, draw: int, indices: list[int], metrics: tuple) -> None:
            picked = [blocks[i] for i in indices]
            results.append(
                LesionResult(
                    lesion,
                    k,
                    draw,
                    ";".join(map(str, indices)),
                    ";".join(network_name(name) for name, _ in picked),
                    ";".join(dict.fromkeys(block.kind for _, block in picked)),
                    ";".join(dict.fromkeys(str(block.stage) for _, block in picked)),
                    metrics[0],
                    metrics[1],
                    base_loss,
                    base_acc,
                )
            )

        lesionable = [i for i, (_, block) in enumerate(blocks) if block.bypassable]
        self.skipped = [network_name(name) for name, block in blocks if not block.bypassable]
        for i in lesionable:
            with _lesioned([blocks[i][1]]):
                record("single", 1, 0, [i], evaluate())

        generator = torch.Generator().manual_seed(self.seed)  # the same draws on every rank
        for k in range(1, min(self.max_deletions, len(lesionable)) + 1):
            for draw, chosen in enumerate(
                _distinct_subsets(len(lesionable), k, self.draws, generator)
            ):
                indices = [lesionable[j] for j in chosen]
                with _lesioned([blocks[i][1] for i in indices]):
                    record("delete", k, draw, indices, evaluate())

        if self.swaps:
            for i in self._swappable(trainer, pl_module, data, blocks):
                with _swapped(pl_module, blocks[i][0], blocks[i + 1][0]):
                    record("swap", 2, 0, [i, i + 1], evaluate())
        return results

    @torch.no_grad()
    def _evaluate(
        self, trainer: Trainer, pl_module: LightningModule, data: AnalysisSplit
    ) -> tuple[float, float]:
        totals = torch.zeros(3, dtype=torch.float64, device=pl_module.device)
        batches = itertools.islice(data.on_device(trainer), self.limit_batches)
        for batch, _ in batches:
            x, y = batch[:2]
            with trainer.precision_plugin.forward_context():
                logits = pl_module(x)
            logits = logits.float()
            self.chance = 1.0 / logits.shape[-1]
            totals[0] += F.cross_entropy(logits, y, reduction="sum")
            totals[1] += (logits.argmax(1) == y).sum()
            totals[2] += y.numel()
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        if totals[2] == 0:
            raise ConfigError(f"Lesion: the {self.split} split is empty")
        return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()

    def _swappable(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        data: AnalysisSplit,
        blocks: list[tuple[str, SkipBlock]],
    ) -> list[int]:
        """Indices ``i`` where blocks ``i`` and ``i + 1`` sit in the same container and both
        keep the shape of their input, so that their order can be swapped."""
        shapes: dict[int, tuple[tuple, tuple]] = {}

        def remember(index: int):
            def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                shapes[index] = (tuple(args[0].shape), tuple(output.shape))

            return hook

        handles = [block.register_forward_hook(remember(i)) for i, (_, block) in enumerate(blocks)]
        try:
            first = next(data.on_device(trainer), None)
            if first is not None:
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    pl_module(inputs_of(first[0]))
        finally:
            for handle in handles:
                handle.remove()

        def same_shape(i: int) -> bool:
            return i in shapes and shapes[i][0] == shapes[i][1]

        def parent(name: str) -> str:
            return name.rpartition(".")[0]

        swappable = [
            i
            for i in range(len(blocks) - 1)
            if same_shape(i)
            and same_shape(i + 1)
            and parent(blocks[i][0]) == parent(blocks[i + 1][0])
        ]
        # Every rank must run the same evaluations: rank zero's list decides.
        return trainer.strategy.broadcast(swappable, src=0)

    # -- comparing runs (skipnets compare Lesion RUN ...) -------------------------------------
    @classmethod
    def compare_runs(cls, runs: dict[str, Path], out: Path) -> list[Path]:
        """Single-block lesion accuracy against block index, one line per run (Veit et al.
        2016, Fig. 3: residual against plain)."""

        def series(directory: Path):
            path = latest_result(directory / "lesion", "lesion.csv")
            if path is None:
                return None
            rows = [r for r in read_rows(path) if r["lesion"] == "single"]
            return [int(r["block_index"]) for r in rows], [r["accuracy"] for r in rows]

        return overlay_runs(
            runs,
            out,
            "lesion",
            series,
            title="accuracy with one block lesioned",
            xlabel="block index",
            ylabel="accuracy",
        )

    # -- output -------------------------------------------------------------------------------
    def _report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        directory = plugin_dir(trainer, "lesion")
        self.output_dir = directory
        rows = [asdict(result) for result in self.results]
        write_csv(directory / "lesion.csv", COLUMNS, rows)
        figure = self._plot(_title(trainer, pl_module, self.split))
        save_figure(trainer, figure, directory / "lesion.png", "lesion/plot", dpi=120)

        singles = [r for r in self.results if r.lesion == "single"]
        base_loss, base_acc = self.baseline
        summary = {"lesion/baseline_acc": base_acc, "lesion/baseline_loss": base_loss}
        if singles:
            worst = min(singles, key=lambda r: r.accuracy)
            summary["lesion/single_mean_acc"] = sum(r.accuracy for r in singles) / len(singles)
            summary["lesion/single_min_acc"] = worst.accuracy
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=trainer.global_step)
        log_rows(trainer, "lesion/table", COLUMNS, rows)
        lines = [f"Lesion study on the {self.split} split: baseline accuracy {base_acc:.4f}"]
        if singles:
            lines.append(
                f"  single blocks lesioned: mean accuracy {summary['lesion/single_mean_acc']:.4f}, "
                f"worst {worst.accuracy:.4f} ({worst.block_name})"
            )
        if self.skipped:
            lines.append(
                f"  not lesioned (they change the shape and have no shortcut): "
                f"{', '.join(self.skipped)}"
            )
        lines.append(f"  results: {directory / 'lesion.csv'}, {directory / 'lesion.png'}")
        rank_zero_info("\n".join(lines))

    def _plot(self, title: str):
        """Accuracy and loss against the lesioned block (the dashed line: the intact network;
        the dotted one: chance), and the k-random-deletion curve (mean over draws, bars from
        the lowest to the highest draw). Lines join only neighbouring blocks that can be
        lesioned: a gap marks blocks that could not be."""
        singles = [r for r in self.results if r.lesion == "single"]
        swaps = [r for r in self.results if r.lesion == "swap"]
        deletions = [r for r in self.results if r.lesion == "delete"]
        base_loss, base_acc = self.baseline
        panels = 3 if deletions else 2
        figure, grid = new_figure(1, panels, size=(4.2, 3.6))
        axes = grid[0]
        figure.suptitle(title)
        for ax, metric, baseline, label in (
            (axes[0], "accuracy", base_acc, "accuracy"),
            (axes[1], "loss", base_loss, "cross-entropy"),
        ):
            x, y = _with_gaps(
                [int(r.block_index) for r in singles], [getattr(r, metric) for r in singles]
            )
            ax.plot(x, y, "o-", ms=4, label="block lesioned")
            if swaps:
                sx = [int(r.block_index.split(";")[0]) + 0.5 for r in swaps]
                ax.plot(sx, [getattr(r, metric) for r in swaps], "x", label="pair swapped")
            ax.axhline(baseline, ls="--", color="k", lw=1, label="intact")
            ax.set_xlabel("block index")
            ax.set_ylabel(f"{self.split} {label}")
        for ax in axes[::2]:
            if self.chance is not None:
                ax.axhline(self.chance, ls=":", color="grey", lw=1, label="chance")
            ax.set_ylim(0, 1.02)
        axes[0].set_title("single-block lesions")
        if deletions:
            ks = sorted({r.k for r in deletions})
            per_k = [[r.accuracy for r in deletions if r.k == k] for k in ks]
            mean = [sum(a) / len(a) for a in per_k]
            spread = [
                [m - min(a) for m, a in zip(mean, per_k)],
                [max(a) - m for m, a in zip(mean, per_k)],
            ]
            ax = axes[2]
            ax.errorbar(ks, mean, yerr=spread, fmt="o-", ms=4, capsize=2, label="mean over draws")
            ax.axhline(base_acc, ls="--", color="k", lw=1, label="intact")
            ax.set_xlabel("blocks deleted at random (k)")
            ax.set_ylabel(f"{self.split} accuracy")
            ax.set_title("k random deletions")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize="small")
        return figure


def _title(trainer: Trainer, pl_module: LightningModule, split: str) -> str:
    arch = getattr(pl_module, "hparams", {}).get("arch") or type(pl_module).__name__
    data = type(trainer.datamodule).__name__ if trainer.datamodule is not None else "data"
    return f"Lesioning {arch} on {data} ({split} split)"


def _with_gaps(x: list[int], y: list[float]) -> tuple[list[float], list[float]]:
    """``x`` and ``y`` with a NaN wherever ``x`` skips an index, so the line breaks there."""
    xs: list[float] = []
    ys: list[float] = []
    for i, (a, b) in enumerate(zip(x, y)):
        if i and a != x[i - 1] + 1:
            xs.append(math.nan)
            ys.append(math.nan)
        xs.append(a)
        ys.append(b)
    return xs, ys


def _distinct_subsets(
    n: int, k: int, draws: int, generator: torch.Generator
) -> list[tuple[int, ...]]:
    """``draws`` different random ``k``-subsets of ``range(n)``, sorted; all of them when
    there are no more than ``draws``."""
    if math.comb(n, k) <= draws:
        return list(itertools.combinations(range(n), k))
    subsets: dict[tuple[int, ...], None] = {}
    while len(subsets) < draws:
        subset = tuple(sorted(torch.randperm(n, generator=generator)[:k].tolist()))
        subsets.setdefault(subset)
    return list(subsets)


@contextmanager
def _lesioned(blocks: list[SkipBlock]) -> Iterator[None]:
    for block in blocks:
        block.lesioned = True
    try:
        yield
    finally:
        for block in blocks:
            block.lesioned = False


@contextmanager
def _swapped(model: nn.Module, first: str, second: str) -> Iterator[None]:
    # Reassigning a child keeps its place in the parent's order: the two swap places.
    container = model.get_submodule(first.rpartition(".")[0])
    a, b = first.rpartition(".")[2], second.rpartition(".")[2]
    module_a, module_b = container.get_submodule(a), container.get_submodule(b)
    setattr(container, a, module_b)
    setattr(container, b, module_a)
    try:
        yield
    finally:
        setattr(container, a, module_a)
        setattr(container, b, module_b)
