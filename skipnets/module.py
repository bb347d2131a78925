"""LightningModules: ``Classifier`` trains any registered classifier by name."""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from skipnets.data.analysis import analysis_split, inputs_of
from skipnets.errors import ConfigError
from skipnets.graphs import TrainingGraph, pinning_conflict
from skipnets.progress import TimedProgressBar
from skipnets.registry import create_model, model_info

DEFAULT_OPTIMIZER = {
    "class_path": "torch.optim.SGD",
    "init_args": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
}

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)

TTA_MODES = ("none", "mirror", "mirror_translate")

#: Attributes set on every training step (Lightning sets ``_current_fx_name`` around each of its
#: hook calls, about fifty times a step): plain values, never parameters, buffers or modules, so
#: they skip ``nn.Module.__setattr__``'s checks for those, which cost ten times a plain setattr.
_STEP_ATTRIBUTES = frozenset({"_current_fx_name", "_train_loss_sum", "_train_loss_batches"})

#: Schedulers whose length the Classifier fills in from the run when the config leaves it out.
RUN_LENGTH_SCHEDULERS = ("OneCycleLR", "LinearWarmupDecayLR")


def build_model(
    arch: str,
    arch_kwargs: dict[str, Any] | None,
    num_classes: int | None,
    input_shape: tuple[int, ...] | None,
) -> nn.Module:
    """Create ``arch`` from the registry, filling in the classes and input size the data gives."""
    kwargs = dict(arch_kwargs or {})
    info = model_info(arch)
    if num_classes is not None and kwargs.setdefault("num_classes", num_classes) != num_classes:
        raise ConfigError(
            f"model.arch_kwargs.num_classes={kwargs['num_classes']} but the data has {num_classes} classes"
        )
    if input_shape is not None:
        if info.input_kind == "image":
            if len(input_shape) != 3:
                raise ConfigError(
                    f"{arch} takes images but the data gives vectors of shape {tuple(input_shape)}; "
                    "choose image data (for Digits: data.init_args.image_size)"
                )
            kwargs.setdefault("in_channels", input_shape[0])
        else:
            kwargs.setdefault("in_features", math.prod(input_shape))
    return create_model(arch, **kwargs)


