"""What the per-step savings of ``skipnets fit`` keep intact: the logged training loss, the
progress bar, batches already on the device, and the allocator setting."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from skipnets.data import Digits
from skipnets.errors import ConfigError
from skipnets.lightning_cli import SkipnetsCLI
from skipnets.module import Classifier
from skipnets.progress import TimedProgressBar


class _StepLosses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning hands on the loss divided by the accumulation count.
        self.losses.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


def _classifier(data: Digits) -> Classifier:
    return Classifier(
        "plain_mlp",
        arch_kwargs={"depth": 3, "width": 32},
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
    )


def _fit_with_csv(tmp_path, **trainer_kwargs) -> tuple[L.Trainer, list[float], list[dict]]:
    """A small run with a CSV logger: the trainer, every batch's loss, the CSV rows."""
    torch.manual_seed(0)
    data = Digits(image_size=None, batch_size=32)
    steps = _StepLosses()
    trainer = quiet_trainer(
        limit_val_batches=0,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[steps],
        **trainer_kwargs,
    )
    trainer.fit(_classifier(data), datamodule=data)
    with open(next(tmp_path.rglob("metrics.csv"))) as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    return trainer, steps.losses, rows


def test_train_loss_is_the_mean_over_the_batches_since_it_was_last_logged(tmp_path):
    trainer, losses, rows = _fit_with_csv(
        tmp_path,
        max_steps=8,
        limit_train_batches=5,  # epochs end after steps 4 and (never reached) 9
        log_every_n_steps=3,
    )
    assert len(losses) == 8
    logged = {int(r["step"]): float(r["train/loss"]) for r in rows}
    # Written every 3 steps: steps 0-2, then 5 alone (the epoch ended after step 4, whose
    # last batch took the mean of steps 3-4 for the progress bar and callbacks).
    assert logged.keys() == {2, 5}
    assert logged[2] == pytest.approx(sum(losses[0:3]) / 3, rel=1e-5)
    assert logged[5] == pytest.approx(losses[5], rel=1e-5)
    # The run's last step logs the mean of the steps after the last write.
    final = float(trainer.callback_metrics["train/loss"])
    assert final == pytest.approx((losses[6] + losses[7]) / 2, rel=1e-5)


def test_train_loss_under_gradient_accumulation_covers_every_micro_batch(tmp_path):
    _, losses, rows = _fit_with_csv(
        tmp_path,
        max_steps=4,  # optimizer steps: 8 batches
        accumulate_grad_batches=2,
        log_every_n_steps=2,
    )
    assert len(losses) == 8
    logged = [float(r["train/loss"]) for r in rows]
    expected = [sum(losses[0:4]) / 4, sum(losses[4:8]) / 4]
    assert logged == pytest.approx(expected, rel=1e-5)


def _counts_shown(capsys, refresh_interval: float) -> set[int]:
    """The batch counts the training bar showed over one epoch of 12 batches."""
    torch.manual_seed(0)
    data = Digits(image_size=None, batch_size=32)
    trainer = quiet_trainer(
        max_epochs=1,
        limit_train_batches=12,
        limit_val_batches=0,
        enable_progress_bar=True,
        callbacks=[TimedProgressBar(refresh_interval=refresh_interval)],
    )
    capsys.readouterr()
    trainer.fit(_classifier(data), datamodule=data)
    captured = capsys.readouterr()
    return {int(n) for n in re.findall(r"Epoch 0: .*?\| (\d+)/12 ", captured.out + captured.err)}


def test_progress_bar_redraws_on_time_and_at_the_last_batch(capsys):
    assert _counts_shown(capsys, refresh_interval=0.0) == set(range(13))
    # Before the first batch, the first batch (nothing drawn yet), and the last batch.
    assert _counts_shown(capsys, refresh_interval=3600.0) == {0, 1, 12}
    with pytest.raises(ConfigError, match="refresh_interval"):
        TimedProgressBar(refresh_interval=-1)


def test_a_log_file_gets_one_line_per_redraw(capsys):
    # capsys is not a terminal, as a job's log file is not.
    shown = _counts_shown(capsys, refresh_interval=0.0)
    assert shown == set(range(13))
    data = Digits(image_size=None, batch_size=128)
    trainer = quiet_trainer(
        max_epochs=1, limit_val_batches=0, enable_progress_bar=True,
        callbacks=[TimedProgressBar(refresh_interval=0.0)],
    )  # fmt: skip
    capsys.readouterr()
    trainer.fit(_classifier(data), datamodule=data)
    out = capsys.readouterr().out
    assert "\r" not in out and "\x1b[" not in out
    lines = [line for line in out.splitlines() if line.startswith("Epoch 0:")]
    # Each batch's count once (Lightning's own bar draws the count, then again the metrics);
    # the epoch's end redraws the last.
    counts = [int(re.search(r"\| (\d+)/10 ", line)[1]) for line in lines]
    assert counts[:11] == list(range(11)) and set(counts[11:]) <= {10}, lines


