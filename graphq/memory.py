"""This process's peak resident memory, for report.json and the benches."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def _status_kib(*keys: str) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values


def peak_rss_bytes() -> int:
    """Peak resident memory since this process was exec'ed (VmHWM).

    Not ru_maxrss: on Linux it survives execve, so a quantizer started by (v)fork + exec from a larger process
    (a bench that already exported or evaluated a model) would report its parent's high-water mark.
    """
    peak = _status_kib("VmHWM").get("VmHWM")
    if peak is not None:
        return peak * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident memory now (VmRSS: anonymous plus file pages mapped and touched, e.g. mmapped weights); 0 where
    /proc is missing."""
    return _status_kib("VmRSS").get("VmRSS", 0) * 1024


def trace(label: str) -> None:
    """With GRAPHQ_MEMTRACE=1, print the resident memory now and its peak so far (stderr), for profiling."""
    if not os.environ.get("GRAPHQ_MEMTRACE"):
        return
    kib = _status_kib("VmRSS", "VmHWM", "RssAnon", "RssFile")
    mib = {key: value / 1024 for key, value in kib.items()}
    print(f"graphq: memory {label}: rss {mib.get('VmRSS', 0):.0f} MiB (anon {mib.get('RssAnon', 0):.0f}, "
          f"file {mib.get('RssFile', 0):.0f}), peak {mib.get('VmHWM', 0):.0f} MiB", file=sys.stderr)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim), so that arrays just dropped stop
    counting in the resident memory; nothing where the C library has no such call."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
