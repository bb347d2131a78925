"""The GPU framework-tax benchmark (``python -m benchmarks --only gpu``), run on the CPU, and
the property it depends on: a ``skipnets fit`` training step reads nothing from the device on
the host (on a GPU, a wait for the GPU) unless it writes a log or redraws the progress bar."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import bench_gpu
from skipnets.lightning_cli import SkipnetsCLI
from skipnets.progress import TimedProgressBar

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "--device=cpu",
    "--epochs=2",
    "--train-size=160",
    "--test-size=32",
    "--batch-size=32",
    "--width-divisor=16",
    "--precision=32",
    "--logger=none",
]


def test_without_cuda_the_gpu_benchmark_says_it_is_skipped_and_succeeds():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "gpu"],
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no CUDA, even on a machine with a GPU
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu: skipped: no CUDA device"), done.stdout


def test_cpu_smoke_run_reports_every_figure_and_target(tmp_path, capsys):
    options = bench_gpu.parse([*TINY, f"--json={tmp_path / 'report.json'}"])
    assert bench_gpu.cli([*TINY, f"--json={tmp_path / 'report.json'}"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    printed = capsys.readouterr().out

    recipe = bench_gpu.Recipe.from_config(bench_gpu.SPEEDRUN_CONFIG)
    assert report["config"] == "configs/papers/cifar10_speedrun.yaml"
    assert report["epochs"] == options.epochs == 2
    assert report["ema"]["every_n_steps"] == recipe.ema["every_n_steps"]
    steps = (160 - 16) // 32  # 16 images held out, as 5,000 of 50,000; the last batch dropped
    for side in ("skipnets", "hand_written"):
        figures = report[side]
        assert figures["steps_per_epoch"] == steps
        assert figures["first_epoch_s"] > 0 and figures["steady_epoch_s"] > 0
        assert figures["fit_s"] >= sum(figures["runs"][0]["epochs"])
        assert len(figures["runs"][0]["epochs"]) == 2
    for side in ("skipnets_process", "hand_written_process"):
        process = report[side]
        assert process["whole_process_s"] > sum(process["epochs"]) > 0
        assert process["steps_per_epoch"] == steps
        # The first epoch, step by step on the host clock: rising, and within the epoch.
        first = process["first_epoch_steps"]
        assert len(first) == steps and first == sorted(first)
        assert first[0] > 0 and first[-1] <= process["first_epoch_s"]
    for part in ("first step", "steps 2-5", "remaining steps", "after the last step"):
        assert f"fresh first epoch: {part}" in printed
    # An untimed process ran before the timed ones (the machine's caches), and is reported.
    warm = report["warm_up_process"]
    assert warm["whole_process_s"] > warm["first_epoch_s"] >= warm["first_step_s"] > 0
    assert "untimed warm-up process (hand-written loop): first step" in printed
    names = [target["name"].split(",")[0] for target in report["targets"]]
    assert names[:3] == ["steady epoch", "first epoch", "whole process"]
    for target in report["targets"]:
        assert isinstance(target["pass"], bool) and target["value"] is not None
        verdict = "PASS" if target["pass"] else "FAIL"
        assert f"{verdict}  {target['name']}" in printed
    # The config's CUDA graphs are off on a CPU, on both sides.
    assert report["skipnets"]["graphs"] is None and report["hand_written"]["graphs"] is None
    assert "CUDA graphs" not in printed
    if bench_gpu.AIRBENCH_CONFIG.is_file():
        assert report["airbench"]["skipnets"]["steady_epoch_s"] > 0, report["airbench"]
    # The rows of `python -m benchmarks`' table.
    rows = bench_gpu.rows(report)
    assert [row.unit for row in rows] == ["epochs/s", "s", "s"]
    assert rows[0].ratio == pytest.approx(
        report["hand_written"]["steady_epoch_s"] / report["skipnets"]["steady_epoch_s"]
    )


def test_profile_writes_a_trace_and_a_table_of_steady_steps(tmp_path):
    options = bench_gpu.parse(TINY)
    recipe = bench_gpu._recipe(options, options.config)
    root = bench_gpu.write_cifar10(tmp_path / "data", 160, 32)
    profile = tmp_path / "profile"
    cpu = torch.device("cpu")
    bench_gpu.skipnets_fit(recipe, root, cpu, logger=False, profile=profile, epochs=2)
    bench_gpu.hand_written(recipe, root, cpu, profile=profile, epochs=2)
    for name in ("skipnets_fit", "hand_written"):
        trace = json.loads((profile / f"{name}.trace.json").read_text())
        assert any(event.get("name") == "aten::convolution" for event in trace["traceEvents"])
        assert "aten::convolution" in (profile / f"{name}.txt").read_text()


def test_first_steps_of_fresh_processes_are_profiled_with_their_call_stacks(tmp_path):
    """``--profile-first-steps``: both fresh processes once more, their first two steps
    profiled with Python's call stacks; the report's figures stay the unprofiled runs'."""
    options = bench_gpu.parse([*TINY, "--profile-first-steps", str(tmp_path / "first")])
    recipe = bench_gpu._recipe(options, options.config)
    root = bench_gpu.write_cifar10(tmp_path / "data", 160, 32)
    work, first = tmp_path / "work", Path(options.profile_first_steps)
    work.mkdir()
    cpu = torch.device("cpu")
    bench_gpu.skipnets_process(recipe, root, cpu, False, work, profile_first=first)
    bench_gpu.hand_written_process(options, root, work, profile_first=first)
    for name in ("skipnets_fit_first_steps", "hand_written_first_steps"):
        table = (first / f"{name}.txt").read_text()
        assert "2 first training steps" in table and "host time by call stack" in table
        trace = json.loads((first / f"{name}.trace.json").read_text())
        steps = [e for e in trace["traceEvents"] if str(e.get("name")).startswith("ProfilerStep")]
        assert len(steps) == 2
        assert any(e.get("cat") == "python_function" for e in trace["traceEvents"])


