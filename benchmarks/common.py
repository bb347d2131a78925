"""What every benchmark shares: interleaved timing, result rows, peak resident memory."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Row:
    """One line of the table: ``value`` of skipnets against ``baseline_value`` of the baseline.

    ``ratio`` is always "higher is better for skipnets" (a throughput ratio, or a speed-up):
    for a time or another quantity where less is better (``lower_is_better``), baseline over
    value.
    """

    benchmark: str
    unit: str
    value: float | None
    baseline: str
    baseline_value: float | None
    target: str = ""
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    lower_is_better: bool = False

    @property
    def ratio(self) -> float | None:
        if not self.value or not self.baseline_value:
            return None
        if self.lower_is_better:
            return self.baseline_value / self.value
        return self.value / self.baseline_value

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


def interleaved(
    runs: dict[str, Callable[[], float]], repeats: int, *, log: bool = True
) -> dict[str, float]:
    """Best rate of each run over ``repeats`` rounds, alternating their order every round.

    Each callable returns a rate (higher is better). Alternating A B, B A, ... spreads slow
    phases of a shared machine over all runs; the best of several repeats is the least disturbed
    one (as ``timeit`` advises for the minimum time).
    """
    names = list(runs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            rates[name].append(runs[name]())
            if log:
                print(f"  {name}: {rates[name][-1]:.4g}", file=sys.stderr, flush=True)
    return {name: max(values) for name, values in rates.items()}


def rate(fn: Callable[[], Any], count: int = 1, *, warmup: int = 1) -> float:
    """``count`` divided by the seconds one call of ``fn`` takes, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def fwd_bwd(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward and backward pass, gradients dropped (what a training step computes)."""
    model.zero_grad(set_to_none=True)
    model(x).float().sum().backward()
