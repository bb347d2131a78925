"""The architecture registry: builders recorded by name, with what users need to know about them.

    @register_model(family="resnet", paper=HE_2016, has_skip=True, input=ImageInput(3, 32))
    def resnet20(num_classes=10, in_channels=3, **kwargs): ...

    create_model("resnet20", num_classes=100)
    list_models("resnet*")          # natural order: resnet20 before resnet110

Architectures come through the ``skipnets.models`` entry-point group, skipnets' own zoo as well
as other packages': each entry is a callable that registers models, or a module whose import
does. Entry points load lazily, once, on the first use of the registry; with autoloading
switched off (``skipnets.autoload``) only skipnets' own load.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import MappingProxyType
from typing import Any, Literal

from torch import nn

from skipnets.autoload import autoload_enabled, loads_with_autoload_off
from skipnets.errors import ConfigError, SkipnetsError, UnknownModelError
from skipnets.papers import Paper

__all__ = [
    "ImageInput",
    "ModelInfo",
    "Paper",
    "VectorInput",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
    "variant",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "skipnets.models"


@dataclass(frozen=True)
class ImageInput:
    """The input a model was designed for: ``channels`` x ``size`` x ``size`` images."""

    channels: int = 3
    size: int = 32


@dataclass(frozen=True)
class VectorInput:
    """Flat feature vectors; ``features`` is the paper's input width (if any)."""

    features: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module] = field(repr=False)
    family: str
    paper: Paper | None
    input: ImageInput | VectorInput
    has_skip: bool
    task: Literal["classification", "segmentation"] = "classification"
    alias_of: str | None = None
    #: Old keyword names the builder still accepts: ``{old: new}``.
    renamed: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def input_kind(self) -> str:
        return "vector" if isinstance(self.input, VectorInput) else "image"

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.builder) or ""
        return doc.splitlines()[0] if doc else ""


_models: dict[str, ModelInfo] = {}
_entry_points_loaded = False


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    family: str,
    paper: Paper | None = None,
    input: ImageInput | VectorInput = ImageInput(),
    has_skip: bool,
    task: Literal["classification", "segmentation"] = "classification",
    name: str | None = None,
    aliases: tuple[str, ...] = (),
    renamed: Mapping[str, str] | None = None,
):
    """Record ``fn`` as the builder of the model named after it (or ``name``).

    Builders take ``num_classes`` and, for image models, ``in_channels`` (vector models take
    ``in_features``). Registering a name twice is an error. ``aliases`` are other names for the
    same model; ``renamed`` maps keyword names the builder used to take to their new names, so
    that old configs and checkpoints still build (with a warning).
    """
    renamed = MappingProxyType(dict(renamed or {}))

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        meta = dict(family=family, paper=paper, input=input, has_skip=has_skip, task=task)
        _add(ModelInfo(key, builder, **meta, renamed=renamed))
        for alias in aliases:
            _add(ModelInfo(alias, builder, **meta, alias_of=key, renamed=renamed))
        return builder

    return decorate(fn) if fn is not None else decorate


def variant(
    name: str, builder: Callable[..., nn.Module], summary: str, /, **fixed: Any
) -> Callable[..., nn.Module]:
    """``builder`` with the arguments ``fixed``: a builder of its own, called ``name``.

    Variants that differ only in numbers are a table and one function (torchvision's and
    timm's way); ``register_model(variant(...), ...)`` registers one row. The variant takes the
    rest of ``builder``'s arguments (so ``create_model`` lists exactly those), and ``summary``
    is its docstring, the line ``skipnets models`` shows::

        for depth in (20, 32, 44):
            register_model(variant(f"resnet{depth}", cifar_resnet, f"ResNet-{depth}.", depth=depth),
                           family="resnet", has_skip=True)
    """
    signature = inspect.signature(builder)
    unknown = sorted(set(fixed) - set(signature.parameters))
    if unknown:
        raise TypeError(f"{builder.__qualname__} takes no argument {', '.join(unknown)}")
    if any(p.kind in (p.POSITIONAL_ONLY, p.VAR_POSITIONAL) for p in signature.parameters.values()):
        raise TypeError(f"{builder.__qualname__}: a variant's builder takes keyword arguments")
    rest = signature.replace(
        parameters=[p for n, p in signature.parameters.items() if n not in fixed]
    )

    def build(*args: Any, **kwargs: Any) -> nn.Module:
        arguments = dict(fixed)
        for key, value in rest.bind(*args, **kwargs).arguments.items():
            if rest.parameters[key].kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            else:
                arguments[key] = value
        return builder(**arguments)

    build.__signature__ = rest  # type: ignore[attr-defined]
    build.__name__ = build.__qualname__ = name
    build.__module__ = builder.__module__
    build.__doc__ = summary
    return build


