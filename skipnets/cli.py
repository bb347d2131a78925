"""The ``skipnets`` command.

``skipnets fit|validate|test|predict`` is LightningCLI (``--config``, several compose; dotted
overrides; ``--print_config``). ``skipnets models``, ``skipnets plugins``, ``skipnets lesion``
and ``skipnets --version`` are dispatched before it, since LightningCLI only hosts Trainer
subcommands; ``lesion`` goes through it again as a ``validate`` run with the Lesion plugin.

A user error (missing or invalid config, unknown key, unknown architecture, bad value) prints one
message and exits with status 2; ``SKIPNETS_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "SKIPNETS_DEBUG"
USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    explicit = argv is not None
    commands: dict[str, Callable[[list[str]], int]] = {
        "models": _models_command,
        "plugins": _plugins_command,
        "lesion": _lesion_command,
        "deconvnet": _deconvnet_command,
    }
    try:
        if args and args[0] in ("--version", "-V"):
            from skipnets import __version__

            print(f"skipnets {__version__}")
            return 0
        if args and args[0] in commands:
            return commands[args[0]](args[1:])
        return _lightning(args if explicit else None)
    except Exception as err:
        cause = _user_error(err)
        if os.environ.get(DEBUG_ENV) or cause is None:
            raise
        print(f"skipnets: error: {cause}", file=sys.stderr)
        return USER_ERROR


def _user_error(err: BaseException) -> BaseException | None:
    """The SkipnetsError behind ``err``, if any: jsonargparse wraps errors raised while it
    instantiates the model and data, so the chain of causes is searched."""
    from jsonargparse import ArgumentError

    from skipnets.errors import SkipnetsError

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (SkipnetsError, ArgumentError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _models_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="skipnets models", description="List the registered architectures."
    )
    parser.add_argument("pattern", nargs="?", default="*", help="shell wildcard, e.g. 'resnet*'")
    parser.add_argument(
        "--details",
        metavar="NAME",
        help="print one model's facts: parameters, FLOPs, receptive field, skip blocks, paper",
    )
    options = parser.parse_args(args)

    import torch

    from skipnets.registry import create_model, list_models, model_info

    if options.details:
        from skipnets.info import describe

        print(describe(options.details))
        return 0
    names = list_models(options.pattern)
    if not names:
        print(f"no registered model matches {options.pattern!r}", file=sys.stderr)
        return 1
    rows = []
    for name in names:
        info = model_info(name)
        with torch.device("meta"):  # count parameters without allocating them
            params = sum(p.numel() for p in create_model(name).parameters())
        paper = f"{_first_author(info.paper.authors)} {info.paper.year}" if info.paper else ""
        rows.append(
            (name, info.family, f"{params / 1e6:.2f}M", "yes" if info.has_skip else "no", paper)
        )
    header = ("name", "family", "params", "skip", "paper")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _plugins_command(args: list[str]) -> int:
    from skipnets.plugins import AUTOLOAD_ENV, ENTRY_POINT_GROUP, autoload_enabled

    parser = argparse.ArgumentParser(
        prog="skipnets plugins",
        description=f"List the callbacks installed through the {ENTRY_POINT_GROUP!r} entry-point "
        "group; exits with status 1 when one of them fails to load.",
    )
    parser.parse_args(args)

    import warnings

    from skipnets.plugins import PluginLoadWarning, discover_plugins

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        plugins = discover_plugins(load=True, refresh=True)
    if not plugins:
        print(f"no plugins installed (entry-point group {ENTRY_POINT_GROUP!r})")
        return 0
    header = ("name", "class", "from", "summary")
    rows = [
        (p.name, p.class_path, p.source, p.summary if p.loaded else f"FAILED: {p.error}")
        for p in plugins
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip())
    if not autoload_enabled():
        print(
            f"\n{AUTOLOAD_ENV} is set: configs must name these by full import path",
            file=sys.stderr,
        )
    return 1 if any(p.error for p in plugins) else 0


LESION_USAGE = """usage: skipnets lesion --config CONFIG --ckpt_path CHECKPOINT [--key=value ...]

Lesion study of a trained checkpoint: evaluates the model of CONFIG with each skip block removed
(and the other lesions the Lesion plugin is configured for). It runs `skipnets validate` with the
Lesion plugin added; its settings come from the config's trainer.callbacks when a Lesion is listed
there, and any `skipnets validate` option applies (`skipnets validate --help`). Results go to
<run dir>/lesion/lesion.csv and lesion.png.
"""


def _lesion_command(args: list[str]) -> int:
    return _validate_with_plugin("lesion", "Lesion", LESION_USAGE, args)


DECONVNET_USAGE = """usage: skipnets deconvnet --config CONFIG --ckpt_path CHECKPOINT [--key=value ...]

DeconvNet figures of a trained checkpoint: the top-9 activations of chosen layers projected back
to pixel space (Zeiler & Fergus's deconvnet and guided backpropagation) next to their input
patches, the first layer's filters, and feature refinement across a residual stage. It runs
`skipnets validate` with the DeconvNet plugin added; its settings come from the config's
trainer.callbacks when a DeconvNet is listed there. Figures go to
<run dir>/deconvnet/<checkpoint name>/.
"""


def _deconvnet_command(args: list[str]) -> int:
    return _validate_with_plugin("deconvnet", "DeconvNet", DECONVNET_USAGE, args)


def _validate_with_plugin(command: str, plugin: str, usage: str, args: list[str]) -> int:
    """``skipnets validate`` on a checkpoint with ``plugin`` added, unless the config lists it
    in trainer.callbacks (then its settings come from there). SkipnetsCLI has checked that the
    checkpoint fits the model before ``before_validate`` runs."""
    if not args or args[0] in ("-h", "--help"):
        print(usage, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else USER_ERROR

    from skipnets.errors import ConfigError
    from skipnets.lightning_cli import SkipnetsCLI
    from skipnets.plugins import load_plugin

    callback = load_plugin(plugin)

    class PluginCLI(SkipnetsCLI):
        def before_validate(self) -> None:
            if not self.config.validate.get("ckpt_path"):
                raise ConfigError(
                    f"skipnets {command} needs --ckpt_path: a checkpoint of the model"
                )
            if not any(isinstance(c, callback) for c in self.trainer.callbacks):
                self.trainer.callbacks.append(callback())

    PluginCLI(args=["validate", *args])
    return 0


def _first_author(authors: str) -> str:
    first, _, others = authors.partition(",")
    return f"{first.strip()} et al." if others.strip() else first.strip()


def _lightning(args: list[str] | None) -> int:
    from skipnets.lightning_cli import SkipnetsCLI

    SkipnetsCLI(args=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
