"""Runtime: the one thread that owns the device and the experts, and runs batches from task pools."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Hashable, Protocol, Sequence

import torch

from lightning_moe.server.task_pool import PoolClosedError

logger = logging.getLogger(__name__)


class RuntimePool(Protocol):
    """What the Runtime runs batches from: a :class:`~lightning_moe.server.task_pool.TaskPool` or a
    :class:`~lightning_moe.server.kept_forwards.KeptForwards`."""

    name: str
    wakeup: threading.Event | None  # the Runtime's: set it when work arrives

    @property
    def oldest_submit_time(self) -> float | None:
        """``time.monotonic()`` when the oldest work that should run now arrived; None if none."""

    @property
    def turn_time(self) -> float | None:
        """When the work the Runtime owes this pool became due (the pool with the earliest runs first); None if none."""

    def group_submit_time(self, group: Hashable) -> float | None:
        """When the oldest work of ``group`` (a client's network) that should run now arrived; None if none."""

    @property
    def deferred_submit_time(self) -> float | None:
        """When the oldest work that may wait arrived (run only if no pool has work that should run now); None if none."""

    def run_batch(self, device: torch.device | str | None = None) -> int:
        """Run one batch on ``device``; returns its rows (0 if there was none). Errors go to the requests' Futures."""

    def close(self, error: BaseException | None = None) -> None:
        """Refuse new work and fail what waits with ``error``."""

    def reopen(self) -> None:
        """Take work again after :meth:`close`."""


class HostShutdownError(PoolClosedError):
    """The host shut down before the task ran."""


class Runtime:
    """Runs batches from ``pools`` in one thread; the pool owed work the longest (its ``turn_time``) goes first.

    Sleeps on an Event while every pool is empty (no polling). :meth:`shutdown` lets the batch
    in progress finish, joins the thread and gives every waiting task a HostShutdownError.
    """

    def __init__(self, pools: Sequence[RuntimePool], device: torch.device | str = "cpu", name: str = "lightning_moe-runtime"):
        self.pools = list(pools)
        self.device = torch.device(device)
        self.name = name
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        self._queue_age = (0.0, 0.0)  # (when measured, age), so that many requests a millisecond scan the pools once
        self._group_ages: dict[Hashable, tuple[float, float]] = {}  # the same per client network
        for pool in self.pools:  # a pool serves one running runtime at a time
            pool.wakeup = self._wakeup

    @property
    def is_alive(self) -> bool:
        """Whether the runtime thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Runtime":
        """Start the runtime thread (once)."""
        if self._thread is not None:
            raise RuntimeError("the runtime was already started")
        for pool in self.pools:
            pool.reopen()  # pools of a previous runtime (e.g. a host restarted with the same backends)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def queue_age(self, group: Hashable = None) -> float:
        """Seconds the oldest task waiting in any pool has waited (0.0 if none waits); measured at most every 10 ms.

        With ``group`` (a client's network): the oldest task of that group, which is what its next request would
        wait behind, as the pools share their batches fairly between groups."""
        now = time.monotonic()
        if group is not None:
            measured, age = self._group_ages.get(group, (0.0, 0.0))
            if now - measured > 0.01:
                times = [t for t in (pool.group_submit_time(group) for pool in self.pools) if t is not None]
                age = max(now - min(times), 0.0) if times else 0.0
                if len(self._group_ages) >= 4096:  # bounded: the groups of the last few seconds' requests
                    self._group_ages.clear()
                self._group_ages[group] = (now, age)
            return age
        measured, age = self._queue_age
        if now - measured > 0.01:
            oldest = _oldest(self.pools, lambda p: p.oldest_submit_time)
            submitted = None if oldest is None else oldest.oldest_submit_time
            age = 0.0 if submitted is None else max(now - submitted, 0.0)
            self._queue_age = (now, age)
        return age

    def _pick(self) -> RuntimePool | None:
        """The pool owed work the longest; if none is, the one with the oldest deferred work."""
        pool = _oldest(self.pools, lambda p: p.turn_time)
        return pool if pool is not None else _oldest(self.pools, lambda p: p.deferred_submit_time)

    def _run(self) -> None:
        logger.debug("runtime %s started on %s with %d pools", self.name, self.device, len(self.pools))
        while not self._stop.is_set():
            self._wakeup.clear()  # clear before looking, so a submit after the look wakes us
            pool = self._pick()
            if pool is None:
                self._wakeup.wait()
                continue
            try:
                pool.run_batch(self.device)
                self.batches_run += 1
            except Exception:  # noqa: BLE001 - a bug here must not kill the thread that serves everyone
                logger.exception("runtime %s: unexpected error in pool %s", self.name, pool.name)
        logger.debug("runtime %s stopped after %d batches", self.name, self.batches_run)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop after the batch in progress, join the thread, fail the tasks still waiting. Idempotent."""
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("runtime %s did not stop within %s s", self.name, timeout)
        for pool in self.pools:
            pool.close(HostShutdownError(f"the host is shutting down; task of {pool.name} was not run"))

    def __enter__(self) -> "Runtime":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _oldest(pools: Sequence[RuntimePool], submitted: Callable[[RuntimePool], float | None]) -> RuntimePool | None:
    best, best_time = None, None
    for pool in pools:
        when = submitted(pool)
        if when is not None and (best_time is None or when < best_time):
            best, best_time = pool, when
    return best
