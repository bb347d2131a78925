"""``python -m benchmarks`` (``make bench``): every benchmark, one table.

    python -m benchmarks                       # all of them (minutes on a small CPU)
    python -m benchmarks --quick               # all of them, fewer steps, one repeat: a check
                                               # that every benchmark runs, not a measurement
    python -m benchmarks --only fit,skip       # some of them
    python -m benchmarks --markdown            # the table as Markdown, for the README
    python -m benchmarks --only gpu            # skipnets fit against a hand-written loop on a GPU
                                               # (more options: python -m benchmarks.bench_gpu -h)
    python -m benchmarks --only quickstart     # `skipnets fit` of the quickstart against the same
                                               # job by hand, whole processes (minutes)

Each benchmark runs in its own process, so its peak resident memory is its own; inside it the
skipnets side and its baseline alternate, and the ratio is skipnets over baseline (higher is
better). Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHMARKS = {
    "fit": "benchmarks.bench_fit",
    "models": "benchmarks.bench_models",
    "skip": "benchmarks.bench_skip",
    "stochastic_depth": "benchmarks.bench_stochastic_depth",
    "norm_ratio": "benchmarks.bench_norm_ratio",
    "data": "benchmarks.bench_data",
    "gpu": "benchmarks.bench_gpu",
    "quickstart": "benchmarks.bench_quickstart",
}


def _machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def _table(rows: list[dict], markdown: bool) -> str:
    header = ["benchmark", "skipnets", "baseline", "baseline value", "ratio", "target", "peak RSS"]
    lines = []
    for row in rows:
        unit = row.get("unit", "")
        lines.append(
            [
                row["benchmark"],
                f"{_format(row.get('value'))} {unit}".strip(),
                row.get("baseline", ""),
                f"{_format(row.get('baseline_value'))} {unit}".strip(),
                _format(row.get("ratio")),
                row.get("target", ""),
                f"{row['peak_rss_mib']:.0f} MiB" if row.get("peak_rss_mib") else "-",
            ]
            + ([row["note"]] if row.get("note") else [])
        )
    if any(len(line) > len(header) for line in lines):
        header.append("note")
    lines = [line + [""] * (len(header) - len(line)) for line in lines]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
        for line in [header, *lines]
    )


def _rows_from(result) -> list[dict]:
    """Rows of a benchmark's ``main()``: ``Row`` objects, or a dict of its own (NormRatio's)."""
    from benchmarks.common import Row

    if isinstance(result, dict):  # bench_norm_ratio: step times with and without the callback
        result = [
            Row(
                f"NormRatio every {result['interval']} steps, {result['model']} "
                f"(batch {result['batch_size']}, {result['device']})",
                "steps/s",
                1e3 / result["norm_ratio_ms"],
                "without it",
                1e3 / result["baseline_ms"],
                ">= 0.95",
            )
        ]
    return [row.as_dict() if isinstance(row, Row) else dict(row) for row in result]


def run_one(name: str, quick: bool, out: str) -> None:
    """Child process: run one benchmark, write its rows with this process's peak memory."""
    import importlib

    from benchmarks.common import peak_rss_mib

    module = importlib.import_module(BENCHMARKS[name])
    rows = _rows_from(module.main(quick=quick))
    peak = peak_rss_mib()
    for row in rows:
        row["peak_rss_mib"] = peak
    Path(out).write_text(json.dumps(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="each benchmark with fewer steps and one repeat instead of several (gpu: 3 epochs, "
        "without the fresh-process runs): a check that every benchmark runs; its figures are "
        "too noisy to hold against the targets",
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per benchmark (0: torch's default); 1 gives steadier figures on a "
        "machine other work shares",
    )
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        run_one(args.run_one, args.quick, args.out)
        return 0
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    os.environ.update(threads)  # for the machine line below
    rows: list[dict] = []
    for name in names:
        module_file = Path(__file__).parent / f"{BENCHMARKS[name].rsplit('.', 1)[1]}.py"
        if not module_file.exists():
            rows.append({"benchmark": name, "note": f"{module_file.name} is not there"})
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, "-m", "benchmarks", "--run-one", name, "--out", out.name]
            done = subprocess.run(
                command + (["--quick"] if args.quick else []),
                capture_output=True,
                text=True,
                env={**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **threads},
            )
            if done.returncode != 0:
                tail = "\n".join(done.stderr.strip().splitlines()[-3:])
                rows.append({"benchmark": name, "note": f"failed: {tail}"})
                print(done.stderr[-4000:], file=sys.stderr)
                continue
            rows += json.loads(Path(out.name).read_text())
    # A benchmark that cannot run here (the GPU one without CUDA) says why, in one line.
    for row in rows:
        if row.get("skipped"):
            print(f"{row['benchmark']}: skipped: {row['skipped']}")
    rows = [row for row in rows if not row.get("skipped")]
    if rows:
        print(f"\nmachine: {_machine()}")
        if args.quick:
            print("--quick: fewer steps and one repeat each; not figures to compare")
        print(_table(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
