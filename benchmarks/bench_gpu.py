"""The GPU framework tax: ``skipnets fit`` on the speed-run recipe against a hand-written loop.

    python -m benchmarks --only gpu                    # with CUDA; without it, one "skipped" line
    python -m benchmarks.bench_gpu                     # the same, with its own report and options
    python -m benchmarks.bench_gpu --data ROOT         # the real files (ROOT/cifar-10-batches-py)
    python -m benchmarks.bench_gpu --compile --profile runs/profile --json report.json
    python -m benchmarks.bench_gpu --device cpu --epochs 2 --train-size 1024 --batch-size 32 \\
        --width-divisor 16 --precision 32              # a smoke run of every path on the CPU

Both sides train the recipe of ``configs/papers/cifar10_speedrun.yaml``, read from that file:
``speedrun_resnet9``, the device-resident CIFAR-10 batches of ``skipnets.data.gpu`` (its
``DeviceLoader`` and ``augment``), bf16 autocast, channels-last, SGD with Nesterov momentum and a
one-cycle learning rate stepped every batch, an EMA of the weights every few steps, label
smoothing, and validation where the config runs it. The skipnets side is ``skipnets fit`` itself
(``SkipnetsCLI`` on that config); the baseline is the same recipe written out as a plain PyTorch
loop over the same network from the registry, its EMA a ``torch._foreach_lerp_`` every few steps.

Two kinds of run:

- **Fresh processes** (``skipnets fit`` as a command, and the hand-written loop as a command of
  this module): the whole process from launch to exit, and its first epoch, which pays CUDA's and
  cuDNN's start-up as a user's run does. The first-epoch and whole-process targets use these.
  An untimed process of the hand-written loop runs first: the first CUDA process on a machine
  also reads the CUDA libraries from disk, which later ones find in the page cache.
- **One process** (this one, after both of the above): ``skipnets fit`` through ``SkipnetsCLI``
  with a callback that times each epoch (the GPU synchronised at epoch boundaries only), and the
  hand-written loop, alternating over ``--repeats`` rounds, after a warm-up epoch (cuDNN's
  autotuning and CUDA's kernel loading are then paid, so the first epochs here differ by what
  each side does in its first epoch). The steady-epoch target uses these.

Targets (issue 11): steady epoch (median of the epochs after the first) of the hand-written loop
over skipnets' >= 0.95; skipnets' first epoch at most 1 s over the loop's; its whole process at
most 10 s over. Each is printed with PASS or FAIL; nothing asserts.

Without ``--data``, the files are random images written in CIFAR-10's real on-disk format
(50,000 training and 10,000 test images): a step costs what it costs on the real files, but the
accuracies mean nothing. ``--compile`` adds compiled runs of both sides (``model.compile: true``
and ``model.compile()``). When the ``airbench`` package is installed (CUDA only), airbench94's own
run on the same files is timed by its own timer; when ``configs/papers/airbench94_cifar10.yaml``
exists, it is trained through ``skipnets fit`` too, and its epoch time is compared with airbench's
(target >= 0.9). ``--profile DIR`` writes a ``torch.profiler`` trace (Chrome/Perfetto JSON) and an
operator table of a few steady steps of each side.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import inspect
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from benchmarks.common import Row
from skipnets.graphs import release_recording
from skipnets.module import DEFAULT_OPTIMIZER

REPO = Path(__file__).resolve().parents[1]
SPEEDRUN_CONFIG = REPO / "configs" / "papers" / "cifar10_speedrun.yaml"
AIRBENCH_CONFIG = REPO / "configs" / "papers" / "airbench94_cifar10.yaml"
CIFAR10_TRAIN_SIZE, CIFAR10_TEST_SIZE = 50_000, 10_000

# The targets of issue 11.
STEADY_RATIO_TARGET = 0.95  # hand-written steady epoch / skipnets steady epoch
FIRST_EPOCH_SLACK_S = 1.0  # skipnets' first epoch over the hand-written loop's
WHOLE_PROCESS_SLACK_S = 10.0  # skipnets' whole process over the hand-written loop's
AIRBENCH_RATIO_TARGET = 0.9  # airbench's epoch / skipnets' epoch on the airbench94 config


# --- data -------------------------------------------------------------------------------------


def write_cifar10(root: Path, train_size: int, test_size: int, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with random images in the format of the real "python
    version" archive: five pickled training batches, a test batch and ``batches.meta``, each a
    dict with uint8 ``data`` rows of 3,072 channel-major values and integer ``labels``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [len(part) for part in np.array_split(np.arange(train_size), 5)]
    batches = [(f"data_batch_{i + 1}", n) for i, n in enumerate(sizes)] + [
        ("test_batch", test_size)
    ]
    for name, n in batches:
        content = {
            "batch_label": name,
            "labels": rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
            "filenames": [f"{name}_{i:05d}.png" for i in range(n)],
        }
        with (folder / name).open("wb") as file:
            pickle.dump(content, file, protocol=2)  # as the original archives were written
    meta = {"label_names": [f"class_{i}" for i in range(10)], "num_vis": 3072}
    with (folder / "batches.meta").open("wb") as file:
        pickle.dump(meta, file, protocol=2)
    return Path(root)


def read_cifar10(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels of one CIFAR-10 split, through the dataset
    class skipnets reads them with (torchvision's, without its MD5 check)."""
    from skipnets.data.vision import CIFAR10

    dataset = CIFAR10.dataset_cls(str(root), train=train)
    images = torch.as_tensor(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(dataset.targets, dtype=torch.long)


# --- the recipe, from the config --------------------------------------------------------------

# The config entries the hand-written loop implements; any other one is listed in the report.
HAND_WRITTEN_MODEL = {"arch", "arch_kwargs", "label_smoothing", "channels_last", "compile"}
HAND_WRITTEN_MODEL |= {"lr_scheduler_interval", "cuda_graphs"}
HAND_WRITTEN_DATA = {"root", "download", "val_size", "batch_size", "eval_batch_size", "seed"}
HAND_WRITTEN_DATA |= {"crop_padding", "padding_mode", "flip", "cutout", "drop_last"}
TRAINER_STEP_OPTIONS = ("accumulate_grad_batches", "gradient_clip_val")


@dataclass
class Recipe:
    """What both sides train, read from a skipnets config, with the benchmark's overrides."""

    config: Path
    arch: str
    arch_kwargs: dict[str, Any]
    label_smoothing: float
    channels_last: bool
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scheduler_per_step: bool
    batch_size: int
    eval_batch_size: int
    val_size: int
    crop_padding: int
    padding_mode: str
    flip: bool
    cutout: int
    drop_last: bool
    data_seed: int
    seed: int
    epochs: int
    val_every: int
    precision: str
    cudnn_benchmark: bool
    ema: dict[str, Any] | None
    cuda_graphs: bool = False
    cli_overrides: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @classmethod
    def from_config(
        cls,
        path: Path,
        *,
        epochs: int | None = None,
        batch_size: int | None = None,
        width_divisor: int | None = None,
        train_size: int | None = None,
        precision: str | None = None,
    ) -> Recipe:
        config = yaml.safe_load(Path(path).read_text())
        model = dict(config.get("model") or {})
        if "class_path" in model:  # model: {class_path: Classifier, init_args: {...}}
            model = dict(model.get("init_args") or {})
        data = dict((config.get("data") or {}).get("init_args") or {})
        trainer = dict(config.get("trainer") or {})
        data_class = _resolve(str((config.get("data") or {}).get("class_path", "GPUCIFAR10")))
        recipe = cls(
            config=Path(path),
            arch=model.get("arch", "speedrun_resnet9"),
            arch_kwargs=dict(model.get("arch_kwargs") or {}),
            label_smoothing=float(model.get("label_smoothing", 0.0)),
            channels_last=bool(model.get("channels_last", False)),
            optimizer=dict(config.get("optimizer") or DEFAULT_OPTIMIZER),
            scheduler=dict(config["lr_scheduler"]) if config.get("lr_scheduler") else None,
            scheduler_per_step=model.get("lr_scheduler_interval", "epoch") == "step",
            batch_size=int(data.get("batch_size", _default(data_class, "batch_size"))),
            eval_batch_size=int(
                data.get("eval_batch_size")
                or data.get("batch_size", _default(data_class, "batch_size"))
            ),
            val_size=int(data.get("val_size", _default(data_class, "val_size"))),
            crop_padding=int(
                data["crop_padding"]
                if data.get("crop_padding") is not None
                else getattr(data_class, "default_crop_padding", 0)
            ),
            padding_mode=str(data.get("padding_mode", "constant")),
            flip=bool(
                data["flip"]
                if data.get("flip") is not None
                else getattr(data_class, "default_flip", False)
            ),
            cutout=int(data.get("cutout", 0)),
            drop_last=bool(data.get("drop_last", False)),
            data_seed=int(data.get("seed", 0)),
            seed=int(config.get("seed_everything") or 0),
            epochs=int(trainer.get("max_epochs", 1)),
            val_every=int(trainer.get("check_val_every_n_epoch", 1)),
            precision=str(trainer.get("precision", "32")),
            cudnn_benchmark=bool(trainer.get("benchmark", False)),
            ema=_ema_settings(trainer.get("callbacks") or []),
            cuda_graphs=bool(model.get("cuda_graphs", False)),
        )
        # What the hand-written loop does not implement, said next to its figures.
        ignored = [f"model.{k}" for k in set(model) - HAND_WRITTEN_MODEL]
        ignored += [f"data.{k}" for k in set(data) - HAND_WRITTEN_DATA]
        if data.get("flip") not in (None, True, False):
            ignored.append(f"data.flip={data['flip']}")
        ignored += [
            f"trainer.{k}" for k in TRAINER_STEP_OPTIONS if trainer.get(k) not in (None, 0, 1)
        ]
        recipe.ignored = sorted(ignored)
        overrides: list[str] = []
        if epochs is not None:
            if recipe.val_every == recipe.epochs:  # validation once, at the end: keep it there
                recipe.val_every = epochs
                overrides.append(f"--trainer.check_val_every_n_epoch={epochs}")
            recipe.epochs = epochs
            overrides.append(f"--trainer.max_epochs={epochs}")
        if batch_size is not None:
            recipe.batch_size = batch_size
            recipe.eval_batch_size = min(recipe.eval_batch_size, 2 * batch_size)
            overrides += [
                f"--data.init_args.batch_size={batch_size}",
                f"--data.init_args.eval_batch_size={recipe.eval_batch_size}",
            ]
        if width_divisor is not None:
            widths = recipe.arch_kwargs.get("widths", _builder_default(recipe.arch, "widths"))
            if widths is None:
                raise ValueError(f"--width-divisor: {recipe.arch} has no widths argument")
            widths = [max(1, int(w) // width_divisor) for w in widths]
            recipe.arch_kwargs = {**recipe.arch_kwargs, "widths": widths}
            overrides.append(f"--model.arch_kwargs={json.dumps(recipe.arch_kwargs)}")
        if train_size is not None and train_size != CIFAR10_TRAIN_SIZE:
            # The same share held out for validation as from the real 50,000.
            recipe.val_size = max(1, round(recipe.val_size * train_size / CIFAR10_TRAIN_SIZE))
            overrides.append(f"--data.init_args.val_size={recipe.val_size}")
        if precision is not None:
            recipe.precision = precision
            overrides.append(f"--trainer.precision={precision}")
        recipe.cli_overrides = overrides
        return recipe


def _resolve(class_path: str) -> Any:
    """A class from a config's ``class_path``: a full import path, or a short name that skipnets'
    CLI would resolve (a data module, a Lightning callback, a ``torch.optim`` class)."""
    module, _, name = class_path.rpartition(".")
    if module:
        return getattr(importlib.import_module(module), name)
    namespaces = ["skipnets.data", "skipnets.ema", "skipnets.schedulers"]
    namespaces += ["lightning.pytorch.callbacks", "torch.optim", "torch.optim.lr_scheduler"]
    for namespace in namespaces:
        if importlib.util.find_spec(namespace) is not None:
            module = importlib.import_module(namespace)
            if hasattr(module, name):
                return getattr(module, name)
    raise ValueError(f"cannot resolve {class_path!r}: give its full import path in the config")


def _default(cls: Any, name: str) -> Any:
    return inspect.signature(cls).parameters[name].default


def _builder_default(arch: str, name: str) -> Any:
    from skipnets.registry import model_info

    parameter = inspect.signature(model_info(arch).builder).parameters.get(name)
    return parameter.default if parameter is not None else None


def _ema_settings(callbacks: list[Any]) -> dict[str, Any] | None:
    """The config's EMA callback as the hand-written loop runs it: skipnets' ``EMA`` (``decay``
    per optimizer step) or Lightning's ``EMAWeightAveraging`` (``decay`` per update)."""
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        class_path = str(callback.get("class_path", "")) if isinstance(callback, dict) else ""
        kind = class_path.split(".")[-1]
        if kind not in ("EMA", "EMAWeightAveraging"):
            continue
        init = dict(callback.get("init_args") or {})
        try:
            parameters = inspect.signature(_resolve(class_path)).parameters.items()
            defaults = {k: p.default for k, p in parameters if p.default is not p.empty}
        except (ImportError, AttributeError, ValueError):
            defaults = {}
        settings = {**defaults, **init}
        if kind == "EMA":
            every = int(settings.get("every_n_steps", 1))
            per_update = float(settings.get("decay", 0.999)) ** every
        else:
            every = int(settings.get("update_every_n_steps", 1))
            per_update = float(settings.get("decay", 0.999))
        return {
            "class_path": class_path,
            "decay_per_update": per_update,
            "every_n_steps": every,
            "decay_power": float(settings.get("decay_power", 0.0)),
            "start_epoch": int(settings.get("start_epoch", 0)),
            "lookahead": bool(settings.get("lookahead", False)),
        }
    return None


# --- timing -----------------------------------------------------------------------------------


def now(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Timing:
    """Seconds of one run: each epoch (from its start to the next one's, or to the end of
    training), the training batches within each, and the whole ``fit``."""

    epochs: list[float]
    batches: list[float]
    steps_per_epoch: int
    fit_s: float | None = None
    whole_process_s: float | None = None
    # Host seconds from the first epoch's start to the end of each of its steps (no GPU sync:
    # where the first epoch's extra time goes, e.g. a slow first step or a slow epoch end).
    first_epoch_steps: list[float] | None = None
    # Which training steps ran from CUDA graphs (model.cuda_graphs), when they were on.
    graphs: str | None = None

    @property
    def first_epoch_s(self) -> float:
        return self.epochs[0]

    @property
    def steady_epoch_s(self) -> float | None:
        return statistics.median(self.epochs[1:]) if len(self.epochs) > 1 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "first_epoch_s": self.first_epoch_s,
            "steady_epoch_s": self.steady_epoch_s,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Timing:
        names = ("epochs", "batches", "steps_per_epoch", "fit_s", "whole_process_s")
        names += ("first_epoch_steps", "graphs")
        return cls(**{k: values.get(k) for k in names})


class EpochTimer(L.Callback):
    """Times each training epoch of a ``Trainer``, the GPU synchronised at epoch boundaries only.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: benchmarks.bench_gpu.EpochTimer
              init_args: {out: epochs.json}

    An epoch runs from its ``on_train_epoch_start`` to the next one's (the last, to
    ``on_train_end``), so validation, checkpoints and every epoch-end hook count; its batches end
    at its last ``on_train_batch_end``.

    Args:
        out: write the timings there as JSON at the end of training.
    """

    def __init__(self, out: str | None = None) -> None:
        self.out = out
        self.starts: list[float] = []
        self.last_batch_ends: list[float] = []
        self.end: float | None = None
        self.steps = 0
        self.first_epoch_steps: list[float] = []
        self.graphs: str | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.starts.append(now(pl_module.device))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if len(self.starts) == 1:
            self.first_epoch_steps.append(time.perf_counter() - self.starts[0])
        if trainer.is_last_batch:
            self.last_batch_ends.append(now(pl_module.device))
            self.steps = batch_idx + 1

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.end = now(pl_module.device)
        graph = getattr(pl_module, "training_graph", None)  # before the module drops it
        self.graphs = graph.summary() if graph is not None else None
        if self.out and trainer.is_global_zero:
            Path(self.out).write_text(json.dumps(self.timing().as_dict()))

    def timing(self) -> Timing:
        bounds = [*self.starts, self.end if self.end is not None else time.perf_counter()]
        return Timing(
            epochs=[b - a for a, b in pairwise(bounds)],
            batches=[b - a for a, b in zip(self.starts, self.last_batch_ends)],
            steps_per_epoch=self.steps,
            first_epoch_steps=self.first_epoch_steps,
            graphs=self.graphs,
        )


class StepProfiler(L.Callback):
    """``torch.profiler`` over a few steady training steps of one epoch; see :func:`profiled`."""

    def __init__(self, directory: Path, name: str, epoch: int, first: bool = False) -> None:
        self.directory, self.name, self.epoch, self.first = Path(directory), name, epoch, first
        self._profiler: Any = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self._profiler = profiled(
                self.directory,
                self.name,
                pl_module.device,
                trainer.num_training_batches,
                first=self.first,
            )
            self._profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        if self._profiler is not None:
            self._profiler.step()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self._profiler = None


def profiled(
    directory: Path, name: str, device: torch.device, steps: int, first: bool = False
) -> Any:
    """A ``torch.profiler.profile`` that skips the epoch's first steps, records a few after a
    warm-up, and writes ``DIR/<name>.trace.json`` (open it in Perfetto or chrome://tracing) and
    ``DIR/<name>.txt`` (the operators by total time). Call ``step()`` after every step.

    ``first``: the epoch's first two steps instead, Python's call stacks included, and a third
    table of the host's time by call stack: where a fresh process's first step goes."""
    from torch.profiler import ProfilerActivity, profile, schedule

    if first:
        wait, warmup, active = 0, 0, max(1, min(2, steps))
    else:
        wait = min(2, max(steps - 3, 0))
        warmup = min(2, max(steps - wait - 1, 0))
        active = max(1, min(5, steps - wait - warmup))
    directory.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # On a GPU the host's time per operator (the framework's share) and the device's both count.
    sorts = ["cpu_time_total"] + (["device_time_total"] if device.type == "cuda" else [])

    def write(prof: Any) -> None:
        prof.export_chrome_trace(str(directory / f"{name}.trace.json"))
        averages = prof.key_averages()
        steps_name = "first training steps" if first else "steady training steps"
        tables = [
            f"{name}: {active} {steps_name} on {device}, by {sort}\n\n"
            + averages.table(sort_by=sort, row_limit=40)
            for sort in sorts
        ]
        if first:
            tables.append(
                f"{name}: {active} {steps_name} on {device}, host time by call stack\n\n"
                + prof.key_averages(group_by_stack_n=8).table(
                    sort_by="self_cpu_time_total", row_limit=25
                )
            )
        (directory / f"{name}.txt").write_text("\n\n".join(tables))

    return profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=write,
        record_shapes=not first,
        with_stack=first,
    )


# --- the skipnets side ------------------------------------------------------------------------


def cli_args(
    recipe: Recipe, root: Path, run_dir: Path, device: torch.device, logger: bool, compile: bool
) -> list[str]:
    """``skipnets fit`` arguments: the recipe's config on these files, with the overrides."""
    args = [
        f"--config={recipe.config}",
        f"--data.init_args.root={root}",
        f"--trainer.default_root_dir={run_dir}",
        *recipe.cli_overrides,
    ]
    if device.type == "cpu":
        args.append("--trainer.accelerator=cpu")
    elif device.index is not None:
        args.append(f"--trainer.devices=[{device.index}]")
    if not logger:
        args.append("--trainer.logger=false")
    if compile:
        args.append("--model.compile=true")
    if recipe.cuda_graphs and (compile or device.type != "cuda"):
        args.append("--model.cuda_graphs=false")  # as the loop: graphs need CUDA, not compile
    return args


def skipnets_fit(
    recipe: Recipe,
    root: Path,
    device: torch.device,
    *,
    logger: bool,
    compile: bool = False,
    profile: Path | None = None,
    epochs: int | None = None,
) -> Timing:
    """``skipnets fit`` in this process (``SkipnetsCLI``, as the command builds it), timed."""
    from skipnets.lightning_cli import SkipnetsCLI

    with tempfile.TemporaryDirectory() as run_dir:
        args = cli_args(recipe, root, Path(run_dir), device, logger, compile)
        if epochs is not None:
            args.append(f"--trainer.max_epochs={epochs}")
        cli = SkipnetsCLI(args=args, run=False)
        timer = EpochTimer()
        cli.trainer.callbacks.append(timer)
        if profile is not None:
            epoch = min(1, (epochs or recipe.epochs) - 1)  # the second epoch: steady steps
            cli.trainer.callbacks.append(StepProfiler(profile, "skipnets_fit", epoch))
        start = now(device)
        try:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        finally:
            _finish_wandb()
        fit_s = now(device) - start
    timing = timer.timing()
    timing.fit_s = fit_s
    return timing


def _finish_wandb() -> None:
    # One W&B run per fit, as `skipnets fit` ends its own.
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


# --- the hand-written side --------------------------------------------------------------------


def hand_written(
    recipe: Recipe,
    root: Path,
    device: torch.device,
    *,
    compile: bool = False,
    test: bool = False,
    profile: Path | None = None,
    epochs: int | None = None,
    validate: bool = False,
    profile_first: Path | None = None,
) -> Timing:
    """The recipe as a plain PyTorch loop over the same network, data path and settings
    (``validate``: also at the end of the last epoch, whatever the config says)."""
    from skipnets.data.gpu import DeviceLoader, augment
    from skipnets.data.vision import CIFAR10
    from skipnets.registry import create_model

    epochs = recipe.epochs if epochs is None else epochs
    torch.manual_seed(recipe.seed)
    torch.backends.cudnn.benchmark = recipe.cudnn_benchmark
    start = now(device)

    images, labels = read_cifar10(root, train=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(recipe.data_seed))
    train_index, val_index = order[recipe.val_size :], order[: recipe.val_size]
    mean = torch.tensor(CIFAR10.mean, device=device)
    std = torch.tensor(CIFAR10.std, device=device)
    train_loader = DeviceLoader(
        images[train_index].to(device),
        labels[train_index].to(device),
        recipe.batch_size,
        shuffle=True,
        transform=partial(
            augment,
            crop_padding=recipe.crop_padding,
            padding_mode=recipe.padding_mode,
            flip=recipe.flip,
            cutout=recipe.cutout,
            mean=mean,
            std=std,
        ),
        seed=recipe.data_seed,
        drop_last=recipe.drop_last,
    )

    def eval_loader(images: torch.Tensor, labels: torch.Tensor) -> DeviceLoader:
        return DeviceLoader(
            images.to(device),
            labels.to(device),
            recipe.eval_batch_size,
            shuffle=False,
            transform=partial(augment, mean=mean, std=std),
        )

    val_loader = eval_loader(images[val_index], labels[val_index])

    model = create_model(recipe.arch, num_classes=10, in_channels=3, **recipe.arch_kwargs)
    model.to(device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = _resolve(recipe.optimizer["class_path"])(
        model.parameters(), **(recipe.optimizer.get("init_args") or {})
    )
    # The run's length as configured: a shorter warm-up or profiling run is its first epochs.
    total_steps = recipe.epochs * len(train_loader)
    scheduler = None
    if recipe.scheduler:
        init = dict(recipe.scheduler.get("init_args") or {})
        scheduler_class = _resolve(recipe.scheduler["class_path"])
        # The run's length, as the Classifier fills it in (OneCycleLR, LinearWarmupDecayLR).
        lengths = ("total_steps", "epochs", "steps_per_epoch")
        if "total_steps" in inspect.signature(scheduler_class).parameters and not any(
            init.get(k) for k in lengths
        ):
            init["total_steps"] = total_steps if recipe.scheduler_per_step else recipe.epochs
        scheduler = scheduler_class(optimizer, **init)
    ema = HandEMA(model, recipe.ema, total_steps) if recipe.ema else None
    if compile:
        model.compile()
    # model.cuda_graphs: recorded at the first batch, as the Classifier does (CUDA, uncompiled).
    graphs = recipe.cuda_graphs and device.type == "cuda" and not compile
    train_forward: Callable[[torch.Tensor], torch.Tensor] | None = None if graphs else model
    # make_graphed_callables takes autocast without its weight cache (Lightning's setting).
    autocast = _autocast(recipe.precision, device, cache=not graphs)
    evaluated = ema.average if ema is not None else model

    epoch_times, batch_times, first_epoch_steps = [], [], []
    step = 0
    for epoch in range(epochs):
        epoch_start = now(device)
        profiler = None
        if profile is not None and epoch == min(1, epochs - 1):
            profiler = profiled(profile, "hand_written", device, len(train_loader))
        elif profile_first is not None and epoch == 0:
            name = "hand_written_first_steps"
            profiler = profiled(profile_first, name, device, len(train_loader), first=True)
        train_loader.sampler.set_epoch(epoch)
        model.train()
        with profiler or nullcontext():
            for x, y in train_loader:
                if recipe.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    if train_forward is None:
                        train_forward = GraphedForward(model, x)
                    logits = train_forward(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler is not None and recipe.scheduler_per_step:
                    scheduler.step()
                step += 1
                if epoch == 0:
                    first_epoch_steps.append(time.perf_counter() - epoch_start)
                if ema is not None:
                    ema.step(step, epoch)
                if profiler is not None:
                    profiler.step()
        batch_times.append(now(device) - epoch_start)
        if ema is not None:
            ema.epoch_end()
        if scheduler is not None and not recipe.scheduler_per_step:
            scheduler.step()
        if (epoch + 1) % recipe.val_every == 0 or (validate and epoch + 1 == epochs):
            accuracy(evaluated, val_loader, autocast, recipe.channels_last)
        epoch_times.append(now(device) - epoch_start)
    fit_s = now(device) - start
    if test:
        accuracy(
            evaluated, eval_loader(*read_cifar10(root, train=False)), autocast, recipe.channels_last
        )
    return Timing(
        epoch_times,
        batch_times,
        len(train_loader),
        fit_s=fit_s,
        first_epoch_steps=first_epoch_steps,
        graphs=train_forward.summary() if isinstance(train_forward, GraphedForward) else None,
    )


class HandEMA:
    """The recipe's EMA, written out: every ``every_n_steps`` steps the average of the
    floating-point parameters and buffers (batch-norm statistics) lerps towards the weights on
    the device, without a host sync (the first update copies them). With ``lookahead`` the
    weights then continue from the average, and again at each epoch's end (airbench)."""

    def __init__(self, model: torch.nn.Module, settings: dict[str, Any], total_steps: int) -> None:
        self.average = copy.deepcopy(model)  # evaluated in the model's place
        pairs = zip(self._floats(self.average), self._floats(model))
        self.averaged, self.current = map(list, zip(*pairs))
        self.settings, self.total_steps = settings, total_steps
        self.started = False

    @staticmethod
    def _floats(module: torch.nn.Module) -> list[torch.Tensor]:
        tensors = (*module.parameters(), *module.buffers())
        return [t.detach() for t in tensors if t.is_floating_point()]

    @torch.no_grad()
    def step(self, step: int, epoch: int) -> None:
        settings = self.settings
        if step % settings["every_n_steps"] or epoch < settings["start_epoch"]:
            return
        if not self.started:
            torch._foreach_copy_(self.averaged, self.current)
            self.started = True
            return
        rho = settings["decay_per_update"]
        if settings["decay_power"] > 0:
            rho *= min(step / self.total_steps, 1.0) ** settings["decay_power"]
        torch._foreach_lerp_(self.averaged, self.current, 1.0 - rho)
        if settings["lookahead"]:
            torch._foreach_copy_(self.current, self.averaged)

    @torch.no_grad()
    def epoch_end(self) -> None:
        if self.settings["lookahead"] and self.started:
            torch._foreach_copy_(self.current, self.averaged)


class GraphedForward:
    """``model``'s training forward and backward as CUDA graphs recorded on the batch ``x``
    (``torch.cuda.make_graphed_callables``), with the running statistics its warm-up passes
    moved put back and the recorded pass's autograd graph let go, as ``skipnets.graphs`` does; a
    batch of another shape runs the model's own forward."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor) -> None:
        self.eager = model.forward
        buffers = list(model.buffers())
        saved = [b.detach().clone() for b in buffers]
        self.sample = x.detach().clone()
        self.graphed = torch.cuda.make_graphed_callables(
            model, (self.sample,), allow_unused_input=True
        )
        release_recording(self.graphed)  # as the Classifier does: no stream waits per parameter
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
        self.replays = self.others = 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.shape == self.sample.shape:
            self.replays += 1
            return self.graphed(batch)
        self.others += 1
        return self.eager(batch)

    def summary(self) -> str:
        return f"{self.replays:,} training steps ran from CUDA graphs, {self.others:,} without"


def _autocast(precision: str, device: torch.device, cache: bool = True) -> Callable[[], Any]:
    if precision in ("bf16-mixed", "bf16"):
        return partial(torch.autocast, device.type, dtype=torch.bfloat16, cache_enabled=cache)
    if precision in ("32", "32-true"):
        return nullcontext
    raise ValueError(
        f"the hand-written loop runs bf16-mixed or 32-bit precision, not {precision!r}"
    )


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, loader: Any, autocast: Callable[[], Any], channels_last: bool
) -> float:
    """Top-1 accuracy over ``loader``, counted on the device and read once at the end."""
    was_training = model.training
    model.eval()
    correct = None
    for x, y in loader:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            hits = (model(x).argmax(dim=1) == y).sum()
        correct = hits if correct is None else correct + hits
    model.train(was_training)
    return float(correct) / len(loader.labels) if correct is not None else 0.0


# --- fresh processes --------------------------------------------------------------------------


def _environment() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_MODE", "offline")  # a benchmark uploads nothing
    env.setdefault("WANDB_SILENT", "true")
    return env


def _run_process(command: list[str], out: Path, log: Path) -> Timing:
    start = time.perf_counter()
    with log.open("w") as output:
        done = subprocess.run(
            command, cwd=REPO, env=_environment(), stdout=output, stderr=subprocess.STDOUT
        )
    whole = time.perf_counter() - start
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join(log.read_text().strip().splitlines()[-15:])
        raise RuntimeError(
            f"{' '.join(command[:4])} ... failed (status {done.returncode}):\n{tail}"
        )
    timing = Timing.from_dict(json.loads(out.read_text()))
    timing.whole_process_s = whole
    return timing


def skipnets_process(
    recipe: Recipe,
    root: Path,
    device: torch.device,
    logger: bool,
    work: Path,
    profile_first: Path | None = None,
) -> Timing:
    """``skipnets fit`` as a command, from launch to exit (test after fit included);
    ``profile_first``: profile its first steps into that folder (the timings then include
    the profiler's cost)."""
    tag = "_profiled" if profile_first else ""
    out = work / f"skipnets_process{tag}.json"
    timer = {"class_path": "benchmarks.bench_gpu.EpochTimer", "init_args": {"out": str(out)}}
    command = [
        sys.executable,
        "-m",
        "skipnets",
        "fit",
        *cli_args(recipe, root, work / f"skipnets_run{tag}", device, logger, compile=False),
        f"--trainer.callbacks+={json.dumps(timer)}",
    ]
    if profile_first:
        profiler = {
            "class_path": "benchmarks.bench_gpu.StepProfiler",
            "init_args": {
                "directory": str(profile_first),
                "name": "skipnets_fit_first_steps",
                "epoch": 0,
                "first": True,
            },
        }
        command.append(f"--trainer.callbacks+={json.dumps(profiler)}")
    return _run_process(command, out, work / f"skipnets_process{tag}.log")


def hand_written_process(
    options: argparse.Namespace,
    root: Path,
    work: Path,
    profile_first: Path | None = None,
    tag: str = "",
) -> Timing:
    """The hand-written loop as a command (this module's ``--child``), from launch to exit;
    ``profile_first`` as for :func:`skipnets_process`."""
    tag = tag or ("_profiled" if profile_first else "")
    out = work / f"hand_written_process{tag}.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_gpu",
        "--child",
        str(out),
        "--data",
        str(root),
    ]
    command += _recipe_arguments(options)
    if profile_first:
        command += ["--profile-first-steps", str(profile_first)]
    return _run_process(command, out, work / f"hand_written_process{tag}.log")


def _recipe_arguments(options: argparse.Namespace) -> list[str]:
    args = ["--device", options.device, "--config", str(options.config)]
    for name in ("epochs", "batch_size", "width_divisor", "train_size", "precision"):
        if getattr(options, name) is not None:
            args += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    return args


def child(options: argparse.Namespace) -> int:
    """``--child OUT``: one hand-written run with a test evaluation, its timings to ``OUT``."""
    device = torch.device(options.device)
    _warm_up(device)
    recipe = _recipe(options, options.config)
    first = Path(options.profile_first_steps) if options.profile_first_steps else None
    timing = hand_written(recipe, Path(options.data), device, test=True, profile_first=first)
    Path(options.child).write_text(json.dumps(timing.as_dict()))
    return 0


def _warm_up(device: torch.device) -> None:
    # The CUDA context, which `skipnets fit` creates before its first epoch as well.
    if device.type == "cuda":
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)


# --- airbench ---------------------------------------------------------------------------------

AIRBENCH_SCRIPT = "import airbench; airbench.warmup94(); airbench.train94()"


def airbench_run(root: Path, work: Path) -> dict[str, Any]:
    """airbench94's own run (warm-up, then one timed run) on these files, in its own process:
    its files are ``cifar10/{train,test}.pt`` under its working directory, written here from
    the CIFAR-10 files. Per-epoch times come from its timer (training only)."""
    folder = work / "airbench" / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    classes = [f"class_{i}" for i in range(10)]
    train_images = 0
    for train, name in ((True, "train.pt"), (False, "test.pt")):
        images, labels = read_cifar10(root, train)
        train_images = len(labels) if train else train_images
        torch.save(
            {
                "images": images.permute(0, 2, 3, 1).contiguous(),
                "labels": labels,
                "classes": classes,
            },
            folder / name,
        )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", AIRBENCH_SCRIPT],
        cwd=folder.parent,
        env=_environment(),
        capture_output=True,
        text=True,
    )
    whole = time.perf_counter() - start
    (work / "airbench.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"airbench failed:\n{done.stderr[-2000:]}")
    totals = _airbench_totals(done.stdout)
    epochs = [b - a for a, b in pairwise([0.0, *totals["epochs"]])]
    return {
        "version": _version("airbench"),
        "epochs": epochs,
        "steady_epoch_s": statistics.median(epochs[1:-1] or epochs[1:])
        if len(epochs) > 1
        else None,
        "total_s": totals["total"],
        "whole_process_s": whole,
        "train_images": train_images,  # all of them: airbench holds none out
        "tta_val_acc": totals.get("tta_val_acc"),
    }


def _airbench_totals(stdout: str) -> dict[str, Any]:
    """The cumulative ``total_time_seconds`` column of airbench's table, per epoch and final."""
    epochs, total, tta = [], None, None
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not cells[6]:
            continue
        try:
            seconds = float(cells[6])
        except ValueError:
            continue  # the header
        if cells[1].isdigit():
            epochs.append(seconds)
        elif cells[1] == "eval":
            total, tta = seconds, float(cells[5]) if cells[5] else None
    if not epochs:
        raise RuntimeError("airbench printed no timed epochs")
    return {
        "epochs": epochs,
        "total": total if total is not None else epochs[-1],
        "tta_val_acc": tta,
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --- the run ----------------------------------------------------------------------------------


def _recipe(options: argparse.Namespace, config: Path) -> Recipe:
    return Recipe.from_config(
        config,
        epochs=options.epochs,
        batch_size=options.batch_size,
        width_divisor=options.width_divisor,
        train_size=options.train_size,
        precision=options.precision,
    )


@contextmanager
def _data(options: argparse.Namespace) -> Iterator[Path]:
    if options.data:
        yield Path(options.data)
        return
    with tempfile.TemporaryDirectory(prefix="bench_gpu_cifar10_") as root:
        train = options.train_size or CIFAR10_TRAIN_SIZE
        test = options.test_size or (
            CIFAR10_TEST_SIZE if train == CIFAR10_TRAIN_SIZE else max(train // 5, 1)
        )
        _log(f"writing {train:,} + {test:,} random images in CIFAR-10's format ...")
        yield write_cifar10(Path(root), train, test)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(options: argparse.Namespace) -> dict[str, Any]:
    """Every measurement the options ask for; returns the report (see :func:`report_lines`).
    With ``--json``, the report so far is written after each part, so that a run stopped by a
    time limit still leaves what it measured."""
    device = torch.device(options.device)

    def save(report: dict[str, Any]) -> dict[str, Any]:
        report["targets"] = targets(report)
        if options.json:
            Path(options.json).write_text(json.dumps(report, indent=2))
        return report

    logger = options.logger == "config"
    logger_note = "as configured (W&B, offline)"
    if logger and importlib.util.find_spec("wandb") is None:
        logger, logger_note = False, "none (wandb is not installed)"
    elif not logger:
        logger_note = "none"
    if logger:
        os.environ.setdefault("WANDB_MODE", "offline")  # a benchmark uploads nothing
        os.environ.setdefault("WANDB_SILENT", "true")
    recipe = _recipe(options, options.config)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": str(
            recipe.config.relative_to(REPO) if recipe.config.is_relative_to(REPO) else recipe.config
        ),
        "data": options.data or "random images in CIFAR-10's format (accuracies mean nothing)",
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "logger": logger_note,
        "ema": recipe.ema,
        "hand_written_ignores": recipe.ignored,
    }
    _warm_up(device)
    with _data(options) as root, tempfile.TemporaryDirectory(prefix="bench_gpu_") as work_dir:
        work = Path(work_dir)
        if not options.no_process:
            # The first CUDA process on a machine reads cuDNN's and cuBLAS's libraries (over a
            # gigabyte) from disk, and every later one from the page cache: an untimed run first,
            # so that neither side's first epoch pays for having gone first.
            _log("fresh processes: an untimed warm-up (the hand-written loop) ...")
            warm = hand_written_process(options, root, work, tag="_warm_up")
            report["warm_up_process"] = {
                "first_epoch_s": warm.first_epoch_s,
                "first_step_s": warm.first_epoch_steps[0] if warm.first_epoch_steps else None,
                "whole_process_s": warm.whole_process_s,
            }
            _log("fresh processes: skipnets fit ...")
            report["skipnets_process"] = skipnets_process(
                recipe, root, device, logger, work
            ).as_dict()
            _log("fresh processes: hand-written loop ...")
            report["hand_written_process"] = hand_written_process(options, root, work).as_dict()
            save(report)
        if options.profile_first_steps and not options.no_process:
            first = Path(options.profile_first_steps)
            _log(f"fresh processes again, their first steps profiled into {first} ...")
            skipnets_process(recipe, root, device, logger, work, profile_first=first)
            hand_written_process(options, root, work, profile_first=first)
            report["profile_first_steps"] = sorted(str(p) for p in first.iterdir())
            save(report)
        # cuDNN's autotuning and CUDA's kernel loading, once for the whole process, so that
        # the one-process first epochs differ by what each side does, not by which ran first.
        _log("one process: warm-up (one epoch of the hand-written loop, and validation) ...")
        hand_written(recipe, root, device, epochs=1, validate=True)
        skipnets_runs, hand_runs = [], []
        for round_ in range(options.repeats):
            sides = [("skipnets fit", skipnets_runs), ("hand-written loop", hand_runs)]
            for name, runs in sides if round_ % 2 == 0 else reversed(sides):
                _log(f"one process, round {round_ + 1}: {name} ...")
                if runs is skipnets_runs:
                    runs.append(skipnets_fit(recipe, root, device, logger=logger))
                else:
                    runs.append(hand_written(recipe, root, device))
        report["skipnets"] = _combine(skipnets_runs)
        report["hand_written"] = _combine(hand_runs)
        save(report)
        if options.profile:
            profile = Path(options.profile)
            epochs = min(recipe.epochs, 2)
            _log(f"profiling {epochs} epochs of each side into {profile} ...")
            skipnets_fit(recipe, root, device, logger=False, profile=profile, epochs=epochs)
            hand_written(recipe, root, device, profile=profile, epochs=epochs)
            report["profile"] = sorted(str(p) for p in profile.iterdir())
            save(report)
        if not options.no_airbench:
            report["airbench"] = _airbench_section(options, root, device, logger, work)
            save(report)
        # Last: compiling takes minutes, and the rest of the report is written by then.
        if options.compile:
            _log("one process, compiled: skipnets fit, then the hand-written loop ...")
            report["compiled"] = {
                "skipnets": skipnets_fit(
                    recipe, root, device, logger=logger, compile=True
                ).as_dict(),
                "hand_written": hand_written(recipe, root, device, compile=True).as_dict(),
            }
    return save(report)


def _combine(runs: list[Timing]) -> dict[str, Any]:
    """The runs of one side: each run's figures, and the median steady epoch over all runs."""
    steady = [e for run in runs for e in run.epochs[1:]]
    # Each epoch's time after its last batch: validation, checkpoints, epoch-end hooks.
    ends = [e - b for run in runs for e, b in zip(run.epochs[1:], run.batches[1:])]
    return {
        "runs": [run.as_dict() for run in runs],
        "steady_epoch_s": statistics.median(steady) if steady else None,
        "epoch_end_s": statistics.median(ends) if ends else None,
        "first_epoch_s": statistics.median(run.first_epoch_s for run in runs),
        "fit_s": statistics.median(run.fit_s for run in runs),
        "steps_per_epoch": runs[0].steps_per_epoch,
        "graphs": runs[-1].graphs,
    }


def _airbench_section(
    options: argparse.Namespace, root: Path, device: torch.device, logger: bool, work: Path
) -> dict[str, Any]:
    section: dict[str, Any] = {}
    installed = importlib.util.find_spec("airbench") is not None
    if not installed:
        section["note"] = "the airbench package is not installed: its own timing was not run"
    elif device.type != "cuda":
        section["note"] = "airbench runs on CUDA only: its own timing was not run"
    else:
        _log("airbench94, its own run ...")
        try:
            section["own"] = airbench_run(root, work)
        except Exception as err:  # reported, and the rest of the report stands
            section["own_failed"] = f"{type(err).__name__}: {err}"
    if AIRBENCH_CONFIG.is_file():
        _log(f"{AIRBENCH_CONFIG.name} through skipnets fit ...")
        try:
            recipe = _recipe(options, AIRBENCH_CONFIG)
            ours = skipnets_fit(recipe, root, device, logger=logger).as_dict()
            ours["train_images"] = len(read_cifar10(root, train=True)[1]) - recipe.val_size
            section["skipnets"] = ours
        except Exception as err:
            section["skipnets_failed"] = f"{type(err).__name__}: {str(err)[:1000]}"
    else:
        section.setdefault("note", "")
        section["note"] += f"; {AIRBENCH_CONFIG.relative_to(REPO)} does not exist yet"
    return section


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 11 with its measured value and PASS/FAIL (``None``: not measured)."""
    results = []

    def check(
        name: str, value: float | None, target: str, passed: bool | None, note: str = ""
    ) -> None:
        results.append(
            {"name": name, "value": value, "target": target, "pass": passed, "note": note}
        )

    # A report written part-way (``--json`` after each part) may lack the one-process runs yet.
    sk, hand = report.get("skipnets") or {}, report.get("hand_written") or {}
    ratio = (
        hand["steady_epoch_s"] / sk["steady_epoch_s"]
        if sk.get("steady_epoch_s") and hand.get("steady_epoch_s")
        else None
    )
    check(
        "steady epoch, hand-written / skipnets fit (one process)",
        ratio,
        f">= {STEADY_RATIO_TARGET}",
        None if ratio is None else ratio >= STEADY_RATIO_TARGET,
    )
    sk_process, hand_process = report.get("skipnets_process"), report.get("hand_written_process")
    if sk_process and hand_process:
        first = sk_process["first_epoch_s"] - hand_process["first_epoch_s"]
        whole = sk_process["whole_process_s"] - hand_process["whole_process_s"]
        check(
            "first epoch, skipnets fit over hand-written (fresh processes)",
            first,
            f"<= +{FIRST_EPOCH_SLACK_S:g} s",
            first <= FIRST_EPOCH_SLACK_S,
        )
        check(
            "whole process, skipnets fit over hand-written",
            whole,
            f"<= +{WHOLE_PROCESS_SLACK_S:g} s",
            whole <= WHOLE_PROCESS_SLACK_S,
        )
    elif sk and hand:
        first = sk["first_epoch_s"] - hand["first_epoch_s"]
        check(
            "first epoch, skipnets fit over hand-written (one process)",
            first,
            f"<= +{FIRST_EPOCH_SLACK_S:g} s",
            None,
            "fresh processes not run (--no-process): no target",
        )
    airbench = report.get("airbench") or {}
    own, ours = airbench.get("own"), airbench.get("skipnets")
    if own and ours and own.get("steady_epoch_s") and ours.get("steady_epoch_s"):
        ratio = own["steady_epoch_s"] / ours["steady_epoch_s"]
        # The config holds images out for validation, airbench does not: per image too.
        per_image = ratio * ours["train_images"] / own["train_images"]
        check(
            "airbench94 epoch, airbench's own / skipnets fit",
            ratio,
            f">= {AIRBENCH_RATIO_TARGET}",
            ratio >= AIRBENCH_RATIO_TARGET,
            f"per training image: {per_image:.3f}",
        )
    return results


# --- the report -------------------------------------------------------------------------------


def _s(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f} s" if signed else f"{value:.3f} s"


def _first_epoch_part(timing: dict[str, Any], start: int | None, stop: int) -> float | None:
    steps = timing.get("first_epoch_steps") or []
    if len(steps) < 6:
        return None
    return steps[stop] - (steps[start] if start is not None else 0.0)


def _after_last_step(timing: dict[str, Any]) -> float | None:
    steps = timing.get("first_epoch_steps") or []
    return timing["first_epoch_s"] - steps[-1] if steps else None


def report_lines(report: dict[str, Any]) -> list[str]:
    sk, hand = report["skipnets"], report["hand_written"]
    sk_process, hand_process = (
        report.get("skipnets_process") or {},
        report.get("hand_written_process") or {},
    )
    lines = [
        f"GPU framework tax: {report['config']} on {report['device']} (torch {report['torch']}), "
        f"{report['epochs']} epochs of {sk['steps_per_epoch']} steps (batch {report['batch_size']}), "
        f"logger: {report['logger']}",
        f"data: {report['data']}",
    ]
    if report.get("hand_written_ignores"):
        lines.append(f"the hand-written loop ignores: {', '.join(report['hand_written_ignores'])}")
    for name, side in (("skipnets fit", sk), ("hand-written", hand)):
        if side.get("graphs"):
            lines.append(f"CUDA graphs, {name} (one process): {side['graphs']}")
    rows = [
        (
            "steady epoch (median after the first, one process)",
            sk["steady_epoch_s"],
            hand["steady_epoch_s"],
        ),
        ("  of which after the last batch (median)", sk["epoch_end_s"], hand["epoch_end_s"]),
        ("first epoch (one process)", sk["first_epoch_s"], hand["first_epoch_s"]),
        ("fit (one process)", sk["fit_s"], hand["fit_s"]),
        (
            "first epoch (fresh process)",
            sk_process.get("first_epoch_s"),
            hand_process.get("first_epoch_s"),
        ),
        (
            "steady epoch (fresh process)",
            sk_process.get("steady_epoch_s"),
            hand_process.get("steady_epoch_s"),
        ),
        ("whole process", sk_process.get("whole_process_s"), hand_process.get("whole_process_s")),
    ]
    # Where a fresh process's first epoch goes: its first step, the next four, the rest of the
    # steps, and the time after the last step (host clock, no GPU sync inside the epoch).
    for part, (start, stop) in {
        "first step": (None, 0),
        "steps 2-5": (0, 4),
        "remaining steps": (4, -1),
    }.items():
        rows.append(
            (
                f"  fresh first epoch: {part}",
                _first_epoch_part(sk_process, start, stop),
                _first_epoch_part(hand_process, start, stop),
            )
        )
    rows.append(
        (
            "  fresh first epoch: after the last step",
            _after_last_step(sk_process),
            _after_last_step(hand_process),
        )
    )
    compiled = report.get("compiled")
    if compiled:
        rows += [
            (
                "steady epoch, compiled",
                compiled["skipnets"]["steady_epoch_s"],
                compiled["hand_written"]["steady_epoch_s"],
            ),
            (
                "first epoch, compiled",
                compiled["skipnets"]["first_epoch_s"],
                compiled["hand_written"]["first_epoch_s"],
            ),
        ]
    width = max(len(r[0]) for r in rows)
    lines.append(f"{'':{width}}  {'skipnets fit':>12}  {'hand-written':>12}  {'difference':>11}")
    for label, a, b in rows:
        difference = a - b if a is not None and b is not None else None
        lines.append(f"{label:{width}}  {_s(a):>12}  {_s(b):>12}  {_s(difference, True):>11}")
    warm = report.get("warm_up_process")
    if warm:
        lines.append(
            f"untimed warm-up process (hand-written loop): first step "
            f"{_s(warm['first_step_s'])}, first epoch {_s(warm['first_epoch_s'])}, whole process "
            f"{_s(warm['whole_process_s'])}"
        )
    airbench = report.get("airbench") or {}
    if airbench.get("own"):
        own = airbench["own"]
        lines.append(
            f"airbench94 {own['version']} (its own timer): steady epoch {_s(own['steady_epoch_s'])}, "
            f"whole run {_s(own['total_s'])}, process {_s(own['whole_process_s'])}"
        )
    if airbench.get("skipnets"):
        ours = airbench["skipnets"]
        lines.append(
            f"{AIRBENCH_CONFIG.name} through skipnets fit: steady epoch {_s(ours['steady_epoch_s'])}, "
            f"first epoch {_s(ours['first_epoch_s'])}, fit {_s(ours['fit_s'])}"
        )
    for key in ("note", "own_failed", "skipnets_failed"):
        if airbench.get(key):
            lines.append(f"airbench ({key.replace('_', ' ')}): {airbench[key].strip('; ')}")
    for target in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[target["pass"]]
        value = target["value"]
        shown = (
            "-"
            if value is None
            else (f"{value:+.3f} s" if target["target"].endswith(" s") else f"{value:.3f}")
        )
        note = f" ({target['note']})" if target["note"] else ""
        lines.append(f"{verdict}  {target['name']}: {shown} (target {target['target']}){note}")
    if report.get("profile"):
        lines.append("profiles: " + ", ".join(report["profile"]))
    if report.get("profile_first_steps"):
        lines.append("first-step profiles: " + ", ".join(report["profile_first_steps"]))
    return lines


def rows(report: dict[str, Any]) -> list[Row]:
    """The report as rows of ``python -m benchmarks``' table."""
    sk, hand = report["skipnets"], report["hand_written"]
    name = f"{report['config']} ({report['device']}, batch {report['batch_size']})"
    verdicts = {t["name"].split(",")[0]: t for t in report["targets"]}

    def note(key: str) -> str:
        target = verdicts.get(key)
        if target is None or target["pass"] is None:
            return ""
        return "PASS" if target["pass"] else "FAIL"

    out = []
    if sk["steady_epoch_s"] and hand["steady_epoch_s"]:
        out.append(
            Row(
                f"skipnets fit steady epoch, {name}",
                "epochs/s",
                1 / sk["steady_epoch_s"],
                "hand-written loop",
                1 / hand["steady_epoch_s"],
                f">= {STEADY_RATIO_TARGET}",
                note("steady epoch"),
            )
        )
    sk_process, hand_process = report.get("skipnets_process"), report.get("hand_written_process")
    if sk_process and hand_process:
        for key, label, slack in (
            ("first_epoch_s", "first epoch", FIRST_EPOCH_SLACK_S),
            ("whole_process_s", "whole process", WHOLE_PROCESS_SLACK_S),
        ):
            out.append(
                Row(
                    f"skipnets fit {label} (fresh process), {name}",
                    "s",
                    sk_process[key],
                    "hand-written loop",
                    hand_process[key],
                    f"<= +{slack:g} s over",
                    f"{sk_process[key] - hand_process[key]:+.2f} s {note(label)}".strip(),
                    lower_is_better=True,
                )
            )
    airbench = report.get("airbench") or {}
    own, ours = airbench.get("own") or {}, airbench.get("skipnets") or {}
    if own.get("steady_epoch_s") and ours.get("steady_epoch_s"):
        out.append(
            Row(
                f"skipnets fit steady epoch, {AIRBENCH_CONFIG.name} ({report['device']})",
                "epochs/s",
                1 / ours["steady_epoch_s"],
                f"airbench {own['version']}, its own timer",
                1 / own["steady_epoch_s"],
                f">= {AIRBENCH_RATIO_TARGET}",
                note("airbench94 epoch"),
            )
        )
    return out


# --- entry points -----------------------------------------------------------------------------


def skip_reason(device: str) -> str | None:
    """Why the benchmark cannot run on ``device`` here, or ``None``."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return (
            "no CUDA device (torch.cuda.is_available() is false); it measures skipnets on a GPU. "
            "For a smoke run of its code on the CPU: python -m benchmarks.bench_gpu --device cpu "
            "--epochs 2 --train-size 1024 --batch-size 32 --width-divisor 16 --precision 32"
        )
    return None


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_gpu",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument(
        "--data", help="folder holding cifar-10-batches-py (default: random images)"
    )
    parser.add_argument("--config", type=Path, default=SPEEDRUN_CONFIG, help="the recipe's config")
    parser.add_argument(
        "--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run"
    )
    parser.add_argument("--epochs", type=int, help="epochs (default: the config's)")
    parser.add_argument(
        "--batch-size", type=int, help="training batch size (default: the config's)"
    )
    parser.add_argument(
        "--width-divisor",
        type=int,
        help="divide the networks' widths by this (a smoke run on the CPU; default: as configured)",
    )
    parser.add_argument("--precision", help="bf16-mixed or 32 (default: the config's)")
    parser.add_argument("--train-size", type=int, help="random training images (default 50,000)")
    parser.add_argument("--test-size", type=int, help="random test images (default 10,000)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of one-process runs (default 1)"
    )
    parser.add_argument("--compile", action="store_true", help="add compiled runs of both sides")
    parser.add_argument(
        "--profile", metavar="DIR", help="write torch.profiler traces and tables to DIR"
    )
    parser.add_argument(
        "--logger",
        choices=("config", "none"),
        default="config",
        help="skipnets fit's logger: the config's (W&B, offline; the default) or none",
    )
    parser.add_argument(
        "--profile-first-steps",
        metavar="DIR",
        help="run the fresh processes once more, their first two steps profiled (Python's call "
        "stacks included) into DIR; the figures come from the unprofiled runs",
    )
    parser.add_argument("--no-process", action="store_true", help="skip the fresh-process runs")
    parser.add_argument(
        "--no-airbench",
        action="store_true",
        help="skip airbench94 (its own run and its config through skipnets fit)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    options = parser().parse_args(argv)
    # (--child gets the --train-size of the random images it trains on, for their val_size.)
    if options.data and not options.child and (options.train_size or options.test_size):
        parser().error("--train-size and --test-size apply to random images, not to --data")
    options.config = options.config.resolve()
    if options.data:
        options.data = str(Path(options.data).resolve())
    if options.profile_first_steps:  # the child processes run in the repository's root
        options.profile_first_steps = str(Path(options.profile_first_steps).resolve())
    return options


def main(quick: bool = False, argv: list[str] | None = None) -> list[Row] | list[dict[str, Any]]:
    """``python -m benchmarks --only gpu``: the rows, or one "skipped" row without CUDA."""
    options = parse(argv or [])
    reason = skip_reason(options.device)
    if reason:
        return [{"benchmark": "gpu", "skipped": reason}]
    if quick:
        options.no_process, options.epochs = True, options.epochs or 3
    report = run(options)
    print("\n".join(report_lines(report)), file=sys.stderr)
    return rows(report)


def cli(argv: list[str] | None = None) -> int:
    options = parse(argv)
    if options.child:
        return child(options)
    reason = skip_reason(options.device)
    if reason:
        print(f"gpu benchmark skipped: {reason}")
        return 0
    report = run(options)
    print("\n".join(report_lines(report)))
    if options.json:
        Path(options.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
