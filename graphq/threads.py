"""How many threads graphq's onnxruntime sessions and numpy's BLAS use: ``GRAPHQ_THREADS`` (unset or 0: each
library's default, every core).

The layer-wise searches make thousands of small and medium BLAS calls. On a machine whose cores are already busy
(other jobs, or onnxruntime's own pool) OpenBLAS's threads wait on each other at every call: on 2 shared cores
AWQ's clip search ran 45x and GPTQ 15x slower with 2 BLAS threads than with one (bench/results/awq_speed.md), so
``GRAPHQ_THREADS=1`` is the setting for a shared machine, and ``busy_machine_hint`` says so when the load shows it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from graphq.errors import GraphqError


def configured_threads() -> int | None:
    """``GRAPHQ_THREADS`` as a positive count, or None (the libraries' defaults)."""
    value = os.environ.get("GRAPHQ_THREADS", "").strip()
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        raise GraphqError(f"GRAPHQ_THREADS={value!r} is not a whole number: set it to a thread count, or 0 for all cores")
    if threads < 0:
        raise GraphqError(f"GRAPHQ_THREADS={threads} is negative: set it to a thread count, or 0 for all cores")
    return threads or None


@contextmanager
def blas_threads(threads: int | None = None) -> Iterator[None]:
    """numpy's BLAS limited to ``threads`` (default ``configured_threads()``) inside the block; unlimited if None."""
    threads = configured_threads() if threads is None else threads
    if not threads:
        yield
        return
    with _blas_controller().limit(limits=threads, user_api="blas"):
        yield


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """One scan of the loaded libraries per process: ``threadpool_limits`` rescans them on every call (2 ms here),
    and the capture enters ``blas_threads(1)`` once per calibration sample and layer."""
    import numpy  # noqa: F401  (its BLAS must be loaded before the scan)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


F = TypeVar("F", bound=Callable)


def with_configured_threads(function: F) -> F:
    """Run ``function`` under ``blas_threads()``: the API entry points (quantize, analyze) honour GRAPHQ_THREADS."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with blas_threads():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def busy_machine_hint() -> str | None:
    """A one-line hint when the machine is already busier than its cores and no thread count was set."""
    if os.environ.get("GRAPHQ_THREADS", "").strip() or not hasattr(os, "getloadavg"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0]
    if cores > 1 and load >= cores:
        return (f"the machine was busy when this run started (load {load:.1f} on {cores} cores): GRAPHQ_THREADS=1 is "
                "usually much faster then (threads waiting on each other cost more than they compute)")
    return None
