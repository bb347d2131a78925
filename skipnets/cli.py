"""The ``skipnets`` command.

``skipnets fit|validate|test|predict`` is LightningCLI (``--config``, several compose; dotted
overrides; ``--print_config``). ``skipnets models``, ``skipnets plugins``, ``skipnets analyse``
(with its short forms ``lesion`` and ``deconvnet``), ``skipnets --help`` and ``--version`` are
dispatched before it, since LightningCLI only hosts Trainer subcommands; ``analyse`` goes through
it again as a ``validate`` run with the one plugin (``skipnets.analyse``).

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
    """Run the command ``argv`` (default: this process's command line) and return its exit
    status. Called without ``argv``, as the ``skipnets`` command is, the command owns its process:
    W&B loads first when the run will use it (:func:`_preload_wandb`), and the process ends as
    soon as the command is done (:func:`_exit_now`)."""
    if argv is not None:
        return _main(list(argv), explicit=True)
    args = sys.argv[1:]
    _preload_wandb(args)
    return _exit_now(_main(args, explicit=False))


def _main(args: list[str], explicit: bool) -> int:
    commands: dict[str, Callable[[list[str]], int]] = {
        "models": _models_command,
        "plugins": _plugins_command,
        "analyse": _analyse_command,
        "compare": _compare_command,
        "study": _study_command,
        "analyze": _analyse_command,
        "lesion": _short_form("lesion"),
        "deconvnet": _short_form("deconvnet"),
    }
    try:
        if args and args[0] in ("--version", "-V"):
            from skipnets import __version__

            print(f"skipnets {__version__}")
            return 0
        if not args or args[0] in ("-h", "--help"):
            print(_overview(), end="", file=sys.stdout if args else sys.stderr)
            return 0 if args else USER_ERROR
        if args and args[0] in commands:
            return commands[args[0]](args[1:])
        return _lightning(args if explicit else None)
    except SystemExit as stop:
        return _stopped(stop)
    except Exception as err:
        cause = _user_error(err) or _constructor_failure(err)
        if os.environ.get(DEBUG_ENV) or cause is None:
            raise
        message = _yaml_problem(args) if "Problems parsing config" in str(cause) else None
        message = message or _with_suggestion(str(cause))
        print(f"skipnets: error: {message}", file=sys.stderr)
        return getattr(cause, "exit_code", USER_ERROR)


_TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _preload_wandb(args: list[str]) -> None:
    """Import W&B, with the part of it that ``wandb.init`` imports, before torch and Lightning,
    when this command is a run that will start W&B (the default logger), so that the import costs
    a tenth of what it costs later: W&B's pydantic models look for their own source as their
    classes are defined, and ``inspect`` searches every loaded module for each frame it checks
    (on this package's quickstart, over a second of CPU once torch and Lightning are loaded).
    Only saves time: a run that turns out not to use W&B merely imported it."""
    if not _will_use_wandb(args):
        return
    import importlib

    try:
        importlib.import_module("wandb.sdk.launch.inputs.internal")
    except Exception:  # another W&B version lays itself out otherwise: nothing to save
        return


def _will_use_wandb(args: list[str]) -> bool:
    """Whether ``skipnets ARGS`` trains or evaluates with W&B, judged from the command line and
    the config files it names (the default logger, or one a config names)."""
    import importlib.util

    if (
        not args
        or args[0] not in _TRAINER_COMMANDS
        or {"-h", "--help", "--print_config"} & {arg.partition("=")[0] for arg in args}
    ):
        return False
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return False
    if importlib.util.find_spec("wandb") is None:
        return False
    chosen = [str(value) for value in _logger_settings(args)]
    return all("wandb" in value.lower() for value in chosen)


def _logger_settings(args: list[str]) -> list[object]:
    """The ``trainer.logger`` values that ``args`` and the config files they name set."""
    import yaml

    values: list[object] = []
    for flag, value in zip(args, [*args[1:], ""]):
        name, equals, inline = flag.partition("=")
        value = inline if equals else value
        if name.startswith("--trainer.logger"):
            values.append(value)
        elif name in ("--config", "-c"):
            try:
                with open(value) as handle:
                    config = yaml.safe_load(handle)
            except (OSError, yaml.YAMLError):
                continue
            trainer = config.get("trainer") if isinstance(config, dict) else None
            if isinstance(trainer, dict) and "logger" in trainer:
                values.append(trainer["logger"])
    return values


def _exit_now(code: int) -> int:
    """End the process with ``code`` once the command is done, as the interpreter would (other
    threads finished, ``atexit`` handlers run, output flushed) but without its clean-up of every
    loaded module, which after a run with torch and Lightning costs seconds of CPU and does
    nothing a finished command needs. Returns ``code`` instead, for a normal exit, while another
    (non-daemon) thread still runs, and in Python's development mode (``-X dev``), which reports
    unclosed resources during that clean-up."""
    import atexit
    import contextlib
    import threading

    run_exit_functions = getattr(atexit, "_run_exitfuncs", None)
    others = [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()
    ]
    if run_exit_functions is None or others or sys.flags.dev_mode:
        return code
    run_exit_functions()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # none, a closed pipe
            stream.flush()
    os._exit(code)


def _stopped(stop: SystemExit) -> int:
    """A run stopped by SIGTERM ends with one line: where its last checkpoint is, and exit
    status 143; any other ``SystemExit`` (``--help``, ``--print_config``) keeps its code."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if not isinstance(stop, SIGTERMException):
        raise stop
    checkpoint = getattr(stop, "checkpoint", "")
    where = (
        f"last.ckpt at step {getattr(stop, 'step', '?')} is {checkpoint}: resume with "
        "--ckpt_path last"
        if checkpoint
        else "no checkpoint was written (checkpointing is off)"
    )
    print(f"skipnets: stopped by SIGTERM; {where}", file=sys.stderr)
    return stop.code if isinstance(stop.code, int) and stop.code else 143


_LIBRARIES = ("jsonargparse", "lightning", "torch", "argparse", "typing", "importlib")


def _constructor_failure(err: BaseException) -> str | None:
    """A class named in the config (a plugin, a data module) that failed in its own
    ``__init__`` with an error of its own: jsonargparse reports it as a page of union
    errors with the cause buried in the middle; this finds it, as one line."""
    if not _raised_through(err, "jsonargparse"):  # not while the config was being built
        return None
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exception in reversed(chain):  # the first raised first
        frames = []
        traceback = exception.__traceback__
        while traceback is not None:
            frames.append(traceback.tb_frame)
            traceback = traceback.tb_next
        for frame in reversed(frames):  # innermost first
            owner = frame.f_locals.get("self") if frame.f_code.co_name == "__init__" else None
            module = type(owner).__module__ if owner is not None else ""
            if owner is not None and not module.startswith(_LIBRARIES):
                name = f"{module}.{type(owner).__qualname__}"
                return f"could not create {name}: {type(exception).__name__}: {exception}"
    return None


def _yaml_problem(args: list[str]) -> str | None:
    """Which config file is not valid YAML, and where."""
    import yaml

    paths = [
        value
        for flag, value in zip(["", *args], args)
        if flag in ("--config", "-c") and not value.startswith("-")
    ] + [arg.partition("=")[2] for arg in args if arg.startswith("--config=")]
    for path in paths:
        try:
            with open(path) as handle:
                yaml.safe_load(handle)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            return f"the config file {path} is not valid YAML: {problem}{where}"
        except OSError:
            continue
    return None


def _with_suggestion(message: str) -> str:
    """An unknown option, told in one line with the closest known one ("did you mean"), as an
    unknown architecture is; other messages as they are."""
    import difflib
    import re

    nested = re.search(
        r'Parser key "([\w.]+)":.*?Problem with given class_path \'([\w.]+)\':\s*'
        r"Option '(\w+)' is not accepted",
        message,
        re.S,
    )
    if nested:
        key, class_path, option = nested.groups()
        known = _parameters(class_path)
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
        hint = f"; did you mean {key}.{close[0]}?" if close else ""
        return f"{key}: {class_path} has no option {option!r}{hint}"
    flat = re.search(r"(?:does not accept option '|unrecognized arguments: --)([\w.]+)", message)
    if flat and flat.group(1).startswith("trainer."):
        option = flat.group(1).removeprefix("trainer.")
        known = _parameters("lightning.pytorch.Trainer")
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
        if close:
            return f"{message.rstrip()}; did you mean trainer.{close[0]}?"
    return message


def _parameters(class_path: str) -> list[str]:
    """The keyword arguments a class takes, its bases' included where it passes ``**kwargs``."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names += [
            p.name
            for p in parameters
            if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return [n for n in dict.fromkeys(names) if n != "self"]


def _raised_through(err: BaseException, package: str) -> bool:
    traceback = err.__traceback__
    while traceback is not None:
        if f"/{package}/" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


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
        rows.append((name, info.family, _count(params), "yes" if info.has_skip else "no", paper))
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


def _compare_command(args: list[str]) -> int:
    from skipnets.compare import compare

    return compare(args)


def _study_command(args: list[str]) -> int:
    from skipnets.study import study

    return study(args)


def _analyse_command(args: list[str]) -> int:
    from skipnets.analyse import analyse

    return analyse(args[0] if args else None, args[1:])


def _short_form(command: str) -> Callable[[list[str]], int]:
    def run(args: list[str]) -> int:
        from skipnets.analyse import SHORT_FORMS, analyse

        if not args:
            print(
                f"usage: skipnets {command} --config CONFIG --ckpt_path CHECKPOINT", file=sys.stderr
            )
            return USER_ERROR
        return analyse(SHORT_FORMS[command], args, command=command)

    return run


COMMANDS = (
    ("fit", "train a model: skipnets fit --config configs/quickstart.yaml"),
    ("validate", "evaluate a checkpoint on the validation split"),
    ("test", "evaluate a checkpoint on the test split"),
    ("predict", "run a checkpoint over the prediction split"),
    ("models", "list the registered architectures, with parameter counts and papers"),
    ("plugins", "list the installed plugins (research callbacks), and any that failed to load"),
    ("analyse", "run an analysis plugin on a trained checkpoint, into the run that trained it"),
    (
        "compare",
        "overlay runs' training curves, or one plugin's results, on one set of axes",
    ),
    ("study", "run a grid of fits from one study file and draw its figure (depth studies)"),
    ("lesion", "skipnets analyse Lesion: each skip block removed in turn"),
    ("deconvnet", "skipnets analyse DeconvNet: top activations projected to pixel space"),
)


def _overview() -> str:
    width = max(len(name) for name, _ in COMMANDS)
    lines = [
        "usage: skipnets COMMAND [options]",
        "",
        "Train and study deep networks with and without skip connections.",
        "",
        "commands:",
        *(f"  {name.ljust(width)}  {summary}" for name, summary in COMMANDS),
        "",
        "`skipnets COMMAND --help` shows a command's options; `skipnets --version` the version.",
    ]
    return "\n".join(lines) + "\n"


def _count(params: int) -> str:
    """A parameter count as people write it: 1.73M, 33.6K, 156."""
    if params >= 100_000:
        return f"{params / 1e6:.2f}M"
    return f"{params / 1e3:.1f}K" if params >= 1000 else str(params)


def _first_author(authors: str) -> str:
    names = [name.strip() for name in authors.split(",") if name.strip()]
    if len(names) == 2:
        return f"{names[0]} & {names[1]}"
    return f"{names[0]} et al." if len(names) > 2 else (names[0] if names else "")


def _lightning(args: list[str] | None) -> int:
    from skipnets.lightning_cli import SkipnetsCLI

    SkipnetsCLI(args=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
