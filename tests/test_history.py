"""Every run's training curves on disk: ``history.csv`` (one row per epoch) and ``test.json``,
kept across a resume and not rolled back by the test of an older checkpoint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from skipnets.data import Digits
from skipnets.history import History, read_history
from skipnets.module import Classifier


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.per_epoch: dict[int, list[float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"]) * trainer.accumulate_grad_batches
        self.per_epoch.setdefault(trainer.current_epoch, []).append(loss)


def _fit(root: Path, max_epochs: int, ckpt_path: str | None = None, **kwargs):
    torch.manual_seed(0)
    data = Digits(image_size=None, batch_size=32)
    model = Classifier(
        "plain_mlp",
        arch_kwargs={"depth": 3, "width": 16},
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
    )
    losses = _Losses()
    trainer = quiet_trainer(
        max_epochs=max_epochs,
        limit_train_batches=4,
        default_root_dir=root,
        enable_checkpointing=True,
        callbacks=[
            History(),
            losses,
            ModelCheckpoint(dirpath=root / "checkpoints", save_top_k=-1, save_last=True),
        ],
        **kwargs,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model, data, losses


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_row_per_epoch_with_the_epoch_mean_loss_and_the_logged_metrics(tmp_path, accumulate):
    trainer, *_, losses = _fit(tmp_path, 2, accumulate_grad_batches=accumulate)
    rows = _rows(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert int(rows[-1]["step"]) == trainer.global_step
    for row in rows:
        expected = sum(losses.per_epoch[int(row["epoch"])]) / 4
        assert float(row["train_loss"]) == pytest.approx(expected, rel=1e-5)
        # Validation of that epoch, and the module's epoch-end training metrics.
        assert {"val/acc", "val/loss", "train/acc"} <= set(row)
        assert row["train/acc"] != "" and "train/loss" not in row
    assert float(rows[-1]["val/acc"]) == pytest.approx(float(trainer.callback_metrics["val/acc"]))
    assert 0 < float(rows[0]["seconds"]) <= float(rows[1]["seconds"])


# Lightning's note on the test's set-up: a bare Trainer resumed into its own folder.
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_resumed_run_continues_its_history_and_a_test_does_not_roll_it_back(tmp_path):
    straight = tmp_path / "straight"
    _fit(straight, 3)
    resumed = tmp_path / "resumed"
    _fit(resumed, 1)
    trainer, model, data, _ = _fit(resumed, 3, ckpt_path=str(resumed / "checkpoints/last.ckpt"))
    keys = ("epoch", "step", "train_loss", "val/acc", "train/acc")
    assert [[r[k] for k in keys] for r in _rows(resumed)] == [
        [r[k] for k in keys] for r in _rows(straight)
    ]
    # Testing the epoch-0 checkpoint restores callback states from it: the history stays whole.
    first = next((resumed / "checkpoints").glob("epoch=0-*.ckpt"))
    trainer.test(model, datamodule=data, ckpt_path=str(first), verbose=False)
    assert [int(r["epoch"]) for r in read_history(resumed)] == [0, 1, 2]
    history = next(c for c in trainer.callbacks if isinstance(c, History))
    assert [r["epoch"] for r in history.rows] == [0, 1, 2]
    record = json.loads((resumed / "test.json").read_text())
    assert record["checkpoint"] == first.name
    assert record["test/acc"] == pytest.approx(float(trainer.callback_metrics["test/acc"]))
