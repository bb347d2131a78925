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
from matplotlib.ticker import MaxNLocator

from skipnets.runs import log_figure, log_table

__all__ = [
    "latest_result",
    "log_images",
    "log_rows",
    "new_figure",
    "read_rows",
    "save_figure",
    "write_csv",
]


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


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A plugin's CSV, numbers as numbers."""
    with open(path, newline="") as handle:
        return [
            {key: _number(value) for key, value in row.items()} for row in csv.DictReader(handle)
        ]


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


def overlay_runs(
    runs: dict[str, Path],
    out: Path,
    name: str,
    series: Any,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log_y: bool = False,
    chance: float | None = None,
) -> list[Path]:
    """One line per run, on one set of axes: ``series(run_dir)`` gives ``(x, y)`` (or None for a
    run without results, which is named in an error). Writes ``<name>.png`` and ``<name>.csv``
    (run, x, y) in ``out``."""
    from skipnets.errors import ConfigError

    curves = {label: series(directory) for label, directory in runs.items()}
    missing = [f"{label} ({runs[label]})" for label, curve in curves.items() if curve is None]
    if missing:
        raise ConfigError(f"no {name} results in: {', '.join(missing)}")
    fig, axes = new_figure(1, 1, size=(6.5, 4.2))
    ax = axes[0][0]
    rows = []
    for label, (x, y) in curves.items():
        ax.plot(x, y, marker=".", label=label)
        rows += [{"run": label, "x": a, "y": b} for a, b in zip(x, y)]
    if chance is not None:
        ax.axhline(chance, ls=":", color="grey", lw=1, label="chance")
    if log_y:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    png = out / f"{name}.png"
    fig.savefig(png, dpi=120)
    return [png, write_csv(out / f"{name}.csv", ("run", "x", "y"), rows)]


def latest_result(folder: Path, name: str) -> Path | None:
    """``folder/name`` (what training wrote), else the newest ``folder/*/name`` (what an
    analysis of a checkpoint wrote): the file ``skipnets compare`` reads for a run."""
    if (folder / name).is_file():
        return folder / name
    found = sorted(folder.glob(f"*/{name}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