@pytest.mark.parametrize("columns", [80, 120, 200])
def test_the_metrics_shown_fit_the_terminal(columns):
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

    from skipnets.progress import MIN_BAR, _fixed_width, fit_width

    metrics = {"v_num": "abcd", "train/acc": 0.85912, "train/acc_top5": 0.967}
    metrics |= {"val/loss": 0.00835, "train/loss": 0.0284, "val/acc_top5": 1.0, "val/acc": 0.9667}
    bar = Tqdm(
        desc="Epoch 12", total=177, file=io.StringIO(), ncols=columns,
        bar_format=TimedProgressBar.BAR_FORMAT,
    )  # fmt: skip
    bar.update(88)
    kept = fit_width(metrics, columns, _fixed_width(bar))
    if columns >= 120:
        assert list(kept)[:2] == ["train/loss", "val/acc"]  # the most useful first
    bar.set_postfix(kept, refresh=False)
    line = str(bar)
    bar.close()
    assert len(line) <= columns
    assert line.count("█") + line.count(" ") >= MIN_BAR // 2  # a bar, not "|█|"
    assert all(f"{name}=" in line for name in kept)  # no name cut
    if columns >= 200:
        assert set(kept) == set(metrics)


def _cli(tmp_path, *args: str) -> SkipnetsCLI:
    return SkipnetsCLI(
        args=[
            "--model=Classifier",
            "--data=Digits",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            *args,
        ],
        run=False,
    )


def test_cli_runs_get_the_timed_progress_bar_unless_the_config_names_one(tmp_path):
    assert type(_cli(tmp_path).trainer.progress_bar_callback) is TimedProgressBar
    own = _cli(tmp_path, "--trainer.callbacks+=TQDMProgressBar")
    assert type(own.trainer.progress_bar_callback) is TQDMProgressBar
    assert sum(isinstance(c, TQDMProgressBar) for c in own.trainer.callbacks) == 1
    off = _cli(tmp_path, "--trainer.enable_progress_bar=false")
    assert off.trainer.progress_bar_callback is None


def test_cli_runs_profile_nothing_at_no_cost_unless_a_profiler_is_chosen(tmp_path):
    from lightning.pytorch.profilers import SimpleProfiler

    from skipnets.lightning_cli import NoProfiler

    trainer = _cli(tmp_path).trainer
    assert type(trainer.profiler) is NoProfiler
    with trainer.profiler.profile("[Callback]x.on_train_batch_end") as entered:
        assert entered is None
    assert trainer.profiler.profile("a") is trainer.profiler.profile("b")  # nothing built per call
    chosen = _cli(tmp_path, "--trainer.profiler=simple").trainer
    assert type(chosen.profiler) is SimpleProfiler


def test_a_training_step_sets_no_classifier_attribute_through_nn_modules_checks(monkeypatch):
    """Lightning sets the module's ``_current_fx_name`` around each of its hook calls, about
    fifty times a step, and the Classifier keeps its loss sum the same way: plain values, which
    ``nn.Module.__setattr__`` would check against parameters, buffers and submodules each time."""
    data = Digits(image_size=None, batch_size=32)
    model = _classifier(data)
    slow_sets: list[str] = []
    counting = [False]
    module_setattr = torch.nn.Module.__setattr__

    def recorded(self, name, value):
        if counting[0] and self is model:
            slow_sets.append(name)
        module_setattr(self, name, value)

    class Count(L.Callback):  # over the steps of the second epoch
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counting[0] = trainer.current_epoch == 1

        def on_train_epoch_end(self, trainer, pl_module):
            counting[0] = False

    monkeypatch.setattr(torch.nn.Module, "__setattr__", recorded)
    trainer = quiet_trainer(max_epochs=2, callbacks=[Count()], limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert trainer.num_training_batches > 10
    assert slow_sets == []


def test_batches_already_on_the_device_are_handed_on_as_they_are():
    data = Digits(image_size=None)
    batch = (torch.zeros(2, 64), torch.zeros(2, dtype=torch.long))
    assert data.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    moved = data.transfer_batch_to_device({"x": batch[0]}, torch.device("cpu"), 0)
    assert torch.equal(moved["x"], batch[0])


_ALLOCATOR = "from skipnets.allocator import keep_freed_memory as k; print(k())"


def _allocator_setting(**env: str) -> str:
    import os

    environment = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "SKIPNETS_SYSTEM"))
    }
    result = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR],
        env={**environment, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_allocator_setting_applies_on_glibc_and_yields_to_the_users_choice():
    import os

    glibc = sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    assert _allocator_setting() == str(glibc)
    assert _allocator_setting(SKIPNETS_SYSTEM_MALLOC="1") == "False"
    assert _allocator_setting(MALLOC_TRIM_THRESHOLD_="131072") == "False"
