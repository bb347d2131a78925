"""Shattered gradients: the network's input gradient along a line of inputs and its
autocorrelation, white noise in deep plain nets and brown noise in residual ones (Balduzzi,
Frean, Leary, Lewis, Ma & McWilliams 2017, "The Shattered Gradients Problem: If resnets are
the answer, then what is the question?")."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from matplotlib import colormaps
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from skipnets.data.analysis import Split, check_split
from skipnets.errors import ConfigError
from skipnets_plugins._milestones import MILESTONE_COLUMNS, MeasuredAtMilestones, milestone_fields
from skipnets_plugins._plotting import latest_result, new_figure, read_rows, save_figure, write_csv
from skipnets_plugins.linear_regions import (
    _check_int,
    _check_samples,
    choose_anchors,
    output_folder,
)

__all__ = [
    "LineGradients",
    "ShatteredGradients",
    "autocorrelation",
    "line_gradients",
    "line_normalised",
]

COLUMNS = (
    *MILESTONE_COLUMNS,
    "output",
    "batch_norm",
    "samples",
    "points",
    "lag1",
    "correlation_length",
    "mean_abs_derivative",
    "mean_gradient_norm",
)
GRADIENT_COLUMNS = ("when", "step", "index", "t", "derivative", "gradient_norm")
ACF_COLUMNS = ("when", "step", "lag", "autocorrelation")


@dataclass
class LineGradients:
    """The input gradient of a scalar output at ``points`` inputs evenly spaced along a line:
    ``gradients[i]`` (flattened, float64, on the CPU) at ``x(t[i])``, and ``derivative[i]``, its
    component along the line (the derivative of the output in ``t``, per unit of input
    distance)."""

    t: Tensor
    gradients: Tensor
    derivative: Tensor


def line_gradients(
    model: nn.Module,
    start: Tensor,
    end: Tensor,
    low: float,
    high: float,
    points: int,
    projection: Tensor | None = None,
    logit: int | None = None,
    line_statistics: bool = False,
) -> LineGradients:
    """Input gradients of ``model`` (in evaluation mode) along ``start + t (end - start)`` for
    ``t`` from ``low`` to ``high``: of ``logits @ projection``, or of logit ``logit``. With
    ``line_statistics`` batch norm normalises with the statistics of these points, held fixed
    (see ``line_normalised``). Runs on the model's device, in its parameters' dtype, without
    autocast; each point's gradient is that of its own output."""
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    t = torch.linspace(low, high, points, dtype=torch.float64)
    # Validation hooks run under inference mode, which rules out the backward pass.
    with torch.inference_mode(False), torch.enable_grad():
        origin = start.detach().clone().to(device, dtype).reshape(1, -1)
        direction = end.detach().clone().to(device, dtype).reshape(1, -1) - origin
        x = (origin + t.to(device, dtype)[:, None] * direction).view(points, *start.shape)
        with line_normalised(model, x if line_statistics else None):
            x.requires_grad_(True)
            out = model(x).reshape(points, -1)
            if logit is not None:
                scalar = out[:, logit]
            else:
                assert projection is not None
                scalar = out @ projection.to(out.device, out.dtype)
            (gradients,) = torch.autograd.grad(scalar.sum(), x)
    gradients = gradients.detach().reshape(points, -1).to("cpu", torch.float64)
    unit = direction.detach().reshape(-1).to("cpu", torch.float64)
    unit = unit / unit.norm()
    return LineGradients(t, gradients, gradients @ unit)


