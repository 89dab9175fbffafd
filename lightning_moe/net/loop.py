"""One asyncio event loop per process for the network layer's own services (relays), on a daemon thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine

from lightning_moe.process import context

def _start_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="lightning_moe.net", daemon=True).start()
    return loop


def process_loop() -> asyncio.AbstractEventLoop:
    """This process's network loop, started on first use (a forked child starts its own)."""
    return context().get("net_loop", _start_loop)


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
