"""Relays: a host that strangers cannot reach (behind a home NAT) is reached through a peer that can.

The relayed host keeps a *control* connection to a relay (outbound, so its NAT lets the relay's
messages back in). The relay gives it an *allocation*: a TCP port of the relay's own. Whoever
connects to that port (a trainer's expert call, ``/info``, ``lightning-moe swarm``, an averaging
exchange) is announced to the host over the control connection; the host opens a *data* connection
to the relay, which the relay splices with the stranger's, byte for byte (TURN does the same for
UDP). The relay sees only bytes: a private swarm's signatures (an HMAC over the request, bound to the
host's ``host_id``) stay end to end, so a relay can neither forge nor replay a request.

Messages are JSON lines of at most ``MAX_LINE`` bytes; after an ``attach`` line the connection
carries raw bytes::

    host -> relay   {"op": "register", "ts": T, "nonce": N, "sig": S}   (sig: private swarms only)
    relay -> host   {"op": "registered", "port": P, "token": K}  or  {"op": "refused", "error": "..."}
    relay -> host   {"op": "incoming", "id": I}          a stranger connected to port P
    host -> relay   a new connection: {"op": "attach", "id": I, "token": K}, then raw bytes
    anyone -> relay {"op": "observe"}   answered {"op": "observed", "address": "ip:port"}: the address the relay
                    sees, then the relay closes (hole punching, lightning_moe/net/punch.py)
    both ways       {"op": "ping"} every PING_PERIOD s; a control connection silent for 3 periods is dead

Everything a stranger can make a relay spend is bounded (:class:`RelayLimits`): relayed hosts in
all and per address, connections to a relayed host in all and per stranger's address, connections
waiting for their attach per relayed host, bytes
per second per relayed host (a token bucket over both directions), and bytes in flight (each
splice reads one chunk and writes it out before it reads the next). A refusal is a clear message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lightning_moe import auth
from lightning_moe.net.signing import MAX_CLOCK_SKEW

logger = logging.getLogger(__name__)

MAX_LINE = 4096
PING_PERIOD = 10.0
CHUNK = 64 * 1024


@dataclass
class RelayLimits:
    """What a relay spends on the hosts it relays and on the strangers who connect to them."""

    max_hosts: int = 16
    max_hosts_per_address: int = 2
    max_connections_per_host: int = 128
    max_connections_per_address: int = 64  # from one stranger's address to one relayed host (a trainer opens dozens)
    max_pending_per_host: int = 16
    bytes_per_second_per_host: float = 12.5e6  # 100 Mbit/s
    attach_timeout: float = 5.0
    line_timeout: float = 5.0


async def read_message(reader: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    """One JSON line (a dict with an ``op``); ValueError when it is malformed or too long."""
    try:
        line = await asyncio.wait_for(reader.readuntil(b"\n"), timeout)
    except asyncio.LimitOverrunError:
        raise ValueError(f"a line longer than {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError:
        raise ConnectionError("connection closed") from None
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("expected a JSON object with an op")
    return message


def write_message(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def register_signature(secret: bytes, timestamp: str, nonce: str) -> str:
    return auth.sign(secret, b"relay-register", timestamp.encode(), nonce.encode())


class TokenBucket:
    """``rate`` bytes per second with a burst of one second's worth; ``take`` waits for the tokens."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.stamp = float(rate), float(rate), time.monotonic()

    async def take(self, amount: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= amount
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, bucket: TokenBucket | None,
                 counter: Counter | None = None) -> None:
    """Copy until end of stream, one chunk in flight; then half-close the other side."""
    try:
        while data := await reader.read(CHUNK):
            if bucket is not None:
                await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
            if counter is not None:
                counter["bytes_relayed"] += len(data)
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def join(a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
               bucket: TokenBucket | None = None, counter: Counter | None = None) -> None:
    """Splice two connections both ways until both ends closed, then close them."""
    try:
        await asyncio.gather(splice(a[0], b[1], bucket, counter), splice(b[0], a[1], bucket, counter))
    finally:
        for writer in (a[1], b[1]):
            writer.close()


class _Relayed:
    """One relayed host: its control connection, allocation server, waiting strangers and open splices."""

    def __init__(self, address: str, writer: asyncio.StreamWriter, rate: float):
        self.address, self.writer, self.token = address, writer, secrets.token_hex(16)
        self.server: asyncio.AbstractServer | None = None
        self.pending: dict[str, asyncio.Future] = {}
        self.connections = 0
        self.by_address: Counter = Counter()
        self.bucket = TokenBucket(rate)


