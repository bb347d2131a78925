"""``skipnets study --config STUDY.yaml``: a multi-run study from one file, and its figure.

A study is a grid of ``skipnets fit`` runs: one *line* per variant (an architecture family, a
callback switched on or off) and, optionally, one *panel* per value of one setting (a depth).
Every run is a ``skipnets fit`` of the study's base config with the line's and the panel's
settings as overrides, in its own process and its own folder. When the runs are done, the study
reads each run's ``history.csv`` and ``test.json`` (written by :class:`skipnets.history.History`)
and writes, in the study's folder:

- ``study.csv``: every run's every epoch (line, panel value, epoch, step, seconds and the
  metrics);
- ``summary.csv``: one row per run (its status, epochs, final training loss, best validation
  accuracy, test accuracy, training seconds, run directory);
- ``study.png``: one column of axes per panel, one row per metric, the lines overlaid (as
  Srivastava et al. 2015, Fig. 1, draws plain against highway nets at each depth).

A study file::

    name: depth_digits                  # optional: the file's name without .yaml
    root: runs/studies/depth_digits     # optional: runs/studies/<name>
    base: ../experiments/some_fit.yaml  # a fit config: a path (relative to this file) or inline
    panels:                             # optional: one panel per value
      name: depth
      key: model.arch_kwargs.depth
      values: [10, 20, 50, 100]
    lines:
      - label: plain MLP
        set: {model.arch: plain_mlp}    # overrides, as on the command line (dotted keys)
      - label: plain CNN
        set: {model.arch: plain_cnn, data.init_args.image_size: 16}
        values: {10: 8, 100: 98}        # optional: this line's value in a panel, where it differs
    metrics: [train_loss, val/acc]      # the figure's rows: history.csv columns

Runs that finished (or diverged: a non-finite loss is a result too) are not run again when the
study is started again; an interrupted run resumes from its ``last.ckpt``. ``--plot-only``
redraws from the runs on disk; ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skipnets.errors import ConfigError
from skipnets.history import draw_metric, metric_label, read_history, read_test

__all__ = ["Run", "Study", "load_study", "study"]

STUDY_KEYS = ("name", "root", "base", "panels", "lines", "metrics", "jobs")
PANEL_KEYS = ("name", "key", "values")
LINE_KEYS = ("label", "set", "values")
LEDGER = "runs.json"
DONE, DIVERGED, FAILED, STOPPED = "done", "diverged", "failed", "stopped"


@dataclass(frozen=True)
class Run:
    """One ``skipnets fit`` of a study: its line, its panel and where it writes."""

    line: str
    panel: Any  # the panel's value (None without panels)
    value: Any  # this line's value of the panel's setting (differs from panel where mapped)
    overrides: tuple[str, ...]
    folder: Path

    @property
    def key(self) -> str:
        return (
            self.folder.name
            if self.panel is None
            else f"{self.folder.parent.name}/{self.folder.name}"
        )

    def describe(self, panel_name: str | None) -> str:
        if self.panel is None:
            return self.line
        shown = self.panel if self.value == self.panel else f"{self.panel} (runs {self.value})"
        return f"{self.line}, {panel_name} {shown}"


@dataclass
class Study:
    path: Path
    name: str
    root: Path
    base: Path
    panel_name: str | None
    panel_key: str | None
    panel_values: list[Any]
    lines: list[dict[str, Any]]
    metrics: list[str]
    jobs: int = 1
    runs: list[Run] = field(default_factory=list)


def load_study(path: Path, root: Path | None = None) -> Study:
    """Read and check a study file; every mistake is one :class:`ConfigError`."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"no study file at {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}{where} is not valid YAML") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a study file is a mapping with base, lines and panels")
    _known(spec, STUDY_KEYS, f"{path}")
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[\w.-]+", name):
        raise ConfigError(f"{path}: name {name!r} must be letters, digits, '_', '-' or '.'")
    root = Path(root or spec.get("root") or Path("runs") / "studies" / name)
    base = _base(spec.get("base"), path, root)

    panels = spec.get("panels")
    panel_name = panel_key = None
    panel_values: list[Any] = [None]
    if panels is not None:
        if not isinstance(panels, dict):
            raise ConfigError(f"{path}: panels is a mapping with key and values")
        _known(panels, PANEL_KEYS, f"{path}: panels")
        panel_key = panels.get("key")
        panel_values = panels.get("values")
        if not isinstance(panel_key, str) or not panel_key:
            raise ConfigError(
                f"{path}: panels.key is the setting that changes, e.g. model.arch_kwargs.depth"
            )
        if not isinstance(panel_values, list) or not panel_values:
            raise ConfigError(f"{path}: panels.values is a non-empty list")
        if len(set(map(repr, panel_values))) != len(panel_values):
            raise ConfigError(f"{path}: panels.values repeats a value")
        panel_name = str(panels.get("name") or panel_key.rpartition(".")[2])

    lines = spec.get("lines")
    if not isinstance(lines, list) or not lines:
        raise ConfigError(f"{path}: lines is a non-empty list of {{label, set}}")
    labels = set()
    for index, line in enumerate(lines):
        where = f"{path}: lines[{index}]"
        if not isinstance(line, dict):
            raise ConfigError(f"{where} is a mapping with label and set")
        _known(line, LINE_KEYS, where)
        label = line.get("label")
        if not isinstance(label, str) or not label:
            raise ConfigError(f"{where} needs a label")
        if label in labels:
            raise ConfigError(f"{where}: the label {label!r} is used twice")
        labels.add(label)
        if not isinstance(line.get("set") or {}, dict):
            raise ConfigError(f"{where}.set is a mapping of dotted keys to values")
        mapped = line.get("values") or {}
        if not isinstance(mapped, dict):
            raise ConfigError(f"{where}.values maps a panel value to this line's value")
        if mapped and panels is None:
            raise ConfigError(f"{where}.values needs panels")
        unknown = [k for k in mapped if k not in panel_values]
        if unknown:
            raise ConfigError(f"{where}.values: {unknown} are not among panels.values")

    metrics = spec.get("metrics", ["train_loss", "val/acc"])
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"{path}: metrics is a list of history.csv columns, e.g. train_loss")
    jobs = spec.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"{path}: jobs is a positive integer, got {jobs!r}")

    result = Study(
        path, name, root, base, panel_name, panel_key, panel_values, lines, metrics, jobs
    )
    for line in lines:
        for panel in panel_values:
            value = (line.get("values") or {}).get(panel, panel)
            overrides = [_override(k, v) for k, v in (line.get("set") or {}).items()]
            folder = root / _slug(line["label"])
            if panel_key is not None:
                overrides.append(_override(panel_key, value))
                folder = folder / f"{panel_name}_{_slug(str(panel))}"
            result.runs.append(Run(line["label"], panel, value, tuple(overrides), folder))
    return result


