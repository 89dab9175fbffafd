"""The relayed side: a host behind NAT keeps a registration with a relay and bridges what arrives there.

:class:`RelayClient` registers with one relay at a time (see :mod:`lightning_moe.net.relay`). For each
stranger the relay announces, it opens a data connection to the relay and one to the local server, and
splices them. When the relay dies or refuses, it registers with the next candidate, and tells its owner
the new public endpoint through ``on_endpoint`` (the host re-declares its experts there at once).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable

from lightning_moe.net import loop as net_loop
from lightning_moe.net.relay import MAX_LINE, PING_PERIOD, join, read_message, register_signature, write_message

logger = logging.getLogger(__name__)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


class RelayClient:
    """Keeps the local server at ``local`` (host, port) reachable through a relay.

    :param candidates: returns relay endpoints (``host:port`` of relay services) to try, best first;
        called from a worker thread (it may query the DHT).
    :param on_endpoint: called with the public ``host:port`` at which strangers now reach the local
        server, or None while no relay serves it.
    :param secret: a private swarm's secret (registrations are signed).
    """

    def __init__(self, local: tuple[str, int], candidates: Callable[[], list[str]],
                 on_endpoint: Callable[[str | None], None], secret: bytes | None = None, retry: float = 2.0,
                 connect_timeout: float = 5.0):
        self.local, self.candidates, self.on_endpoint, self.secret = local, candidates, on_endpoint, secret
        self.retry, self.connect_timeout = retry, connect_timeout
        self.relay: str | None = None
        self.endpoint: str | None = None
        self.stats: Counter = Counter()
        self._task: asyncio.Future | None = None

    def start(self, wait: float = 0.0) -> "RelayClient":
        """Start keeping a registration; wait up to ``wait`` s for the first endpoint."""
        self._task = net_loop.submit(self._run())
        deadline = time.monotonic() + wait
        while self.endpoint is None and time.monotonic() < deadline and not self._task.done():
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        bridges: set[asyncio.Task] = set()
        try:
            while True:
                try:
                    relays = await loop.run_in_executor(None, self.candidates)
                except Exception:  # noqa: BLE001 - a failed lookup is retried like a dead relay
                    logger.warning("finding relays failed", exc_info=True)
                    relays = []
                for relay in relays:
                    await self._serve(relay, bridges)
                if not relays:
                    logger.warning("no relay found for %s:%d; trying again in %.0f s", *self.local, self.retry)
                await asyncio.sleep(self.retry * random.uniform(0.8, 1.2))
        finally:
            for task in bridges:
                task.cancel()

    async def _serve(self, relay: str, bridges: set[asyncio.Task]) -> None:
        """Register with ``relay`` and bridge its strangers until it dies or refuses."""
        host, port = split_endpoint(relay)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE),
                                                    self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            logger.info("relay %s unreachable: %s", relay, e)
            self.stats["relays_unreachable"] += 1
            return
        try:
            message = {"op": "register", "ts": f"{time.time():.3f}", "nonce": secrets.token_hex(8)}
            if self.secret is not None:
                message["sig"] = register_signature(self.secret, message["ts"], message["nonce"])
            write_message(writer, message)
            answer = await read_message(reader, self.connect_timeout)
            if answer["op"] != "registered":
                logger.warning("relay %s refused: %s", relay, answer.get("error", answer))
                self.stats["refusals"] += 1
                return
            token, self.relay = str(answer["token"]), relay
            self.endpoint = f"{host}:{int(answer['port'])}"
            logger.info("reachable through relay %s at %s", relay, self.endpoint)
            self.stats["registrations"] += 1
            self.on_endpoint(self.endpoint)
            pinger = asyncio.ensure_future(self._ping(writer))
            try:
                while True:
                    message = await read_message(reader, 3 * PING_PERIOD)
                    if message["op"] == "incoming":
                        task = asyncio.ensure_future(self._bridge(host, port, str(message["id"]), token))
                        bridges.add(task)
                        task.add_done_callback(bridges.discard)
            finally:
                pinger.cancel()
        except (ConnectionError, OSError, ValueError, KeyError, asyncio.TimeoutError) as e:
            if self.endpoint is not None:
                logger.warning("relay %s lost (%s); looking for another", relay, e or type(e).__name__)
        finally:
            writer.close()
            if self.endpoint is not None:
                self.endpoint = self.relay = None
                self.on_endpoint(None)

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(PING_PERIOD)
            write_message(writer, {"op": "ping"})
            await writer.drain()

    async def _bridge(self, host: str, port: int, connection_id: str, token: str) -> None:
        """Attach to the relay for one stranger and splice it with a new connection to the local server."""
        relay_side = None
        try:
            relay_side = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout)
            write_message(relay_side[1], {"op": "attach", "id": connection_id, "token": token})
            local_side = await asyncio.wait_for(asyncio.open_connection(*self.local), self.connect_timeout)
        except (OSError, asyncio.TimeoutError):
            self.stats["bridges_failed"] += 1
            if relay_side is not None:
                relay_side[1].close()
            return
        self.stats["bridges"] += 1
        await join(relay_side, local_side)