@contextmanager
def line_normalised(model: nn.Module, inputs: Tensor | None) -> Iterator[None]:
    """Batch-norm layers (in evaluation mode) normalise with the mean and variance that
    ``inputs`` bring them, as in a training step on that batch, but held fixed: each input's
    output (and gradient) is then its own, where batch statistics would tie each to all the
    others. Their running statistics, momentum and mode are restored on leaving; with
    ``inputs`` None nothing changes."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if inputs is None or not layers:
        yield
        return
    saved = [
        (m.training, m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in layers
    ]
    tracked = [m.num_batches_tracked.clone() for m in layers]
    counts: dict[nn.Module, int] = {}

    def count(module: nn.Module, args: tuple) -> None:
        counts[module] = args[0].numel() // args[0].shape[1]  # values per channel

    hooks = [m.register_forward_pre_hook(count) for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: after one batch, that batch's
                m.train()
            model(inputs.detach())
            for m in layers:
                n = counts.get(m, 2)
                m.running_var.mul_((n - 1) / n)  # the biased variance a training step uses
                m.eval()
        for hook in hooks:
            hook.remove()
        yield
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for m, (training, momentum, mean, var), count_ in zip(layers, saved, tracked):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count_)
                m.momentum = momentum
                m.train(training)


def autocorrelation(gradients: Tensor, max_lag: int) -> Tensor:
    """Sample autocorrelation of a series of vectors (one per row) at lags ``0 .. max_lag``:
    ``r(k) = sum_i <g_i - m, g_(i+k) - m> / sum_i |g_i - m|^2``, ``m`` the mean; for scalars the
    usual estimate. NaN at every lag when the series is constant."""
    series = gradients.reshape(len(gradients), -1).double()
    centred = series - series.mean(0)
    energy = centred.pow(2).sum()
    lags = range(min(max_lag, len(series) - 1) + 1)
    if energy == 0:
        return torch.full((len(lags),), math.nan, dtype=torch.float64)
    return torch.stack([(centred[: len(series) - k] * centred[k:]).sum() / energy for k in lags])


def correlation_length(acf: Tensor) -> int | None:
    """The first lag at which the autocorrelation falls below 1/e; None if it never does."""
    below = (acf[1:] < math.exp(-1)).nonzero()
    return int(below[0]) + 1 if len(below) else None


class ShatteredGradients(MeasuredAtMilestones):
    """Input gradients along a line and their autocorrelation: white or brown noise (Balduzzi 2017).

    As in Balduzzi et al. 2017, "The Shattered Gradients Problem: If resnets are the answer,
    then what is the question?", Figs. 1-3: the gradient of the network's output with respect
    to its input at ``points`` inputs evenly spaced along a line (Fig. 1), and the
    autocorrelation of that series of gradients (Fig. 2). In a deep plain network the gradient
    jumps at every one of the many breakpoints along the line and looks like white noise, its
    autocorrelation near 0 from lag 1 on; in a residual network it stays correlated like brown
    noise (a random walk). One number sums each measurement up, the lag-1 autocorrelation, and
    ``skipnets compare ShatteredGradients RUN ...`` plots it against depth (Fig. 3's decay of
    correlation with depth) beside the runs' autocorrelation curves.

    The line runs through two samples of ``split`` (``samples``, or the split's first and the
    one of its first ``max_samples`` farthest from it), over ``t`` from ``-extend`` to
    ``1 + extend``. The output differentiated is a scalar: with ``output: projection`` (the
    default) the logits' dot product with a fixed random unit vector (drawn from ``seed``, the
    same on every run and rank), with ``output: K`` logit ``K``. The gradient at each point is
    the whole input gradient; the autocorrelation at lag ``k`` is
    ``sum_i <g_i - m, g_(i+k) - m> / sum_i |g_i - m|^2`` (``m`` the mean gradient), which for
    one input is the paper's. The figure draws the gradient's component along the line.

    Batch norm matters here. With ``batch_norm: batch`` (the default) its layers normalise
    with the mean and variance the points along the line bring them, as in a training step on
    that batch (so that every unit switches somewhere along the line), but held fixed, so that
    each point's gradient is that of its own output; their running statistics are restored
    afterwards. With ``running`` they use their running statistics (the function the network
    computes at evaluation; at initialisation, an identity). Everything else is in evaluation
    mode. Without batch norm, a plain ReLU net's gradient along a line stays correlated at
    depth (its many breakpoints each change it a little); with it, it decorrelates with depth.

    Measured at initialisation (``on_fit_start``, not when resuming), after every
    ``every_n_epochs`` training epochs, when training ends, and on a checkpoint in a standalone
    ``validate`` (``skipnets analyse ShatteredGradients --config ... --ckpt_path ...``), on the
    model's device, in its parameters' dtype and without autocast. Every rank computes the same
    numbers (with ``SyncBatchNorm`` and ``batch`` statistics, all ranks take part alike in its
    one reduction); rank zero writes.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: ShatteredGradients
              init_args: {points: 256, output: projection}

    Writes under ``<run dir>/shattered_gradients/``: ``shattered_gradients.csv`` (one row per
    measurement: when, epoch, step, arch, depth, output, the line's samples, points, the lag-1
    autocorrelation, the first lag where it falls below 1/e, the mean absolute derivative along
    the line and mean gradient norm), ``gradients.csv`` (each point's ``t``, derivative along
    the line and gradient norm), ``autocorrelation.csv`` (lags 0 to ``max_lag``) and
    ``shattered_gradients_<init|epoch<E>|trained>.png``; on a checkpoint the same under
    ``shattered_gradients/<checkpoint name>/``.

    Args:
        split: the data module's split the line's samples come from.
        samples: positions in the split of the line's two samples; None: chosen as above.
        points: inputs along the line (the paper: 256).
        extend: how far the line runs past its samples, in units of their distance.
        output: ``projection`` or the index of the logit differentiated.
        seed: seed of the projection.
        max_lag: largest lag of the autocorrelation; None: half of ``points``.
        max_samples: samples of the split searched for the line's far end.
        every_n_epochs: also measure after every this many training epochs; 0: at the start
            and the end only.
        batch_norm: ``batch`` or ``running`` statistics in batch-norm layers, see above.
    """

    def __init__(
        self,
        split: Split = "val",
        samples: list[int] | None = None,
        points: int = 256,
        extend: float = 0.25,
        output: int | Literal["projection"] = "projection",
        seed: int = 0,
        max_lag: int | None = None,
        max_samples: int = 256,
        every_n_epochs: int = 0,
        batch_norm: Literal["batch", "running"] = "batch",
    ) -> None:
        super().__init__(every_n_epochs)
        owner = "ShatteredGradients"
        if batch_norm not in ("batch", "running"):
            raise ConfigError(
                f"{owner}: batch_norm must be 'batch' or 'running', not {batch_norm!r}"
            )
        check_split(split, owner)
        _check_samples(samples, (2,), owner)
        _check_int(points, 4, "points", owner)
        _check_int(max_samples, 2, "max_samples", owner)
        _check_int(every_n_epochs, 0, "every_n_epochs", owner)
        _check_int(seed, 0, "seed", owner)
        if max_lag is not None:
            _check_int(max_lag, 1, "max_lag", owner)
            if max_lag >= points:
                raise ConfigError(
                    f"{owner}: max_lag must be below points ({points}), got {max_lag}"
                )
        if output != "projection" and (
            isinstance(output, bool) or not isinstance(output, int) or output < 0
        ):
            raise ConfigError(
                f"{owner}: output must be 'projection' or the index of a logit, got {output!r}"
            )
        if not isinstance(extend, (int, float)) or isinstance(extend, bool) or extend < 0:
            raise ConfigError(f"{owner}: extend must be a number >= 0, got {extend!r}")
        self.split = split
        self.samples = list(samples) if samples is not None else None
        self.points = points
        self.extend = float(extend)
        self.output = output
        self.seed = seed
        self.max_lag = max_lag if max_lag is not None else points // 2
        self.max_samples = max_samples
        self.batch_norm = batch_norm
        self.gradient_rows: list[dict[str, Any]] = []
        self.acf_rows: list[dict[str, Any]] = []

    table = "shattered_gradients/table"
    columns = COLUMNS

    def reset(self) -> None:
        self.rows, self.gradient_rows, self.acf_rows = [], [], []

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "gradients": self.gradient_rows, "acf": self.acf_rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
        self.gradient_rows = list(state_dict.get("gradients", []))
        self.acf_rows = list(state_dict.get("acf", []))

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str) -> dict:
        """Gradients along the line and their autocorrelation; rank zero writes the files."""
        owner = "ShatteredGradients"
        anchors = choose_anchors(
            trainer, self.split, self.samples, self.max_samples, self.extend, owner, count=2
        )
        was_training = pl_module.training
        pl_module.eval()
        try:
            line = self._gradients(pl_module, anchors.inputs[0], anchors.inputs[1])
        finally:
            pl_module.train(was_training)
        acf = autocorrelation(line.gradients, self.max_lag)
        length = correlation_length(acf)
        row = {
            **milestone_fields(trainer, pl_module, when),
            "output": self._output_name(),
            "batch_norm": self.batch_norm,
            "samples": " ".join(map(str, anchors.positions)),
            "points": self.points,
            "lag1": float(acf[1]),
            "correlation_length": "" if length is None else length,
            "mean_abs_derivative": float(line.derivative.abs().mean()),
            "mean_gradient_norm": float(line.gradients.norm(dim=1).mean()),
        }
        self.rows.append(row)
        step = trainer.global_step
        norms = line.gradients.norm(dim=1)
        self.gradient_rows += [
            {
                "when": when,
                "step": step,
                "index": i,
                "t": float(line.t[i]),
                "derivative": float(line.derivative[i]),
                "gradient_norm": float(norms[i]),
            }
            for i in range(self.points)
        ]
        self.acf_rows += [
            {"when": when, "step": step, "lag": k, "autocorrelation": float(value)}
            for k, value in enumerate(acf)
        ]
        if trainer.is_global_zero:
            self._write(trainer, row, line, acf, anchors.positions)
        return row

    def _gradients(self, pl_module: L.LightningModule, start: Tensor, end: Tensor):
        with torch.inference_mode(False), torch.no_grad():
            probe = start.detach().clone().to(next(pl_module.parameters()))
            classes = pl_module(probe.unsqueeze(0)).reshape(1, -1).shape[1]
        low, high = -self.extend, 1 + self.extend
        batch = self.batch_norm == "batch"
        if self.output == "projection":
            generator = torch.Generator().manual_seed(self.seed)
            projection = torch.randn(classes, generator=generator, dtype=torch.float64)
            projection = projection / projection.norm()
            return line_gradients(
                pl_module, start, end, low, high, self.points, projection, line_statistics=batch
            )
        if self.output >= classes:
            raise ConfigError(
                f"ShatteredGradients: output={self.output} but the model has {classes} outputs"
            )
        return line_gradients(
            pl_module, start, end, low, high, self.points, logit=self.output, line_statistics=batch
        )

    def _output_name(self) -> str:
        if self.output == "projection":
            return f"random projection of the logits (seed {self.seed})"
        return f"logit {self.output}"

    def _write(self, trainer, row, line: LineGradients, acf: Tensor, positions) -> None:
        folder = output_folder(trainer, "shattered_gradients")
        write_csv(folder / "shattered_gradients.csv", COLUMNS, self.rows)
        write_csv(folder / "gradients.csv", GRADIENT_COLUMNS, self.gradient_rows)
        write_csv(folder / "autocorrelation.csv", ACF_COLUMNS, self.acf_rows)
        name = (
            "shattered_gradients"
            if row["when"] == "checkpoint"
            else f"shattered_gradients_{row['when']}"
        )
        data = type(trainer.datamodule).__name__ if trainer.datamodule is not None else "data"
        title = (
            f"Input gradients of {row['arch']} (depth {row['depth']}) on {data} "
            f"({row['when']}, step {row['step']})"
        )
        figure = plot_gradients(title, line, acf, row["output"], positions, self.split)
        save_figure(trainer, figure, folder / f"{name}.png", "shattered_gradients/figure")
        rank_zero_info(
            f"ShatteredGradients ({row['when']}): lag-1 autocorrelation {row['lag1']:.3f}; "
            f"{folder / 'shattered_gradients.csv'}"
        )

    # -- comparing runs (skipnets compare ShatteredGradients RUN ...) -------------------------
    @classmethod
    def compare_runs(cls, runs: dict[str, Path], out: Path) -> list[Path]:
        """Each run's autocorrelation at initialisation (its first measurement), and the lag-1
        autocorrelation against depth per architecture, at initialisation and at the end."""
        summaries: dict[str, list[dict[str, Any]]] = {}
        curves: dict[str, tuple[list[int], list[float]]] = {}
        missing = []
        for label, directory in runs.items():
            path = latest_result(directory / "shattered_gradients", "shattered_gradients.csv")
            rows = read_rows(path) if path else []
            if not rows:
                missing.append(f"{label} ({directory})")
                continue
            first = rows[0]
            last = rows[-1] if len(rows) > 1 else None
            summaries[label] = [first] + ([last] if last is not None else [])
            acf = [
                r
                for r in read_rows(path.parent / "autocorrelation.csv")
                if r["when"] == first["when"] and r["step"] == first["step"]
            ]
            curves[label] = ([r["lag"] for r in acf], [r["autocorrelation"] for r in acf])
        if missing:
            raise ConfigError(f"no shattered_gradients results in: {', '.join(missing)}")
        table = [
            {
                "run": label,
                "arch": r["arch"],
                "depth": r["depth"],
                "when": "init" if r["when"] == "init" else "trained",
                "lag1": r["lag1"],
                "correlation_length": r["correlation_length"],
            }
            for label, rows in summaries.items()
            for r in rows
        ]
        fig, axes = new_figure(1, 2, size=(5.6, 4.2))
        left, right = axes[0]
        archs = sorted({r["arch"] for r in table})
        shades = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys")
        first_rows = {label: rows[0] for label, rows in summaries.items()}
        for arch_index, arch in enumerate(archs):
            labels = sorted(
                (label for label, row in first_rows.items() if row["arch"] == arch),
                key=lambda label: first_rows[label]["depth"],
            )
            cmap = colormaps[shades[arch_index % len(shades)]]
            for i, label in enumerate(labels):
                lags, values = curves[label]
                shade = cmap(0.4 + 0.6 * (i + 1) / len(labels))
                left.plot(lags, values, lw=1.1, color=shade, label=label)
            colour = cmap(0.8)
            for when, style in (("init", "-"), ("trained", "--")):
                points = sorted(
                    (r["depth"], r["lag1"])
                    for r in table
                    if r["arch"] == arch and r["when"] == when
                )
                if points:
                    x, y = zip(*points)
                    right.plot(x, y, style, marker="o", color=colour, label=f"{arch}, {when}")
        left.axhline(math.exp(-1), ls=":", color="grey", lw=1, label="1/e")
        left.axhline(0, color="k", lw=0.6)
        left.set_xlabel("lag (points along the line)")
        left.set_ylabel("autocorrelation of the input gradient")
        left.set_title("autocorrelation, first measurement")
        left.legend(fontsize="x-small", loc="upper right")
        right.axhline(0, color="k", lw=0.6)
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_xlabel("depth")
        right.set_ylabel("lag-1 autocorrelation")
        right.set_title("correlation of neighbouring gradients against depth")
        right.grid(alpha=0.3)
        right.legend(fontsize="x-small", loc="best")
        png = out / "shattered_gradients.png"
        fig.savefig(png, dpi=120)
        columns = ("run", "arch", "depth", "when", "lag1", "correlation_length")
        return [png, write_csv(out / "shattered_gradients.csv", columns, table)]


def plot_gradients(title: str, line: LineGradients, acf: Tensor, output: str, positions, split):
    """Fig. 1 (the gradient along the line) and Fig. 2 (its autocorrelation) of Balduzzi et al."""
    fig, axes = new_figure(1, 2, size=(5.4, 4.0))
    fig.suptitle(title)
    left, right = axes[0]
    t = line.t.numpy()
    left.plot(t, line.derivative.numpy(), lw=0.8, marker=".", ms=2)
    for x in (0, 1):
        left.axvline(x, color="k", ls=":", lw=1)
    a, b = positions[:2]
    left.set_xlabel(f"t along the line (0: {split} sample {a}, 1: sample {b})")
    left.set_ylabel("d output / d input, along the line")
    left.set_title(f"gradient of the {output}", fontsize="medium")
    lags = np.arange(len(acf))
    right.plot(lags, acf.numpy(), marker=".", ms=3)
    band = 2 / math.sqrt(len(t))
    right.axhspan(-band, band, color="0.85", label="white noise (±2/√n)")
    right.axhline(math.exp(-1), ls=":", color="grey", lw=1, label="1/e")
    right.axhline(0, color="k", lw=0.6)
    right.set_xlabel("lag (points along the line)")
    right.set_ylabel("autocorrelation")
    right.set_title(f"autocorrelation (lag 1: {float(acf[1]):.3f})", fontsize="medium")
    right.legend(fontsize="x-small", loc="upper right")
    return fig
