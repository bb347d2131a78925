"""skipnets: train and study deep networks with and without skip connections."""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from skipnets.errors import ConfigError, SkipnetsError, UnknownModelError
from skipnets.registry import create_model, list_models, model_info, register_model

try:
    __version__ = version("skipnets")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# The Lightning parts load on first use, so `import skipnets` stays light for model-only users.
_LAZY = {"Classifier": "skipnets.module", "Segmenter": "skipnets.segmentation"}

__all__ = [
    "Classifier",
    "ConfigError",
    "Segmenter",
    "SkipnetsError",
    "UnknownModelError",
    "__version__",
    "create_model",
    "list_models",
    "model_info",
    "register_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skipnets' has no attribute {name!r}")
