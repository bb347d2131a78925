"""The quickstart as a user runs it: ``skipnets fit --config configs/quickstart.yaml`` against the
same job written by hand, each a whole process timed from launch to exit.

    python -m benchmarks --only quickstart             # 5 pairs of the config's 4 epochs
    python -m benchmarks --only quickstart --quick     # 3 pairs of 1 epoch
    python -m benchmarks.bench_quickstart --pairs 7    # its own report, every run listed

The hand-written side is ``benchmarks/quickstart_reference.py``: plain PyTorch, the same
ResNet-20 from the registry, the same digits and shifted copies, the same batch order, SGD and
schedule, validation every epoch, the best weights saved and the test split evaluated with them.
The skipnets side is the real command with its defaults: W&B tracking (offline, as without
credentials: every file W&B would upload is written), the best and last checkpoints, the progress
bar, the model summary, validation with Lightning's sanity check, the test of the best checkpoint
and the summary of where the run is. Everything is counted: imports, W&B's service, data, every
epoch, checkpoints, the test, W&B's finish and the interpreter's exit.

The two alternate (A B, B A, ...) in fresh temporary folders, so a slow spell of a shared machine
falls on both; the figure is the median over pairs of each pair's ratio, skipnets' time over the
script's (lower is better), with PASS at or under :data:`TARGET`. Each process's CPU time (itself
and the children it waited for: W&B's service) is reported too: it moves less than wall time when
other work shares the machine. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import Row

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"
#: skipnets' whole process over the hand-written script's, at most.
TARGET = 1.10
SIDES = ("skipnets fit", "hand-written script")
_TEST_ACC = re.compile(r"test/acc(?!_)\W+([0-9]*\.[0-9]+)")


@dataclass
class Process:
    """One run: wall seconds from launch to exit, CPU seconds, exit status, test accuracy."""

    side: str
    seconds: float
    cpu_seconds: float | None
    returncode: int
    test_acc: float | None
    output: str


def commands(root: Path, epochs: int | None, limit_train_batches: int | None) -> dict[str, list]:
    """The two command lines, writing under ``root``; ``epochs`` and ``limit_train_batches``
    shorten both the same way (``None``: the config's epochs, every batch)."""
    skipnets = [sys.executable, "-m", "skipnets", "fit", "--config", CONFIG]
    skipnets.append(f"--trainer.default_root_dir={root / 'skipnets'}")
    script = [sys.executable, "-m", "benchmarks.quickstart_reference", "--config", CONFIG]
    script += ["--root", str(root / "script")]
    if epochs is not None:
        skipnets.append(f"--trainer.max_epochs={epochs}")
        script += ["--epochs", str(epochs)]
    if limit_train_batches is not None:
        skipnets.append(f"--trainer.limit_train_batches={limit_train_batches}")
        script += ["--limit-train-batches", str(limit_train_batches)]
    return {SIDES[0]: skipnets, SIDES[1]: script}


def run_process(side: str, command: list[str], env: dict[str, str]) -> Process:
    """Launch ``command`` in the repository and wait for it to exit."""
    with tempfile.TemporaryFile("w+") as output:
        start = time.perf_counter()
        child = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT
        )
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(child.pid, 0)
            seconds = time.perf_counter() - start
            child.returncode = os.waitstatus_to_exitcode(status)
            cpu: float | None = usage.ru_utime + usage.ru_stime
        else:  # no resource figures of a child here (Windows)
            child.wait()
            seconds, cpu = time.perf_counter() - start, None
        output.seek(0)
        text = output.read()
    found = _TEST_ACC.findall(text)
    accuracy = float(found[-1]) if found else None
    return Process(side, seconds, cpu, child.returncode, accuracy, text)


def measure(
    pairs: int,
    epochs: int | None = None,
    limit_train_batches: int | None = None,
    log: bool = True,
    keep: Path | None = None,
) -> list[dict[str, Process]]:
    """``pairs`` runs of each side, alternating which goes first, each in a fresh folder: a
    temporary one, or ``keep/<pair>/`` when ``keep`` is given (the runs' files stay there)."""
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    env.setdefault("WANDB_SILENT", "true")
    runs = []
    for index in range(pairs):
        pair: dict[str, Process] = {}
        for side in SIDES if index % 2 == 0 else SIDES[::-1]:
            with tempfile.TemporaryDirectory(prefix="bench_quickstart_") as temporary:
                root = Path(temporary) if keep is None else Path(keep) / str(index)
                command = commands(root, epochs, limit_train_batches)[side]
                done = run_process(side, command, env)
            if done.returncode != 0:
                raise RuntimeError(
                    f"{side} failed with status {done.returncode}: {' '.join(command)}\n"
                    + done.output[-3000:]
                )
            pair[side] = done
            if log:
                print(
                    f"  pair {index + 1}/{pairs} {side}: {done.seconds:.2f} s "
                    f"(CPU {done.cpu_seconds or 0:.2f} s), test/acc {done.test_acc}",
                    file=sys.stderr,
                    flush=True,
                )
        runs.append(pair)
    return runs


