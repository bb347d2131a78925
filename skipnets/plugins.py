"""Plugin discovery: Lightning callbacks from the ``skipnets.plugins`` entry-point group.

Any installed distribution adds callbacks with an entry point that names a ``Callback`` subclass:

.. code-block:: toml

    [project.entry-points."skipnets.plugins"]
    census = "my_package.callbacks:BlockCensus"

The CLI imports every entry point before it parses its config. jsonargparse resolves a short
``class_path`` among the imported subclasses of ``Callback``, so a config names a plugin by its
class name (``class_path: BlockCensus``) or by its full import path. A plugin that fails to import
is reported with a warning and skipped; a config that names it stops with that import error.

Setting ``SKIPNETS_NO_PLUGIN_AUTOLOAD=1`` turns autoloading off (``skipnets.autoload``, the switch
the registry obeys too): no entry point is imported, short names of plugin classes no longer
resolve, full import paths still work.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from skipnets.autoload import AUTOLOAD_ENV, autoload_enabled
from skipnets.errors import ConfigError

__all__ = [
    "AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "Plugin",
    "PluginLoadWarning",
    "autoload_enabled",
    "check_config_names",
    "discover_plugins",
    "load_plugin",
]

ENTRY_POINT_GROUP = "skipnets.plugins"


class PluginLoadWarning(UserWarning):
    """An installed plugin could not be imported; it is skipped."""


@dataclass(frozen=True)
class Plugin:
    """One ``skipnets.plugins`` entry point and what came of importing it."""

    name: str
    target: str
    distribution: str
    version: str
    cls: type | None = None
    error: str | None = None

    @property
    def class_name(self) -> str:
        return self.target.rpartition(":")[2].rpartition(".")[2]

    @property
    def class_path(self) -> str:
        """The dotted import path a config can use (``module.Class``)."""
        return self.target.replace(":", ".").replace(" ", "")

    @property
    def loaded(self) -> bool:
        return self.cls is not None

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) if self.cls is not None else None
        return doc.splitlines()[0] if doc else ""

    @property
    def source(self) -> str:
        return f"{self.distribution} {self.version}".strip() or "?"


_discovered: list[Plugin] | None = None


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _describe(ep: metadata.EntryPoint, load: bool) -> Plugin:
    dist = ep.dist
    name = (dist.metadata["Name"] or dist.name) if dist is not None else ""
    version = dist.version if dist is not None else ""
    plugin = Plugin(ep.name, ep.value, name, version)
    if not load:
        return plugin
    from lightning.pytorch.callbacks import Callback

    try:
        loaded = ep.load()
    except Exception as err:  # a broken third-party package must not break the CLI
        return Plugin(ep.name, ep.value, name, version, error=f"{type(err).__name__}: {err}")
    if not (isinstance(loaded, type) and issubclass(loaded, Callback)):
        error = f"{ep.value} is not a lightning.pytorch.Callback subclass"
        bases = [f"{b.__module__}.{b.__qualname__}" for b in getattr(loaded, "__mro__", ())]
        if any(b.startswith("pytorch_lightning.") for b in bases):
            error = (
                f"{ep.value} subclasses pytorch_lightning's Callback, from the standalone "
                "pytorch_lightning package; skipnets runs on the unified lightning package: "
                "write `from lightning.pytorch import Callback` instead"
            )
        return Plugin(ep.name, ep.value, name, version, error=error)
    return Plugin(ep.name, ep.value, name, version, cls=loaded)


def discover_plugins(*, load: bool | None = None, refresh: bool = False) -> list[Plugin]:
    """Every ``skipnets.plugins`` entry point, imported unless autoloading is off.

    Imports happen once per process (``refresh=True`` looks again); each plugin that fails to
    import raises a ``PluginLoadWarning`` and is returned with its ``error``. With ``load=False``
    (or autoloading off) nothing is imported and every plugin comes back unloaded.
    """
    global _discovered
    if load is None:
        load = autoload_enabled()
    if not load:
        return [_describe(ep, load=False) for ep in _entry_points()]
    if _discovered is None or refresh:
        _discovered = [_describe(ep, load=True) for ep in _entry_points()]
        for plugin in _discovered:
            if plugin.error:
                warnings.warn(
                    f"skipnets: plugin {plugin.name!r} ({plugin.target}, from {plugin.source}) "
                    f"could not be loaded and is skipped: {plugin.error}",
                    PluginLoadWarning,
                    stacklevel=2,
                )
    return list(_discovered)


def load_plugin(name: str) -> type:
    """The callback class of the plugin whose entry point is ``name``, imported even with
    autoloading off; a clear error when it is not installed or does not import."""
    matches = [ep for ep in _entry_points() if ep.name == name]
    if not matches:
        raise ConfigError(
            f"no installed plugin provides the {name!r} entry point in group "
            f"{ENTRY_POINT_GROUP!r}; the first-party plugins install with `pip install -e ./plugins`"
        )
    plugin = _describe(matches[0], load=True)
    if plugin.cls is None:
        raise ConfigError(f"plugin {name!r} ({plugin.target}) failed to load: {plugin.error}")
    return plugin.cls


def check_config_names(args: Sequence[str] | None) -> None:
    """Raise ``ConfigError`` when the command line or a config file it names uses a plugin
    that failed to load, with that plugin's import error (instead of a parse error that only
    says the class is unknown), or a class name close to a plugin's ("did you mean")."""
    if not isinstance(args, Sequence) or _discovered is None:
        return
    named = set(_named_classes(args))
    broken = [p for p in _discovered if p.error]
    for plugin in broken:
        spelled = {plugin.class_name, plugin.class_path, plugin.target} & named
        if spelled:
            raise ConfigError(
                f"the config uses {sorted(spelled)[0]}, but plugin {plugin.name!r} "
                f"({plugin.target}, from {plugin.source}) failed to load: {plugin.error}"
            )
    _check_spelling(named, [p.class_name for p in _discovered])


