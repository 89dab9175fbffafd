"""Direct paths between two peers behind NAT: TCP simultaneous open, coordinated through a relay (as libp2p's DCUtR).

A trainer that calls a relayed host often (:mod:`lightning_moe.client.direct`) asks it to *punch*:

1. ``GET /punch`` through the relay: the host answers the relay it is registered with (``{"relay": "ip:port"}``;
   404 when it is not relayed or does not punch).
2. The trainer binds a few sockets (``SO_REUSEADDR``, ``SO_REUSEPORT``), and from each asks that relay
   ``{"op": "observe"}``: the relay answers the address it sees, the trainer's router's public ``ip:port``
   for that local port (:func:`observe`).
3. ``POST /punch`` through the relay with ``{"id": ..., "addresses": [...]}`` (signed like any request in a
   private swarm): the host binds as many sockets, observes each the same way, answers its own addresses and
   starts to dial the trainer's, pair by pair (:meth:`PunchService.punch`). The trainer dials the host's on the
   answer. A home router (MASQUERADE) keeps a free source port, so each SYN opens its own router for the other's:
   both ``connect()`` calls meet in one connection (TCP simultaneous open). A router that picks a new port per
   destination (a symmetric NAT) makes the observed address wrong, and the attempt fails within its time bound.
4. On each connection the trainer sends ``<id>.<pair>\\n``; the host answers a proof (an HMAC with the swarm's
   secret; the line itself in a public swarm) and serves HTTP on it, spliced with a connection to its own
   server, as the relay client does with relayed connections.

Whatever fails, calls keep going through the relay. What a stranger can make a host spend is bounded
(:class:`PunchLimits`): attempts at once, attempts per target address and in all per window, pairs per attempt,
seconds per attempt, and direct connections open.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from lightning_moe import auth
from lightning_moe.net import loop as net_loop
from lightning_moe.net.relay import MAX_LINE, join

logger = logging.getLogger(__name__)

PUNCH_DOMAIN = b"lightning_moe.punch.v1"
MAX_PAIRS = 8
ID_RE = re.compile(r"[0-9a-f]{32}")
MAX_BODY = 4096


class PunchRefused(Exception):
    """The host will not punch now; ``status`` is the HTTP status to answer (429: limits, 400: malformed, 404: no relay)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class PunchLimits:
    """What one host spends on punch attempts that strangers ask for."""

    max_concurrent: int = 2
    max_per_address: int = 6  # attempts towards one target IP per window
    max_per_window: int = 60  # attempts in all per window
    window: float = 600.0
    max_pairs: int = 4  # sockets per attempt (each a direct connection when it works)
    attempt_seconds: float = 6.0  # an attempt's dialing, all pairs together
    max_direct: int = 64  # direct connections open at once


def reuse_socket(port: int = 0, family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking TCP socket bound to ``port`` on all interfaces, which later sockets may bind too."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def parse_address(text: Any, loopback: bool) -> tuple[str, int]:
    """``ip:port`` of an IPv4 peer; ValueError unless a unicast address (loopback only when ``loopback``)."""
    if not isinstance(text, str) or len(text) > 64 or text.count(":") != 1:
        raise ValueError(f"expected ip:port, got {str(text)[:64]!r}")
    host, port = text.split(":")
    address = ipaddress.IPv4Address(host)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    if address.is_multicast or address.is_unspecified or address.is_reserved or (address.is_loopback and not loopback) \
            or address == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"{host} is not a peer's address")
    return host, int(port)


async def observe(relay: tuple[str, int], port: int, timeout: float) -> tuple[socket.socket, str]:
    """Bind a socket to ``port`` (0: any) and ask ``relay`` from it which address it sees; returns a fresh socket bound
    to the same local port (to dial from), and the observed ``ip:port``."""
    loop = asyncio.get_running_loop()
    sock = reuse_socket(port)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, relay), timeout)
        await loop.sock_sendall(sock, b'{"op":"observe"}\n')
        data = b""
        deadline = loop.time() + timeout
        while not data.endswith(b"\n") and len(data) < MAX_LINE:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, MAX_LINE), max(0.01, deadline - loop.time()))
            if not chunk:
                break
            data += chunk
        message = json.loads(data)
        if not isinstance(message, dict) or message.get("op") != "observed":
            raise ValueError(f"relay {relay[0]}:{relay[1]} did not observe: {str(message)[:200]}")
        observed = str(message.get("address"))
        parse_address(observed, loopback=True)
        local_port = sock.getsockname()[1]
    finally:
        sock.close()  # the relay closed first: this side's port is free to bind again
    return reuse_socket(local_port), observed


async def dial(sock: socket.socket, remote: tuple[str, int], deadline: float, pause: float = 0.2) -> socket.socket | None:
    """Connect from ``sock``'s local port to ``remote`` until ``deadline`` (loop time), a new socket on the same port
    after each refusal or timeout; the connected socket, or None. Closes ``sock`` unless it is the one returned."""
    loop = asyncio.get_running_loop()
    port = sock.getsockname()[1]
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                sock.close()
                return None
            try:
                await asyncio.wait_for(loop.sock_connect(sock, remote), min(left, 2.5))
                return sock
            except (OSError, asyncio.TimeoutError):
                sock.close()
            if deadline - loop.time() <= pause:
                return None
            await asyncio.sleep(pause)
            sock = reuse_socket(port)
    except OSError:
        return None
    except asyncio.CancelledError:
        sock.close()
        raise


