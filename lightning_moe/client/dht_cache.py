"""CachedExpertLookup: DHT answers reused for a few seconds, and endpoints that just failed left out."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any


class CachedExpertLookup:
    """Wraps a DHT for beam search: ``get_active_children`` answers are reused for ``ttl`` seconds.

    Endpoints reported by :meth:`ban` are left out of the last grid dimension's answers for
    ``ban_time`` seconds, so a host that just died stops being chosen before its DHT records
    expire. (Higher prefixes name just one of the hosts below them, so they are not filtered.)

    Args:
        dht: a :class:`lightning_moe.dht.DHT` (anything with ``get_active_children``).
        grid_dims: number of grid dimensions; prefixes with ``grid_dims - 1`` dots hold endpoints.
        ttl: seconds an answer is reused.
        ban_time: seconds a failed endpoint is left out.
    """

    def __init__(self, dht: Any, grid_dims: int, ttl: float = 5.0, ban_time: float = 10.0):
        self.dht, self.ttl, self.ban_time = dht, ttl, ban_time
        self.leaf_depth = grid_dims - 1
        self._children: dict[str, tuple[float, dict[int, list[str]]]] = {}
        self._banned: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def wait_timeout(self) -> float:
        return float(getattr(self.dht, "wait_timeout", 5.0))

    def ban(self, endpoint: str) -> None:
        """Leave ``endpoint`` out of answers for ``ban_time`` seconds."""
        with self._lock:
            self._banned[endpoint] = time.monotonic() + self.ban_time

    def get_active_children(self, prefixes: Sequence[str], timeout: float | None = None) -> dict[str, dict[int, str]]:
        """Live children of each prefix, as the DHT's method of the same name; cached.

        A leaf child declared by several hosts answers with the first one not banned, so a dead
        host (or a stranger's record pointing at a closed port) does not hide the others.
        """
        now = time.monotonic()
        with self._lock:
            lists = {p: self._children[p][1] for p in prefixes if p in self._children and self._children[p][0] > now}
            self._banned = {e: until for e, until in self._banned.items() if until > now}
            banned = set(self._banned)
        missing = [p for p in prefixes if p not in lists]
        if missing:
            fresh = self.dht.get_active_children(missing, timeout=timeout, all_endpoints=True)
            with self._lock:
                for prefix in missing:
                    children = fresh.get(prefix, {})
                    if children:  # an empty answer may be a lookup that ran out of time: ask again next step
                        self._children[prefix] = (now + self.ttl, children)
                    lists[prefix] = children
        answer: dict[str, dict[int, str]] = {}
        for prefix, children in lists.items():
            leaf = prefix.count(".") == self.leaf_depth
            answer[prefix] = {}
            for coord, endpoints in children.items():
                usable = [e for e in endpoints if e not in banned] if leaf else endpoints
                if usable:
                    answer[prefix][coord] = usable[0]
        return answer
