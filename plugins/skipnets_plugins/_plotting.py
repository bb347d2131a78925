"""What the research callbacks share: their folder in the run directory, CSV files, Agg figures,
and handing both to the logger (W&B gets images and tables; other loggers only the files)."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skipnets.runs import log_figure, log_table

__all__ = ["log_images", "log_rows", "new_figure", "save_figure", "write_csv"]


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0)):
    """A figure on its own Agg canvas (no pyplot state, no display needed) and its axes grid."""
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes: Any = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(trainer: L.Trainer, fig: Figure, path: Path, key: str, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG and log it to the logger under ``key``."""
    fig.savefig(path, dpi=dpi)
    log_figure(trainer, key, path)
    return path


def log_images(trainer: L.Trainer, key: str, paths: Sequence[Path]) -> None:
    for path in paths:
        log_figure(trainer, key, path)


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def log_rows(
    trainer: L.Trainer, key: str, columns: Sequence[str], rows: Sequence[dict[str, Any]]
) -> None:
    log_table(trainer, key, [[r[c] for c in columns] for r in rows], columns=columns)


def mark_stages(ax: Axes, stages: Sequence[int], offset: float = 0.0) -> bool:
    """Dashed vertical lines between consecutive indices whose stage differs (negative stages,
    parts outside any stage such as a stem or head, are not boundaries). Returns whether there
    was any, so that a label mentions them only then."""
    drawn = False
    for i in range(1, len(stages)):
        if min(stages[i], stages[i - 1]) >= 0 and stages[i] != stages[i - 1]:
            ax.axvline(i - 0.5 + offset, color="0.5", linestyle="--", linewidth=0.8)
            drawn = True
    return drawn
