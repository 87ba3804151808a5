"""Timing helpers shared by the benchmark scripts (these machines are noisy: compare
alternating runs inside one process)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

# glibc returning large blocks to the OS makes allocation-heavy timings swing between runs.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def pin_malloc() -> None:
    """Re-execute the running script with malloc's thresholds pinned (once)."""
    if any(os.environ.get(key) != value for key, value in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})


def paired_ratio(plain: Callable[[], object], other: Callable[[], object], pairs: int) -> float:
    """Median of other/plain over alternating timed pairs (after one warm-up each)."""
    plain(), other()
    ratios = []
    for _ in range(pairs):
        start = time.perf_counter()
        plain()
        middle = time.perf_counter()
        other()
        ratios.append((time.perf_counter() - middle) / (middle - start))
    return statistics.median(ratios)
