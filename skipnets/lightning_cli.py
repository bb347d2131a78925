"""LightningCLI wired for skipnets: registry-backed model, data modules by short name, W&B by
default (offline without credentials), and every file of a run under its run directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from skipnets.data import DataModule
from skipnets.module import Classifier
from skipnets.plugins import check_config_names, discover_plugins
from skipnets.runs import run_dir, wandb_has_credentials

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
        self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
        if trainer.logger is not None:
            info = {"config": self.parser.dump(self.config, skip_none=False, format="json")}
            arch = getattr(getattr(pl_module, "hparams", {}), "get", lambda k: None)("arch")
            if arch:
                info["arch"] = arch
                info["parameters"] = sum(p.numel() for p in pl_module.parameters())
            trainer.logger.log_hyperparams(info)


class SkipnetsCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs: Any) -> None:
        # Plugins are imported before parsing, so that a config can name them by class name.
        discover_plugins()
        check_config_names(sys.argv[1:] if args is None else args)
        kwargs.setdefault("trainer_defaults", _trainer_defaults())
        super().__init__(
            model_class=Classifier,
            datamodule_class=DataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveRunConfig,
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

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

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        trainer = config.trainer
        root = trainer.get("default_root_dir") or os.getcwd()
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if getattr(logger, "class_path", None) != WANDB_LOGGER:
                continue
            init = logger.init_args
            if init.get("save_dir") in (None, ".", ""):
                init.save_dir = str(root)
            if (
                "WANDB_MODE" not in os.environ
                and not init.get("offline")
                and not wandb_has_credentials()
            ):
                init.offline = True

    def after_fit(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        if (
            config.get("test_after_fit")
            and self.datamodule is not None
            and _has_test_split(self.datamodule)
        ):
            checkpoint = self.trainer.checkpoint_callback
            best = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None)
        _report(self.trainer)


def _as_dict(config: Any) -> dict[str, Any] | None:
    return config.as_dict() if config is not None else None


def _trainer_defaults() -> dict[str, Any]:
    return {
        "logger": {"class_path": WANDB_LOGGER, "init_args": {"project": "skipnets"}},
        "callbacks": [ModelCheckpoint(monitor="val/acc", mode="max", save_last=True)],
    }


def _has_test_split(datamodule: Any) -> bool:
    return type(datamodule).test_dataloader is not DataModule.__mro__[1].test_dataloader


@rank_zero_only
def _report(trainer: Trainer) -> None:
    """Tell the user where the run's files are."""
    directory = run_dir(trainer)
    lines = [f"\nRun directory: {directory}"]
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
        lines.append(f"  checkpoints: {checkpoint.dirpath}")
        if checkpoint.best_model_path:
            lines.append(f"    best: {Path(checkpoint.best_model_path).name}")
        if checkpoint.last_model_path:
            lines.append(
                f"    last: {Path(checkpoint.last_model_path).name} (resume with --ckpt_path last)"
            )
    if (directory / "config.yaml").exists():
        lines.append(f"  config: {directory / 'config.yaml'}")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            experiment = logger.experiment
            offline = (
                getattr(experiment.settings, "_offline", False)
                or os.environ.get("WANDB_MODE") == "offline"
            )
            wandb_dir = Path(experiment.dir).parent
            if offline:
                lines.append(f"  W&B (offline): {wandb_dir}")
                lines.append(f"    upload it with: wandb sync {wandb_dir}")
            else:
                lines.append(f"  W&B: {experiment.url}")
    print("\n".join(lines))
