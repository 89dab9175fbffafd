"""How fast each host answers, as this process has measured it; how long a layer waits for slow hosts, and how
routing leans away from them.

:class:`HostSpeeds` lives in the process's health registry (one per process, shared by every layer): an
exponentially weighted mean and mean deviation of each host's answer time (forwards and backwards apart), and its
rows per second. A call given up is left to finish, and its answer time is measured when it comes: estimates
hold real answer times only. Slowness is not failure: it does not count against a host's health.

:class:`StragglerWait` decides, once the first answer of a layer's calls arrived, until when to wait for the others:
as long again as the first answer took (at least ``MIN_WAIT``), longer for a pending host whose estimate says it
answers soon, not at all for one known to be slow (``SLOW_FACTOR`` times slower than the typical host), except that
a small share of the layer's time (``slow_wait_budget``) is spent waiting for slow hosts' answers, so their
experts keep learning.

:func:`prefer_fast` lets a faster expert take a slow host's expert's place when their scores are close.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: Weight of a new answer time in the running mean (about the last 5 answers count).
ALPHA = 0.2
#: Hosts remembered; the least recently measured is forgotten first (a DHT may list any number of strangers).
MAX_HOSTS = 4096
#: An estimate older than this (seconds) is not trusted: the host is treated as new and measured again.
STALE_AFTER = 120.0
#: The shortest wait for other answers after the first one (seconds): scheduling jitter of a loaded machine. It is
#: spent only while a host not known to be slow is out.
MIN_WAIT = 0.1
#: After the first answer came at ``t``, the others are waited for until ``WAIT_RATIO * t`` more.
WAIT_RATIO = 1.0
#: A pending host expected to answer within ``SOON`` times the plain wait is waited for until its estimate.
SOON = 2.0
#: Answer times below this (seconds) are never slow, however much faster the typical host is.
SLOW_FLOOR = 0.05
#: A host expected to answer this many times slower than the typical host is slow: routing leans away from it.
SLOW_FACTOR = 2.0
#: With no wait budget, the share of a slow host's rows that routing leaves with it whatever the scores, so it is still
#: measured (and noticed once it got faster).
SLOW_HOST_MIN_SHARE = 0.25


@dataclass
class HostSpeed:
    """One host's answer times (seconds, from the request to the answer) and throughput."""

    latency: float
    deviation: float
    rows_per_s: float
    answers: int = 0
    given_up: int = 0
    updated: float = 0.0  # time.monotonic()

    def expected(self) -> float:
        """A pessimistic answer time: the mean plus twice the mean deviation (as TCP estimates its timeout)."""
        return self.latency + 2 * self.deviation


