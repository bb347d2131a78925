"""``skipnets analyse PLUGIN --config CONFIG --ckpt_path CHECKPOINT``: one analysis plugin on a
trained checkpoint, its results written into the run that trained it.

An analysis plugin is any installed plugin (built-in or third-party) that does its work in a
standalone ``validate`` run: Lesion, DeconvNet, NormRatio and HighwayGates among the built-in
ones. The command builds the model and data of CONFIG, loads CHECKPOINT's weights and runs
``validate`` with that plugin as the only research callback (the plugin's settings come from
CONFIG's ``trainer.callbacks`` when it is listed there; the other callbacks listed there do not
run). The results go under the trained run's directory (the folder holding ``checkpoints/``),
in the plugin's own folder; the run's ``config.yaml`` and ``run.json`` are left as they are,
and no new W&B run is started. It ends by listing the files the plugin wrote.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

from skipnets.errors import ConfigError
from skipnets.runs import trained_run_dir

__all__ = ["SHORT_FORMS", "USAGE", "analyse"]

USAGE = """usage: skipnets analyse PLUGIN --config CONFIG --ckpt_path CHECKPOINT [--key=value ...]

Runs one analysis plugin (Lesion, DeconvNet, NormRatio, HighwayGates, or an installed
third-party one: `skipnets plugins` lists them) on a trained checkpoint. The model and data come
from CONFIG (the run's own config.yaml does), the weights from CHECKPOINT. The plugin's settings
come from CONFIG's trainer.callbacks when it is listed there, and can be overridden like any
option (--trainer.callbacks.init_args.split=test); the config's other callbacks do not run. Any
`skipnets validate` option applies (`skipnets validate --help`).

Results are written into the trained run's directory (the folder that holds checkpoints/), in the
plugin's folder; the run's config.yaml and run.json are not touched. The command lists what it
wrote.
"""

#: The short commands: ``skipnets lesion`` is ``skipnets analyse Lesion``.
SHORT_FORMS = {"lesion": "Lesion", "deconvnet": "DeconvNet"}


def analyse(plugin_name: str | None, args: list[str], command: str = "analyse") -> int:
    """Run ``plugin_name`` on the checkpoint named in ``args``; returns the exit status."""
    if plugin_name in (None, "-h", "--help") or (args and args[0] in ("-h", "--help")):
        shown = plugin_name is not None or bool(args)
        print(USAGE, end="", file=sys.stdout if shown else sys.stderr)
        return 0 if shown else 2
    assert plugin_name is not None
    from skipnets.plugins import load_plugin

    plugin = load_plugin(plugin_name)
    checkpoint = _option(args, "--ckpt_path")
    if not checkpoint:
        raise ConfigError(f"skipnets {command} needs --ckpt_path: a checkpoint of the model")
    if not Path(checkpoint).expanduser().is_file():
        raise ConfigError(f"no checkpoint at {checkpoint!r}")
    run = trained_run_dir(Path(checkpoint).expanduser())
    started = time.time()
    before = _files(run)
    _run_validate(plugin, command, [*args, f"--trainer.default_root_dir={run}"])
    written = sorted(
        path
        for path, mtime in _files(run).items()
        if path.parent.name != "checkpoints" and (path not in before or mtime >= started)
    )
    name = plugin.__name__
    if not written:
        raise ConfigError(
            f"{name} wrote nothing on a trained checkpoint: it works while a model trains "
            f"(`skipnets fit` with it in trainer.callbacks), not as an analysis"
        )
    print(f"skipnets {command}: {name} wrote {len(written)} file(s) under {run}")
    for path in written[:12]:
        print(f"  {path.relative_to(run)}")
    if len(written) > 12:
        print(f"  ... and {len(written) - 12} more")
    return 0


def _run_validate(plugin: type, command: str, args: list[str]) -> None:
    from lightning.pytorch.callbacks import ProgressBar

    from skipnets.lightning_cli import SkipnetsCLI

    class AnalyseCLI(SkipnetsCLI):
        def before_validate(self) -> None:
            configured = [c for c in self.trainer.callbacks if isinstance(c, plugin)]
            bars = [c for c in self.trainer.callbacks if isinstance(c, ProgressBar)]
            self.trainer.callbacks = (configured or [plugin()])[:1] + bars

    # No logger (no new W&B run, nothing in the trained run's W&B folder) and no saved config:
    # the trained run's config.yaml and run.json stay the ones its training wrote. The checkpoint
    # holds the state of every callback the run trained with, and this validate leaves them out
    # on purpose: Lightning's advice to add them back says nothing here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
        AnalyseCLI(
            args=["validate", *args, "--trainer.logger=false"],
            save_config_callback=None,
        )


def _option(args: list[str], name: str) -> str | None:
    value: str | None = None
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            value = args[index + 1]
        elif arg.startswith(f"{name}="):
            value = arg.partition("=")[2]
    return value


def _files(root: Path) -> dict[Path, Any]:
    if not root.is_dir():
        return {}
    return {p: p.stat().st_mtime for p in root.rglob("*") if p.is_file()}
