"""This process's peak resident memory, for report.json and the benches."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak resident memory since this process was exec'ed (VmHWM).

    Not ru_maxrss: on Linux it survives execve, so a quantizer started by (v)fork + exec from a larger process
    (a bench that already exported or evaluated a model) would report its parent's high-water mark.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
