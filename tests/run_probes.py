"""Callbacks that tests put into real ``skipnets`` runs (by class path, ``tests.run_probes.X``),
and a reader for W&B's offline run files."""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from skipnets.runs import log_figure, log_table


class KillAt(Callback):
    """SIGKILL this process once ``step`` optimizer steps are done (and saved, if due)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RequeueAt(Callback):
    """At ``step``, send this process SLURM's pre-emption signal (SIGUSR1), wait until Lightning
    has written its hpc checkpoint and asked ``scontrol`` to requeue, then die as SLURM kills."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step < self.step:
            return
        os.kill(os.getpid(), signal.SIGUSR1)
        hpc = Path(trainer.default_root_dir) / "hpc_ckpt_1.ckpt"
        deadline = time.monotonic() + 60
        while not hpc.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)


class StallOnSave(Callback):
    """On the ``save``-th checkpoint save, put an object into the checkpoint whose pickling
    writes ``marker`` and then sleeps: the test kills the process while the file is being
    written."""

    def __init__(self, save: int, marker: str) -> None:
        self.save = save
        self.marker = marker
        self.saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves += 1
        if self.saves == self.save:
            checkpoint["stall"] = _Stall(self.marker)


class _Stall:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        Path(self.marker).write_text(str(os.getpid()))
        time.sleep(120)
        return (str, ("never reached",))


class NoisyInputs(Callback):
    """Adds Gaussian noise drawn from the global RNG to every training batch, in place: a
    stand-in for augmentation or dropout, so that resuming must restore the RNG to be exact."""

    def __init__(self, std: float = 0.1) -> None:
        self.std = std

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        batch[0].add_(torch.randn(batch[0].shape) * self.std)


class RecordBatches(Callback):
    """Saves the training inputs this rank saw in each epoch to ``<folder>/rank<r>-epoch<e>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(batch[0].detach().clone())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        name = f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.pt"
        torch.save(torch.cat(self.seen), Path(self.folder) / name)
        self.seen = []


class LogThroughRuns(Callback):
    """Logs a PNG and two tables at the end of fit with ``skipnets.runs.log_figure`` and
    ``log_table``, as a plugin would."""

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from skipnets.runs import run_dir

        folder = run_dir(trainer) / "probe"
        folder.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(2, 2))
        FigureCanvasAgg(fig)
        fig.subplots().plot([0, 1], [1, 0])
        fig.savefig(folder / "line.png")
        log_figure(trainer, "probe/line", folder / "line.png")
        (folder / "rows.csv").write_text("block,ratio\nblock1,0.5\nblock2,0.25\n")
        log_table(trainer, "probe/csv", folder / "rows.csv")
        log_table(trainer, "probe/dicts", [{"step": 1, "acc": 0.5}, {"step": 2, "acc": 0.75}])


def wandb_records(run_file: str | os.PathLike, timeout: float = 60) -> list[Any]:
    """The records of a finished W&B run log (``run-<id>.wandb``), once its ``exit`` record is
    written (W&B's service finishes the file after ``wandb.finish`` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_read_records(Path(run_file).read_bytes()))
        done = any(r.WhichOneof("record_type") == "exit" for r in records)
        if done or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _read_records(data: bytes) -> Iterator[Any]:
    """A LevelDB-style log of protobuf ``Record`` messages in 32 KiB blocks, after a 7-byte
    file header."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B", "not a W&B run log"
    block, position, chunks = 32768, 7, []
    while position + 7 <= len(data):
        room = block - position % block
        length, kind = struct.unpack("<HB", data[position + 4 : position + 7])
        if room < 7 or (length == 0 and kind == 0):
            position += room
            continue
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_history(run_file: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``log`` call of a W&B run log, as dicts of decoded values."""
    rows = []
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def wandb_config(run_file: str | os.PathLike) -> dict[str, Any]:
    """The run's config, merged from all its config records."""
    config: dict[str, Any] = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return config


class TermAt(Callback):
    """Send this process SIGTERM (a cluster's notice before it stops the job) as the batch of
    optimizer step ``step`` starts; the run goes on until skipnets stops it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class DiskFullAt(Callback):
    """From the ``save``-th checkpoint on, writing fails half-way as on a full disk (``ENOSPC``)."""

    def __init__(self, save: int) -> None:
        import errno

        import skipnets.checkpoints

        real_save = skipnets.checkpoints.torch.save
        calls = {"count": 0}
        failing_from = save

        def filling_save(obj, file, *args, **kwargs):
            calls["count"] += 1
            if calls["count"] < failing_from:
                return real_save(obj, file, *args, **kwargs)
            file.write(b"\0" * 4096)  # some bytes reach the side file first
            raise OSError(errno.ENOSPC, "No space left on device")

        skipnets.checkpoints.torch = _TorchWith(filling_save)


class _TorchWith:
    # torch with its ``save`` replaced, for the checkpoint module only.
    def __init__(self, save) -> None:
        import torch

        self._torch, self.save = torch, save

    def __getattr__(self, name: str):
        return getattr(self._torch, name)


class SlowSteps(Callback):
    """Each training step takes ``seconds`` longer, and ``marker`` is written at the first one:
    a run that is still running when another process starts."""

    def __init__(self, seconds: float, marker: str) -> None:
        self.seconds, self.marker = seconds, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time
        from pathlib import Path

        Path(self.marker).touch()
        time.sleep(self.seconds)


class OutOfMemoryAt(Callback):
    """The batch of optimizer step ``step`` does not fit in the GPU's memory."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class FailsToStart(Callback):
    """A plugin whose constructor fails with an error of its own (not a ConfigError)."""

    def __init__(self, level: int = 1) -> None:
        raise RuntimeError(f"this callback needs a newer driver (level {level})")


class KillWhenPlaced(Callback):
    """SIGKILL this process right after the ``times``-th checkpoint named ``name`` is renamed
    into place by ``skipnets.checkpoints``."""

    def __init__(self, times: int, name: str = "last.ckpt") -> None:
        import skipnets.checkpoints

        placed = {"count": 0}

        def replace(source, target, *args, **kwargs):
            os.replace(source, target, *args, **kwargs)
            if Path(target).name == name:
                placed["count"] += 1
                if placed["count"] == times:
                    os.kill(os.getpid(), signal.SIGKILL)

        skipnets.checkpoints.os = _OsWith(replace)


class _OsWith:
    # os with its ``replace`` wrapped, for the checkpoint module only.
    def __init__(self, replace) -> None:
        self.replace = replace

    def __getattr__(self, name: str):
        return getattr(os, name)
