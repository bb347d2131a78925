"""LightningCLI wired for skipnets: registry-backed model, data modules by short name, W&B by
default (offline without credentials), and every file of a run under its run directory."""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.profilers import PassThroughProfiler
from lightning.pytorch.utilities import rank_zero_only

from skipnets.allocator import keep_freed_memory
from skipnets.checkpoints import (
    DEFAULT_LAST_EVERY_N_STEPS,
    BestCheckpoint,
    LastCheckpoint,
    check_checkpoint,
    find_best_checkpoint,
    find_last_checkpoint,
    install_atomic_checkpoints,
    read_checkpoint,
    with_wandb_flush_interval,
)
from skipnets.data import DataModule
from skipnets.divergence import NonFiniteLossStop
from skipnets.ema import EMA  # noqa: F401 - so `class_path: EMA` resolves
from skipnets.errors import ConfigError, SkipnetsError
from skipnets.history import History
from skipnets.module import Classifier
from skipnets.plugins import check_config_names, discover_plugins
from skipnets.predictions import PredictionCSV
from skipnets.progress import TimedProgressBar
from skipnets.quiet import VERBOSE_ENV, quiet_frameworks, quiet_wandb
from skipnets.resume import RunState
from skipnets.runs import run_dir, wandb_has_credentials, wandb_run_info, write_run_record
from skipnets.segmentation import Segmenter  # noqa: F401 - so `class_path: Segmenter` resolves

