"""Gradient norms per block or per layer over training: where do gradients die?"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from torch import nn

from skipnets.errors import ConfigError
from skipnets.nn import SkipBlock, network_name
from skipnets.runs import plugin_dir
from skipnets_plugins._plotting import (
    log_rows,
    mark_stages,
    new_figure,
    overlay_runs,
    read_rows,
    save_figure,
    write_csv,
)

COLUMNS = ("step", "epoch", "index", "name", "stage", "grad_norm", "param_norm", "numel")
GRANULARITIES = ("block", "layer")


class GradientFlow(Callback):
    """Gradient norm of each block or layer over training: where gradients vanish.

    The L2 norm of the loss gradient of each block's (or layer's) parameters, every
    ``every_n_steps`` optimizer steps.

    Measured in ``on_before_optimizer_step``: after gradient accumulation, after mixed precision
    has unscaled the gradients, and after DDP has averaged them across ranks, so every rank sees
    the same values and rank zero writes them. With ``granularity: block`` a group is a skip block
    (the whole ``SkipBlock``, including its shortcut's weights) or a top-level part of the model
    that holds no skip block (the stem, the head); with ``layer`` it is every module that owns
    parameters. A group's norm is ``sqrt(sum of its parameters' squared gradient norms)``.

    .. code-block:: yaml

        trainer:
          callbacks:
            - class_path: GradientFlow
              init_args: {every_n_steps: 20, granularity: layer}

    .. code-block:: python

        trainer = L.Trainer(callbacks=[GradientFlow(every_n_steps=20)])

    Writes ``<run dir>/gradient_flow/gradient_flow.csv`` (step, epoch, index, name, stage,
    grad_norm, param_norm, numel; stage is -1 outside skip blocks) and ``gradient_flow.png``: a
    heatmap of log10 gradient norm over (step, depth) and the norm against depth at a few steps.
    Files are rewritten after every training epoch; the figure is logged each epoch, the table at
    the end of fit.

    Args:
        every_n_steps: measure when ``global_step`` is a multiple of this (the first step is
            always measured).
        granularity: ``block`` or ``layer``, see above.
    """

    def __init__(
        self, every_n_steps: int = 50, granularity: Literal["block", "layer"] = "block"
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise ConfigError(
                f"GradientFlow: every_n_steps must be an integer, got {every_n_steps!r}"
            )
        if every_n_steps < 1:
            raise ConfigError(f"GradientFlow: every_n_steps must be >= 1, got {every_n_steps}")
        if granularity not in GRANULARITIES:
            raise ConfigError(
                f"GradientFlow: granularity must be 'block' or 'layer', not {granularity!r}"
            )
        self.every_n_steps = every_n_steps
        self.granularity = granularity
        self.rows: list[dict[str, Any]] = []
        self._groups: list[tuple[str, int, list[nn.Parameter]]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(granularity=self.granularity)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))

    @classmethod
    def compare_runs(cls, runs: dict[str, Path], out: Path) -> list[Path]:
        """Gradient norm against depth at each run's first measured step, one line per run:
        where the gradient vanishes (plain), fades (highway) or holds (residual)."""

        def series(directory: Path):
            path = directory / "gradient_flow" / "gradient_flow.csv"
            if not path.is_file():
                return None
            rows = read_rows(path)
            first = min(r["step"] for r in rows)
            rows = sorted((r for r in rows if r["step"] == first), key=lambda r: r["index"])
            return [r["index"] for r in rows], [r["grad_norm"] for r in rows]

        return overlay_runs(
            runs,
            out,
            "gradient_flow",
            series,
            title="gradient norm against depth, first step",
            xlabel="depth (0: input side)",
            ylabel="gradient norm",
            log_y=True,
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._groups = [
            (network_name(name), stage_, params)
            for name, stage_, params in parameter_groups(pl_module, self.granularity)
        ]
        if not self._groups:
            raise ConfigError(
                f"GradientFlow: {type(pl_module).__name__} has no trainable parameters to watch"
            )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        if self.rows and self.rows[-1]["step"] == trainer.global_step:
            return  # a second optimizer at the same step: already measured
        grad_sq, param_sq, present = [], [], []
        for _, _, params in self._groups:
            grads = [p.grad for p in params if p.grad is not None]
            present.append(bool(grads))
            grad_sq.append(_sum_sq(grads, params[0]))
            param_sq.append(_sum_sq([p.detach() for p in params], params[0]))
        grad_norms = torch.stack(grad_sq).sqrt().cpu().tolist()
        param_norms = torch.stack(param_sq).sqrt().cpu().tolist()
        for index, ((name, stage, params), g, w, has) in enumerate(
            zip(self._groups, grad_norms, param_norms, present)
        ):
            self.rows.append(
                {
                    "step": trainer.global_step,
                    "epoch": trainer.current_epoch,
                    "index": index,
                    "name": name,
                    "stage": stage,
                    "grad_norm": g if has else float("nan"),
                    "param_norm": w,
                    "numel": sum(p.numel() for p in params),
                }
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.rows:
            return
        folder = plugin_dir(trainer, "gradient_flow")
        write_csv(folder / "gradient_flow.csv", COLUMNS, self.rows)
        fig = plot_gradient_flow(self.rows, [stage for _, stage, _ in self._groups])
        save_figure(trainer, fig, folder / "gradient_flow.png", "gradient_flow/figure")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            log_rows(trainer, "gradient_flow/table", COLUMNS, self.rows)


def _sum_sq(tensors: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # Squared in float64: a float32 square underflows to zero below about 1e-23, and the first
    # layers of a deep sigmoid net have true gradient norms far below that (1e-30 and less).
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=like.device)
    return torch.stack([t.double().pow(2).sum() for t in tensors]).sum()


def parameter_groups(
    model: nn.Module, granularity: str
) -> list[tuple[str, int, list[nn.Parameter]]]:
    """``(name, stage, parameters)`` in registration (depth) order; stage -1 outside blocks."""
    modules = dict(model.named_modules())
    groups: dict[str, tuple[int, list[nn.Parameter]]] = {}
    has_block = {
        name: any(isinstance(m, SkipBlock) for m in module.modules())
        for name, module in modules.items()
    }
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = param_name.rpartition(".")[0]
        if granularity == "layer":
            key = owner
        else:
            parts = owner.split(".") if owner else []
            key = owner
            for depth in range(len(parts) + 1):
                prefix = ".".join(parts[:depth])
                if isinstance(modules[prefix], SkipBlock) or not has_block[prefix]:
                    key = prefix
                    break
        stage = next(
            (modules[p].stage for p in _prefixes(key) if isinstance(modules.get(p), SkipBlock)),
            -1,
        )
        groups.setdefault(key, (stage, []))[1].append(param)
    return [(name or type(model).__name__, stage, ps) for name, (stage, ps) in groups.items()]


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def plot_gradient_flow(rows: Sequence[dict[str, Any]], stages: Sequence[int]):
    steps = sorted({r["step"] for r in rows})
    count = max(r["index"] for r in rows) + 1
    grid = np.full((count, len(steps)), np.nan)
    column = {step: i for i, step in enumerate(steps)}
    for r in rows:
        grid[r["index"], column[r["step"]]] = r["grad_norm"]
    fig, axes = new_figure(1, 2, size=(5.5, 4.0))
    heat, curves = axes[0]
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size else None
    cmap = colormaps["magma"].with_extremes(bad="0.8")  # grey: exactly zero (or not measured)
    image = heat.imshow(
        np.where(grid > 0, grid, np.nan),
        aspect="auto",
        origin="lower",
        norm=norm,
        cmap=cmap,
        extent=(-0.5, len(steps) - 0.5, -0.5, count - 0.5),
        interpolation="nearest",
    )
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int)
    heat.set_xticks(ticks, [str(steps[t]) for t in ticks])
    heat.set_xlabel("step")
    heat.set_ylabel("depth (0: input side)")
    heat.set_title("gradient norm (grey: zero)")
    fig.colorbar(image, ax=heat, label=r"$\|\nabla_\theta L\|_2$")

    shown = sorted(
        {steps[t] for t in np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int)}
    )
    cmap = colormaps["viridis"]
    step_norm = Normalize(steps[0], max(steps[-1], steps[0] + 1))
    for step in shown:
        curves.plot(
            np.arange(count), grid[:, column[step]], marker=".", color=cmap(step_norm(step))
        )
    boundaries = mark_stages(curves, stages)
    curves.set_yscale("log")
    curves.set_xlabel(
        "depth (0: input side; dashed: stage boundary)" if boundaries else "depth (0: input side)"
    )
    curves.set_ylabel(r"$\|\nabla_\theta L\|_2$")
    curves.set_title("gradient norm against depth")
    curves.grid(alpha=0.3)
    fig.colorbar(ScalarMappable(step_norm, cmap), ax=curves, label="step")
    return fig