def _known(spec: dict[str, Any], keys: Sequence[str], where: str) -> None:
    for key in spec:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(keys)})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def _base(base: Any, path: Path, root: Path) -> Path:
    """The fit config every run starts from: a file next to the study, or the inline mapping
    written to ``<root>/base.yaml``."""
    import yaml

    if isinstance(base, str):
        file = (path.parent / base).resolve()
        if not file.is_file():
            raise ConfigError(f"{path}: base {base!r} is not a file (looked at {file})")
        return file
    if isinstance(base, dict):
        root.mkdir(parents=True, exist_ok=True)
        file = root / "base.yaml"
        text = f"# The fit config of every run of {path}\n" + yaml.safe_dump(base, sort_keys=False)
        if not file.is_file() or file.read_text() != text:
            file.write_text(text)
        return file
    raise ConfigError(f"{path}: base is a fit config: a path or a mapping")


def _override(key: str, value: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"a study override needs a dotted key, got {key!r}")
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{key}={text}"


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text.strip()).strip("_") or "run"


# -- running ---------------------------------------------------------------------------------------
def study(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="skipnets study",
        description="Run every run of a study (a grid of `skipnets fit` runs) and draw its "
        "figure. Extra --key=value options go to every run.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", type=Path, required=True, help="the study file")
    parser.add_argument("--root", type=Path, help="the study's folder (default: the file's root)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: the file's, or 1)")
    parser.add_argument("--rerun", action="store_true", help="run again the runs already done")
    parser.add_argument(
        "--plot-only", action="store_true", help="only redraw from the runs on disk"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    options, extra = parser.parse_known_args(args)
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        raise ConfigError(
            f"skipnets study: {bad[0]!r}: extra options are --key=value for every run"
        )
    spec = load_study(options.config, options.root)
    jobs = options.jobs if options.jobs is not None else spec.jobs
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if options.dry_run:
        for run in spec.runs:
            print(shlex.join(_command(spec, run, extra, resume=False)))
        return 0
    spec.root.mkdir(parents=True, exist_ok=True)
    ledger = _read_ledger(spec.root)
    if not options.plot_only:
        code = _run_all(spec, ledger, extra, jobs, options.rerun)
        if code:
            return code
    written = write_results(spec, ledger)
    print(f"skipnets study: {spec.name}")
    for path in written:
        print(f"  {path}")
    return 0


def _command(spec: Study, run: Run, extra: Sequence[str], resume: bool) -> list[str]:
    command = [sys.executable, "-m", "skipnets", "fit", "--config", str(spec.base)]
    command += [*run.overrides, *extra]
    command += [f"--trainer.default_root_dir={run.folder}", "--trainer.enable_progress_bar=false"]
    if resume:
        command.append("--ckpt_path=last")
    return command


def _read_ledger(root: Path) -> dict[str, Any]:
    path = root / LEDGER
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def _write_ledger(root: Path, ledger: dict[str, Any]) -> None:
    partial = root / f"{LEDGER}.partial"
    partial.write_text(json.dumps(ledger, indent=2, sort_keys=True) + "\n")
    partial.replace(root / LEDGER)


def _run_all(
    spec: Study, ledger: dict[str, Any], extra: Sequence[str], jobs: int, rerun: bool
) -> int:
    todo = [
        run
        for run in spec.runs
        if rerun or ledger.get(run.key, {}).get("status") not in (DONE, DIVERGED)
    ]
    done = len(spec.runs) - len(todo)
    if done:
        print(f"skipnets study: {done} of {len(spec.runs)} runs already done in {spec.root}")
    if not todo:
        return 0
    env = dict(os.environ)
    env.setdefault("WANDB_RUN_GROUP", spec.name)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    lock = threading.Lock()
    children: set[subprocess.Popen] = set()
    stopping = threading.Event()
    counter = iter(range(done + 1, len(spec.runs) + 1))

    def one(run: Run) -> None:
        if stopping.is_set():
            return
        run.folder.mkdir(parents=True, exist_ok=True)
        resume = not rerun and _has_last_checkpoint(run.folder)
        command = _command(spec, run, extra, resume)
        started = time.perf_counter()
        with open(run.folder / "output.log", "a") as log:
            log.write(f"$ {shlex.join(command)}\n")
            log.flush()
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            with lock:
                children.add(child)
            code = child.wait()
            with lock:
                children.discard(child)
        seconds = time.perf_counter() - started
        record = _record(run, code, seconds)
        with lock:
            ledger[run.key] = record
            _write_ledger(spec.root, ledger)
            number = next(counter)
            print(f"[{number}/{len(spec.runs)}] {run.describe(spec.panel_name)}: {_said(record)}")
            sys.stdout.flush()

    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum, frame) -> None:
        stopping.set()
        with lock:
            for child in children:
                child.send_signal(signal.SIGTERM)  # each run saves last.ckpt and exits

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(one, todo))
    except KeyboardInterrupt:
        stop(signal.SIGINT, None)
        stopping.set()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    if stopping.is_set():
        print(
            f"skipnets study: stopped; start it again to continue where it stopped: "
            f"skipnets study --config {shlex.quote(str(spec.path))}",
            file=sys.stderr,
        )
        return 143
    failed = [r for r in spec.runs if ledger.get(r.key, {}).get("status") == FAILED]
    if failed:
        print(
            f"skipnets study: {len(failed)} run(s) failed; their output.log says why "
            f"(first: {failed[0].folder / 'output.log'}). The figure shows the others.",
            file=sys.stderr,
        )
    return 0