async def meet(sock: socket.socket, remote: tuple[str, int], deadline: float,
               check: Callable[[socket.socket], Awaitable[bool]], first: bool) -> list[socket.socket]:
    """Dial ``remote`` from ``sock``'s port and listen on that port too, until ``deadline``: TCP simultaneous open
    where both SYNs cross (NAT), an accepted connection where one arrives first (a peer with no NAT, loopback).
    Each connection made (at most 4) must pass ``check``; returns those that did (``first``: only the first, and
    at once). Only connections from ``remote``'s IP are accepted; everything else is closed."""
    loop = asyncio.get_running_loop()
    try:
        listener = reuse_socket(sock.getsockname()[1])
        listener.listen(2)
    except OSError:
        sock.close()
        return []
    passed: list[socket.socket] = []
    tasks: set[asyncio.Task] = set()
    settled = asyncio.Event()
    candidates = 0

    async def vet(conn: socket.socket) -> None:
        try:
            ok = await check(conn)
        except (OSError, ValueError, asyncio.TimeoutError):
            ok = False
        except asyncio.CancelledError:
            conn.close()
            raise
        if ok and not (first and passed):
            passed.append(conn)
            loop.call_later(0 if first else 0.5, settled.set)  # the host waits a moment for a second one
        else:
            conn.close()

    def add(conn: socket.socket) -> None:
        nonlocal candidates
        candidates += 1
        conn.setblocking(False)
        tasks.add(asyncio.ensure_future(vet(conn)))

    async def accepting() -> None:
        while candidates < 4:
            conn, address = await loop.sock_accept(listener)
            if address[0] != remote[0]:
                conn.close()
                continue
            add(conn)

    async def dialing() -> None:
        conn = await dial(sock, remote, deadline)
        if conn is not None:
            add(conn)

    tasks.update({asyncio.ensure_future(accepting()), asyncio.ensure_future(dialing())})
    try:
        await asyncio.wait_for(settled.wait(), max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError:
        pass
    finally:
        listener.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return passed


def proof(secret: bytes | None, line: str) -> str:
    """What the host answers to the trainer's first line on a punched connection."""
    return line if secret is None else auth.sign(secret, PUNCH_DOMAIN, line.encode())


async def read_line(sock: socket.socket, timeout: float, limit: int = 128) -> str:
    """One short ASCII line from a raw non-blocking socket; ValueError when it is longer or does not come."""
    loop = asyncio.get_running_loop()
    data, deadline = b"", loop.time() + timeout
    while not data.endswith(b"\n"):
        if len(data) > limit:
            raise ValueError("line too long")
        chunk = await asyncio.wait_for(loop.sock_recv(sock, limit + 1 - len(data)), max(0.01, deadline - loop.time()))
        if not chunk:
            raise ValueError("connection closed")
        data += chunk
    return data[:-1].decode("ascii", "replace")


class _Window:
    """Attempts per key within a sliding window (bounded: at most ``max_keys`` keys remembered)."""

    def __init__(self, window: float, max_keys: int = 4096):
        self.window, self.max_keys = window, max_keys
        self.times: "OrderedDict[str, deque]" = OrderedDict()

    def count(self, key: str, now: float) -> int:
        times = self.times.get(key)
        while times and now - times[0] > self.window:
            times.popleft()
        return len(times) if times else 0

    def add(self, key: str, now: float) -> None:
        self.times.setdefault(key, deque()).append(now)
        self.times.move_to_end(key)
        while len(self.times) > self.max_keys:
            self.times.popitem(last=False)


class PunchService:
    """The host's side (see the module): answers ``/punch`` for the HTTP server at ``local`` (host, port).

    :param relay: the relay this host is registered with now (``ip:port`` of its relay service), or None.
    :param secret: a private swarm's secret (the proof on punched connections).
    """

    def __init__(self, relay: Callable[[], str | None], local: tuple[str, int], secret: bytes | None = None,
                 limits: PunchLimits | None = None):
        self.relay, self.local, self.secret = relay, local, secret
        self.limits = limits or PunchLimits()
        self.stats: Counter = Counter()
        self._running = 0
        self._direct = 0
        self._per_address = _Window(self.limits.window)
        self._all = _Window(self.limits.window)
        self._tasks: set[asyncio.Task] = set()

    def offer(self) -> dict[str, Any]:
        """``GET /punch``: the relay to observe through (PunchRefused 404 while no relay serves this host)."""
        relay = self.relay()
        if relay is None:
            raise PunchRefused(404, "this host is not relayed now: connect to it directly")
        return {"relay": relay, "max_pairs": self.limits.max_pairs}

    def submit(self, body: bytes) -> "asyncio.Future[dict[str, Any]]":
        """``POST /punch`` from another event loop (the HTTP server's): a future of the answer."""
        return asyncio.wrap_future(net_loop.submit(self.punch(body)))

    def _admit(self, targets: list[tuple[str, int]]) -> None:
        limits, now, ip = self.limits, time.monotonic(), targets[0][0]
        if self._running >= limits.max_concurrent:
            raise PunchRefused(429, f"{self._running} punch attempts in progress (limit {limits.max_concurrent})")
        if self._direct + len(targets) > limits.max_direct:
            raise PunchRefused(429, f"{self._direct} direct connections open (limit {limits.max_direct})")
        if self._per_address.count(ip, now) >= limits.max_per_address:
            raise PunchRefused(429, f"{limits.max_per_address} punch attempts towards {ip} in {limits.window:.0f} s: "
                                    "try again later")
        if self._all.count("", now) >= limits.max_per_window:
            raise PunchRefused(429, f"{limits.max_per_window} punch attempts in {limits.window:.0f} s: try again later")
        self._per_address.add(ip, now)
        self._all.add("", now)

    async def punch(self, body: bytes) -> dict[str, Any]:
        """Check a request, observe this host's addresses through its relay, start dialing, answer the addresses."""
        relay = self.relay()
        if relay is None:
            raise PunchRefused(404, "this host is not relayed now: connect to it directly")
        relay_host, _, relay_port = relay.rpartition(":")
        try:
            loopback = ipaddress.ip_address(relay_host).is_loopback
        except ValueError:  # a relay declared by name
            loopback = False
        try:
            request = json.loads(body)
            attempt = str(request["id"])
            if not ID_RE.fullmatch(attempt):
                raise ValueError("id must be 32 hex digits")
            addresses = request["addresses"]
            if not isinstance(addresses, list) or not 0 < len(addresses) <= self.limits.max_pairs:
                raise ValueError(f"addresses must be a list of 1 to {self.limits.max_pairs} ip:port")
            targets = [parse_address(a, loopback) for a in addresses]
            if len({ip for ip, _ in targets}) != 1:
                raise ValueError("addresses must share one IP address (one peer)")
        except (ValueError, KeyError, TypeError) as e:
            raise PunchRefused(400, f"punch: {e}") from None
        self._admit(targets)
        self._running += 1  # until _dial_all ends, or here if it never starts (also when this request is cancelled)
        self.stats["attempts"] += 1
        dialing = False
        try:
            seen = await asyncio.gather(*(observe((relay_host, int(relay_port)), 0, 3.0) for _ in targets),
                                        return_exceptions=True)
            sockets = [found[0] for found in seen if not isinstance(found, BaseException)]
            errors = [found for found in seen if isinstance(found, BaseException)]
            if errors:
                for sock in sockets:
                    sock.close()
                self.stats["observe_failed"] += 1
                if not isinstance(errors[0], (OSError, ValueError, asyncio.TimeoutError)):
                    raise errors[0]
                raise PunchRefused(503, f"punch: observing this host's address through relay {relay} failed: "
                                        f"{errors[0] or type(errors[0]).__name__}")
            task = asyncio.ensure_future(self._dial_all(attempt, sockets, targets))
            dialing = True
        finally:
            if not dialing:
                self._running -= 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return {"addresses": [found[1] for found in seen]}

    async def _dial_all(self, attempt: str, sockets: list[socket.socket], targets: list[tuple[str, int]]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.attempt_seconds
        try:
            results = await asyncio.gather(*(self._dial_one(f"{attempt}.{i}", sock, target, deadline)
                                             for i, (sock, target) in enumerate(zip(sockets, targets))))
        finally:
            self._running -= 1
        made = sum(results)
        self.stats["pairs"] += len(targets)
        self.stats["direct"] += made
        if made:
            self.stats["succeeded"] += 1
            logger.info("direct path to %s: %d of %d connections hole-punched", targets[0][0], made, len(targets))
        else:
            logger.info("no direct path to %s (hole punching failed): it goes on through the relay", targets[0][0])

    async def _dial_one(self, expected: str, sock: socket.socket, target: tuple[str, int], deadline: float) -> bool:
        loop = asyncio.get_running_loop()

        async def check(conn: socket.socket) -> bool:
            if await read_line(conn, 3.0) != expected:
                return False
            await loop.sock_sendall(conn, proof(self.secret, expected).encode() + b"\n")
            return True

        served = 0
        for conn in await meet(sock, target, deadline, check, first=False):
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = await asyncio.open_connection(sock=conn)
                local = await asyncio.wait_for(asyncio.open_connection(*self.local), 5.0)
            except (OSError, asyncio.TimeoutError):
                conn.close()
                continue
            self._direct += 1
            served += 1
            task = asyncio.ensure_future(self._serve(peer, local))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return served > 0

    async def _serve(self, peer: Any, local: Any) -> None:
        try:
            await join(peer, local)
        finally:
            self._direct -= 1

    @property
    def direct_connections(self) -> int:
        return self._direct

    def stop(self) -> None:
        """End attempts in progress and direct connections."""
        for task in list(self._tasks):
            task.get_loop().call_soon_threadsafe(task.cancel)

