"""The ``skipnets`` command.

``skipnets fit|validate|test|predict`` is LightningCLI (``--config``, several compose; dotted
overrides; ``--print_config``). ``skipnets models`` and ``skipnets --version`` are dispatched
before it, since LightningCLI only hosts Trainer subcommands.

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
    commands: dict[str, Callable[[list[str]], int]] = {"models": _models_command}
    try:
        if args and args[0] in ("--version", "-V"):
            from skipnets import __version__

            print(f"skipnets {__version__}")
            return 0
        if args and args[0] in commands:
            return commands[args[0]](args[1:])
        return _lightning(args if explicit else None)
    except Exception as err:
        from skipnets.errors import SkipnetsError

        if os.environ.get(DEBUG_ENV) or not isinstance(err, SkipnetsError):
            raise
        print(f"skipnets: error: {err}", file=sys.stderr)
        return USER_ERROR


def _models_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="skipnets models", description="List the registered architectures."
    )
    parser.add_argument("pattern", nargs="?", default="*", help="shell wildcard, e.g. 'resnet*'")
    options = parser.parse_args(args)

    import torch

    from skipnets.registry import create_model, list_models, model_info

    names = list_models(options.pattern)
    if not names:
        print(f"no registered model matches {options.pattern!r}", file=sys.stderr)
        return 1
    rows = []
    for name in names:
        info = model_info(name)
        with torch.device("meta"):  # count parameters without allocating them
            params = sum(p.numel() for p in create_model(name).parameters())
        paper = f"{info.paper.authors.split(',')[0]} et al. {info.paper.year}" if info.paper else ""
        rows.append(
            (name, info.family, f"{params / 1e6:.2f}M", "yes" if info.has_skip else "no", paper)
        )
    header = ("name", "family", "params", "skip", "paper")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _lightning(args: list[str] | None) -> int:
    from skipnets.lightning_cli import SkipnetsCLI

    SkipnetsCLI(args=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
