"""Hosts outvoted across cells: each two-way spot check (one cell's two replicas, :mod:`lightning_moe.client.spot_checks`)
recorded per host, shared by all the layers of a process through its health registry (a lying host lies in every layer,
so every layer's checks count against it).

A pair of replicas cannot outvote a liar in their cell, but a host serves several cells, each with other partners. A
host that disagreed with at least 2 other hosts in ``needed`` of its last ``remembered`` two-way checks is outvoted when
each of those hosts agreed with some host and disagreed less often than it: an honest host next to liars disagrees
only with them, and they agree with nobody (or, lying at a rate, less often than it does).

A host with a gross disagreement remembered is *suspected*: the layers spot-check its answers at a higher rate
(:data:`lightning_moe.client.spot_checks.SUSPECT_RATE`), so a verdict on it comes within a few steps instead of after
``needed`` checks at the base rate, and its honest partners, checked as often, are vouched for by the others.
"""

from __future__ import annotations

import collections
import threading


class CrossCellVotes:
    """The two-way checks' outcomes per host (thread-safe, at most ``max_hosts`` hosts, least recently checked
    forgotten first)."""

    def __init__(self, remembered: int = 16, needed: int = 6, max_hosts: int = 4096):
        self.remembered, self.needed, self.max_hosts = remembered, needed, max_hosts
        self._lock = threading.Lock()
        self._records: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()  # host -> (peer, agreed)

    def record(self, a: str, b: str, agreed: bool) -> tuple[str, set[str], int, int] | None:
        """Record a check of ``a`` against ``b``. On a disagreement that outvotes one of them: ``(host, the hosts it
        disagreed with, its disagreements, its checks remembered)``, and the host is forgotten (its disagreements no
        longer count against its partners); else None."""
        with self._lock:
            for host, peer in ((a, b), (b, a)):
                record = self._records.pop(host, None) or collections.deque(maxlen=self.remembered)
                record.append((peer, agreed))
                self._records[host] = record
            while len(self._records) > self.max_hosts:
                self._records.popitem(last=False)
            if agreed:
                return None
            for suspect in (a, b):
                record = self._records[suspect]
                against = [peer for peer, ok in record if not ok]
                share = len(against) / len(record)
                if len(against) >= self.needed and len(set(against)) >= 2 and all(
                        self._vouched(peer, share) for peer in set(against)):
                    break
            else:
                return None
            del self._records[suspect]
            for host, entries in self._records.items():
                self._records[host] = collections.deque((e for e in entries if e[0] != suspect), maxlen=self.remembered)
            return suspect, set(against), len(against), len(record)

    def suspected(self, host: str) -> bool:
        """Whether ``host`` disagreed grossly in one of its remembered checks."""
        with self._lock:
            return any(not ok for _, ok in self._records.get(host, ()))

    def _vouched(self, host: str, share: float) -> bool:
        """Whether ``host`` agreed with some host and disagreed in a smaller share of its checks than ``share``."""
        record = self._records.get(host, ())
        agreed = sum(ok for _, ok in record)
        return agreed >= 1 and (len(record) - agreed) / len(record) < share