def _check_spelling(named: set[str], plugin_names: list[str]) -> None:
    """A short class name that names nothing but is close to a plugin's or to one of
    Lightning's callbacks gets a "did you mean", as an unknown architecture does."""
    import difflib

    import lightning.pytorch.callbacks as lightning_callbacks

    from skipnets import data

    known = (
        set(plugin_names)
        | {name for name in dir(lightning_callbacks) if name[:1].isupper()}
        | {"EMA", "Classifier", "Segmenter"}
        | set(data.__all__)
    )
    for name in sorted(named):
        if "." in name or name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
        if close:
            raise ConfigError(
                f"unknown callback or class {name!r}; did you mean {' or '.join(map(repr, close))}? "
                "(`skipnets plugins` lists the installed plugins)"
            )


def _named_classes(args: Sequence[str]) -> Iterator[str]:
    """Class names that ``args`` (and the config files they name) give as a ``class_path`` or
    as an entry of a ``callbacks`` list."""
    import yaml

    key: str | None = None
    for arg in args:
        if not isinstance(arg, str):
            continue
        if arg.startswith("-"):
            name, sep, value = arg.partition("=")
            key = None if sep else name
            if not sep:
                continue
        else:
            name, value, key = key or "", arg, None
        name = name.lstrip("-")
        path = Path(value)
        if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
            text = path.read_text()
        elif name in ("config", "c") or "callbacks" in name or name.endswith("class_path"):
            text = value
        else:
            continue
        try:
            parsed = yaml.safe_load(text)
        except (yaml.YAMLError, OSError):
            continue
        if isinstance(parsed, str):
            yield parsed
        else:
            yield from _class_paths(parsed)


def _class_paths(node: Any, in_callbacks: bool = False) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path" and isinstance(value, str):
                yield value
            else:
                yield from _class_paths(value, in_callbacks=key == "callbacks")
    elif isinstance(node, list):
        for item in node:
            if in_callbacks and isinstance(item, str):
                yield item
            else:
                yield from _class_paths(item)
    elif in_callbacks and isinstance(node, str):
        yield node