def _add(info: ModelInfo) -> None:
    if info.name in _models:
        existing = _models[info.name].builder
        raise ConfigError(
            f"model {info.name!r} is already registered (by {existing.__module__}."
            f"{existing.__qualname__}); choose another name"
        )
    _models[info.name] = info


def _load_entry_points() -> None:
    """Import every ``skipnets.models`` entry point once.

    Another package's broken entry point warns and is skipped; skipnets' own must load.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    everyone = autoload_enabled()  # off: SKIPNETS_NO_PLUGIN_AUTOLOAD, skipnets' own zoo only
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        first_party = loads_with_autoload_off(ep)
        if not (everyone or first_party):
            continue
        try:
            loaded = ep.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()
        except Exception as err:
            if first_party:
                _entry_points_loaded = False
                raise
            warnings.warn(  # a third-party package must not break the registry
                f"skipnets: could not load models from entry point {ep.name!r} ({ep.value}): "
                f"{type(err).__name__}: {err}",
                stacklevel=3,
            )
    if not any(info.builder.__module__.startswith("skipnets.") for info in _models.values()):
        raise SkipnetsError(
            f"skipnets' own architectures are missing: its metadata lacks the "
            f"{ENTRY_POINT_GROUP!r} entry point. Reinstall skipnets (`make install`, or "
            "`pip install -e .` in the repository); a stale skipnets.egg-info folder in the "
            "current directory hides the installed metadata: delete it"
        )


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def list_models(pattern: str = "*", *, include_aliases: bool = True) -> list[str]:
    """Registered names matching a shell wildcard, in natural order (resnet20 before resnet110)."""
    _load_entry_points()
    names = [
        n
        for n, info in _models.items()
        if fnmatch.fnmatchcase(n, pattern) and (include_aliases or info.alias_of is None)
    ]
    return sorted(names, key=_natural_key)


def model_info(name: str) -> ModelInfo:
    _load_entry_points()
    try:
        return _models[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_models), n=5, cutoff=0.5)
        hint = (
            f"did you mean {', '.join(close)}?"
            if close
            else "run `skipnets models` to list the registered names"
        )
        raise UnknownModelError(f"unknown model {name!r}: {hint}") from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` with the builder's keyword arguments.

    An unknown name raises an error naming the closest registered names; a keyword the builder
    does not take raises an error listing the ones it does.
    """
    info = model_info(name)
    kwargs = _renew(info, kwargs)
    signature = inspect.signature(info.builder)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if not takes_any:
        unknown = sorted(set(kwargs) - set(signature.parameters))
        if unknown:
            accepted = ", ".join(signature.parameters)
            raise ConfigError(
                f"model {name!r} does not take {', '.join(map(repr, unknown))}; "
                f"it takes: {accepted}"
            )
    model = info.builder(**kwargs)
    model.registry_name = name
    return model


def _renew(info: ModelInfo, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the builder's old keyword names replaced by the new ones."""
    old = [key for key in kwargs if key in info.renamed]
    if not old:
        return kwargs
    kwargs = dict(kwargs)
    for key in old:
        new = info.renamed[key]
        if new in kwargs:
            raise ConfigError(
                f"model {info.name!r} got both {key!r} and {new!r}, which is its new name: "
                f"give only {new!r}"
            )
        warnings.warn(
            f"model {info.name!r}: {key!r} is now called {new!r}; write {new!r} in new configs",
            FutureWarning,
            stacklevel=3,
        )
        kwargs[new] = kwargs.pop(key)
    return kwargs
