"""Shared test helpers: run the real ``skipnets`` command in a subprocess, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import lightning.pytorch
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite trains tiny models: one thread is as fast as two for them, and much faster when
    # the two cores are busy. Subprocesses (the real CLI) keep torch's default.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    # No test may reach W&B's servers; runs go offline, as they do for a user without credentials.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("SKIPNETS_DEBUG", raising=False)
    yield
    # W&B keeps process-wide settings (the mode among them) from the first run in a process; a
    # test that ran W&B in process must not decide how the next one's run is set up.
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is None:
        wandb.teardown()


def quiet_trainer(**kwargs) -> L.Trainer:
    """The tests' Trainer: CPU, no logger, no checkpoints, no progress bar, no model summary.
    Any keyword overrides these or adds to them (``logger=...``, ``max_epochs=...``)."""
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**options, **kwargs})


class Wrapped(L.LightningModule):
    """A bare network as a LightningModule, for a plugin's hooks: cross-entropy training with
    SGD at ``lr`` (0: the weights stay as built) and a validation that computes nothing."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def run_skipnets(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
):
    """Run ``python -m skipnets ARGS`` and return the completed process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "skipnets", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def skipnets_cli():
    """The ``run_skipnets`` function, for tests that drive the command line."""
    return run_skipnets


class GraphsOnTheCPU:
    """``model.cuda_graphs`` on the CPU: ``torch.cuda.make_graphed_callables`` (as torch 2.11
    has it, without ``capture_error_mode``) replaced by a stand-in that keeps its contract as far
    as a CPU can. Warm-up passes of forward and backward on the sample batch, which move
    normalisation statistics as the real ones do. The sample kept as the static input every
    later batch is copied into. In training mode the module's forward becomes one autograd
    function over the input and the parameters, whose output is the same static tensor at every
    step and whose backward writes each gradient into a static buffer of its own and hands that
    on, as a replayed graph does (so a gradient kept from an earlier step is overwritten by the
    next backward, as on a GPU). The recorded pass's output is kept with its autograd graph, as
    torch keeps it (``skipnets.graphs.release_recording`` lets it go). ``records`` lists the
    sample shapes recorded; ``fail`` makes recording raise after its warm-up, as a capture
    refused by CUDA does."""

    def __init__(self) -> None:
        self.records: list[tuple[int, ...]] = []
        self.fail: Exception | None = None

    def __call__(self, module, sample_args, num_warmup_iters=3, allow_unused_input=False):
        (static,) = sample_args
        parameters = tuple(module.parameters())
        trained = [p for p in parameters if p.requires_grad]
        for _ in range(num_warmup_iters):
            out = module(static)
            torch.autograd.grad(out, trained, torch.ones_like(out), allow_unused=allow_unused_input)
        if self.fail is not None:
            raise self.fail
        self.records.append(tuple(static.shape))
        recorded, training = module.forward, module.training
        # torch keeps the recorded pass's outputs, autograd graph included, for its replays.
        kept = (recorded(static),)
        gradients = [torch.zeros_like(p) if p.requires_grad else None for p in parameters]
        state: dict = {"output": None, "live": None}

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, *weights):
                if x.data_ptr() != static.data_ptr():
                    static.copy_(x)
                with torch.enable_grad():
                    state["live"] = live = recorded(static)
                if state["output"] is None:
                    state["output"] = torch.empty_like(live)
                assert kept[0].shape == live.shape
                state["output"].copy_(live.detach())
                return state["output"].detach()

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, grad):
                found = torch.autograd.grad(
                    state["live"], trained, grad, allow_unused=allow_unused_input
                )
                buffers = [g for g in gradients if g is not None]
                for buffer, value in zip(buffers, found):
                    buffer.copy_(value) if value is not None else buffer.zero_()
                return (None, *(g.detach() if g is not None else None for g in gradients))

        def replay(x):
            if module.training != training:
                return recorded(x)
            return Replay.apply(x, *parameters)

        module.forward = replay
        return module


@pytest.fixture
def graphs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> GraphsOnTheCPU:
    """Train with ``model.cuda_graphs`` on the CPU through :class:`GraphsOnTheCPU`."""
    import skipnets.graphs
    from skipnets import Classifier

    grapher = GraphsOnTheCPU()
    monkeypatch.setattr(skipnets.graphs, "_make_graphed_callables", grapher)
    monkeypatch.setattr(Classifier, "_cuda_graphs_off", lambda self: None)
    return grapher