class HostSpeeds:
    """Per-host answer-time estimates (thread-safe, at most ``MAX_HOSTS`` hosts)."""

    def __init__(self, max_hosts: int = MAX_HOSTS):
        self.max_hosts = max_hosts
        self._hosts: OrderedDict[str, HostSpeed] = OrderedDict()
        self._lock = threading.Lock()

    def _update(self, key: str, seconds: float, rows: int) -> None:
        now = time.monotonic()
        with self._lock:
            speed = self._hosts.pop(key, None)
            if speed is None or now - speed.updated > STALE_AFTER:
                speed = HostSpeed(seconds, seconds / 2, rows / max(seconds, 1e-6))
            else:
                speed.deviation += ALPHA * (abs(seconds - speed.latency) - speed.deviation)
                speed.latency += ALPHA * (seconds - speed.latency)
                speed.rows_per_s += ALPHA * (rows / max(seconds, 1e-6) - speed.rows_per_s)
            speed.answers += 1
            speed.updated = now
            self._hosts[key] = speed
            while len(self._hosts) > self.max_hosts:
                self._hosts.popitem(last=False)

    @staticmethod
    def key(endpoint: str, method: str) -> str:
        """Forwards and backwards are estimated apart (a backward also steps the optimizer)."""
        return endpoint if method == "forward" else f"{method} {endpoint}"

    def answered(self, endpoint: str, seconds: float, rows: int, method: str = "forward") -> None:
        """The host answered a call of ``rows`` rows after ``seconds``."""
        self._update(self.key(endpoint, method), seconds, rows)

    def gave_up(self, endpoint: str, method: str = "forward") -> None:
        """A call to the host was given up (not waited for any longer). Only counted: its answer, when it comes, is
        still measured (:meth:`answered`), so the estimate holds real answer times only."""
        key = self.key(endpoint, method)
        with self._lock:
            speed = self._hosts.get(key)
            if speed is not None:
                speed.given_up += 1

    def expected(self, endpoint: str, method: str = "forward") -> float | None:
        """The host's pessimistic answer time (seconds), or None if it is unknown or its estimate is stale."""
        with self._lock:
            speed = self._hosts.get(self.key(endpoint, method))
            if speed is None or time.monotonic() - speed.updated > STALE_AFTER:
                return None
            return speed.expected()

    def snapshot(self) -> dict[str, HostSpeed]:
        """A copy of every estimate, by endpoint (forwards) and ``"backward endpoint"``."""
        with self._lock:
            return {endpoint: HostSpeed(**vars(speed)) for endpoint, speed in self._hosts.items()}

    def typical(self, method: str = "forward") -> float | None:
        """The median expected answer time over the hosts with a fresh estimate (None if none has one)."""
        now = time.monotonic()
        with self._lock:
            values = sorted(s.expected() for key, s in self._hosts.items()
                            if now - s.updated <= STALE_AFTER and self._method(key) == method)
        return values[(len(values) - 1) // 2] if values else None  # the lower median: of 2 hosts, the faster

    @staticmethod
    def _method(key: str) -> str:
        return key.split(" ", 1)[0] if " " in key else "forward"

    def slow_hosts(self, factor: float) -> set[str]:
        """The endpoints whose forwards are expected ``factor`` times slower than the typical host's."""
        typical, now = self.typical(), time.monotonic()
        if typical is None:
            return set()
        with self._lock:
            return {key for key, s in self._hosts.items() if " " not in key and now - s.updated <= STALE_AFTER
                    and s.expected() > factor * max(typical, SLOW_FLOOR)}

    def pick(self, endpoints: Sequence[str], rng: random.Random) -> str:
        """One of ``endpoints`` (the replicas of one expert), at random in proportion to its speed: weight 1 / its
        expected forward answer time, which holds its queue too. A replica not measured yet weighs as much as the
        fastest measured one, so it gets measured; with none measured, each is as likely."""
        if len(endpoints) == 1:
            return endpoints[0]
        expected = [self.expected(endpoint) for endpoint in endpoints]
        known = [e for e in expected if e is not None]
        fastest = max(min(known), SLOW_FLOOR) if known else 1.0
        weights = [1.0 / max(fastest if e is None else e, SLOW_FLOOR) for e in expected]
        return rng.choices(list(endpoints), weights)[0]

    def is_slow(self, endpoint: str, factor: float, method: str = "forward") -> bool:
        """Whether the host is expected to answer more than ``factor`` times slower than the typical host."""
        typical, expected = self.typical(method), self.expected(endpoint, method)
        return typical is not None and expected is not None and expected > factor * max(typical, SLOW_FLOOR)


class WaitBudget:
    """The share of a layer's call time that may go to waiting for hosts known to be slow (thread-safe)."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.elapsed = 0.0  # seconds the layer's calls took in all
        self.spent = 0.0  # of which, waiting for slow hosts beyond the plain wait
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"fraction": self.fraction, "elapsed": self.elapsed, "spent": self.spent}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def add_elapsed(self, seconds: float) -> None:
        with self._lock:
            self.elapsed += seconds

    def affords(self, seconds: float) -> bool:
        """Whether ``seconds`` of waiting fit in the budget now (nothing is spent)."""
        with self._lock:
            return self.spent + seconds <= self.fraction * self.elapsed

    def try_spend(self, seconds: float) -> bool:
        """Spend ``seconds`` of waiting if the budget allows it."""
        with self._lock:
            if self.spent + seconds > self.fraction * self.elapsed:
                return False
            self.spent += seconds
            return True


class StragglerWait:
    """Until when one batch of parallel calls waits for the calls still out, once the first answered.

    The plain wait is as long again as the first answer took (at least ``MIN_WAIT``). A pending host with no
    estimate gets the plain wait; one expected soon (within ``SOON`` plain waits) is waited for until its expected
    answer; one known to be slow is not waited for at all: once only slow hosts are out, the batch stops waiting,
    unless the ``budget`` pays for waiting once for the slowest of them. Nothing is waited for past
    ``first + max(plain wait, cap)``. ``cap`` None: every answer is waited for (until the caller's timeout).
    ``patient``: every answer is waited for until ``start + cap`` whatever the estimates (calls that are some sample's
    last way to ``k_min`` answers).
    """

    def __init__(self, cap: float | None, speeds: HostSpeeds | None = None, budget: WaitBudget | None = None,
                 method: str = "forward", patient: bool = False):
        self.cap, self.speeds, self.budget, self.method, self.patient = cap, speeds, budget, method, patient
        self._paid_until: float | None = None  # the budget is asked once per batch

    @property
    def waits_for_all(self) -> bool:
        return self.cap is None

    def end(self, start: float, first: float, pending: list[str]) -> float:
        """The ``time.monotonic()`` until which to wait, given the batch's ``start``, its ``first`` answer and the
        endpoints of the calls still out (ask again as answers come: the end moves earlier once only slow hosts are
        out)."""
        if self.cap is None:
            return math.inf
        if self.patient:
            return start + self.cap
        plain = max(MIN_WAIT, WAIT_RATIO * (first - start))
        limit = first + max(plain, self.cap)
        horizon = first + SOON * plain
        speeds = self.speeds
        typical = None if speeds is None else speeds.typical(self.method)
        slow_after = math.inf if typical is None else SLOW_FACTOR * max(typical, SLOW_FLOOR)
        late, others = [], []  # expected answer times of known-slow hosts; of the others (None: unknown)
        for endpoint in pending:
            e = None if speeds is None else speeds.expected(endpoint, self.method)
            slow = e is not None and start + e > horizon and e > slow_after
            (late if slow else others).append(None if e is None else start + e)
        end = first
        if others:
            end = max([first + plain, *(t for t in others if t is not None)])
        end = min(end, limit)
        if late and self.budget is not None and self._paid_until is None:
            target = max(late)
            self._paid_until = target if target <= limit and self.budget.try_spend(target - end) else -math.inf
        return max(end, self._paid_until or -math.inf)


def prefer_fast(chosen: list[list[tuple[str, str]]], scores: Sequence[torch.Tensor], k: int, slow: set[str],
                margin: float, keep_share: float = SLOW_HOST_MIN_SHARE) -> list[list[tuple[str, str]]]:
    """Each sample's ``k`` best of its candidates (best first, as beam search found them) after an expert on a ``slow``
    host lost ``margin`` of its score (the sum of its cells' logits, as the layer's mix weighs them): a faster
    expert that scores within ``margin`` of it takes its place. A random ``keep_share`` of the slow hosts'
    candidates keep their scores, so no host is starved whatever the gating learns. Vectorized over the samples
    that have a slow candidate."""
    out = [row[:k] for row in chosen]
    flags = [[endpoint in slow for _, endpoint in row] for row in chosen]
    touched = [b for b, row_flags in enumerate(flags) if True in row_flags]
    if not touched:
        return out
    width = max(len(chosen[b]) for b in touched)
    cells: dict[str, list[int]] = {}
    blank = [0] * len(scores)
    flat_cells: list[list[int]] = []
    flat_slow: list[bool] = []
    flat_present: list[bool] = []
    for b in touched:
        row, pad = chosen[b], width - len(chosen[b])
        for uid, _ in row:
            cell = cells.get(uid)
            if cell is None:
                cell = cells[uid] = [int(c) for c in uid.split(".")[1:]]
            flat_cells.append(cell)
        flat_cells += [blank] * pad
        flat_slow += flags[b] + [False] * pad
        flat_present += [True] * len(row) + [False] * pad
    coords = torch.tensor(flat_cells).view(len(touched), width, len(scores))
    is_slow = torch.tensor(flat_slow).view(len(touched), width)
    present = torch.tensor(flat_present).view(len(touched), width)
    rows = torch.tensor(touched)
    total = sum(s[rows].gather(1, coords[..., d]).float() for d, s in enumerate(scores))
    penalized = is_slow & (torch.rand(is_slow.shape) >= keep_share)
    adjusted = torch.where(penalized, total - margin, total).masked_fill(~present, -math.inf)  # margin may be inf
    order = torch.sort(adjusted, dim=1, descending=True, stable=True).indices[:, :k].tolist()
    for r, b in enumerate(touched):
        row = chosen[b]
        out[b] = [row[i] for i in order[r] if i < len(row)]
    return out
