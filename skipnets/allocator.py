"""Keep freed CPU memory inside the process between training steps (glibc's malloc).

glibc serves an allocation above its "mmap threshold" with a fresh ``mmap`` and returns the
memory to the system when it is freed, and it trims the top of the heap as soon as enough of it
is free. A training step frees and reallocates the same activations and gradients every step,
so each step pays page faults on memory it had a moment ago: on a CIFAR ResNet-20 step on CPU,
about 1,500 faults per step, and a visibly slower forward pass. PyTorch's own guides for CPU
training suggest a caching allocator (jemalloc, tcmalloc) for the same reason.

``keep_freed_memory`` raises both thresholds, so that memory freed during a step is reused by
the next one (ResNet-20: about 20 faults per step). ``skipnets fit`` (and every other
``SkipnetsCLI`` command) calls it once at start. The price is that the process keeps up to
``trim_threshold`` (256 MiB) of freed memory instead of returning it; peak memory is unchanged. Nothing is changed when the user has chosen for themselves (an
``LD_PRELOAD``-ed allocator, ``MALLOC_*`` variables or ``GLIBC_TUNABLES``), outside glibc, or
with ``SKIPNETS_SYSTEM_MALLOC=1``.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit for this setting on 64-bit systems
TRIM_THRESHOLD = 256 * 2**20
OPT_OUT_ENV = "SKIPNETS_SYSTEM_MALLOC"
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Set glibc's mmap and trim thresholds; returns whether both were set."""
    if sys.platform != "linux" or os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return False
    if any(name in os.environ for name in _USER_SETTINGS) or os.environ.get("LD_PRELOAD"):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (AttributeError, OSError, ValueError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting either one turns glibc's dynamic adjustment off.
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