def param_groups(model: nn.Module, weight_decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """One group, or two: the second holds norm weights and biases with ``weight_decay=0``."""
    if weight_decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if isinstance(module, _NORM_TYPES) or name == "bias" else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class Classifier(L.LightningModule):
    """Trains any registered classifier.

    .. code-block:: yaml

        model:
          arch: resnet56
          arch_kwargs: {shortcut: A}
          label_smoothing: 0.1
        optimizer:                  # LightningCLI's own entries, handed to this module
          class_path: torch.optim.SGD
          init_args: {lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 1e-4}
        lr_scheduler:
          class_path: torch.optim.lr_scheduler.MultiStepLR
          init_args: {milestones: [91, 136], gamma: 0.1}

    A network with auxiliary classifiers exposes ``aux_loss(targets)``, the auxiliary loss of
    its last forward; it is added to the training loss (GoogLeNet with ``aux_logits: true``).

    Logged: ``train/loss``, the mean training loss over the batches since it was last logged, on
    the steps the loggers write (every ``trainer.log_every_n_steps``), at the last batch of each
    epoch and at the last step of the run. The loss is summed on the device every step and
    handed to Lightning's ``self.log`` (a fraction of a millisecond per call) only on those
    steps; skipnets' progress bar reads it when it redraws, and nothing reads it on the other
    steps, which therefore never wait for the GPU. ``train/acc`` and ``train/acc_top5`` per
    epoch; ``val/...`` and ``test/...`` loss and accuracies per epoch.

    Args:
        arch: registered model name (``skipnets models`` lists them).
        arch_kwargs: keyword arguments of the model's builder.
        num_classes: number of classes; the CLI links it from the data module.
        input_shape: shape of one input; the CLI links it from the data module. Image models get
            ``in_channels`` from it, vector models ``in_features``.
        label_smoothing: cross-entropy label smoothing.
        weight_decay_norm_and_bias: when false, norm-layer weights and all biases get no
            weight decay.
        optimizer: ``{class_path, init_args}`` of a ``torch.optim`` optimizer (default: SGD,
            lr 0.1, Nesterov momentum 0.9, weight decay 5e-4).
        lr_scheduler: ``{class_path, init_args}`` of a learning-rate scheduler, stepped each
            epoch or each step (``lr_scheduler_interval``). ``ReduceLROnPlateau`` watches
            ``val/loss`` (per epoch only). ``OneCycleLR`` without ``total_steps`` (nor
            ``epochs``/``steps_per_epoch``) gets the run's length: its optimizer steps
            (``trainer.estimated_stepping_batches``) or its ``trainer.max_epochs``; so does
            ``skipnets.schedulers.LinearWarmupDecayLR`` without ``total_steps``.
        channels_last: keep image models' weights and inputs in channels-last (NHWC) memory
            layout, which tensor-core GPUs run faster (with mixed precision in particular).
        compile: ``torch.compile`` the network: ``true``, or a dict of ``torch.compile``'s
            keyword arguments (``{mode: max-autotune}``). The network is compiled in place, so
            checkpoints keep their keys and plugins' observers on skip blocks still run (traced
            into the compiled code; attaching or removing one recompiles once).
        lr_scheduler_interval: ``epoch`` (the papers' step schedules) or ``step`` (one-cycle,
            warm-up and other per-batch schedules).
        tta: test-time augmentation in validation, test and predict (Jordan 2024, airbench):
            ``none``; ``mirror``, the mean of the logits of the image and of its mirror image;
            ``mirror_translate``, half that and half the mean of the same for the image
            translated by one pixel up-left and down-right (reflect padding): six forward
            passes per image. Image models only.
        norm_bias_lr_scale: the biases of normalisation layers train at this multiple of the
            learning rate (airbench: 64), with their weight decay divided by it, so that the
            decay per step stays what it is for the other weights.
        decoupled_per_examples: airbench's decoupled hyperparameters (after Page 2018): when
            set to N (airbench: 1024), the SGD optimizer's ``lr`` and ``weight_decay`` are given
            per N training examples and the optimizer runs with ``lr * B / (N * (1 + 1 / (1 -
            momentum)))`` and ``weight_decay / lr``, where B is the examples per optimizer step
            (the data module's ``batch_size`` x devices x gradient accumulation). The step size
            then follows ``lr`` alone whatever the batch size and momentum (airbench's
            normalisation, written for Nesterov momentum), and the decay per step follows
            ``weight_decay`` alone whatever ``lr``. SGD only.
        cuda_graphs: run the network's training forward and backward passes from CUDA graphs
            (``torch.cuda.make_graphed_callables``), recorded at the first training step: one
            launch per pass instead of one per kernel, so that a small network's step is no
            longer paced by the host (``skipnets.graphs``). The same computation as without; steps a
            graph cannot repeat (another batch shape, a plugin observing or altering skip
            blocks, stochastic depth, replaced parameters or buffers, gradient accumulation)
            run the network as usual. On one CUDA device; elsewhere (CPU, DDP) a warning says
            it is off. Not with ``compile``.

    Networks that initialise themselves from data (airbench's whitening layer) expose
    ``init_from_data(images)`` and ``init_data_size``: at the start of ``fit`` (not when resuming
    from a checkpoint) they get the first ``init_data_size`` training images, without training
    augmentation, on their device; every rank gets the same ones. Networks that train some
    parameters for the first epochs only expose ``parameter_epochs`` (``{name: epochs}``):
    from that epoch on the optimizer skips them (on one device, uncompiled and without CUDA
    graphs, they stop requiring gradients, which also saves their backward pass; otherwise their
    gradient is dropped before the optimizer step).
    """

    def __init__(
        self,
        arch: str = "resnet20",
        arch_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        input_shape: tuple[int, ...] | None = None,
        label_smoothing: float = 0.0,
        weight_decay_norm_and_bias: bool = True,
        optimizer: dict[str, Any] | None = None,
        lr_scheduler: dict[str, Any] | None = None,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
        lr_scheduler_interval: Literal["epoch", "step"] = "epoch",
        tta: Literal["none", "mirror", "mirror_translate"] = "none",
        norm_bias_lr_scale: float = 1.0,
        decoupled_per_examples: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ConfigError(
                f"model.lr_scheduler_interval must be 'epoch' or 'step', not {lr_scheduler_interval!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if channels_last and model_info(arch).input_kind != "image":
            raise ConfigError(f"model.channels_last applies to image models; {arch} takes vectors")
        if tta not in TTA_MODES:
            raise ConfigError(f"model.tta must be one of {', '.join(TTA_MODES)}, not {tta!r}")
        if tta != "none" and model_info(arch).input_kind != "image":
            raise ConfigError(f"model.tta mirrors and shifts images; {arch} takes vectors")
        _check_decoupled(optimizer, lr_scheduler, norm_bias_lr_scale, decoupled_per_examples)
        compile_options = _compile_options(compile)
        if cuda_graphs and compile_options is not None:
            raise ConfigError(
                "model.cuda_graphs and model.compile both replace how the network runs: choose "
                "one (torch.compile's own graphs: model.compile: {mode: reduce-overhead})"
            )
        self.save_hyperparameters(
            {
                "arch": arch,
                "arch_kwargs": arch_kwargs or {},
                "num_classes": num_classes,
                "input_shape": tuple(input_shape) if input_shape is not None else None,
                "label_smoothing": label_smoothing,
                "weight_decay_norm_and_bias": weight_decay_norm_and_bias,
                "optimizer": dict(optimizer) if optimizer else None,
                "lr_scheduler": dict(lr_scheduler) if lr_scheduler else None,
                "channels_last": bool(channels_last),
                "compile": compile,
                "lr_scheduler_interval": lr_scheduler_interval,
                "tta": tta,
                "norm_bias_lr_scale": float(norm_bias_lr_scale),
                "decoupled_per_examples": decoupled_per_examples,
                "cuda_graphs": bool(cuda_graphs),
            }
        )
        self._compile_options = compile_options
        self._compiled = self._channels_last = False
        self.model = build_model(arch, arch_kwargs, num_classes, input_shape)
        classes = num_classes or _out_features(self.model)
        # Keys are prefixed: a bare "train" would shadow nn.Module.train.
        self.metrics = nn.ModuleDict(
            {f"{split}_": self._split_metrics(classes) for split in ("train", "val", "test")}
        )
        self.losses = nn.ModuleDict({f"{split}_": MeanMetric() for split in ("val", "test")})
        self._train_loss_sum: Tensor | None = None
        self._train_loss_batches = 0
        self._stopped: list[nn.Parameter] = []  # past their parameter_epochs
        self._graph: TrainingGraph | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _STEP_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @staticmethod
    def _split_metrics(num_classes: int) -> Metric:
        return TopKAccuracy((1, 5) if num_classes > 5 else (1,))

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # A parameter an earlier fit stopped after its epochs trains again in this fit's
            # (the optimizer, built after setup, takes the parameters that require gradients).
            for name in getattr(self.model, "parameter_epochs", None) or {}:
                self.model.get_parameter(name).requires_grad_(True)
        # Lightning calls this before each fit/validate/test; the changes below happen once.
        if self.hparams.get("channels_last") and not self._channels_last:
            self.model.to(memory_format=torch.channels_last)
            self.model.register_forward_pre_hook(_to_channels_last)
            self._channels_last = True
        if self._compile_options is not None and not self._compiled:
            self.model.compile(**self._compile_options)
            self._compiled = True

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @property
    def example_input_array(self) -> Any:
        """One all-zero input of ``input_shape`` (batch of one), in the network's floating-point
        dtype and on its device; ``None`` without an ``input_shape``. Lightning's model summary
        runs it to count the FLOPs of a forward pass (in evaluation mode, without gradients),
        which ``skipnets.info`` counts the same way. A value assigned to it is used instead.
        ``None`` for a compiled network (``compile``): a batch of one would compile it once more,
        for that shape, before the first training step."""
        if self._example_input_array is not None:
            return self._example_input_array
        shape = self.hparams.get("input_shape")
        if not shape or self._compile_options is not None:
            return None
        # The dtype the network holds now: a float64 or bf16 ("true" precision) model gets an
        # input it can take, as a batch converted by the precision plugin would be.
        reference = next(
            (
                p
                for p in self.model.parameters()
                if p.is_floating_point() and not isinstance(p, nn.parameter.UninitializedParameter)
            ),
            None,
        )
        if reference is None:
            return torch.zeros(1, *shape)
        return torch.zeros(1, *shape, dtype=reference.dtype, device=reference.device)

    @example_input_array.setter
    def example_input_array(self, example: Any) -> None:
        self._example_input_array = example

    def _step(self, batch: tuple[Tensor, Tensor], split: str) -> Tensor:
        x, y = batch
        if split != "train":
            logits = self._evaluate(x)
        elif self._graph is None or (logits := self._graph(x, self._graph_off())) is None:
            logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        metrics = self.metrics[f"{split}_"]
        metrics.update(logits.detach(), y)
        if split == "train":
            aux_loss = getattr(self.model, "aux_loss", None)
            if aux_loss is not None:  # auxiliary classifiers (GoogLeNet) add theirs in training
                loss = loss + aux_loss(y)
        else:
            self.losses[f"{split}_"].update(loss.detach(), weight=y.shape[0])
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self._log_train_loss(loss, batch_idx)
        return loss

    def _log_train_loss(self, loss: Tensor, batch_idx: int) -> None:
        # Summed on the device (no host sync), logged only when someone reads it.
        loss = loss.detach()
        total = self._train_loss_sum
        self._train_loss_sum = loss.clone() if total is None else total.add_(loss)
        self._train_loss_batches += 1
        if self._train_loss_due(batch_idx):
            mean = self._train_loss_sum / self._train_loss_batches
            self.log("train/loss", mean, prog_bar=self._loss_on_progress_bar())
            self._train_loss_sum, self._train_loss_batches = None, 0

    def _loss_on_progress_bar(self) -> bool:
        # Lightning turns a value logged with prog_bar=True into a Python number after every
        # later step of the epoch: one host sync per step (on a GPU, a wait for the GPU), with
        # or without a bar. TimedProgressBar reads the loss itself when it redraws.
        bar = self.trainer.progress_bar_callback
        return bar is not None and not isinstance(bar, TimedProgressBar)

    def _train_loss_due(self, batch_idx: int) -> bool:
        trainer = self._trainer
        if trainer is None:  # called outside a Trainer: nothing reads the log
            return False
        if trainer.is_last_batch or trainer.should_stop:
            return True
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return False  # gradients still accumulating: the optimizer step is not done
        step = trainer.global_step + 1  # the optimizer step this batch completes
        every = trainer.log_every_n_steps
        return (every > 0 and step % every == 0) or 0 < trainer.max_steps <= step

    def on_train_epoch_start(self) -> None:
        self._train_loss_sum, self._train_loss_batches = None, 0
        self._stop_finished_parameters()

    def on_fit_start(self) -> None:
        init = getattr(self.model, "init_from_data", None)
        if init is not None and self.trainer.ckpt_path is None:
            count = int(getattr(self.model, "init_data_size", 5000))
            split = analysis_split(self.trainer, "train", owner=self.hparams.arch)
            # The same images on every rank (fetch reads any positions), so ranks agree.
            x = inputs_of(split.fetch(self.trainer, range(min(count, split.size))))
            with torch.no_grad():
                init(x)

    @property
    def training_graph(self) -> TrainingGraph | None:
        """The CUDA graphs of the training step while ``fit`` trains with ``cuda_graphs``
        (their ``summary()`` says how many steps used them), else None."""
        return self._graph

    def on_train_start(self) -> None:
        self._graph = None
        if not self.hparams.get("cuda_graphs"):
            return
        off = self._cuda_graphs_off()
        if off is not None:
            rank_zero_warn(f"model.cuda_graphs is off: {off}; the network runs as usual")
            return
        self._graph = TrainingGraph(self.model, allowed_hooks=frozenset({id(_to_channels_last)}))

    def _graph_off(self) -> str | None:
        # A GradientAccumulationScheduler raises the count after training has started.
        if self.trainer.accumulate_grad_batches > 1:
            return "gradients accumulate over several batches (trainer.accumulate_grad_batches)"
        return None

    def _cuda_graphs_off(self) -> str | None:
        """Why this run cannot train from CUDA graphs, or None."""
        if self.device.type != "cuda":
            return f"training runs on {self.device.type}, not on a CUDA device"
        if self.trainer.world_size > 1:
            return "training runs in several processes (DDP's gradient hooks run in the backward)"
        if (accumulating := self._graph_off()) is not None:
            return accumulating
        if getattr(self.model, "aux_loss", None) is not None:
            return f"{self.hparams.arch} keeps auxiliary outputs from its forward pass"
        return pinning_conflict(self.trainer.train_dataloader)

    def on_train_end(self) -> None:
        graph, self._graph = self._graph, None  # the graphs' memory goes with them
        if graph is not None:
            rank_zero_info(f"model.cuda_graphs: {graph.summary()}")

    def _stop_finished_parameters(self) -> None:
        limits = getattr(self.model, "parameter_epochs", None) or {}
        epoch = self.current_epoch
        self._stopped = [self.model.get_parameter(n) for n, e in limits.items() if epoch >= e]
        if self.trainer.world_size == 1 and not self._compiled and self._graph is None:
            # DDP waits for a gradient of every parameter it was built with, a compiled model
            # would compile again for the change, and CUDA graphs repeat the backward pass they
            # recorded: there, the gradient is computed and dropped before the optimizer step.
            for name, epochs in limits.items():
                self.model.get_parameter(name).requires_grad_(epoch < epochs)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for param in self._stopped:
            param.grad = None  # SGD and Adam skip a parameter without a gradient entirely

    def _evaluate(self, x: Tensor) -> Tensor:
        """The network's logits, averaged over the test-time augmentation's views."""
        tta = self.hparams.get("tta", "none")
        if tta == "none":
            return self.model(x)
        logits = self._mirrored(x)
        if tta == "mirror":
            return logits
        height, width = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        up_left, down_right = padded[..., :height, :width], padded[..., 2:, 2:]
        shifted = (self._mirrored(up_left) + self._mirrored(down_right)) / 2
        return (logits + shifted) / 2

    def _mirrored(self, x: Tensor) -> Tensor:
        return (self.model(x) + self.model(x.flip(-1))) / 2

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self._evaluate(x).softmax(dim=-1)

    def _log_epoch(self, split: str) -> None:
        values = {f"{split}/{k}": v for k, v in self.metrics[f"{split}_"].compute().items()}
        if split != "train":
            values[f"{split}/loss"] = self.losses[f"{split}_"].compute()
            self.losses[f"{split}_"].reset()
        self.log_dict(values, prog_bar=split != "test")
        self.metrics[f"{split}_"].reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self) -> Any:
        groups = param_groups(self.model, self.hparams.weight_decay_norm_and_bias)
        optimizer_config = self._optimizer_config()
        scale = self.hparams.get("norm_bias_lr_scale", 1.0)
        if scale != 1.0:
            groups = _scale_norm_biases(self.model, groups, optimizer_config["init_args"], scale)
        optimizer = instantiate_class(groups, optimizer_config)
        if not self.hparams.lr_scheduler:
            return optimizer
        interval = self.hparams.get("lr_scheduler_interval", "epoch")
        scheduler = instantiate_class(optimizer, self._scheduler_config(interval))
        config = {"scheduler": scheduler, "interval": interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if interval != "epoch":
                raise ConfigError(
                    "ReduceLROnPlateau watches val/loss, which exists once per validation: "
                    "use model.lr_scheduler_interval: epoch"
                )
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _optimizer_config(self) -> dict[str, Any]:
        """The optimizer's config, its ``lr`` and ``weight_decay`` converted from airbench's
        decoupled form when ``decoupled_per_examples`` is set."""
        config = dict(self.hparams.optimizer or DEFAULT_OPTIMIZER)
        init = dict(config.get("init_args") or {})
        config["init_args"] = init
        per = self.hparams.get("decoupled_per_examples")
        if per:
            lr, momentum = float(init["lr"]), float(init.get("momentum", 0.0))
            examples = self._examples_per_step()
            init["weight_decay"] = float(init.get("weight_decay", 0.0)) / lr
            init["lr"] = lr * examples / (per * (1 + 1 / (1 - momentum)))
        return config

    def _examples_per_step(self) -> int:
        trainer = self.trainer
        batch_size = getattr(trainer.datamodule, "batch_size", None)
        if not isinstance(batch_size, int):
            raise ConfigError(
                "model.decoupled_per_examples scales the learning rate by the batch size: train "
                "with a data module that has a batch_size"
            )
        return batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def _scheduler_config(self, interval: str) -> dict[str, Any]:
        """The scheduler's config; a ``OneCycleLR`` or ``LinearWarmupDecayLR`` told nothing of
        its length gets the run's."""
        config = dict(self.hparams.lr_scheduler)
        init = dict(config.get("init_args") or {})
        name = str(config.get("class_path", "")).rsplit(".", 1)[-1]
        if name == "OneCycleLR":
            lengths: tuple[str, ...] = ("total_steps", "epochs", "steps_per_epoch")
        else:
            lengths = ("total_steps",)
        if name in RUN_LENGTH_SCHEDULERS and all(init.get(n) is None for n in lengths):
            if interval == "step":
                total = self.trainer.estimated_stepping_batches
            else:
                total = self.trainer.max_epochs
            if total is None or total < 1 or total == float("inf"):
                raise ConfigError(
                    f"{name} needs the run's length: set trainer.max_epochs or "
                    "trainer.max_steps, or the scheduler's total_steps"
                )
            init["total_steps"] = int(total)
            config["init_args"] = init
        return config


class TopKAccuracy(Metric):
    """Top-k accuracies (``acc``, ``acc_top5``, ...) over an epoch, from one update per batch.

    The values of torchmetrics' ``MulticlassAccuracy(top_k=k, average="micro")`` (top-1 by
    argmax, top-k by ``topk``), at a small part of its per-step cost: it one-hot encodes the
    predictions, which on a small network costs as much as the training step.
    """

    full_state_update = False

    def __init__(self, top_k: tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.top_k = tuple(top_k)
        self.add_state("correct", torch.zeros(len(self.top_k), dtype=torch.long), "sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), "sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        hits = []
        for k in self.top_k:
            if k == 1:
                hits.append((logits.argmax(dim=1) == target).sum())
            else:
                topk = logits.topk(k, dim=1).indices
                hits.append((topk == target.unsqueeze(1)).any(dim=1).sum())
        self.correct += torch.stack(hits)
        self.total += target.numel()

    def compute(self) -> dict[str, Tensor]:
        accuracy = self.correct.float() / self.total.clamp(min=1).float()
        return {("acc" if k == 1 else f"acc_top{k}"): a for k, a in zip(self.top_k, accuracy)}


def _check_decoupled(
    optimizer: dict[str, Any] | None,
    lr_scheduler: dict[str, Any] | None,
    norm_bias_lr_scale: float,
    decoupled_per_examples: int | None,
) -> None:
    """Refuse, at construction, learning-rate options that cannot work together."""
    if norm_bias_lr_scale <= 0:
        raise ConfigError(f"model.norm_bias_lr_scale must be positive, got {norm_bias_lr_scale}")
    if decoupled_per_examples is not None and decoupled_per_examples < 1:
        raise ConfigError(
            f"model.decoupled_per_examples must be a positive number of examples (airbench: "
            f"1024) or null, got {decoupled_per_examples}"
        )
    optimizer = optimizer or DEFAULT_OPTIMIZER
    init = optimizer.get("init_args") or {}
    if decoupled_per_examples:
        if str(optimizer.get("class_path", "")).rsplit(".", 1)[-1] != "SGD":
            raise ConfigError(
                "model.decoupled_per_examples converts SGD's lr, momentum and weight_decay; "
                f"the optimizer is {optimizer.get('class_path')}: use torch.optim.SGD or "
                "leave decoupled_per_examples out"
            )
        if not init.get("lr") or not 0.0 <= float(init.get("momentum", 0.0)) < 1.0:
            raise ConfigError(
                "model.decoupled_per_examples needs the optimizer's lr > 0 and momentum in [0, 1)"
            )
    if norm_bias_lr_scale != 1.0 and not init.get("lr"):
        raise ConfigError("model.norm_bias_lr_scale needs the optimizer's lr in its init_args")
    scheduler = str((lr_scheduler or {}).get("class_path", "")).rsplit(".", 1)[-1]
    if scheduler == "OneCycleLR" and (decoupled_per_examples or norm_bias_lr_scale != 1.0):
        raise ConfigError(
            "OneCycleLR sets every parameter group's learning rate from its max_lr, which undoes "
            "model.decoupled_per_examples and model.norm_bias_lr_scale; use a schedule that "
            "multiplies each group's rate, such as skipnets.schedulers.LinearWarmupDecayLR"
        )


def _scale_norm_biases(
    model: nn.Module, groups: list[dict[str, Any]], init: dict[str, Any], scale: float
) -> list[dict[str, Any]]:
    """``groups`` with the trainable biases of norm layers moved to groups of their own, at
    ``scale`` times the learning rate and the weight decay divided by ``scale``."""
    biases = {
        id(m.bias)
        for m in model.modules()
        if isinstance(m, _NORM_TYPES) and getattr(m, "bias", None) is not None
    }
    scaled_groups = []
    for group in groups:
        params = group["params"]
        group["params"] = [p for p in params if id(p) not in biases]
        scaled = [p for p in params if id(p) in biases]
        if scaled:
            decay = group.get("weight_decay", init.get("weight_decay", 0.0))
            lr, decay = init["lr"] * scale, decay / scale
            scaled_groups.append({**group, "params": scaled, "lr": lr, "weight_decay": decay})
    return [group for group in groups + scaled_groups if group["params"]]


def _to_channels_last(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Every caller of the network (training, evaluation, plugins) hands it NHWC images.
    x, *rest = args
    return (x.contiguous(memory_format=torch.channels_last), *rest) if x.ndim == 4 else args


def _compile_options(compile: bool | dict[str, Any]) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments from ``model.compile``, checked now, not at step 1."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, dict):
        raise ConfigError(f"model.compile must be true, false or a dict, not {compile!r}")
    accepted = set(inspect.signature(torch.compile).parameters) - {"model"}
    unknown = sorted(set(compile) - accepted)
    if unknown:
        raise ConfigError(
            f"model.compile: torch.compile does not take {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(accepted))}"
        )
    return dict(compile)


def _out_features(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ConfigError("could not infer num_classes from the model; set model.num_classes")
    return last[-1].out_features
