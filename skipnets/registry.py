"""The architecture registry: builders recorded by name, with what users need to know about them.

    @register_model(family="resnet", paper=HE_2016, has_skip=True, input=ImageInput(3, 32))
    def resnet20(num_classes=10, in_channels=3, **kwargs): ...

    create_model("resnet20", num_classes=100)
    list_models("resnet*")          # natural order: resnet20 before resnet110

Third-party packages add architectures through the ``skipnets.models`` entry-point group: each
entry is a callable that registers models, or a module whose import does. Entry points load
lazily, once, on the first use of the registry.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

from torch import nn

from skipnets.errors import ConfigError, UnknownModelError

__all__ = [
    "ImageInput",
    "ModelInfo",
    "Paper",
    "VectorInput",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "skipnets.models"


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    year: int
    arxiv: str | None = None

    def __str__(self) -> str:
        ref = f" (arXiv:{self.arxiv})" if self.arxiv else ""
        return f"{self.authors} {self.year}, {self.title}{ref}"


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
):
    """Record ``fn`` as the builder of the model named after it (or ``name``).

    Builders take ``num_classes`` and, for image models, ``in_channels`` (vector models take
    ``in_features``). Registering a name twice is an error.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        info = ModelInfo(key, builder, family, paper, input, has_skip, task)
        _add(info)
        for alias in aliases:
            _add(ModelInfo(alias, builder, family, paper, input, has_skip, task, alias_of=key))
        return builder

    return decorate(fn) if fn is not None else decorate


def _add(info: ModelInfo) -> None:
    if info.name in _models:
        existing = _models[info.name].builder
        raise ConfigError(
            f"model {info.name!r} is already registered (by {existing.__module__}."
            f"{existing.__qualname__}); choose another name"
        )
    _models[info.name] = info


def _load_entry_points() -> None:
    """Import every ``skipnets.models`` entry point once; a broken one warns and is skipped."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    import skipnets.models  # noqa: F401 - the first-party zoo registers on import
    from skipnets.plugins import autoload_enabled

    if not autoload_enabled():  # SKIPNETS_NO_PLUGIN_AUTOLOAD: only the first-party zoo
        return
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()
        except Exception as err:  # a third-party package must not break the registry
            warnings.warn(
                f"skipnets: could not load models from entry point {ep.name!r} ({ep.value}): "
                f"{type(err).__name__}: {err}",
                stacklevel=2,
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
