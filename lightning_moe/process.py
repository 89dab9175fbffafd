"""This process's shared state in one place: one object per kind, made on first use, and new after a fork.

A forked child must not use its parent's sockets, threads or event loop, so every per-process object
(the DHT nodes and the health registry of ``shared.py``, the HTTP connection pool, the expert-call
threads, the network loop) lives in the :class:`ProcessContext` of the process that made it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ProcessContext:
    """Named per-process objects; :meth:`get` makes one on first use (thread-safe)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self._objects: dict[str, Any] = {}

    def get(self, name: str, factory: Callable[[], T]) -> T:
        with self.lock:
            if name not in self._objects:
                self._objects[name] = factory()
            return self._objects[name]

    def pop(self, name: str) -> Any:
        """Forget ``name`` (the next :meth:`get` makes a new one); returns what was there, or None."""
        with self.lock:
            return self._objects.pop(name, None)


_context: ProcessContext | None = None
_lock = threading.Lock()


def context() -> ProcessContext:
    """This process's context (a forked child gets a new, empty one)."""
    global _context
    with _lock:
        if _context is None or _context.pid != os.getpid():
            _context = ProcessContext()
        return _context
