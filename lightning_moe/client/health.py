"""Health of experts and hosts: circuit breakers by error rate, with exponential backoff and probes.

One registry per process (:func:`lightning_moe.shared.process_health`), shared by every
DecentralizedMoE layer. An error an expert returned (HTTP 500 from its code, a wrong answer)
counts against that expert on that host; a refused connection or a timeout counts against the
host, and so against every expert it serves. A breaker opens when, within ``window`` seconds,
at least ``min_failures`` calls failed and they are at least ``failure_rate`` of the calls (a
refused connection opens its host's breaker at once). An open breaker excludes for ``ban_time``
seconds, doubling on each reopening up to ``max_ban_time``; then one call is let through as a
probe: if it answers the breaker closes, otherwise it opens again for twice as long.

The registry also holds how fast each host answers (:class:`~lightning_moe.client.speed.HostSpeeds`): slowness is
not failure, it steers waiting and routing instead.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from lightning_moe.client.links import LinkRates
from lightning_moe.client.speed import HostSpeeds
from lightning_moe.client.votes import CrossCellVotes
from lightning_moe.config import HealthConfig


@dataclass
class Breaker:
    """One expert's (``uid@endpoint``) or one host's (``endpoint``) recent calls and exclusion."""

    outcomes: deque = field(default_factory=deque)  # (time, ok) within the window
    open_until: float = 0.0  # time.monotonic() until which it is excluded
    reopenings: int = 0  # consecutive openings (the backoff exponent)
    probing: bool = False  # open_until passed: the next call is a probe
    last_error: str = ""

    def failures(self) -> int:
        return sum(1 for _, ok in self.outcomes if not ok)


@dataclass(frozen=True)
class Exclusion:
    """Why and until when something is excluded."""

    key: str
    until: float  # time.time() clock, for messages
    failures: int
    last_error: str

    def describe(self) -> str:
        until = time.strftime("%H:%M:%S", time.localtime(self.until))
        if not self.failures:  # the host asked for a pause (503 with Retry-After)
            return f"{self.key} excluded until {until}: {self.last_error[:200]}"
        return f"{self.key} excluded until {until} after {self.failures} failures (last: {self.last_error[:200]})"


class HealthRegistry:
    """Circuit breakers for experts and hosts, the hosts' answer times, their links' rates and the spot checks' votes
    across cells (thread-safe)."""

    def __init__(self, config: HealthConfig | None = None):
        self.config = config or HealthConfig()
        self.speeds = HostSpeeds()
        self.links = LinkRates()
        self.votes = CrossCellVotes()  # every layer's two-way spot checks, per host
        self._breakers: dict[str, Breaker] = {}
        self._lock = threading.Lock()

    @staticmethod
    def expert_key(uid: str, endpoint: str) -> str:
        return f"{uid}@{endpoint}"

    def _breaker(self, key: str) -> Breaker:
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = self._breakers[key] = Breaker()
        return breaker

    def _record(self, key: str, ok: bool, error: str = "", trip: bool = False) -> None:
        now, config = time.monotonic(), self.config
        breaker = self._breaker(key)
        breaker.outcomes.append((now, ok))
        while breaker.outcomes and breaker.outcomes[0][0] < now - config.window:
            breaker.outcomes.popleft()
        if ok:
            if breaker.probing or breaker.open_until <= now:
                breaker.reopenings, breaker.probing, breaker.open_until = 0, False, 0.0
            return
        breaker.last_error = error
        if breaker.open_until > now:
            return  # already open (calls of one batch fail together): one opening, not one per call
        failures, total = breaker.failures(), len(breaker.outcomes)
        if trip or breaker.probing or (failures >= config.min_failures and failures >= config.failure_rate * total):
            ban = min(config.ban_time * 2 ** breaker.reopenings, config.max_ban_time)
            breaker.open_until, breaker.probing = now + ban, False
            breaker.reopenings += 1

    def success(self, uid: str, endpoint: str) -> None:
        """An expert answered: good news for it and for its host."""
        with self._lock:
            self._record(self.expert_key(uid, endpoint), True)
            self._record(endpoint, True)

    def expert_failure(self, uid: str, endpoint: str, error: str) -> None:
        """The host answered, but this expert failed (HTTP 5xx from its code, a malformed answer)."""
        with self._lock:
            self._record(self.expert_key(uid, endpoint), False, error)
            self._record(endpoint, True)  # the host itself is up

    def host_failure(self, endpoint: str, error: str, refused: bool = False) -> None:
        """The host did not answer (timeout) or refused the connection (``refused``: excluded at once)."""
        with self._lock:
            self._record(endpoint, False, error, trip=refused)

    def host_busy(self, endpoint: str, seconds: float, message: str) -> None:
        """The host said it is behind (503 with Retry-After): excluded for ``seconds``, without counting a failure."""
        with self._lock:
            breaker = self._breaker(endpoint)
            breaker.open_until = max(breaker.open_until, time.monotonic() + seconds)
            breaker.last_error = message

    def exclude_host(self, endpoint: str, seconds: float, reason: str) -> None:
        """Exclude a host for ``seconds`` because of what it answered (a liar caught by
        :mod:`~lightning_moe.client.spot_checks`), saying ``reason``."""
        with self._lock:
            breaker = self._breaker(endpoint)
            breaker.open_until = max(breaker.open_until, time.monotonic() + seconds)
            breaker.probing, breaker.last_error = False, reason
            breaker.outcomes.clear()  # no failure count: the reason says why

    def _exclusion(self, key: str, now: float, wall: float) -> Exclusion | None:
        breaker = self._breakers.get(key)
        if breaker is None or breaker.open_until == 0.0:
            return None
        if breaker.open_until > now:
            return Exclusion(key, wall + breaker.open_until - now, breaker.failures(), breaker.last_error)
        breaker.probing = True  # the ban is over: the next call is a probe
        return None

    def excluded(self, uid: str, endpoint: str) -> Exclusion | None:
        """Why the expert ``uid`` at ``endpoint`` (or its whole host) is excluded now, or None."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            return self._exclusion(endpoint, now, wall) or self._exclusion(self.expert_key(uid, endpoint), now, wall)

    def badness(self, uid: str, endpoint: str) -> float:
        """How long until the expert (or its host) may be tried again; 0 if it may now (for least-bad picks)."""
        now = time.monotonic()
        with self._lock:
            keys = (endpoint, self.expert_key(uid, endpoint))
            return max([0.0] + [self._breakers[k].open_until - now for k in keys if k in self._breakers])

    def exclusions(self) -> list[Exclusion]:
        """Everything excluded now."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            found = [self._exclusion(key, now, wall) for key in list(self._breakers)]
        return [e for e in found if e is not None]
