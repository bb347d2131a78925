"""``DataLoader`` worker processes that leave the parent's CUDA tensors alone.

On Linux a ``DataLoader`` starts its workers with ``fork``: each child inherits the parent's
whole heap, including garbage the parent's collector has not reached yet, such as the reference
cycles that autograd graphs, hooks and callbacks leave behind. A child's first collection frees
that garbage; where it holds a CUDA tensor, the child (which has no CUDA context) aborts with
"CUDA error: initialization error" and the loader reports "DataLoader worker exited
unexpectedly". Which run it hits depends on the collector's timing.

:class:`WorkerLoader` starts its workers with every object of the parent frozen
(:func:`gc.freeze`), so no child ever collects an object it inherited; the parent collects its
young garbage just before and unfreezes its objects at once after, and collects as before.
"""

from __future__ import annotations

import gc
from typing import Any

from torch.utils.data import DataLoader


class WorkerLoader(DataLoader):
    """A ``DataLoader`` whose worker processes never collect the parent's objects."""

    def _get_iterator(self) -> Any:  # where the worker processes start
        if self.num_workers == 0:
            return super()._get_iterator()
        # The young garbage first, so that unfreezing does not move it to the oldest generation.
        gc.collect(1)
        gc.freeze()
        try:
            return super()._get_iterator()
        finally:
            gc.unfreeze()
