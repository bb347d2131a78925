"""Effective paths: how much gradient the paths of each length carry through a residual network
(Veit, Wilber & Belongie 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks", Fig. 6)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn

from skipnets.data.analysis import (
    AnalysisSplit,
    Split,
    analysis_split,
    check_split,
    inputs_of,
    to_device,
)
from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock, network_name, skip_blocks
from skipnets.papers import VEIT_2016
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

__all__ = ["EffectivePaths", "path_gradient", "random_paths", "routable_blocks"]

COLUMNS = (
    "length",
    "blocks",
    "paths",
    "path_share",
    "samples",
    "grad_norm",
    "grad_norm_std",
    "first_block_grad_norm",
    "total_gradient",
    "total_share",
    "cumulative_share",
)

# Per path length: samples, sum and sum of squares of the norm at the input, and the sum of the
# norm at the input of the first block.
_COUNT, _SUM, _SQ, _FIRST = range(4)


class EffectivePaths(RunWhenTrained):
    """The gradient that paths of each length carry, and the lengths that carry most of it.

    A network of ``n`` skip blocks unravels into ``2**n`` paths, each taking the branch of some
    blocks and the shortcut of the others: ``C(n, k)`` paths go through ``k`` branches, a
    Binomial(n, 1/2) distribution of path lengths (Veit et al. 2016, Fig. 6a). To measure paths
    of length ``k``, a batch goes forward through the whole, unmodified network; the backward pass
    then goes through the branches of ``k`` blocks drawn at random and through the shortcuts of
    the other ``n - k`` (each block's ``gradient_path``, which changes no forward value). Each
    sample of the batch takes its own random path, so a batch of 64 is 64 draws. The stem, the
    head and everything between blocks are always traversed; a shortcut that projects or pads
    where the shape changes is the shortcut path of its block. The gradient that arrives at the
    network's input is the path's gradient magnitude (Fig. 6b): the L2 norm of the sample's loss
    gradient, averaged over ``draws`` paths per length. Multiplied by the number of paths of
    that length it gives the total gradient magnitude per length (Fig. 6c). On a ResNet-110 (54
    blocks) almost all of it comes from paths through 5 to 17 blocks, which the paper calls the
    effective paths.

    Blocks of kind ``residual``, ``highway`` and ``dense`` have both paths; ``plain`` layers have
    only one and are always traversed, like the stem. The model is measured in evaluation mode
    (batch norm with its running statistics, no dropout), so each sample's gradient is its own
    and nothing in the model changes. The backward pass runs in the precision of the forward
    pass: a gradient below the smallest number of its dtype reads as zero (in float32, paths
    through more than about 48 of ResNet-110's blocks; under ``16-mixed`` far fewer, so measure
    in 32-bit or ``bf16-mixed``). Runs when training ends, on the weights it ended with, and
    in a standalone ``validate``: ``skipnets analyse EffectivePaths --config C --ckpt_path K``.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: EffectivePaths
              init_args: {split: train, draws: 1000}

    Writes ``<run dir>/effective_paths/effective_paths.csv`` (one row per path length: length,
    blocks, paths, path_share, samples (the paths drawn), grad_norm and its standard deviation,
    first_block_grad_norm (the norm at the input of the first block, where the paper's Fig. 6b
    measures), total_gradient = paths x grad_norm, its share of the sum over lengths and the
    cumulative share) and ``effective_paths.png`` (the three panels of Fig. 6), and logs both.
    Under DDP each rank draws its share of the paths on its share of the split; the sums are
    added across ranks and rank zero writes.

    Args:
        split: the data the batches come from: ``train`` (the paper's), ``val`` or ``test``.
        draws: random paths per length (the paper's 1,000), one per sample: the first
            ``draws`` samples of the split (over again if it has fewer), the same ones for
            every length, so that the lengths differ by their paths only. The cost is about
            ``draws / batch size * (n + 1)`` forward and backward passes.
        max_samples: use only the first this many samples of the split (None: all of it).
        seed: seed of the random choice of blocks (rank ``r`` uses ``seed + r``).
    """

    def __init__(
        self,
        split: Split = "train",
        draws: int = 1000,
        max_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_split(split, "EffectivePaths")
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ConfigError(f"EffectivePaths: draws must be a positive integer, got {draws!r}")
        if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 1):
            raise ConfigError(
                f"EffectivePaths: max_samples must be positive or null, got {max_samples!r}"
            )
        self.split = split
        self.draws = draws
        self.max_samples = max_samples
        self.seed = seed
        self.rows: list[dict[str, Any]] = []
        self.output_dir: Path | None = None
        self._blocks: list[tuple[str, SkipBlock]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        arch = getattr(pl_module, "hparams", {}).get("arch")
        self._blocks = routable_blocks(pl_module, f"model {arch!r}" if arch else None)

    # -- the measurement ----------------------------------------------------------------------
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """Measure every path length on this trainer's data; rank zero writes and logs."""
        blocks = [block for _, block in self._blocks]
        n = len(blocks)
        was_training = pl_module.training
        pl_module.eval()
        try:
            # Validation hooks run under inference mode, which rules out the backward passes.
            with torch.inference_mode(False):
                data = analysis_split(trainer, self.split, self.max_samples, "EffectivePaths")
                sums = torch.zeros(n + 1, 4, dtype=torch.float64, device=pl_module.device)
                generator = torch.Generator().manual_seed(self.seed + trainer.global_rank)
                # The same samples for every length, read once: the lengths differ by their
                # paths only. A rank without samples measures nothing and still joins the sum.
                samples = _first_samples(data, -(-self.draws // trainer.world_size))
                for length in range(n + 1):
                    for batch in samples:
                        x, y = to_device(trainer, batch)[:2]
                        through_branch = random_paths(len(x), n, length, generator)
                        at_input, at_first = path_gradient(
                            pl_module,
                            blocks,
                            through_branch.to(x.device),
                            x,
                            y,
                            trainer.precision_plugin.forward_context(),
                        )
                        sums[length, _COUNT] += at_input.numel()
                        sums[length, _SUM] += at_input.sum()
                        sums[length, _SQ] += at_input.square().sum()
                        sums[length, _FIRST] += at_first.sum()
                # Every rank gets here, with or without samples: one collective for all.
                sums = trainer.strategy.reduce(sums, reduce_op="sum")
        finally:
            for block in blocks:
                block.gradient_path = "both"
            pl_module.train(was_training)
        totals = sums.cpu().tolist()
        if totals[0][_COUNT] == 0:
            raise ConfigError(f"EffectivePaths: the {self.split} split is empty")
        self.rows = _rows(totals, n)
        if trainer.is_global_zero:
            self._report(trainer, pl_module)
        return self.rows

    # -- comparing runs (skipnets compare EffectivePaths RUN ...) -----------------------------
    @classmethod
    def compare_runs(cls, runs: dict[str, Path], out: Path) -> list[Path]:
        """Total gradient magnitude per path length, one line per run (Veit et al. 2016, Fig.
        6c): where the effective paths of networks of different depths lie."""

        def series(directory: Path):
            path = latest_result(directory / "effective_paths", "effective_paths.csv")
            if path is None:
                return None
            rows = read_rows(path)
            return [r["length"] for r in rows], [r["total_gradient"] for r in rows]

        return overlay_runs(
            runs,
            out,
            "effective_paths",
            series,
            title="total gradient magnitude per path length",
            xlabel="path length (blocks whose branch the path takes)",
            ylabel="paths x gradient magnitude",
            log_y=True,
        )

    # -- output -------------------------------------------------------------------------------
    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = plugin_dir(trainer, "effective_paths")
        self.output_dir = directory
        write_csv(directory / "effective_paths.csv", COLUMNS, self.rows)
        arch = getattr(pl_module, "hparams", {}).get("arch") or type(pl_module).__name__
        figure = plot_effective_paths(self.rows, f"{arch}, {self.split} split")
        save_figure(trainer, figure, directory / "effective_paths.png", "effective_paths/plot")
        summary = summarise(self.rows)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"effective_paths/{key}": value for key, value in summary.items()},
                step=trainer.global_step,
            )
        log_rows(trainer, "effective_paths/table", COLUMNS, self.rows)
        n = self.rows[0]["blocks"]
        rank_zero_info(
            f"Effective paths of {arch} ({n} skip blocks, {self.draws} paths per length, "
            f"{self.split} split): the total gradient peaks at length "
            f"{summary['peak_length']}; 90% of it comes from lengths "
            f"{summary['range_low']}-{summary['range_high']}; paths through at most n/3 = "
            f"{n // 3} blocks carry {100 * summary['share_up_to_third']:.1f}% of it; each "
            f"branch scales a path's gradient by {summary['factor_per_branch']:.3g}, which puts "
            f"the peak at length {summary['fit_peak_length']}\n"
            f"  results: {directory / 'effective_paths.csv'}, {directory / 'effective_paths.png'}"
        )


def routable_blocks(model: nn.Module, what: str | None = None) -> list[tuple[str, SkipBlock]]:
    """The skip blocks whose two paths the measurement chooses between, in depth order: every
    block that is not ``plain``. A ``ConfigError`` when there is none, or when one sits inside
    another's branch (nested blocks do not unravel into a binomial set of paths)."""
    blocks = [
        (network_name(name), block) for name, block in skip_blocks(model) if block.kind != "plain"
    ]
    what = what or f"the model ({type(model).__name__})"
    if not blocks:
        raise ConfigError(
            f"EffectivePaths needs skip blocks with a skip path (residual, highway or dense), "
            f"and {what} has none (`skipnets models` marks the architectures with skip "
            "connections)"
        )
    for outer, _ in blocks:
        inner = next((name for name, _ in blocks if name.startswith(f"{outer}.")), None)
        if inner is not None:
            raise ConfigError(
                f"EffectivePaths needs skip blocks in sequence, but {inner} sits inside the "
                f"branch of {outer} in {what}: nested blocks do not unravel into 2**n paths"
            )
    return blocks


def random_paths(samples: int, n: int, length: int, generator: torch.Generator) -> Tensor:
    """A ``(samples, n)`` boolean tensor on the CPU: for each sample, ``length`` of the ``n``
    blocks drawn at random without replacement (``True``: the path takes its branch)."""
    order = torch.rand(samples, n, generator=generator).argsort(dim=1)
    chosen = torch.zeros(samples, n, dtype=torch.bool)
    return chosen.scatter_(1, order[:, :length], True)


def path_gradient(
    model: nn.Module,
    blocks: Sequence[SkipBlock],
    through_branch: Tensor,
    inputs: Tensor,
    targets: Tensor,
    forward_context: AbstractContextManager | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample L2 norms of the cross-entropy gradient at ``inputs`` and at the input of
    ``blocks[0]``, each sample ``s`` along its own path: the branch of ``blocks[i]`` where
    ``through_branch[s, i]`` (a boolean tensor on the inputs' device), the shortcut of the
    others. The forward values are those of the intact network; the routes are left set (the
    caller restores ``gradient_path``)."""
    if not inputs.is_floating_point():
        raise ConfigError(
            "EffectivePaths measures the gradient at the network's input, which needs "
            f"floating-point inputs, not {inputs.dtype}"
        )
    if through_branch.shape != (len(inputs), len(blocks)):
        raise ValueError(
            f"through_branch must have shape {(len(inputs), len(blocks))}, "
            f"not {tuple(through_branch.shape)}"
        )
    for block, column in zip(blocks, through_branch.t().contiguous()):
        block.gradient_path = column
    first_inputs: list[Tensor] = []
    handle = blocks[0].register_forward_pre_hook(lambda _, args: first_inputs.append(args[0]))
    x = inputs.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            with forward_context or nullcontext():
                logits = model(x)
            # Summed, so that each sample's gradient is that of its own loss.
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
            at_input, at_first = torch.autograd.grad(loss, [x, first_inputs[0]], allow_unused=True)
    finally:
        handle.remove()
    return _norms(at_input, x), _norms(at_first, first_inputs[0])


def _norms(grad: Tensor | None, like: Tensor) -> Tensor:
    if grad is None:  # no path reaches it
        return torch.zeros(like.shape[0], dtype=torch.float64, device=like.device)
    return grad.detach().flatten(1).double().norm(dim=1)


def _first_samples(data: AnalysisSplit, count: int) -> list[Any]:
    """This rank's first ``count`` samples of the split, as the loader batches them (not yet on
    the device), the split over again if it has fewer; empty when it has none."""
    batches: list[Any] = []
    while count > 0:
        before = count
        for batch in data.batches:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ConfigError(
                    f"EffectivePaths needs (inputs, targets) batches, but the {data.name} split "
                    f"gives {type(batch).__name__}"
                )
            size = min(len(inputs_of(batch)), count)
            batches.append(tuple(part[:size] for part in batch))
            count -= size
            if count == 0:
                break
        if count == before:  # an empty share of the split
            break
    return batches


def _rows(totals: list[list[float]], n: int) -> list[dict[str, Any]]:
    rows = []
    for length, sums in enumerate(totals):
        count = sums[_COUNT]
        mean = sums[_SUM] / count if count else float("nan")
        spread = math.sqrt(max(sums[_SQ] / count - mean**2, 0.0)) if count else float("nan")
        paths = math.comb(n, length)
        rows.append(
            {
                "length": length,
                "blocks": n,
                "paths": paths,
                "path_share": paths / 2**n,
                "samples": int(count),
                "grad_norm": mean,
                "grad_norm_std": spread,
                "first_block_grad_norm": sums[_FIRST] / count if count else float("nan"),
                "total_gradient": paths * mean,
            }
        )
    whole = sum(r["total_gradient"] for r in rows)
    cumulative = 0.0
    for row in rows:
        # No gradient at all (a network whose every path is cut off) has no shares.
        row["total_share"] = row["total_gradient"] / whole if whole > 0 else float("nan")
        cumulative += row["total_share"]
        row["cumulative_share"] = cumulative
    return rows


def summarise(rows: Sequence[dict[str, Any]], central: float = 0.9) -> dict[str, float]:
    """The length where the total gradient peaks, the lengths between which the ``central``
    share of it lies, the share that paths through at most a third of the blocks carry, the
    factor by which one more branch scales a path's gradient (the geometric fit of the
    magnitudes, over the lengths whose gradient is not zero) and the length where the fit's
    total, ``C(n, k) * factor**k``, peaks: less noisy than the measured peak."""
    n = rows[0]["blocks"]
    tail = (1.0 - central) / 2
    cumulative = [r["cumulative_share"] for r in rows]
    factor, fit_peak = geometric_fit(rows)
    if not all(math.isfinite(c) for c in cumulative):
        return {
            "peak_length": -1,
            "range_low": -1,
            "range_high": -1,
            "share_up_to_third": math.nan,
            "factor_per_branch": factor,
            "fit_peak_length": fit_peak,
        }
    return {
        "peak_length": max(rows, key=lambda r: r["total_gradient"])["length"],
        "range_low": next(i for i, c in enumerate(cumulative) if c > tail),
        "range_high": next((i for i, c in enumerate(cumulative) if c >= 1.0 - tail), n),
        "share_up_to_third": cumulative[n // 3],
        "factor_per_branch": factor,
        "fit_peak_length": fit_peak,
    }


def geometric_fit(rows: Sequence[dict[str, Any]]) -> tuple[float, int]:
    """The factor per branch of a least-squares line through log(grad_norm) against length, and
    the length where ``C(n, k) * factor**k`` peaks; NaN and -1 without two nonzero lengths."""
    measured = [(r["length"], math.log(r["grad_norm"])) for r in rows if r["grad_norm"] > 0]
    if len(measured) < 2:
        return math.nan, -1
    lengths, logs = np.array(measured).T
    slope = float(np.polyfit(lengths, logs, 1)[0])
    n = rows[0]["blocks"]
    peak = max(
        range(n + 1),
        key=lambda k: math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + slope * k,
    )
    return math.exp(slope), peak


def plot_effective_paths(rows: Sequence[dict[str, Any]], title: str):
    """Veit et al.'s Fig. 6: (a) the share of paths of each length, (b) the gradient magnitude
    of one path of each length (log scale), (c) their product, the total gradient magnitude per
    length, with the lengths that carry 90% of it shaded."""
    n = rows[0]["blocks"]
    lengths = np.array([r["length"] for r in rows])
    summary = summarise(rows)
    figure, grid = new_figure(1, 3, size=(4.4, 3.6))
    paths, magnitude, total = grid[0]
    figure.suptitle(f"Effective paths: {title} ({n} skip blocks), after {VEIT_2016.authors} 2016")

    paths.bar(lengths, [r["path_share"] for r in rows], width=0.9, color="tab:blue")
    paths.set_title(f"(a) path lengths: Binomial({n}, 1/2)")
    paths.set_ylabel(f"share of the 2^{n} paths")

    grad = np.array([r["grad_norm"] for r in rows], dtype=float)
    spread = np.array([r["grad_norm_std"] for r in rows], dtype=float)
    magnitude.plot(
        lengths,
        grad,
        "o-",
        ms=3,
        label=f"at the network's input (x{summary['factor_per_branch']:.2g} per branch)",
    )
    magnitude.fill_between(
        lengths, np.clip(grad - spread, grad * 1e-3, None), grad + spread, alpha=0.2, lw=0
    )
    magnitude.plot(
        lengths,
        [r["first_block_grad_norm"] for r in rows],
        ".--",
        color="tab:orange",
        label="at the first block's input",
    )
    magnitude.set_yscale("log")
    magnitude.set_title("(b) gradient magnitude of one path")
    magnitude.set_ylabel("mean per-sample |gradient| (band: ± std)")
    magnitude.legend(fontsize="small")

    measured = [r["total_gradient"] for r in rows]
    total.plot(lengths, measured, "o-", ms=3, color="tab:green", label="measured")
    if summary["fit_peak_length"] >= 0:
        # The geometric fit's totals, scaled to the measured sum.
        logs = [
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + k * math.log(summary["factor_per_branch"])
            for k in range(n + 1)
        ]
        fit = np.exp(np.array(logs) - max(logs))
        total.plot(
            lengths,
            fit * sum(measured) / fit.sum(),
            "--",
            color="0.3",
            lw=1,
            label=f"C({n}, k) x {summary['factor_per_branch']:.2g}^k, peak {summary['fit_peak_length']}",
        )
    total.axvspan(
        summary["range_low"] - 0.5,
        summary["range_high"] + 0.5,
        color="tab:green",
        alpha=0.12,
        label=f"90% of the total: lengths {summary['range_low']}-{summary['range_high']}",
    )
    total.axvline(
        n // 3 + 0.5,
        color="0.4",
        ls=":",
        lw=1,
        label=f"lengths <= {n // 3}: {100 * summary['share_up_to_third']:.0f}%",
    )
    total.set_title("(c) total gradient magnitude per length")
    total.set_ylabel("paths x gradient magnitude")
    total.legend(fontsize="small")
    for ax in grid[0]:
        ax.set_xlabel("path length (blocks whose branch it takes)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return figure
