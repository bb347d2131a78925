"""The private parts of Lightning, torch, torchvision and W&B that skipnets relies on, in one
place.

Each is used only where no public API does the job. Each entry says where it is used, why, and
which test runs that path; ``tests/test_internals.py`` checks that every one still exists in the
installed versions, so an upgrade that removes one fails ``make test`` with its name instead of
failing a user's run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["PRIVATE_APIS", "PrivateAPI"]


@dataclass(frozen=True)
class PrivateAPI:
    """One private attribute: ``name``, where skipnets uses it, why, the test that runs that
    code, and ``present``, which says whether the installed library still has it."""

    name: str
    used_in: str
    why: str
    tested_by: str
    present: Callable[[], bool]


def _has(path: str, attribute: str) -> Callable[[], bool]:
    def check() -> bool:
        import importlib

        module, _, qualname = path.partition(":")
        owner: object = importlib.import_module(module)
        for part in filter(None, qualname.split(".")):
            owner = getattr(owner, part)
        return hasattr(owner, attribute)

    return check


def _checkpoint_attributes() -> bool:
    from lightning.pytorch.callbacks import ModelCheckpoint

    callback = ModelCheckpoint(every_n_train_steps=3)
    return callback._every_n_train_steps == 3 and hasattr(callback, "_last_global_step_saved")


def _batch_progress() -> bool:
    import lightning as L

    loop = L.Trainer(logger=False, enable_checkpointing=False).fit_loop.epoch_loop
    return hasattr(loop.batch_progress.current, "ready")


def _wandb_run_file() -> bool:
    import wandb
    from wandb.proto import wandb_internal_pb2

    history = wandb_internal_pb2.Record.DESCRIPTOR.fields_by_name.get("history")
    return (
        "x_transaction_log_flush_interval" in wandb.Settings.model_fields
        and history is not None
        and "step" in wandb_internal_pb2.HistoryRecord.DESCRIPTOR.fields_by_name
    )


PRIVATE_APIS: tuple[PrivateAPI, ...] = (
    PrivateAPI(
        "LightningCLI._parse_ckpt_path",
        "skipnets.lightning_cli.SkipnetsCLI",
        "LightningCLI reads --ckpt_path before instantiating and folds the checkpoint's "
        "hyperparameters into the model config, failing with a raw torch error on a bad file; "
        "skipnets overrides it to build the model the config describes and to refuse an "
        "unreadable or mismatched checkpoint with one line",
        "tests/test_fault_tolerance.py",
        _has("lightning.pytorch.cli:LightningCLI", "_parse_ckpt_path"),
    ),
    PrivateAPI(
        "LightningCLI._run_subcommand",
        "skipnets.lightning_cli.SkipnetsCLI",
        "the one place around every Trainer command where the checkpoint can be checked against "
        "the instantiated model and the W&B run finished with the command's exit status",
        "tests/test_wandb.py",
        _has("lightning.pytorch.cli:LightningCLI", "_run_subcommand"),
    ),
    PrivateAPI(
        "ModelCheckpoint._update_best_and_save, best_k_models, kth_best_model_path",
        "skipnets.checkpoints.BestCheckpoint",
        "the best checkpoint's score is recorded there, and a tie in validation accuracy is "
        "broken by the validation loss of the checkpoint it would replace, which Lightning "
        "keeps nowhere public",
        "tests/test_fault_tolerance.py",
        _has("lightning.pytorch.callbacks:ModelCheckpoint", "_update_best_and_save"),
    ),
    PrivateAPI(
        "ModelCheckpoint._save_last_checkpoint, _monitor_candidates, _every_n_train_steps, "
        "_last_global_step_saved",
        "skipnets.checkpoints.LastCheckpoint",
        "last.ckpt every N steps and at every epoch end, written by ModelCheckpoint's own code "
        "so that its bookkeeping (last_model_path, which --ckpt_path last, the run summary and "
        "resumed runs read) stays Lightning's",
        "tests/test_fault_tolerance.py",
        lambda: (
            _has("lightning.pytorch.callbacks:ModelCheckpoint", "_save_last_checkpoint")()
            and _has("lightning.pytorch.callbacks:ModelCheckpoint", "_monitor_candidates")()
            and _checkpoint_attributes()
        ),
    ),
    PrivateAPI(
        "fit_loop.epoch_loop.batch_progress",
        "skipnets.resume.RunState",
        "the number of batches of the interrupted epoch the trainer counts as done, which a "
        "checkpoint written in the middle of a step (SLURM's signal) counts one lower than the "
        "loader; Lightning exposes it nowhere else",
        "tests/test_distributed.py",
        _batch_progress,
    ),
    PrivateAPI(
        "DataLoader._index_sampler",
        "skipnets.data.base.ResumableLoader",
        "the batches of indices every loader iterator (single- and multi-process) draws from: "
        "skipping the first ones there resumes an epoch without loading the batches already "
        "trained on",
        "tests/test_fault_tolerance.py",
        _has("torch.utils.data:DataLoader", "_index_sampler"),
    ),
    PrivateAPI(
        "CIFAR10._check_integrity, CIFAR10._load_meta",
        "skipnets.data.vision",
        "torchvision checks the MD5 sums of the files on every load; skipnets checks that the "
        "files are there and leaves the sums to the download, so a user's own copy or a test's "
        "small one in the real format loads",
        "tests/test_data.py",
        lambda: (
            _has("torchvision.datasets:CIFAR10", "_check_integrity")()
            and _has("torchvision.datasets:CIFAR10", "_load_meta")()
        ),
    ),
    PrivateAPI(
        "torch._foreach_lerp_, torch._foreach_copy_",
        "skipnets.ema.EMA",
        "one fused operation over all weights per update (what torch's own optimizers and "
        "AveragedModel use); a Python loop over tensors would cost a kernel launch each",
        "tests/test_airbench.py",
        lambda: _has("torch:", "_foreach_lerp_")() and _has("torch:", "_foreach_copy_")(),
    ),
    PrivateAPI(
        "wandb Settings.x_transaction_log_flush_interval, the .wandb file's record format",
        "skipnets.checkpoints.wandb_history_on_disk, with_wandb_flush_interval",
        "W&B's service writes what a run logs into the run's .wandb file only when a 32 KiB "
        "block fills, every x_transaction_log_flush_interval seconds (an x_ setting: W&B's "
        "experimental ones; 15 by default) and when the run finishes, and no call, public or "
        "private, asks it to write. skipnets sets the interval for the runs its CLI starts and, "
        "before a checkpoint goes into place, reads the file (a LevelDB-style log of "
        "wandb.proto Records) until it holds the step that run.step says was logged last",
        "tests/test_wandb.py",
        _wandb_run_file,
    ),
)