def test_random_files_are_read_as_cifar10(tmp_path):
    root = bench_gpu.write_cifar10(tmp_path, train_size=23, test_size=7)
    images, labels = bench_gpu.read_cifar10(root, train=True)
    assert images.shape == (23, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (23,) and labels.min() >= 0 and labels.max() < 10
    assert bench_gpu.read_cifar10(root, train=False)[0].shape == (7, 3, 32, 32)


# --- host reads in training steps ---------------------------------------------------------------

# What makes the host wait for the device: a scalar read (.item(), float(), bool(), int()) and
# the operations whose output size depends on the data.
HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "allclose"}
HOST_READS |= {"unique", "_unique", "_unique2", "unique_consecutive", "unique_dim"}


class _HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.step: tuple[int, int] | None = None
        self.reads: collections.Counter[tuple[int, int]] = collections.Counter()

    def count(self, what: str) -> None:
        if self.step is not None:
            self.reads[self.step] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_READS:
            self.count(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


class _CountHostReads(L.Callback):
    """Counts host reads from one training step's start to the next one's (so Lightning's work
    after a step, and fetching the next batch, count for the step), and records which steps
    are expected to read: those whose loss is logged (written by the loggers, or the last of the
    epoch) and those where the progress bar redrew."""

    def __init__(self) -> None:
        self.mode = _HostReads()
        self.logging_steps: set[tuple[int, int]] = set()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.mode.__enter__()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = (trainer.current_epoch, batch_idx)
        self.mode.step = step
        every = trainer.log_every_n_steps
        if (trainer.global_step + 1) % every == 0 or batch_idx + 1 == trainer.num_training_batches:
            self.logging_steps.add(step)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.mode.step = None
        self.mode.__exit__(None, None, None)


class _RecordedBar(TimedProgressBar):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.redraws: list[tuple[int, int]] = []
        self.epoch = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch = trainer.current_epoch
        super().on_train_epoch_start(trainer, pl_module)

    def _due(self, batch_idx, total) -> bool:
        due = super()._due(batch_idx, total)
        if due:
            self.redraws.append((self.epoch, batch_idx))
        return due


@pytest.fixture
def python_host_reads(monkeypatch):
    """Also count the device-to-host copies that a CPU run cannot see as operators."""
    modes: list[_HostReads] = []
    for name in ("tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, __original=original, __name=name, **kwargs):
            for mode in modes:
                mode.count(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return modes


def _fit_counting_host_reads(
    tmp_path: Path, modes: list, *args: str, bar: Any = None
) -> tuple[_CountHostReads, SkipnetsCLI]:
    """A 2-epoch fit of ``args`` that counts every step's host reads; ``bar`` replaces the
    default progress bar."""
    probe = _CountHostReads()
    modes.append(probe.mode)
    cli = SkipnetsCLI(
        args=[
            *args,  # the config first: the options below override it
            "--trainer.accelerator=cpu",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.log_every_n_steps=4",
            "--trainer.max_epochs=2",
        ],
        run=False,
    )
    if bar is not None:
        callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, TimedProgressBar)]
        cli.trainer.callbacks = [*callbacks, bar]
    cli.trainer.callbacks.append(probe)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return probe, cli


def test_speedrun_training_steps_read_nothing_on_the_host(
    tmp_path, python_host_reads, graphs_on_the_cpu
):
    """The speed-run recipe as configured (its EMA, checkpoints, metrics and loss logging, its
    CUDA graphs through the CPU stand-in; no progress bar): a step that writes no log makes no
    host read."""
    root = bench_gpu.write_cifar10(tmp_path / "data", train_size=224, test_size=16)
    probe, _ = _fit_counting_host_reads(
        tmp_path,
        python_host_reads,
        f"--config={bench_gpu.SPEEDRUN_CONFIG}",
        f"--data.init_args.root={root}",
        "--data.init_args.val_size=32",
        "--data.init_args.batch_size=16",
        "--data.init_args.eval_batch_size=32",
        '--model.arch_kwargs={"widths": [4, 8, 8, 8]}',
        "--trainer.check_val_every_n_epoch=2",
    )
    assert graphs_on_the_cpu.records == [(16, 3, 32, 32)]  # the steps ran from the "graphs"
    quiet = {(epoch, batch) for epoch in range(2) for batch in range(12)} - probe.logging_steps
    assert len(quiet) >= 16  # most steps log nothing
    assert {step: probe.mode.reads[step] for step in quiet if probe.mode.reads[step]} == {}
    # The counter does see reads: the loss written to the logger is read on the host.
    assert any(probe.mode.reads[step] for step in probe.logging_steps)


def test_default_run_reads_the_loss_only_to_log_it_or_redraw_the_bar(tmp_path, python_host_reads):
    """A default ``skipnets fit`` (its progress bar, training accuracy, checkpoints) with the
    per-step non-finite check off: Lightning would read a loss logged for the progress bar after
    every step; the bar reads it only when it redraws."""
    bar = _RecordedBar(refresh_interval=3600.0)  # redraws at the first and each last batch
    probe, cli = _fit_counting_host_reads(
        tmp_path,
        python_host_reads,
        "--model.arch=plain_mlp",
        '--model.arch_kwargs={"depth": 3, "width": 16}',
        "--data=Digits",
        "--data.image_size=null",
        "--data.batch_size=128",
        "--stop_on_nonfinite_loss=false",
        bar=bar,
    )
    batches = cli.trainer.num_training_batches
    expected = probe.logging_steps | set(bar.redraws)
    quiet = {(epoch, batch) for epoch in range(2) for batch in range(batches)} - expected
    assert len(quiet) >= batches  # most steps neither log nor redraw
    assert {step: probe.mode.reads[step] for step in quiet if probe.mode.reads[step]} == {}
    # The bar still shows the training loss.
    shown = bar.get_metrics(cli.trainer, cli.model)
    assert shown["train/loss"] == pytest.approx(float(cli.trainer.callback_metrics["train/loss"]))


# airbench 0.1.8's table (its print_training_details), after its warm-up's header.
AIRBENCH_OUTPUT = """\
-----------------------------------------------------------------------------------------------
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
-----------------------------------------------------------------------------------------------
|       0  |      0  |      1.5000  |     0.4000  |   0.5000  |               |              0.3000  |
|          |      1  |      1.5000  |     0.4000  |   0.5000  |               |              0.6000  |
|          |      2  |      1.5000  |     0.4000  |   0.5000  |               |              0.9000  |
|          |   eval  |              |             |           |       0.9400  |              1.0000  |
-----------------------------------------------------------------------------------------------
"""


def test_airbench_timings_are_read_from_its_table():
    totals = bench_gpu._airbench_totals(AIRBENCH_OUTPUT)
    assert totals == {"epochs": [0.3, 0.6, 0.9], "total": 1.0, "tta_val_acc": 0.94}
    with pytest.raises(RuntimeError, match="no timed epochs"):
        bench_gpu._airbench_totals("airbench crashed")


FAKE_AIRBENCH = """
import torch

def warmup94():
    pass

def train94():
    # What airbench's CifarLoader reads: cifar10/{train,test}.pt under the working directory.
    for name in ("train", "test"):
        data = torch.load(f"cifar10/{name}.pt")
        assert data["images"].dtype == torch.uint8 and data["images"].shape[1:] == (32, 32, 3)
        assert len(data["labels"]) == len(data["images"]) and len(data["classes"]) == 10
    print(OUTPUT)
"""


def test_airbench_runs_in_its_own_process_on_the_same_files(tmp_path, monkeypatch):
    package = tmp_path / "site" / "airbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"OUTPUT = {AIRBENCH_OUTPUT!r}\n" + FAKE_AIRBENCH)
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    root = bench_gpu.write_cifar10(tmp_path / "data", train_size=30, test_size=10)
    work = tmp_path / "work"
    work.mkdir()
    result = bench_gpu.airbench_run(root, work)
    assert result["epochs"] == pytest.approx([0.3, 0.3, 0.3])
    assert result["steady_epoch_s"] == pytest.approx(0.3)
    assert result["total_s"] == 1.0 and result["train_images"] == 30
    assert result["whole_process_s"] > 0


# The fit trains without validation data, which Lightning notes.
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_the_report_says_which_steps_ran_from_cuda_graphs(graphs_on_the_cpu):
    """On a GPU both sides record the config's graphs, and the report says how many steps used
    them: here the skipnets side's timer, on a fit through the CPU stand-in."""
    from conftest import quiet_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from skipnets import Classifier

    images = TensorDataset(torch.randn(40, 3, 32, 32), torch.randint(0, 10, (40,)))
    model = Classifier(
        "speedrun_resnet9", {"widths": [4, 8, 8, 8]}, num_classes=10, cuda_graphs=True
    )
    timer = bench_gpu.EpochTimer()
    trainer = quiet_trainer(max_epochs=1, callbacks=[timer], limit_val_batches=0)
    trainer.fit(model, train_dataloaders=DataLoader(images, batch_size=16))
    graphs = "2 training steps ran from CUDA graphs, 1 without (1: a batch of shape"
    assert timer.timing().graphs.startswith(graphs)
    report = {"skipnets": {"graphs": timer.timing().graphs}, "hand_written": {"graphs": None}}
    assert _graph_lines(report) == [
        f"CUDA graphs, skipnets fit (one process): {timer.timing().graphs}"
    ]


def _graph_lines(report: dict) -> list[str]:
    full = {
        "config": "c",
        "device": "cpu",
        "torch": "t",
        "epochs": 1,
        "batch_size": 16,
        "logger": "none",
        "data": "d",
        "targets": [],
    }
    figures = {"steps_per_epoch": 9, "steady_epoch_s": None, "epoch_end_s": None}
    figures |= {"first_epoch_s": None, "fit_s": None}
    for side in ("skipnets", "hand_written"):
        full[side] = {**figures, **report[side]}
    return [line for line in bench_gpu.report_lines(full) if "CUDA graphs" in line]
