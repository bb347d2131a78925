"""The quickstart benchmark (``python -m benchmarks --only quickstart``): its hand-written side
does the same job on the same data, and its machinery runs both sides as whole processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from run_probes import wandb_history, wandb_records

from benchmarks import bench_quickstart
from benchmarks.bench_quickstart import SIDES, Process
from benchmarks.quickstart_reference import digits_tensors, epoch_order, recipe
from skipnets.data import Digits
from skipnets.data.base import SeededShuffle


def test_the_script_trains_on_the_quickstart_data_in_its_order():
    setup = recipe()
    assert setup["arch"] == "resnet20" and setup["epochs"] >= 1
    data = setup["data"]
    ours = Digits(
        **{k: data[k] for k in ("image_size", "val_fraction", "test_fraction", "shift", "seed")}
    )
    ours.setup("fit")
    tensors = digits_tensors(
        data["image_size"], data["val_fraction"], data["test_fraction"], data["shift"], data["seed"]
    )
    for (x, y), split in zip(tensors, (ours.train_set, ours.val_set, ours.test_set)):
        assert torch.equal(x, split.tensors[0]) and torch.equal(y, split.tensors[1])
    shuffle = SeededShuffle(ours.train_set, data["seed"])
    shuffle.set_epoch(3)
    assert torch.equal(
        torch.tensor(list(shuffle)), epoch_order(len(tensors[0][1]), data["seed"], 3)
    )


def _pair(skipnets: float, script: float) -> dict[str, Process]:
    return {
        side: Process(side, seconds, seconds / 2, 0, 0.99, "")
        for side, seconds in zip(SIDES, (skipnets, script))
    }


def test_the_figure_is_the_median_of_the_pairs_ratios():
    summary = bench_quickstart.summarise([_pair(11, 10), _pair(30, 20), _pair(10.5, 10)])
    assert summary["ratios"] == [1.1, 1.5, 1.05]
    assert summary["ratio"] == 1.1 and summary["pass"]  # the median pair, not the mean
    assert summary["seconds"] == {SIDES[0]: 11, SIDES[1]: 10}
    row = bench_quickstart.row(summary, epochs=1).as_dict()
    assert row["ratio"] == 10 / 11  # the table's ratio: higher is better
    assert "1.100x the script's time, PASS" in row["note"]
    failing = bench_quickstart.summarise([_pair(12, 10)])
    assert not failing["pass"]
    assert bench_quickstart.report_lines(failing, 1)[-1].startswith("FAIL  skipnets fit")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_command_loads_light_and_ends_its_process_once_done():
    # Nothing heavy before the command knows what it runs (W&B can then load first).
    heavy = "import sys, skipnets.cli; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    assert _python(heavy).stdout == "[]\n"
    # Exit handlers run and output is flushed before the process ends, with the command's status.
    ends = "import atexit, sys; from skipnets.cli import _exit_now\n"
    ends += "atexit.register(print, 'handler'); print('done', end=' '); _exit_now(3)"
    done = _python(ends)
    assert (done.returncode, done.stdout) == (3, "done handler\n")
    # A thread still at work is waited for: the process ends the usual way.
    waits = "import threading, time, sys; from skipnets.cli import _exit_now\n"
    waits += "threading.Thread(target=lambda: (time.sleep(0.3), print('thread'))).start()\n"
    waits += "sys.exit(_exit_now(4) + 1)"
    done = _python(waits)
    assert (done.returncode, done.stdout) == (5, "thread\n")


def test_smallest_run_times_both_whole_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two tiny steps: no use for more threads
    runs = bench_quickstart.measure(1, epochs=1, limit_train_batches=2, log=False, keep=tmp_path)
    summary = bench_quickstart.summarise(runs)
    for side in SIDES:
        done = runs[0][side]
        assert done.returncode == 0 and done.seconds > 0
        assert 0 <= done.test_acc <= 1, done.output[-2000:]
    skipnets = runs[0][SIDES[0]]
    assert skipnets.output.rstrip().splitlines()[-1].lstrip().startswith("upload it with: wandb")
    # The command ends its process as soon as it is done: W&B's offline record is complete,
    # up to the test of the best checkpoint.
    (record,) = (tmp_path / "0" / "skipnets" / "wandb").glob("offline-run-*/run-*.wandb")
    kinds = [r.WhichOneof("record_type") for r in wandb_records(record, timeout=0)]
    assert "exit" in kinds  # written when W&B finished the run, before the process ended
    history = wandb_history(record)
    assert any(row.get("test/acc") == pytest.approx(skipnets.test_acc, abs=5e-5) for row in history)
    assert (tmp_path / "0" / "script" / "best.pt").is_file()
    assert summary["ratio"] == skipnets.seconds / runs[0][SIDES[1]].seconds
    verdict = "PASS" if summary["ratio"] <= bench_quickstart.TARGET else "FAIL"
    assert bench_quickstart.report_lines(summary, 1)[-1].startswith(verdict)