WANDB_LOGGER = "lightning.pytorch.loggers.WandbLogger"


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``<run dir>/config.yaml`` and records it on the logger.

    One directory per run, so a second run never collides with the first one's config (the
    clash LightningCLI's default callback has with W&B's shared save directory).
    """

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any) -> None:
        super().__init__(parser, config, save_to_log_dir=False, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        path = run_dir(trainer) / self.config_filename
        path.parent.mkdir(parents=True, exist_ok=True)
        dump = {**_keep_nulls(), **_checked_when_parsed(self.parser)}
        self.parser.save(self.config, str(path), overwrite=True, multifile=False, **dump)
        record = write_run_record(trainer, pl_module)
        if trainer.logger is not None:
            info = {"config": self.parser.dump(self.config, format="json", **dump)}
            info.update({k: v for k, v in record.items() if k != "wandb"})
            trainer.logger.log_hyperparams(info)


def _checked_when_parsed(parser: LightningArgumentParser) -> dict[str, bool]:
    # The config was checked as it was parsed: checking it again for each file written from it
    # costs more than the writing (jsonargparse 4.35 renamed skip_check to skip_validation).
    return {"skip_validation" if _jsonargparse_at_least(4, 35) else "skip_check": True}


def _keep_nulls() -> dict[str, bool]:
    # A null that overrides a default (Digits' image_size: null) must stay in the saved config.
    # jsonargparse 4.49 renamed skip_none to skip_unset; the old name warns, and goes in 5.0.
    return {"skip_unset" if _jsonargparse_at_least(4, 49) else "skip_none": False}


def _jsonargparse_at_least(major: int, minor: int) -> bool:
    import jsonargparse

    version = tuple(int(part) for part in jsonargparse.__version__.split(".")[:2])
    return version >= (major, minor)


class SkipnetsCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        keep_freed_memory()
        quiet_frameworks()
        if not os.environ.get(VERBOSE_ENV):
            # W&B's history and summary footer would come after skipnets' own summary, which
            # says where the run is and how to upload it.
            os.environ.setdefault("WANDB_QUIET", "true")
        # Plugins are imported before parsing, so that a config can name them by class name.
        discover_plugins()
        given = sys.argv[1:] if args is None else args
        check_config_names(given)
        self._subcommand = given[0] if isinstance(given, list) and given else None
        kwargs.setdefault("trainer_defaults", _trainer_defaults())
        # LightningCLI's default (`true`, "a random seed") seeds with 0 and warns "No seed found"
        # on every run that names none: seed 0 it is, said in `--help` and the saved config.
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        # Lightning's support for `Classifier.load_from_checkpoint` of a subclass dumps the whole
        # config once more before building the model, to record it as the hyperparameters of
        # modules that save all of theirs; skipnets' modules record their own, and a checkpoint
        # is always loaded into the model the config builds.
        kwargs.setdefault("load_from_checkpoint_support", False)
        super().__init__(
            model_class=Classifier,
            datamodule_class=DataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            # Parse errors are raised, not printed with a page of usage: skipnets.cli prints one
            # message and exits with status 2.
            # No abbreviations: `--trainer.max_epoc=1` is a typo, not max_epochs.
            parser_kwargs={
                "exit_on_error": False,
                "allow_abbrev": False,
                **{
                    name: {"exit_on_error": False, "allow_abbrev": False}
                    for name in self.subcommands()
                },
            },
            args=args,
            **kwargs,
        )

    def subcommands(self) -> dict[str, set[str]]:  # type: ignore[override]
        """The subcommand the command line names, alone, when it names one: each subcommand's
        parser costs a fraction of a second of CPU to build, and a run uses one."""
        every = LightningCLI.subcommands()
        wanted = getattr(self, "_subcommand", None)
        return {wanted: every[wanted]} if wanted in every else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # LightningCLI's own `optimizer:` / `lr_scheduler:` entries, handed to the module, which
        # builds them over its own parameter groups (no weight decay on norms and biases).
        parser.add_optimizer_args()
        parser.add_lr_scheduler_args()
        parser.link_arguments("optimizer", "model.init_args.optimizer", compute_fn=_as_dict)
        parser.link_arguments("lr_scheduler", "model.init_args.lr_scheduler", compute_fn=_as_dict)
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.input_shape", "model.init_args.input_shape", apply_on="instantiate"
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="after `fit`, evaluate the best checkpoint on the test split",
        )
        _add_safety_arguments(parser)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        trainer = config.trainer
        root = trainer.get("default_root_dir") or os.getcwd()
        if self.subcommand in ("fit", "validate", "test", "predict"):
            _check_writable(Path(root))
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", None) != WANDB_LOGGER:
                continue
            init = logger.init_args
            if init.get("save_dir") in (None, ".", ""):
                init.save_dir = str(root)
            # W&B writes the run's file often, so that each checkpoint can wait for the metrics
            # it covers to be in it; the settings keep only what the config gave.
            init.settings = with_wandb_flush_interval(init.get("settings"))
            if (
                "WANDB_MODE" not in os.environ
                and not init.get("offline")
                and not wandb_has_credentials()
            ):
                init.offline = True
        _fill_cluster_devices(trainer)
        self.trainer_defaults["callbacks"] = _core_callbacks(config)
        if self.subcommand == "predict":
            self.trainer_defaults["callbacks"].append(PredictionCSV())

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would fold the checkpoint's hyperparameters into the model config (and
        # fail with a raw torch error on a bad file). skipnets builds the model the config
        # describes and refuses, with one line, a checkpoint that is unreadable or does not fit.
        subcommand = self.config.get("subcommand")
        if subcommand:
            _prepare_resume(self.config[subcommand], subcommand)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.profiler) is PassThroughProfiler:  # none chosen: the free one
            trainer.profiler = NoProfiler()
        install_atomic_checkpoints(trainer)
        _check_sync_batchnorm(trainer, self.config.get(str(self.subcommand), self.config))
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in ("fit", "validate", "test", "predict"):
            _check_checkpoint_fits(self.config[subcommand], self.model)
            quiet_wandb(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            _finish_wandb(exit_code=1)
            if _out_of_memory(err):
                raise OutOfMemory(_memory_advice(self.datamodule, err)) from None
            raise
        _finish_wandb(exit_code=0)

    def before_fit(self) -> None:
        from lightning.pytorch.callbacks import Timer

        trainer = self.trainer
        timed = any(isinstance(c, Timer) for c in trainer.callbacks)
        if trainer.max_epochs == -1 and trainer.max_steps == -1 and not timed:
            rank_zero_only(print)(
                "skipnets: trainer.max_epochs=-1 and no max_steps or max_time: training goes on "
                "until it is stopped (SIGTERM saves last.ckpt first)",
                file=sys.stderr,
            )

    def after_fit(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        if (
            config.get("test_after_fit")
            and self.datamodule is not None
            and _has_test_split(self.datamodule)
        ):
            checkpoint = self.trainer.checkpoint_callback
            best = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
            # Lightning's own table is left out: the summary below ends with the same metrics.
            results = self.trainer.test(
                self.model, datamodule=self.datamodule, ckpt_path=best or None, verbose=False
            )
            tested = f"the best checkpoint, {Path(best).name}" if best else "the last weights"
            _report(self.trainer, (tested, results[0] if results else {}))
            return
        _report(self.trainer)


class OutOfMemory(SkipnetsError):
    """A batch did not fit in the device's (or the machine's) memory."""

    exit_code = 3


def _out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _memory_advice(datamodule: Any, err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    size = getattr(datamodule, "batch_size", None)
    if isinstance(size, int) and size > 1:
        smaller = max(1, size // 2)
        return (
            f"out of memory with batch_size={size} ({first}). Try "
            f"--data.init_args.batch_size={smaller}, and --trainer.accumulate_grad_batches=2 "
            f"to keep the effective batch of {size}; or a smaller model, or "
            "--trainer.precision=bf16-mixed"
        )
    return f"out of memory ({first}). Try a smaller model or --trainer.precision=bf16-mixed"


def _check_writable(root: Path) -> None:
    """Everything a run writes goes under its root: one that cannot be written to is refused
    before anything starts (W&B would otherwise fall back to the system's temporary folder).
    Nothing is created here: the nearest folder that exists must be one the run can write in."""
    existing = root.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        reason = "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only" if existing == root.absolute() else f"{existing} is read-only"
    else:
        return
    raise ConfigError(
        f"cannot write to the run's root {root} ({reason}): choose another "
        "--trainer.default_root_dir"
    )


def _as_dict(config: Any) -> dict[str, Any] | None:
    return config.as_dict() if config is not None else None


_NO_CONTEXT = nullcontext()


class NoProfiler(PassThroughProfiler):
    """Lightning's default "no profiler", without its cost per call.

    Lightning wraps each hook call in ``trainer.profiler.profile(name)``, about 130 times a
    training step with skipnets' callbacks; the default's ``profile`` builds a generator-based
    context manager each time (about 0.1 ms a step on a 2-core CPU, more on a slow GPU host).
    This one hands back one shared ``nullcontext``. A profiler the user chooses
    (``--trainer.profiler=simple``) is kept.
    """

    def profile(self, action_name: str) -> AbstractContextManager[Any]:  # type: ignore[override]
        return _NO_CONTEXT


def _trainer_defaults() -> dict[str, Any]:
    return {
        "logger": {"class_path": WANDB_LOGGER, "init_args": {"project": "skipnets"}},
        "callbacks": [],  # filled by _core_callbacks once the config is parsed
        # Not the working directory, Lightning's default: run from a clone's root, the run
        # directory `<root>/skipnets/<run id>` would land inside the package's source.
        "default_root_dir": "runs",
    }


def _add_safety_arguments(parser: LightningArgumentParser) -> None:
    parser.add_argument(
        "--last_checkpoint_every_n_steps",
        type=int,
        default=DEFAULT_LAST_EVERY_N_STEPS,
        help="write last.ckpt every N optimizer steps and at each epoch end (0: epoch ends "
        "only); a killed run loses at most N steps",
    )
    parser.add_argument(
        "--last_checkpoint_every_n_epochs",
        type=int,
        default=1,
        help="write last.ckpt at the end of every N-th epoch (0: only when training ends)",
    )
    parser.add_argument(
        "--allow_resume_changes",
        type=bool,
        default=False,
        help="resume a checkpoint with another batch size, data, optimizer, schedule or world "
        "size (refused by default: the saved state would mean something else)",
    )
    parser.add_argument(
        "--stop_on_nonfinite_loss",
        type=bool,
        default=True,
        help="stop at the first nan/inf loss, before it reaches the weights, and say what to change",
    )


def _core_callbacks(config: Any) -> list[Any]:
    """The callbacks every run gets, on top of the config's own: the best checkpoint by
    validation accuracy (ties to the lower validation loss), a fresh last.ckpt, the resume state, the history of the training curves
    (``history.csv``), the non-finite loss stop, and a
    progress bar that redraws on time (unless the config names its own)."""
    callbacks: list[Any] = [
        RunState(allow_changes=bool(config.get("allow_resume_changes"))),
        History(),
    ]
    if config.trainer.get("enable_checkpointing") is not False:
        every = config.get("last_checkpoint_every_n_steps", DEFAULT_LAST_EVERY_N_STEPS)
        epochs = config.get("last_checkpoint_every_n_epochs", 1)
        last = LastCheckpoint(every, every_n_epochs=epochs)
        callbacks[:0] = [BestCheckpoint(monitor="val/acc", mode="max"), last]
    if config.get("stop_on_nonfinite_loss", True):
        callbacks.append(NonFiniteLossStop())
    if config.trainer.get("enable_progress_bar") is not False and not _names_progress_bar(config):
        callbacks.append(TimedProgressBar())
    return callbacks


def _names_progress_bar(config: Any) -> bool:
    # The class paths are complete once parsed (short names resolved) and importable.
    import importlib

    callbacks = config.trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        module, _, name = str(getattr(callback, "class_path", "")).rpartition(".")
        cls = getattr(importlib.import_module(module), name, None) if module else None
        if isinstance(cls, type) and issubclass(cls, LightningProgressBar):
            return True
    return False


def _prepare_resume(config: Any, subcommand: str | None) -> None:
    """Turn ``--ckpt_path last`` into this run tree's newest last/hpc checkpoint, refuse an
    unusable checkpoint before anything starts, and point W&B at the run being resumed."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if subcommand not in ("fit", "validate", "test", "predict"):
        return
    trainer = config.trainer
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    ckpt_path = config.get("ckpt_path")
    weights_only = config.get("weights_only")
    if ckpt_path == "last":
        found = find_last_checkpoint(root)
        if found is not None:
            config.ckpt_path = ckpt_path = str(found)
    elif ckpt_path == "best" and subcommand != "fit":
        # Lightning knows "best" only within the fit that made it; a later command finds it.
        config.ckpt_path = ckpt_path = str(find_best_checkpoint(root))
    elif ckpt_path is None and subcommand == "fit" and SLURMEnvironment.detect():
        # A requeued SLURM job: Lightning resumes from the newest hpc_ckpt_N.ckpt by itself.
        found = max(root.glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)
        ckpt_path = str(found) if found is not None else None
    if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or "://" in ckpt_path:
        return
    checkpoint = read_checkpoint(ckpt_path, weights_only=weights_only is not False)
    if subcommand != "fit":
        return
    state = (checkpoint.get("callbacks") or {}).get("RunState") or {}
    identity = state.get("wandb") if isinstance(state, dict) else None
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if identity and getattr(logger, "class_path", None) == WANDB_LOGGER:
            init = logger.init_args
            if not init.get("id") and identity.get("project") == init.get("project"):
                init.id = identity["id"]
                init.resume = "allow"


def _check_checkpoint_fits(config: Any, model: Any) -> None:
    ckpt_path = config.get("ckpt_path")
    if ckpt_path and Path(ckpt_path).is_file():
        check_checkpoint(ckpt_path, model, weights_only=config.get("weights_only") is not False)


def _fill_cluster_devices(trainer: Any) -> None:
    """Under ``torchrun`` or ``srun``, ``devices: auto`` means one device per launched process
    on each node (Lightning's own auto would count the node's accelerators, or one CPU)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if trainer.get("devices") not in ("auto", None):
        return
    if TorchElasticEnvironment.detect():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = max(int(os.environ.get("WORLD_SIZE", "1")) // per_node, 1)
    elif SLURMEnvironment.detect() and os.environ.get("SLURM_NTASKS_PER_NODE"):
        per_node = int(os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0])
        nodes = int(os.environ.get("SLURM_NNODES", "1"))
    else:
        return
    trainer.devices = per_node
    if trainer.get("num_nodes") in (None, 1):
        trainer.num_nodes = nodes


def _check_sync_batchnorm(trainer: Trainer, config: Any) -> None:
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import ParallelStrategy

    if (
        config.trainer.get("sync_batchnorm")
        and isinstance(trainer.accelerator, CPUAccelerator)
        and isinstance(trainer.strategy, ParallelStrategy)
    ):
        raise ConfigError(
            "trainer.sync_batchnorm needs GPUs: torch's SyncBatchNorm runs on CUDA (or XPU) "
            "devices only; leave it off for DDP on CPU"
        )


def _metric_table(metrics: dict[str, float], indent: int) -> list[str]:
    """One line per metric, names aligned, values to four decimals."""
    width = max(len(name) for name in metrics)
    return [f"{' ' * indent}{name:<{width}}  {float(value):.4f}" for name, value in metrics.items()]


def _finish_wandb(exit_code: int) -> None:
    """End this process's W&B run, so that the next run in the same process gets its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


def _has_test_split(datamodule: Any) -> bool:
    return type(datamodule).test_dataloader is not DataModule.__mro__[1].test_dataloader


@rank_zero_only
def _report(trainer: Trainer, test: tuple[str, dict[str, float]] | None = None) -> None:
    """Tell the user where the run's files are and, after a test, its metrics: ``test`` is what
    was tested and the metrics Lightning returned."""
    directory = run_dir(trainer)
    lines = [f"\nRun directory: {directory}"]
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
        lines.append(f"  checkpoints: {checkpoint.dirpath}")
        if checkpoint.best_model_path:
            lines.append(f"    best: {Path(checkpoint.best_model_path).name}")
        # From the folder, not last_model_path: the test after fit restores the callbacks'
        # state of the best checkpoint, which may predate the first last.ckpt.
        last = [
            Path(c.dirpath) / f"{c.CHECKPOINT_NAME_LAST}{c.FILE_EXTENSION}"
            for c in trainer.checkpoint_callbacks
            if isinstance(c, LastCheckpoint) and c.dirpath
        ]
        last = [path for path in last if path.is_file()]
        if last:
            lines.append(f"    last: {last[0].name} (resume with --ckpt_path last)")
    if (directory / "config.yaml").exists():
        lines.append(f"  config: {directory / 'config.yaml'}")
    if test is not None and test[1]:
        lines.append(f"  test, with {test[0]}:")
        lines += _metric_table(test[1], indent=4)
    wandb_info = wandb_run_info(trainer)
    if wandb_info and wandb_info.get("sync"):
        lines.append(f"  W&B (offline): {wandb_info['folders'][-1]}")
        lines.append(f"    upload it with: {wandb_info['sync']}")
    elif wandb_info and wandb_info.get("url"):
        lines.append(f"  W&B: {wandb_info['url']}")
    print("\n".join(lines))