def summarise(runs: list[dict[str, Process]]) -> dict[str, Any]:
    """Median seconds of each side, the median of the pairs' ratios (skipnets over script), the
    same for CPU time, and the verdict against :data:`TARGET`."""
    ours, theirs = SIDES
    ratios = [pair[ours].seconds / pair[theirs].seconds for pair in runs]
    cpu = [
        pair[ours].cpu_seconds / pair[theirs].cpu_seconds
        for pair in runs
        if pair[ours].cpu_seconds and pair[theirs].cpu_seconds
    ]
    ratio = statistics.median(ratios)
    return {
        "pairs": len(runs),
        "seconds": {side: statistics.median(p[side].seconds for p in runs) for side in SIDES},
        "ratios": ratios,
        "ratio": ratio,
        "cpu_ratio": statistics.median(cpu) if cpu else None,
        "test_acc": {side: [p[side].test_acc for p in runs] for side in SIDES},
        "pass": ratio <= TARGET,
    }


def report_lines(summary: dict[str, Any], epochs: int | None) -> list[str]:
    ours, theirs = SIDES
    seconds, accuracy = summary["seconds"], summary["test_acc"]
    length = f"{_epochs(epochs)} epochs"
    lines = [
        f"quickstart ({CONFIG}, {length}), whole processes, median of {summary['pairs']} pairs:",
        f"  {ours}: {seconds[ours]:.2f} s, test/acc {_accuracies(accuracy[ours])}",
        f"  {theirs}: {seconds[theirs]:.2f} s, test/acc {_accuracies(accuracy[theirs])}",
        "  pairs' ratios: " + ", ".join(f"{r:.3f}" for r in summary["ratios"]),
    ]
    if summary["cpu_ratio"] is not None:
        lines.append(f"  CPU time ratio (median): {summary['cpu_ratio']:.3f}x")
    verdict = "PASS" if summary["pass"] else "FAIL"
    lines.append(f"{verdict}  {ours} / {theirs}: {summary['ratio']:.3f}x (target <= {TARGET:.2f}x)")
    return lines


def _epochs(epochs: int | None) -> int:
    from benchmarks.quickstart_reference import recipe

    return epochs if epochs is not None else recipe(REPO / CONFIG)["epochs"]


def _accuracies(values: list[float | None]) -> str:
    return ", ".join("-" if v is None else f"{v:.4f}" for v in values)


def row(summary: dict[str, Any], epochs: int | None) -> Row:
    """The result as a row of ``python -m benchmarks``' table (its ratio: script over skipnets,
    higher is better, as every row's)."""
    ours, theirs = SIDES
    verdict = "PASS" if summary["pass"] else "FAIL"
    accuracy = summary["test_acc"]
    cpu = summary["cpu_ratio"]
    note = f"{summary['ratio']:.3f}x the script's time, {verdict}"
    note += f"; CPU {cpu:.3f}x" if cpu is not None else ""
    note += f"; test/acc {_accuracies(accuracy[ours][:1])} vs {_accuracies(accuracy[theirs][:1])}"
    length = f"{_epochs(epochs)} epochs"
    return Row(
        f"skipnets fit quickstart, whole process ({length}, median of {summary['pairs']} pairs)",
        "s",
        summary["seconds"][ours],
        theirs,
        summary["seconds"][theirs],
        target=f">= {1 / TARGET:.3f} (<= {TARGET:.2f}x)",
        note=note,
        lower_is_better=True,
    )


def main(quick: bool = False) -> list[Row]:
    pairs, epochs = (3, 1) if quick else (5, None)
    summary = summarise(measure(pairs, epochs))
    for line in report_lines(summary, epochs):
        print(line, file=sys.stderr)
    return [row(summary, epochs)]


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_quickstart", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--pairs", type=int, default=5, help="runs of each side (default 5)")
    parser.add_argument("--epochs", type=int, help="instead of the config's max_epochs")
    parser.add_argument("--limit-train-batches", type=int, help="a smoke run: so many per epoch")
    parser.add_argument("--quick", action="store_true", help="3 pairs of 1 epoch")
    args = parser.parse_args(argv)
    pairs, epochs = (3, 1) if args.quick else (args.pairs, args.epochs)
    if pairs < 1:
        parser.error("--pairs must be at least 1")
    summary = summarise(measure(pairs, epochs, args.limit_train_batches))
    print("\n".join(report_lines(summary, epochs)))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
