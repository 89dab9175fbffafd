"""CachedExpertLookup: DHT answers reused and refreshed in the background (stale-while-revalidate),
and excluded experts and hosts left out on every read."""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any

from lightning_moe.client.health import HealthRegistry

logger = logging.getLogger(__name__)

Children = dict[int, list[str]]

#: Seconds past its ``ttl`` that an answer may still be served while a background refresh runs.
#: An answer is this old only while refreshes keep failing (in steady state one replaces it
#: before ``ttl``). 60 s is the life of a host's records at ExpertHost's default update_period
#: (2 x 30 s), three times the CLI host's (2 x 10 s), and a fifth of the DHT's MAX_TTL (300 s),
#: past which no entry of the answer can still be live. What it risks is bounded: a host that
#: left is excluded by the health registry at its first failed call; a host that joined is
#: seen late. Past it a read blocks on the DHT, as a cold one does.
DEFAULT_MAX_STALE = 60.0

#: Fraction of ``ttl`` after which a read of a fresh answer starts its refresh (refresh ahead).
DEFAULT_REFRESH_AHEAD = 0.8

#: Prefixes whose refresh may be in flight at once, per lookup.
DEFAULT_MAX_IN_FLIGHT = 64


class CachedExpertLookup:
    """Wraps a DHT for beam search: ``get_active_children`` answers are reused, and refreshed off the caller's thread.

    An answer younger than ``ttl`` is fresh; one read after ``refresh_ahead * ttl`` starts a
    background refresh of its prefix, so that a layer used every step never sees it age past
    ``ttl``. An answer between ``ttl`` and ``max_stale`` old is served at once while one
    background refresh of its prefix runs (never two per prefix, at most ``max_in_flight``
    prefixes in all). Only a prefix never answered, or answered longer than ``max_stale`` ago,
    makes the caller wait on the DHT. Empty answers (maybe a lookup that ran out of time) are
    never cached, and a refresh that finds a prefix empty leaves its older answer in place.

    Refreshes run on the DHT's event loop (its ``return_future=True`` calls) or, for a DHT
    without those, on short-lived worker threads; :meth:`close` cancels or joins them.

    Experts (or hosts) that the health registry excludes are left out of the last grid
    dimension's answers on every read, so a dead host found by a failed call stops being chosen
    at once, before its DHT records expire. (Higher prefixes name just one of the hosts below
    them, so they are not filtered.) One lookup per layer; the DHT node and the health registry
    are the process's.

    Args:
        dht: a :class:`lightning_moe.dht.DHT` (anything with ``get_active_children``).
        grid_dims: number of grid dimensions; prefixes with ``grid_dims - 1`` dots hold endpoints.
        health: the health registry that says what is excluded.
        ttl: seconds an answer is fresh; 0 turns caching off (every read waits on the DHT).
        least_bad: include excluded experts too, those whose exclusion ends soonest first (so that
            a layer never has an empty candidate set).
        max_stale: seconds an answer may be served at all (at least ``ttl``), see ``DEFAULT_MAX_STALE``.
        refresh_ahead: fraction of ``ttl`` after which a read starts a refresh; 1 or more: only stale reads do.
        max_in_flight: prefixes whose background refresh may run at once.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, dht: Any, grid_dims: int, health: HealthRegistry, ttl: float = 5.0, least_bad: bool = False,
                 max_stale: float = DEFAULT_MAX_STALE, refresh_ahead: float = DEFAULT_REFRESH_AHEAD,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, clock: Callable[[], float] = time.monotonic):
        self.dht, self.ttl, self.health, self.least_bad = dht, float(ttl), health, least_bad
        self.max_stale = max(float(max_stale), self.ttl) if self.ttl > 0 else 0.0
        self.refresh_ahead, self.max_in_flight, self.clock = float(refresh_ahead), int(max_in_flight), clock
        self.leaf_depth = grid_dims - 1
        self._children: dict[str, tuple[float, Children]] = {}  # prefix -> (when its lookup started, answer)
        self._in_flight: set[str] = set()  # prefixes being refreshed
        self._jobs: set[Any] = set()  # refresh futures and threads, for close()
        self._counts: Counter = Counter()
        self._closed = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when no refresh is in flight
        self._futures = _accepts_return_future(dht)
        self._rng = random.Random()  # picks among a cell's replicas

    @property
    def wait_timeout(self) -> float:
        return float(getattr(self.dht, "wait_timeout", 5.0))

    @property
    def stats(self) -> dict[str, int]:
        """Counters since creation: ``blocking_lookups`` (reads that waited on the DHT) and their
        ``blocking_prefixes``; prefixes served ``fresh_hits`` and ``stale_hits``; background
        ``refreshes`` (DHT calls) started, ``refreshed_prefixes`` (answers replaced),
        ``refresh_empty`` (prefixes a refresh found empty), ``refresh_failures`` (calls that raised
        or were cancelled), ``refreshes_skipped`` (prefixes left stale because ``max_in_flight``
        were running); ``in_flight`` now."""
        with self._lock:
            counts = {name: self._counts[name] for name in STAT_NAMES}
            counts["in_flight"] = len(self._in_flight)
        return counts

    def all_children(self, prefixes: Sequence[str], timeout: float | None = None) -> dict[str, Children]:
        """Every endpoint of each live child of each prefix, unfiltered; cached, refreshed in the background."""
        now = self.clock()
        lists: dict[str, Children] = {}
        wanted: list[str] = []  # prefixes to refresh in the background
        with self._lock:
            for prefix in dict.fromkeys(prefixes):
                stamp, children = self._children.get(prefix, (None, None))
                age = None if stamp is None else now - stamp
                if age is None or age >= self.max_stale or self.ttl <= 0:
                    continue  # a blocking lookup below
                lists[prefix] = children
                self._counts["fresh_hits" if age < self.ttl else "stale_hits"] += 1
                if age >= self.refresh_ahead * self.ttl:
                    wanted.append(prefix)
            claimed = self._claim(wanted)
        if claimed:
            self._start_refresh(claimed, now)
        missing = [p for p in dict.fromkeys(prefixes) if p not in lists]
        if missing:
            with self._lock:
                self._counts["blocking_lookups"] += 1
                self._counts["blocking_prefixes"] += len(missing)
            fresh = self.dht.get_active_children(missing, timeout=timeout, all_endpoints=True)
            self._store(missing, fresh, now)
            for prefix in missing:
                lists[prefix] = fresh.get(prefix, {})
        return lists

    def get_active_children(self, prefixes: Sequence[str], timeout: float | None = None) -> dict[str, dict[int, str]]:
        """Live children of each prefix, as the DHT's method of the same name; cached.

        A leaf child declared by several hosts (replicas, or a stranger's record pointing at a closed port) answers
        with one of those not excluded, picked at random in proportion to its speed (:meth:`HostSpeeds.pick`), so
        a cell's load spreads over its replicas and a dead host does not hide the others.
        """
        return self._answer(prefixes, timeout, self.least_bad)

    def least_bad_view(self) -> "LookupView":
        """The same cache, answering with excluded experts too (least bad first)."""
        return LookupView(self, least_bad=True)

    def avoiding(self, endpoints: Collection[str]) -> "LookupView":
        """The same cache, answering a leaf child only with endpoints other than ``endpoints`` (those that failed a
        forward: its re-routing round tries another replica of the same expert before another expert)."""
        return LookupView(self, least_bad=self.least_bad, avoid=frozenset(endpoints))

    def _answer(self, prefixes: Sequence[str], timeout: float | None, least_bad: bool,
                avoid: frozenset[str] = frozenset()) -> dict[str, dict[int, str]]:
        answer: dict[str, dict[int, str]] = {}
        for prefix, children in self.all_children(prefixes, timeout).items():
            leaf = prefix.count(".") == self.leaf_depth
            answer[prefix] = {}
            for coord, endpoints in children.items():
                if not leaf:
                    answer[prefix][coord] = endpoints[0]
                    continue
                usable = [e for e in self._usable(f"{prefix}.{coord}", endpoints, least_bad) if e not in avoid]
                if usable:
                    answer[prefix][coord] = usable[0] if least_bad else self.health.speeds.pick(usable, self._rng)
        return answer

    def _usable(self, uid: str, endpoints: list[str], least_bad: bool) -> list[str]:
        if least_bad:
            return sorted(endpoints, key=lambda e: self.health.badness(uid, e))
        return [e for e in endpoints if self.health.excluded(uid, e) is None]

    # ------------------------------------------------------------------ background refresh
    def _claim(self, prefixes: list[str]) -> list[str]:
        """Mark for refresh those of ``prefixes`` not being refreshed yet, within ``max_in_flight`` (lock held)."""
        if self._closed:
            return []
        new = [p for p in prefixes if p not in self._in_flight]
        room = max(self.max_in_flight - len(self._in_flight), 0)
        self._counts["refreshes_skipped"] += max(len(new) - room, 0)
        claimed = new[:room]
        self._in_flight.update(claimed)
        return claimed

    def _start_refresh(self, prefixes: list[str], started: float) -> None:
        """Look ``prefixes`` up again off the caller's thread; the answer replaces the cached one when it comes."""
        with self._lock:
            self._counts["refreshes"] += 1
        if not self._futures:
            thread = threading.Thread(target=self._refresh_in_thread, args=(prefixes, started), daemon=True,
                                      name="lightning_moe.dht_cache.refresh")
            with self._lock:
                self._jobs.add(thread)
            try:
                thread.start()
            except RuntimeError as e:  # no thread to be had: the next read tries again
                with self._lock:
                    self._jobs.discard(thread)
                self._finish(prefixes, started, None, e)
            return
        try:
            future = self.dht.get_active_children(prefixes, timeout=self.wait_timeout, all_endpoints=True,
                                                  return_future=True)
        except Exception as e:  # noqa: BLE001 - a shut-down DHT: the next read tries again
            self._finish(prefixes, started, None, e)
            return
        with self._lock:
            self._jobs.add(future)
            closed = self._closed
        if closed:
            future.cancel()
        future.add_done_callback(lambda done: self._finish_future(prefixes, started, done))

    def _refresh_in_thread(self, prefixes: list[str], started: float) -> None:
        try:
            fresh, error = self.dht.get_active_children(prefixes, timeout=self.wait_timeout, all_endpoints=True), None
        except Exception as e:  # noqa: BLE001 - counted; the stale answer stays
            fresh, error = None, e
        self._finish(prefixes, started, fresh, error)
        with self._lock:
            self._jobs.discard(threading.current_thread())

    def _finish_future(self, prefixes: list[str], started: float, future: concurrent.futures.Future) -> None:
        """Done callback of a refresh future (runs on the DHT's loop thread, or in the canceller's)."""
        with self._lock:
            self._jobs.discard(future)
        try:
            fresh, error = future.result(), None
        except BaseException as e:  # noqa: BLE001 - cancelled (close, DHT shutdown) or failed
            fresh, error = None, e
        self._finish(prefixes, started, fresh, error)

    def _finish(self, prefixes: list[str], started: float, fresh: dict[str, Children] | None,
                error: BaseException | None) -> None:
        if error is not None:
            logger.debug("background refresh of %s failed: %r", prefixes, error)
            with self._lock:
                self._counts["refresh_failures"] += 1
        self._store(prefixes, fresh or {}, started, refresh=fresh is not None)
        with self._lock:
            self._in_flight.difference_update(prefixes)
            if not self._in_flight:
                self._idle.notify_all()

    def _store(self, prefixes: list[str], fresh: dict[str, Children], started: float, refresh: bool = False) -> None:
        """Cache the non-empty answers, unless a lookup started later already answered."""
        with self._lock:
            for prefix in prefixes:
                children = fresh.get(prefix, {})
                if not children:  # an empty answer may be a lookup that ran out of time: keep the older one
                    self._counts["refresh_empty"] += refresh
                    continue
                if prefix not in self._children or self._children[prefix][0] <= started:
                    self._children[prefix] = (started, children)
                    self._counts["refreshed_prefixes"] += refresh

    def close(self, timeout: float | None = None) -> None:
        """Start no more refreshes; cancel those on the DHT's loop, join the worker threads, and wait until none is
        in flight (at most ``timeout``, default the DHT's ``wait_timeout`` + 1 s). Idempotent."""
        with self._lock:
            self._closed = True
            jobs = list(self._jobs)
        deadline = time.monotonic() + (self.wait_timeout + 1.0 if timeout is None else timeout)
        for job in jobs:
            if isinstance(job, threading.Thread):
                if job is not threading.current_thread():
                    job.join(max(deadline - time.monotonic(), 0.0))
            else:
                job.cancel()
        with self._idle:
            self._idle.wait_for(lambda: not self._in_flight, max(deadline - time.monotonic(), 0.0))

    # ------------------------------------------------------------------ error messages
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


STAT_NAMES = ("blocking_lookups", "blocking_prefixes", "fresh_hits", "stale_hits", "refreshes", "refreshed_prefixes",
              "refresh_empty", "refresh_failures", "refreshes_skipped")


class LookupView:
    """A :class:`CachedExpertLookup` (same cache) that answers with excluded experts too, least bad first
    (``least_bad``), or leaves ``avoid``'s endpoints out."""

    def __init__(self, lookup: CachedExpertLookup, least_bad: bool = False, avoid: frozenset[str] = frozenset()):
        self.lookup, self.least_bad, self.avoid = lookup, least_bad, avoid

    @property
    def wait_timeout(self) -> float:
        return self.lookup.wait_timeout

    def get_active_children(self, prefixes: Sequence[str], timeout: float | None = None) -> dict[str, dict[int, str]]:
        """As :meth:`CachedExpertLookup.get_active_children`, with this view's rules."""
        return self.lookup._answer(prefixes, timeout, self.least_bad, self.avoid)


def _accepts_return_future(dht: Any) -> bool:
    """True if ``dht.get_active_children`` takes ``return_future`` (runs on the DHT's own loop)."""
    try:
        parameters = inspect.signature(dht.get_active_children).parameters
    except (TypeError, ValueError, AttributeError):
        return False
    return "return_future" in parameters