def _has_last_checkpoint(folder: Path) -> bool:
    return any(folder.rglob("last.ckpt"))


def _record(run: Run, code: int, seconds: float) -> dict[str, Any]:
    directory = find_run_dir(run.folder)
    message = _last_error(run.folder / "output.log")
    if code == 0:
        status = DONE
    elif code in (143, -signal.SIGTERM, 130, -signal.SIGINT):
        status = STOPPED
    elif message and message.startswith("training diverged"):
        status = DIVERGED
    else:
        status = FAILED
    return {
        "status": status,
        "exit": code,
        "message": message if status != DONE else None,
        "seconds": round(seconds, 1),
        "run_dir": str(directory) if directory else None,
    }


def _last_error(log: Path) -> str | None:
    if not log.is_file():
        return None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    for line in reversed(lines):
        if line.startswith("skipnets: "):
            return line.partition(": ")[2].removeprefix("error: ")
    return next((line for line in reversed(lines) if line), None)  # e.g. a traceback's last


def _said(record: dict[str, Any]) -> str:
    if record["status"] == DONE:
        return f"done in {record['seconds']:.0f} s"
    return f"{record['status']} after {record['seconds']:.0f} s: {record.get('message') or ''}"


def find_run_dir(folder: Path) -> Path | None:
    """The run a study run wrote: the newest folder under ``folder`` with a ``config.yaml``
    (its logger's run directory), or None."""
    configs = sorted(folder.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    configs = [c for c in configs if c.parent != folder or (folder / "checkpoints").is_dir()]
    return configs[-1].parent if configs else None


# -- results ---------------------------------------------------------------------------------------
def write_results(spec: Study, ledger: dict[str, Any]) -> list[Path]:
    """``study.csv``, ``summary.csv`` and ``study.png`` from the runs on disk."""
    curves: dict[Run, list[dict[str, float]]] = {}
    summary = []
    for run in spec.runs:
        record = ledger.get(run.key, {})
        directory = find_run_dir(run.folder)
        rows = read_history(directory) if directory else []
        test = read_test(directory) if directory else {}
        curves[run] = rows
        val = [r["val/acc"] for r in rows if "val/acc" in r]
        summary.append(
            {
                "line": run.line,
                spec.panel_name or "panel": run.panel,
                "value": run.value,
                "status": record.get("status") or ("done" if test else "not run"),
                "epochs": len(rows),
                "final_train_loss": rows[-1].get("train_loss") if rows else None,
                "best_val_acc": max(val) if val else None,
                "test_acc": test.get("test/acc"),
                "train_seconds": rows[-1].get("seconds") if rows else None,
                "run_dir": str(directory) if directory else None,
            }
        )
    if not any(curves.values()):
        raise ConfigError(f"no run of study {spec.name} has a history.csv under {spec.root}")
    spec.root.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for rows in curves.values() for r in rows for k in r} - {"epoch"})
    study_csv = spec.root / "study.csv"
    with open(study_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["line", spec.panel_name or "panel", "value", "epoch", *columns])
        for run, rows in curves.items():
            for r in rows:
                writer.writerow(
                    [
                        run.line,
                        run.panel,
                        run.value,
                        int(r["epoch"]),
                        *(r.get(c, "") for c in columns),
                    ]
                )
    summary_csv = spec.root / "summary.csv"
    with open(summary_csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    png = spec.root / "study.png"
    plot_study(spec, curves).savefig(png, dpi=110)
    _print_summary(spec, summary)
    return [study_csv, summary_csv, png]


def plot_study(spec: Study, curves: dict[Run, list[dict[str, float]]]):
    """One column per panel, one row per metric, one line per line of the study."""
    from matplotlib import colormaps

    from skipnets.history import _figure

    columns, rows = len(spec.panel_values), len(spec.metrics)
    fig = _figure(rows, columns, (3.6, 2.9))
    axes = [fig.axes[r * columns : (r + 1) * columns] for r in range(rows)]
    palette = {line["label"]: colormaps["tab10"](i % 10) for i, line in enumerate(spec.lines)}
    for col, panel in enumerate(spec.panel_values):
        runs = [run for run in curves if run.panel == panel]
        histories = {
            run.line if run.value == panel else f"{run.line} ({run.value})": curves[run]
            for run in runs
        }
        lines = {label: run.line for label, run in zip(histories, runs)}
        for row, metric in enumerate(spec.metrics):
            ax = axes[row][col]
            draw_metric(
                ax, histories, metric, colours=lambda label, lines=lines: palette[lines[label]]
            )
            if row == 0:
                ax.set_title(spec.name if panel is None else f"{spec.panel_name} {panel}")
                ax.legend(fontsize="x-small")
            if row == rows - 1:
                ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel(metric_label(metric))
    for row in axes:  # one scale per metric, so that panels compare at a glance
        low = min(ax.get_ylim()[0] for ax in row)
        high = max(ax.get_ylim()[1] for ax in row)
        for ax in row:
            ax.set_ylim(low, high)
    return fig


def _print_summary(spec: Study, summary: list[dict[str, Any]]) -> None:
    def number(value: Any, digits: int = 3) -> str:
        return (
            "-"
            if value is None
            else f"{value:.{digits}f}"
            if isinstance(value, float)
            else str(value)
        )

    head = ["line", spec.panel_name or "", "status", "train loss", "test acc", "seconds"]
    table = [
        [
            r["line"],
            "" if r["value"] is None else str(r["value"]),
            r["status"],
            number(r["final_train_loss"]),
            number(r["test_acc"]),
            number(r["train_seconds"], 0),
        ]
        for r in summary
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    for cells in [head, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
