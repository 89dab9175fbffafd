"""Connection slots of the host's HTTP server, fair per client address and per client network.

An attacker with many addresses usually has them in few networks (one /24, one /48), but one with
addresses in many networks (a botnet, cloud machines) could still hold every slot. So:

- at most ``max_per_address`` connections from one address and ``max_per_network`` from one network
  (:func:`~lightning_moe.net.addresses.netgroup`: its /24 or /48); more are closed on arrival;
- when all ``max_connections`` are taken, a newcomer whose network holds at least two fewer slots than
  the network holding the most evicts that network's oldest connection (connections that sent no
  request yet are the oldest: a connection moves to the back once its first request arrives). So no
  set of networks can take every slot: a network taking no part in an attack always gets one, as in
  Bitcoin Core's eviction by netgroup.
"""

from __future__ import annotations

import collections
import threading
from typing import Protocol

from lightning_moe.net.addresses import netgroup


class Evictable(Protocol):
    """A connection holding a slot, which the slots may close to give it to a newcomer from a smaller network."""

    def evict(self) -> None:
        """Close the connection now and release its slot (:meth:`ConnectionSlots.release`)."""


class ConnectionSlots:
    """Counts open connections in total, per client address and per network; thread-safe reads for stats.

    Everything but the counters' reads runs on the server's event loop. :meth:`release` is idempotent,
    so a connection that was evicted and then reports its loss releases once.
    """

    def __init__(self, max_connections: int, max_per_address: int, max_per_network: int | None = None):
        self.max_connections, self.max_per_address = int(max_connections), int(max_per_address)
        self.max_per_network = int(max_per_network) if max_per_network is not None else self.max_connections
        self._per_address: collections.Counter[str] = collections.Counter()
        self._networks: dict[str, dict[Evictable, None]] = {}  # network -> its connections, oldest first
        self._by_count: dict[int, set[str]] = {}  # connections held -> the networks that hold that many
        self._top = 0  # the most connections one network holds
        self._lock = threading.Lock()
        self.open = self.accepted = self.refused = self.evicted = 0
        self.trickles = 0  # connections the host stopped reading: their head came in tiny pieces
        self.closing = False

    def admit(self, address: str, connection: Evictable) -> bool:
        """Take a slot for ``connection`` from ``address``, evicting another network's if all are taken (see module);
        False (and counted as refused) if it gets none."""
        network = netgroup(address)
        victim = None
        with self._lock:
            if self.closing:
                return False
            held = len(self._networks.get(network, ()))
            if (self._per_address[address] >= self.max_per_address or held >= self.max_per_network
                    or (self.open >= self.max_connections and self._top < held + 2)):
                self.refused += 1
                return False
            if self.open >= self.max_connections:
                victim = next(iter(self._networks[next(iter(self._by_count[self._top]))]))
                self.evicted += 1
            self._add(address, network, connection)
            self.accepted += 1
        if victim is not None:
            victim.evict()
        return True

    def _add(self, address: str, network: str, connection: Evictable) -> None:
        members = self._networks.setdefault(network, {})
        self._move(network, len(members), len(members) + 1)
        members[connection] = None
        self._per_address[address] += 1
        self.open += 1

    def _move(self, network: str, before: int, after: int) -> None:
        """``network`` went from holding ``before`` connections to ``after`` (lock held)."""
        if before:
            bucket = self._by_count[before]
            bucket.discard(network)
            if not bucket:
                del self._by_count[before]
        if after:
            self._by_count.setdefault(after, set()).add(network)
        self._top = max(self._top, after)
        while self._top and self._top not in self._by_count:
            self._top -= 1

    def transfer(self, address: str, old: Evictable, new: Evictable) -> None:
        """``new`` holds the slot of ``old`` from now on (the lobby handing a connection on), as the youngest."""
        with self._lock:
            members = self._networks.get(netgroup(address))
            if members is not None and old in members:
                del members[old]
                members[new] = None

    def release(self, address: str, connection: Evictable) -> None:
        """Give back the slot of ``connection``; nothing if it holds none (released already)."""
        network = netgroup(address)
        with self._lock:
            members = self._networks.get(network)
            if members is None or connection not in members:
                return
            del members[connection]
            self._move(network, len(members) + 1, len(members))
            if not members:
                del self._networks[network]
            self.open -= 1
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]

    def addresses(self) -> int:
        """How many distinct client addresses hold connections now."""
        with self._lock:
            return len(self._per_address)

    def networks(self) -> int:
        """How many distinct client networks (/24, /48) hold connections now."""
        with self._lock:
            return len(self._networks)
