"""The switch that keeps other packages' code out: ``SKIPNETS_NO_PLUGIN_AUTOLOAD=1``.

Both entry-point groups obey it. Plugin discovery (``skipnets.plugins``) imports no plugin, so
a config must name one by its full import path; the registry (``skipnets.models``) loads only
the architectures of skipnets itself, whose zoo comes through the same group.
"""

from __future__ import annotations

import os
from importlib import metadata

__all__ = ["AUTOLOAD_ENV", "FIRST_PARTY", "autoload_enabled", "loads_with_autoload_off"]

AUTOLOAD_ENV = "SKIPNETS_NO_PLUGIN_AUTOLOAD"
#: The distribution whose own entry points load even with autoloading off.
FIRST_PARTY = "skipnets"


def autoload_enabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in ("", "0", "false", "no")


def loads_with_autoload_off(entry_point: metadata.EntryPoint) -> bool:
    """Whether ``entry_point`` comes from skipnets itself, not from another package."""
    dist = getattr(entry_point, "dist", None)
    name = (dist.metadata["Name"] or dist.name) if dist is not None else ""
    return name.lower().replace("_", "-") == FIRST_PARTY
