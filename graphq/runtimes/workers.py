"""Work that does not fit one process: an ordered map over independent items, local or on Ray actors.

``WorkerPool(workers=0|1)`` runs everything in this process; ``WorkerPool(workers=N)`` starts a local Ray cluster
(``ray.init(num_cpus=N)``) with N actors, and ``WorkerPool(address=ADDR)`` joins an existing cluster. The callers
(eval / verify windows, sensitivity measurements, layer-wise calibration samples) never see Ray: they hand
``map`` a picklable ``setup`` (built once per worker and map call: sessions, slices) and a module-level
``work(state, item)``, and get the results back in item order, so they combine them exactly as the
single-process loop does.

Ray does the scheduling (``ray.util.ActorPool``) and the retries: an actor whose process dies is restarted
(``max_restarts``) and the call it was running is retried (``max_task_retries``). Each reply carries the worker's
process id and whether the actor was reconstructed, so the pool counts the restarts (``retried``), says so on
stderr, and reports them (``summary()``). An exception raised by ``work`` is not a death: it comes back and is
raised here as itself (a GraphqError stays one line).

``GRAPHQ_WORKER_CRASH_ONCE=PATH`` (fault injection, for the tests; read by the workers, so set before the cluster
starts): while a file exists at PATH, the next Ray worker call renames it to PATH.crashed and kills its own process
(``os._exit``), so the retry path can be exercised.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from typing import Any, Callable, Iterable, Iterator, TypeVar

from graphq.errors import GraphqError

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

RAY_MISSING = "--workers needs ray: pip install 'graphq[ray]'"
CRASH_ONCE_ENV = "GRAPHQ_WORKER_CRASH_ONCE"
DEFAULT_RETRIES = 3


def import_ray():
    """The ray module, or one GraphqError line saying how to get it."""
    try:
        import ray
    except ImportError:
        raise GraphqError(RAY_MISSING) from None
    return ray


class _Failure:
    """An exception raised by ``work`` on a worker, carried back to be raised in the caller."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _maybe_crash() -> None:
    """Fault injection: with GRAPHQ_WORKER_CRASH_ONCE=PATH, the one call that renames an existing PATH to
    PATH.crashed (atomic: one winner) kills its own process, as a lost machine would."""
    path = os.environ.get(CRASH_ONCE_ENV)
    if not path:
        return
    try:
        os.rename(path, path + ".crashed")
    except OSError:
        return
    os._exit(17)


class _Worker:
    """The Ray actor's body: one cached state (the latest map call's), built from its setup on first use."""

    def __init__(self) -> None:
        self.key = None
        self.state = None

    def run(self, key: int, setup_ref: list, work: Callable, item: Any) -> tuple[int, bool, Any]:
        import ray

        _maybe_crash()
        context = ray.get_runtime_context()
        try:
            if self.key != key:
                self.state = None  # the previous call's sessions go before the next are built
                self.state = ray.get(setup_ref[0])()
                self.key = key
            result = work(self.state, item)
        except Exception as exc:  # noqa: BLE001 - raised again in the caller
            result = _Failure(exc)
        return os.getpid(), bool(context.was_current_actor_reconstructed), result


class WorkerPool:
    """An ordered map over independent items: in this process, or on Ray actors (see the module docstring)."""

    def __init__(self, workers: int | None = None, address: str | None = None, retries: int = DEFAULT_RETRIES,
                 env: dict[str, str] | None = None):
        """Checks at once that ray is importable; the cluster starts (or is joined) at the first distributed map."""
        if workers is not None and workers < 0:
            raise GraphqError(f"--workers must be >= 0, got {workers}")
        self.address = address
        self.distributed = bool(address) or (workers or 0) > 1
        self.workers = workers or 1
        self.retries = retries
        # Each actor holds one of Ray's CPUs: one onnxruntime thread each unless GRAPHQ_THREADS says otherwise.
        self.env = {"GRAPHQ_THREADS": os.environ.get("GRAPHQ_THREADS", "1"), **(env or {})}
        if os.environ.get(CRASH_ONCE_ENV):
            self.env.setdefault(CRASH_ONCE_ENV, os.environ[CRASH_ONCE_ENV])
        self.retried = 0
        self._restarted: set[int] = set()
        self._calls = itertools.count()
        self._ray = None
        self._actors: list = []
        self._started_ray = False
        if self.distributed:
            import_ray()

    def _start(self) -> None:
        ray = import_ray()
        address, runtime_env = self.address, {"env_vars": dict(self.env)}
        try:
            if address:
                if not ray.is_initialized():
                    ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env,
                             logging_level=logging.WARNING)
                    self._started_ray = True
                if self.workers <= 1:
                    self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
            else:
                if ray.is_initialized():
                    raise GraphqError("ray is already initialized in this process: pass its address instead of --workers")
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env,
                         logging_level=logging.WARNING)
                self._started_ray = True
            self._ray = ray
        except GraphqError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            where = f"the Ray cluster at {address}" if address else f"a local Ray cluster of {self.workers} workers"
            raise GraphqError(f"could not start {where}: {_first_line(exc)}") from exc

    def map(self, setup: Callable[[], S], work: Callable[[S, T], R], items: Iterable[T]) -> Iterator[R]:
        """``work(state, item)`` for every item, results in item order; ``state = setup()`` once per worker.

        ``setup`` and ``work`` must be picklable (module-level functions, partials of them) when distributed."""
        if not self.distributed:
            state = setup()
            for item in items:
                yield work(state, item)
            return
        if self._ray is None:
            self._start()
        if not self._actors:
            actor = self._ray.remote(num_cpus=1, max_restarts=self.retries, max_task_retries=self.retries)(_Worker)
            self._actors = [actor.remote() for _ in range(self.workers)]
        from ray.util import ActorPool

        # A fresh ActorPool per call: calls an earlier map left in flight (it stopped early) just queue before
        # these on their actors.
        ray = self._ray
        key = next(self._calls)
        setup_ref = [ray.put(setup)]  # in a list: Ray leaves nested references unresolved, the actor gets it once
        pool = ActorPool(self._actors)
        try:
            for pid, reconstructed, result in pool.map(lambda a, item: a.run.remote(key, setup_ref, work, item), items):
                if reconstructed and pid not in self._restarted:
                    self._restarted.add(pid)
                    self.retried += 1
                    print(f"graphq: warning: a worker process died and Ray restarted it (pid {pid}); its work was "
                          f"retried ({self.retried} retried in all)", file=sys.stderr)
                if isinstance(result, _Failure):
                    raise result.exc
                yield result
        except ray.exceptions.RayActorError as exc:
            raise GraphqError(f"a Ray worker died more often than it may be retried: {_first_line(exc)}") from exc

    def summary(self) -> dict | None:
        """For report.json and the JSON outputs: None when everything ran in this process."""
        if not self.distributed:
            return None
        return {"workers": self.workers, "ray_address": self.address, "retried": self.retried}

    def release(self) -> None:
        """End the actors (each holds one of the cluster's CPUs); the next map starts new ones."""
        for actor in self._actors:
            try:
                self._ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._actors = []

    def close(self) -> None:
        ray = self._ray
        self.release()
        if self._started_ray and ray is not None:
            ray.shutdown()
        self._started_ray = False
        self._ray = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_LOCAL = None


def local_pool() -> WorkerPool:
    """The in-process pool, for callers given none."""
    global _LOCAL
    if _LOCAL is None:
        _LOCAL = WorkerPool()
    return _LOCAL
