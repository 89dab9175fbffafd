"""CachedExpertLookup: DHT answers reused for a few seconds, and excluded experts and hosts left out."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from lightning_moe.client.health import HealthRegistry


class CachedExpertLookup:
    """Wraps a DHT for beam search: ``get_active_children`` answers are reused for ``ttl`` seconds.

    Experts (or hosts) that the health registry excludes are left out of the last grid
    dimension's answers, so they stop being chosen before their DHT records expire. (Higher
    prefixes name just one of the hosts below them, so they are not filtered.) One lookup per
    layer; the DHT node and the health registry are the process's.

    Args:
        dht: a :class:`lightning_moe.dht.DHT` (anything with ``get_active_children``).
        grid_dims: number of grid dimensions; prefixes with ``grid_dims - 1`` dots hold endpoints.
        health: the health registry that says what is excluded.
        ttl: seconds an answer is reused.
        least_bad: include excluded experts too, those whose exclusion ends soonest first (so that
            a layer never has an empty candidate set).
    """

    def __init__(self, dht: Any, grid_dims: int, health: HealthRegistry, ttl: float = 5.0, least_bad: bool = False):
        self.dht, self.ttl, self.health, self.least_bad = dht, ttl, health, least_bad
        self.leaf_depth = grid_dims - 1
        self._children: dict[str, tuple[float, dict[int, list[str]]]] = {}
        self._lock = threading.Lock()

    @property
    def wait_timeout(self) -> float:
        return float(getattr(self.dht, "wait_timeout", 5.0))

    def least_bad_view(self) -> "CachedExpertLookup":
        """The same cache, answering with excluded experts too (least bad first)."""
        view = CachedExpertLookup.__new__(CachedExpertLookup)
        view.__dict__.update(self.__dict__)
        view.least_bad = True
        return view

    def all_children(self, prefixes: Sequence[str], timeout: float | None = None) -> dict[str, dict[int, list[str]]]:
        """Every endpoint of each live child of each prefix, unfiltered; cached."""
        now = time.monotonic()
        with self._lock:
            lists = {p: self._children[p][1] for p in prefixes if p in self._children and self._children[p][0] > now}
        missing = [p for p in prefixes if p not in lists]
        if missing:
            fresh = self.dht.get_active_children(missing, timeout=timeout, all_endpoints=True)
            with self._lock:
                for prefix in missing:
                    children = fresh.get(prefix, {})
                    if children:  # an empty answer may be a lookup that ran out of time: ask again next step
                        self._children[prefix] = (now + self.ttl, children)
                    lists[prefix] = children
        return lists

    def get_active_children(self, prefixes: Sequence[str], timeout: float | None = None) -> dict[str, dict[int, str]]:
        """Live children of each prefix, as the DHT's method of the same name; cached.

        A leaf child declared by several hosts answers with the first one not excluded, so a dead
        host (or a stranger's record pointing at a closed port) does not hide the others.
        """
        answer: dict[str, dict[int, str]] = {}
        for prefix, children in self.all_children(prefixes, timeout).items():
            leaf = prefix.count(".") == self.leaf_depth
            answer[prefix] = {}
            for coord, endpoints in children.items():
                usable = self._usable(f"{prefix}.{coord}", endpoints) if leaf else endpoints
                if usable:
                    answer[prefix][coord] = usable[0]
        return answer

    def _usable(self, uid: str, endpoints: list[str]) -> list[str]:
        if self.least_bad:
            return sorted(endpoints, key=lambda e: self.health.badness(uid, e))
        return [e for e in endpoints if self.health.excluded(uid, e) is None]

    def excluded_experts(self, uid_prefix: str) -> list[str]:
        """Why each cached expert under ``uid_prefix`` that is excluded now is (for error messages)."""
        with self._lock:
            cached = [(p, c) for p, (_, c) in self._children.items() if p.count(".") == self.leaf_depth and
                      (p == uid_prefix or p.startswith(uid_prefix + "."))]
        reasons = []
        for prefix, children in cached:
            for coord, endpoints in children.items():
                for endpoint in endpoints:
                    exclusion = self.health.excluded(f"{prefix}.{coord}", endpoint)
                    if exclusion is not None:
                        reasons.append(f"{prefix}.{coord} at {endpoint}: {exclusion.describe()}")
        return reasons
