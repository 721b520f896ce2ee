"""SIGTERM handled like Ctrl-C: the running command unwinds (staging folders are removed) and exits 128 + 15.

Without a handler, SIGTERM (what `kill`, systemd and container runtimes send) ends Python at once, skipping every
``finally`` and leaving the output's ``.partial`` staging folder behind. The handler raises ``Terminated`` instead, a
BaseException so that no ``except Exception`` on the way swallows it.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

#: The exit status of a process ended by SIGTERM, by shell convention.
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def handle_sigterm() -> Any:
    """Turn SIGTERM into ``Terminated``; returns the previous handler for ``restore_sigterm``.

    Only the main thread may set handlers (Python's rule); elsewhere (a library caller's worker thread) this does
    nothing and SIGTERM keeps its previous meaning."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def restore_sigterm(previous: Any) -> None:
    """Put back what ``handle_sigterm`` replaced (the CLI runs in-process under tests and other callers)."""
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
