"""skipnets: train and study deep networks with and without skip connections."""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from skipnets.errors import ConfigError, SkipnetsError, UnknownModelError

if TYPE_CHECKING:
    from skipnets.module import Classifier
    from skipnets.registry import create_model, list_models, model_info, register_model
    from skipnets.segmentation import Segmenter

try:
    __version__ = version("skipnets")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# Everything that needs torch loads on first use: `import skipnets` (and so the `skipnets`
# command, before it knows what it will run) stays light, and model-only users never load
# Lightning.
_LAZY = {
    "Classifier": "skipnets.module",
    "Segmenter": "skipnets.segmentation",
    **dict.fromkeys(
        ("create_model", "list_models", "model_info", "register_model"), "skipnets.registry"
    ),
}

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
