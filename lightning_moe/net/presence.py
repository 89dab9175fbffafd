"""How strangers reach a server of this process: directly, or through a relay; and relaying for others.

:class:`Presence` is made for one local TCP server (a host's HTTP port) once it listens:

- with an address given (flags, or a swarm on loopback) it announces that, as before;
- otherwise it asks DHT peers for its public address and to dial its port back
  (:meth:`~lightning_moe.dht.DHT.check_reachable`): reached, it announces ``public_ip:port`` and,
  unless told not to, runs a :class:`~lightning_moe.net.relay.Relay` for hosts that are not reachable,
  declared in the DHT under ``relays``; not reached (a home NAT), it registers with a relay found there
  (:class:`~lightning_moe.net.relay_client.RelayClient`) and announces the relay's allocation, moving
  to another relay when that one dies. While relayed, with ``hole_punch``, it answers trainers that ask for a
  direct path (:class:`~lightning_moe.net.punch.PunchService`, ``punch``).

``on_endpoint(endpoint | None)`` tells the owner (the host, which re-declares its experts at once)
where strangers reach it now.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from lightning_moe.dht.records import parse_endpoint
from lightning_moe.net import loop as net_loop
from lightning_moe.net.addresses import is_loopback
from lightning_moe.net.punch import PunchService
from lightning_moe.net.relay import Relay, RelayLimits
from lightning_moe.net.relay_client import RelayClient

logger = logging.getLogger(__name__)

RELAYS_KEY = "relays"
MAX_RELAY_CANDIDATES = 8


def find_relays(dht: Any, exclude: str | None = None) -> list[str]:
    """Relay endpoints declared in the DHT, the ones with more free slots first (malformed entries skipped)."""
    found = []
    for endpoint, (free, _) in dht.get(RELAYS_KEY).items():
        try:
            parse_endpoint(endpoint)
        except ValueError:
            continue
        if endpoint != exclude and isinstance(free, int) and not isinstance(free, bool) and free > 0:
            found.append((free + random.random(), endpoint))
    return [endpoint for _, endpoint in sorted(found, reverse=True)[:MAX_RELAY_CANDIDATES]]


class Presence:
    """See the module. ``local`` is the (host, port) the server listens on; ``announce`` an address that was
    given (None: find out); ``relay`` whether a reachable process relays for others."""

    def __init__(self, dht: Any, local: tuple[str, int], announce: str | None, on_endpoint: Callable[[str | None], None],
                 secret: bytes | None = None, relay: bool = True, relay_limits: RelayLimits | None = None,
                 update_period: float = 10.0, hole_punch: bool = True):
        self.dht, self.local, self.announce, self.on_endpoint = dht, local, announce, on_endpoint
        self.secret, self.relay_enabled, self.relay_limits = secret, relay, relay_limits
        self.update_period = update_period
        self.endpoint: str | None = announce
        self.relay: Relay | None = None
        self.relay_endpoint: str | None = None
        self.client: RelayClient | None = None
        self.reachable: bool | None = None
        self.hole_punch = hole_punch
        self.punch: PunchService | None = None

    def start(self, timeout: float = 10.0) -> str | None:
        """Find how strangers reach the server and start serving that way; the endpoint (None: no relay yet)."""
        if self.announce is not None:  # flags (or a loopback swarm): taken as reachable
            host = self.announce.rpartition(":")[0].strip("[]")
            if self.relay_enabled and not is_loopback(host):
                self._start_relay(host)
            return self.endpoint
        port = self.local[1]
        public = self.dht.observed_address()
        self.reachable = public is not None and self.dht.check_reachable([port], udp=False)[f"tcp:{port}"]
        if self.reachable:
            self.endpoint = f"{public}:{port}"
            logger.info("strangers reach this host at %s (peers dialed it back)", self.endpoint)
            if self.relay_enabled:
                self._start_relay(public)
            return self.endpoint
        logger.info("strangers cannot reach port %d%s (NAT or firewall): serving through a relay", port,
                    f" at {public}" if public else "")
        connect_to = ("127.0.0.1", port) if self.local[0] in ("0.0.0.0", "") else self.local
        self.client = RelayClient(connect_to, lambda: find_relays(self.dht), self._moved, secret=self.secret)
        if self.hole_punch:
            self.punch = PunchService(lambda: self.client.relay if self.client is not None else None, connect_to,
                                      secret=self.secret)
        self.client.start(wait=timeout)
        self.endpoint = self.client.endpoint
        return self.endpoint

    def _moved(self, endpoint: str | None) -> None:
        self.endpoint = endpoint
        self.on_endpoint(endpoint)

    def _start_relay(self, public: str) -> None:
        self.relay = Relay(self.local[0], 0, secret=self.secret, limits=self.relay_limits)
        port = net_loop.run(self.relay.start(), 10)
        self.relay_endpoint = f"{public}:{port}"
        logger.info("relaying for hosts behind NAT at %s", self.relay_endpoint)
        self.declare()

    def declare(self) -> None:
        """Declare this process's relay (with its free slots) in the DHT; call every update period."""
        if self.relay is None or self.relay_endpoint is None:
            return
        free = self.relay.limits.max_hosts - len(self.relay.hosts)
        try:
            self.dht.store(RELAYS_KEY, self.relay_endpoint, free, time.time() + 2 * self.update_period)
        except Exception:  # noqa: BLE001 - a DHT hiccup must not stop the host; the next period retries
            logger.warning("declaring the relay in the DHT failed", exc_info=True)

    def stop(self) -> None:
        if self.punch is not None:
            self.punch.stop()
        if self.client is not None:
            self.client.stop()
            self.client = None
        if self.relay is not None:
            net_loop.run(self.relay.stop(), 10)
            self.relay = None
