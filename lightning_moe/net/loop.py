"""One asyncio event loop per process for the network layer's own services (relays), on a daemon thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any, Coroutine

_lock = threading.Lock()
_loop: tuple[int, asyncio.AbstractEventLoop, threading.Thread] | None = None


def process_loop() -> asyncio.AbstractEventLoop:
    """This process's network loop, started on first use (a forked child starts its own)."""
    global _loop
    with _lock:
        if _loop is None or _loop[0] != os.getpid() or not _loop[2].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="lightning_moe.net", daemon=True)
            thread.start()
            _loop = (os.getpid(), loop, thread)
        return _loop[1]


def submit(coro: Coroutine) -> concurrent.futures.Future:
    """Run ``coro`` on the process's network loop; the future gives its result."""
    return asyncio.run_coroutine_threadsafe(coro, process_loop())


def run(coro: Coroutine, timeout: float) -> Any:
    """Run ``coro`` on the network loop and wait at most ``timeout`` s for its result (from another thread)."""
    future = submit(coro)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"network call did not finish within {timeout} s") from None
