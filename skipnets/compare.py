"""``skipnets compare PLUGIN RUN_DIR [RUN_DIR ...]``: several runs' results on one set of axes.

``skipnets compare curves RUN_DIR...`` overlays the runs' training curves (training loss and
validation accuracy against epoch, from each run's ``history.csv``).

A plugin that can compare runs has a class method ``compare_runs(runs, out)``: ``runs`` maps a
label to a run directory, ``out`` is the folder to write in, and it returns the files it wrote
(a PNG and a CSV). Each run is labelled by its architecture and depth, read from its
``config.yaml``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from skipnets.errors import ConfigError

__all__ = ["CURVES", "compare", "run_label"]

#: The names that compare the runs' training curves (their ``history.csv``) rather than a
#: plugin's results.
CURVES = ("curves", "history")


def compare(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="skipnets compare",
        description="Overlay several runs on one set of axes: their training curves "
        "(`curves`: training loss and validation accuracy against epoch) or one plugin's "
        "results (Lesion, NormRatio, GradientFlow, or any plugin with compare_runs).",
    )
    parser.add_argument(
        "plugin", help="`curves`, or the plugin whose results to compare, e.g. Lesion"
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, help="run directories (they hold config.yaml)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("comparisons"), help="folder to write the PNG and CSV in"
    )
    options = parser.parse_args(args)

    if options.plugin.lower() in CURVES:
        from skipnets.history import History

        plugin: Any = History
    else:
        from skipnets.plugins import load_plugin

        plugin = load_plugin(options.plugin)
    method = getattr(plugin, "compare_runs", None)
    if not callable(method):
        raise ConfigError(f"{plugin.__name__} has no comparison of runs (no compare_runs method)")
    runs: dict[str, Path] = {}
    for directory in options.runs:
        if not directory.is_dir():
            raise ConfigError(f"no run directory at {directory}")
        label = run_label(directory)
        while label in runs:  # two runs of the same model: tell them apart by folder
            label = f"{label} ({directory.name})"
        runs[label] = directory
    options.out.mkdir(parents=True, exist_ok=True)
    written = method(runs, options.out)
    what = "training curves" if plugin.__name__ == "History" else plugin.__name__
    print(f"skipnets compare: {what} of {len(runs)} runs")
    for path in written:
        print(f"  {path}")
    return 0


def run_label(directory: Path) -> str:
    """``resnet20``, ``plain_mlp depth 50``: the run's architecture and depth, from its
    ``config.yaml`` (the folder's name when there is none)."""
    import yaml

    path = directory / "config.yaml"
    if not path.is_file():
        return directory.name
    with open(path) as handle:
        config: Any = yaml.safe_load(handle) or {}
    model = config.get("model") or {}
    init = model.get("init_args", model) if isinstance(model, dict) else {}
    arch = init.get("arch") or directory.name
    depth = (init.get("arch_kwargs") or {}).get("depth")
    return f"{arch} depth {depth}" if depth is not None else str(arch)