class Relay:
    """A relay service on ``host:port`` (see the module). Runs on the caller's event loop.

    :param secret: a private swarm's secret: registrations must be signed with it.
    """

    def __init__(self, host: str, port: int = 0, secret: bytes | None = None, limits: RelayLimits | None = None):
        self.host, self.port, self.secret = host, port, secret
        self.limits = limits or RelayLimits()
        self.stats: Counter = Counter()
        self._replays = auth.ReplayGuard(MAX_CLOCK_SKEW, max_entries=4096)
        self.hosts: dict[str, _Relayed] = {}  # token -> relayed host
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for relayed in list(self.hosts.values()):
            relayed.writer.close()
            if relayed.server is not None:
                relayed.server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> asyncio.Task:
        return self._track(asyncio.ensure_future(coro))

    def _track(self, task: Any) -> asyncio.Task:
        """Keep ``task`` until it ends, so that :meth:`stop` can cancel it."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track(asyncio.current_task())
        address = (writer.get_extra_info("peername") or ("?",))[0]
        try:
            message = await read_message(reader, self.limits.line_timeout)
            if message["op"] == "register":
                await self._register(address, message, reader, writer)
            elif message["op"] == "attach":
                await self._attach(message, reader, writer)
            elif message["op"] == "observe":
                self.stats["observed"] += 1
                peer = writer.get_extra_info("peername") or ("?", 0)
                write_message(writer, {"op": "observed", "address": f"{peer[0]}:{peer[1]}"})
                await writer.drain()
            else:
                raise ValueError(f"unknown op {message['op']!r}")
        except (ValueError, TypeError, KeyError) as e:
            self.stats["bad_messages"] += 1
            write_message(writer, {"op": "refused", "error": f"bad message: {e}"})
        except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.CancelledError):
            pass  # a connection task ends here, also when the relay stops
        finally:
            writer.close()

    def _refusal(self, address: str, message: dict[str, Any]) -> str | None:
        limits = self.limits
        if len(self.hosts) >= limits.max_hosts:
            return f"relay full: it relays {len(self.hosts)} hosts (limit {limits.max_hosts})"
        if sum(r.address == address for r in self.hosts.values()) >= limits.max_hosts_per_address:
            return f"relay refuses more than {limits.max_hosts_per_address} hosts from one address"
        if self.secret is not None:
            timestamp, nonce, signature = str(message.get("ts", "")), str(message.get("nonce", "")), message.get("sig")
            try:
                fresh = abs(float(timestamp) - time.time()) <= MAX_CLOCK_SKEW
            except ValueError:
                fresh = False
            if not fresh or not auth.verify(self.secret, signature, b"relay-register", timestamp.encode(), nonce.encode()):
                return "registration not signed with this swarm's secret (or its timestamp is off)"
            if not self._replays.first_use(signature, float(timestamp)):
                return "replayed registration"
        return None

    async def _register(self, address: str, message: dict[str, Any], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        refusal = self._refusal(address, message)
        if refusal is not None:
            self.stats["registrations_refused"] += 1
            write_message(writer, {"op": "refused", "error": refusal})
            await writer.drain()
            return
        relayed = _Relayed(address, writer, self.limits.bytes_per_second_per_host)
        relayed.server = await asyncio.start_server(lambda r, w: self._stranger(relayed, r, w), self.host, 0)
        port = relayed.server.sockets[0].getsockname()[1]
        self.hosts[relayed.token] = relayed
        self.stats["registrations"] += 1
        logger.info("relaying for %s at port %d (%d hosts)", address, port, len(self.hosts))
        try:
            write_message(writer, {"op": "registered", "port": port, "token": relayed.token})
            pinger = self._spawn(self._ping(writer))
            try:
                while True:
                    await read_message(reader, 3 * PING_PERIOD)  # pings; anything else is ignored
            finally:
                pinger.cancel()
        finally:
            del self.hosts[relayed.token]
            relayed.server.close()
            for future in relayed.pending.values():
                future.cancel()
            logger.info("stopped relaying for %s (port %d)", address, port)

    async def _ping(self, writer: asyncio.StreamWriter) -> None:
        while True:
            write_message(writer, {"op": "ping"})
            await writer.drain()
            await asyncio.sleep(PING_PERIOD)

    async def _stranger(self, relayed: _Relayed, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection to a relayed host's port: announce it, wait for the host's attach, splice."""
        self._track(asyncio.current_task())
        limits = self.limits
        address = (writer.get_extra_info("peername") or ("?",))[0]
        if relayed.connections >= limits.max_connections_per_host or len(relayed.pending) >= limits.max_pending_per_host \
                or relayed.by_address[address] >= limits.max_connections_per_address:
            self.stats["connections_refused"] += 1
            writer.close()
            return
        relayed.connections += 1
        relayed.by_address[address] += 1
        try:
            await self._relay_stranger(relayed, reader, writer)
        except (ConnectionError, OSError, asyncio.CancelledError):
            writer.close()
        finally:
            relayed.connections -= 1
            relayed.by_address[address] -= 1
            if relayed.by_address[address] <= 0:
                del relayed.by_address[address]

    async def _relay_stranger(self, relayed: _Relayed, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection_id = secrets.token_hex(8)
        attached: asyncio.Future = asyncio.get_running_loop().create_future()
        relayed.pending[connection_id] = attached
        write_message(relayed.writer, {"op": "incoming", "id": connection_id})
        try:
            host_side = await asyncio.wait_for(attached, self.limits.attach_timeout)
        except asyncio.TimeoutError:
            self.stats["attach_timeouts"] += 1
            writer.close()
            return
        finally:
            relayed.pending.pop(connection_id, None)
        self.stats["connections"] += 1
        await join((reader, writer), host_side, relayed.bucket, self.stats)

    async def _attach(self, message: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relayed = self.hosts.get(str(message.get("token")))
        future = relayed.pending.get(str(message.get("id"))) if relayed is not None else None
        if future is None or future.done():
            raise ValueError("no such connection waits for an attach")
        done = asyncio.get_running_loop().create_future()
        future.set_result((reader, _Closing(writer, done)))
        await done  # the stranger's task splices and closes; this connection stays open until then


class _Closing:
    """A StreamWriter whose ``close`` also tells the attach handler that the splice is over."""

    def __init__(self, writer: asyncio.StreamWriter, done: asyncio.Future):
        self._writer, self._done = writer, done

    def close(self) -> None:
        self._writer.close()
        if not self._done.done():
            self._done.set_result(None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)
