"""A trainer's direct paths to hosts it reaches through a relay: hole punching for the hosts it talks to often.

:func:`note_calls` counts a layer's answered expert calls per endpoint (``DecentralizedMoE(hole_punch=True)``,
the default). After ``PUNCH_AFTER_CALLS`` calls to one endpoint, one background attempt asks its host to punch
(:mod:`lightning_moe.net.punch`, the protocol): through the relay, both sides learn each other's public
address and connect at once. The connections made go to the HTTP client's pool for that endpoint
(:func:`lightning_moe.net.http_client.add_direct`), which takes them before its relayed ones; calls never wait
for an attempt, and keep going through the relay when it fails or when direct connections close. While calls
still go through the relay beside the direct connections (more calls at once than connections), another
``PUNCH_AFTER_CALLS`` of them start another attempt, up to ``MAX_DIRECT`` direct connections per endpoint.

Bounded: one attempt per endpoint at a time and ``MAX_RUNNING`` in all; a host that is not relayed (404) is not
asked again; after a failure the next attempt waits ``RETRY_AFTER`` s, doubled after each further failure
(up to ``MAX_RETRY_AFTER``); at most ``MAX_ENDPOINTS`` endpoints are remembered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from lightning_moe.client.remote_expert import host_id
from lightning_moe.net import http_client
from lightning_moe.net import loop as net_loop
from lightning_moe.net.punch import MAX_PAIRS, meet, observe, parse_address, proof, read_line
from lightning_moe.process import context

logger = logging.getLogger(__name__)

PUNCH_AFTER_CALLS = 16  # answered calls to one endpoint through its relay before we try a direct path
PAIRS = 4  # direct connections asked per attempt (the host may allow fewer)
ATTEMPT_SECONDS = 6.0
RETRY_AFTER = 60.0
MAX_RETRY_AFTER = 3600.0
MAX_RUNNING = 2
MAX_DIRECT = 16  # direct connections per endpoint
MAX_ENDPOINTS = 1024
TIMEOUT = 10.0


@dataclass
class _Path:
    calls: int = 0
    running: bool = False
    unsupported: bool = False  # the host is not relayed (or too old to punch): never asked again
    failures: int = 0
    not_before: float = 0.0
    relayed_at: int = 0  # requests that went another way than direct, at the last attempt


class DirectPaths:
    """This process's attempts, per endpoint (thread-safe); ``stats`` counts attempts, successes and connections."""

    def __init__(self, after_calls: int = PUNCH_AFTER_CALLS, pairs: int = PAIRS):
        self.after_calls, self.pairs = after_calls, pairs
        self.lock = threading.Lock()
        self.paths: "OrderedDict[str, _Path]" = OrderedDict()
        self.stats: Counter = Counter()
        self.outcomes: dict[str, int] = {}  # endpoint -> direct connections its attempts made (-1: not relayed)
        self.running = 0

    def note_calls(self, endpoints: Iterable[str], secret: bytes | None) -> None:
        """Count answered calls; start an attempt for an endpoint called often through the relay."""
        now = time.monotonic()
        start = []
        with self.lock:
            for endpoint in endpoints:
                path = self.paths.get(endpoint)
                if path is None:
                    path = self.paths[endpoint] = _Path()
                    while len(self.paths) > MAX_ENDPOINTS:
                        self.paths.popitem(last=False)
                path.calls += 1
                if path.unsupported or path.running or path.calls < self.after_calls or now < path.not_before \
                        or self.running >= MAX_RUNNING:
                    continue
                direct, relayed = http_client.direct_connections(endpoint), http_client.request_counts(endpoint)[1]
                if direct >= MAX_DIRECT or (direct > 0 and relayed - path.relayed_at < self.after_calls):
                    continue  # enough direct connections for the calls made at once
                path.running, path.calls, path.relayed_at = True, 0, relayed
                self.running += 1
                start.append(endpoint)
        for endpoint in start:
            net_loop.submit(self._attempt(endpoint, secret))

    async def _attempt(self, endpoint: str, secret: bytes | None) -> None:
        made = 0
        try:
            made = await self.upgrade(endpoint, secret)
        except _NotRelayed as e:
            made = -1
            logger.debug("%s: no hole punching (%s)", endpoint, e)
        except Exception as e:  # noqa: BLE001 - an attempt that fails leaves the relay in use, nothing more
            self.stats["errors"] += 1
            logger.info("hole punching to %s failed: %s; calls go on through the relay", endpoint, e)
        finally:
            with self.lock:
                self.running -= 1
                path = self.paths.get(endpoint)
                if path is not None:
                    path.running = False
                    path.unsupported = made < 0
                    path.failures = 0 if made > 0 else path.failures + 1
                    backoff = RETRY_AFTER * 2 ** max(path.failures - 1, 0) if path.failures else 1.0
                    path.not_before = time.monotonic() + min(backoff, MAX_RETRY_AFTER)
                self.outcomes[endpoint] = made if made < 0 else self.outcomes.get(endpoint, 0) + made
                while len(self.outcomes) > MAX_ENDPOINTS:
                    self.outcomes.pop(next(iter(self.outcomes)))

    async def upgrade(self, endpoint: str, secret: bytes | None) -> int:
        """One attempt (see :mod:`lightning_moe.net.punch`); the number of direct connections added to the pool."""
        loop = asyncio.get_running_loop()
        offer = await loop.run_in_executor(None, _request, endpoint, "GET", b"", secret)
        relay_host, relay_port = parse_address(offer.get("relay"), loopback=True)
        loopback = relay_host.startswith("127.")
        pairs = max(1, min(self.pairs, int(offer.get("max_pairs", 1)), MAX_PAIRS,
                           MAX_DIRECT - http_client.direct_connections(endpoint)))
        self.stats["attempts"] += 1
        observed = await asyncio.gather(*(observe((relay_host, relay_port), 0, 3.0) for _ in range(pairs)),
                                        return_exceptions=True)
        sockets = [found[0] for found in observed if not isinstance(found, BaseException)]
        failed = [found for found in observed if isinstance(found, BaseException)]
        try:
            if failed:
                raise RuntimeError(f"observing this trainer's address through relay {relay_host}:{relay_port} failed: "
                                   f"{failed[0] or type(failed[0]).__name__}")
            attempt = secrets.token_hex(16)
            body = json.dumps({"id": attempt, "addresses": [found[1] for found in observed]}).encode()
            answer = await loop.run_in_executor(None, _request, endpoint, "POST", body, secret)
            theirs = answer.get("addresses")
            if not isinstance(theirs, list) or len(theirs) != pairs:
                raise RuntimeError(f"the host answered {str(theirs)[:200]} for {pairs} addresses")
            targets = [parse_address(address, loopback) for address in theirs]
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        deadline = loop.time() + ATTEMPT_SECONDS
        connected = await asyncio.gather(*(_connect(f"{attempt}.{i}", sock, target, deadline, secret)
                                           for i, (sock, target) in enumerate(zip(sockets, targets))))
        made = 0
        for sock in connected:
            if sock is not None:
                http_client.add_direct(endpoint, sock)
                made += 1
        self.stats["pairs"] += pairs
        self.stats["direct"] += made
        self.stats["succeeded" if made else "failed"] += 1
        if made:
            logger.info("direct path to %s at %s: %d of %d connections hole-punched", endpoint, targets[0][0], made, pairs)
        else:
            logger.info("no direct path to %s at %s (hole punching failed): calls go on through the relay", endpoint,
                        targets[0][0])
        return made


class _NotRelayed(Exception):
    pass


def _request(endpoint: str, method: str, body: bytes, secret: bytes | None) -> dict:
    """``GET`` or ``POST /punch`` through the relay (signed in a private swarm); the answer's JSON object."""
    target = host_id(endpoint, secret, TIMEOUT) if method == "POST" else ""
    headers = {"Content-Type": "application/json", **http_client.signed(secret, method, "/punch", body, "none", target)}
    answer = http_client.request(endpoint, method, "/punch", body or None, headers, TIMEOUT, max_answer_bytes=4096)
    if answer.status == 404 or (method == "GET" and answer.status == 405):
        raise _NotRelayed(f"HTTP {answer.status}")
    if answer.status != 200:
        raise RuntimeError(f"/punch answered HTTP {answer.status}: {bytes(answer.body[:200]).decode(errors='replace')}")
    message = json.loads(answer.body)
    if not isinstance(message, dict):
        raise RuntimeError("/punch answered no JSON object")
    return message


async def _connect(line: str, sock: socket.socket, target: tuple[str, int], deadline: float,
                   secret: bytes | None) -> socket.socket | None:
    """Meet the host at ``target`` from ``sock``'s port and check that it is the host; the socket, or None."""
    loop = asyncio.get_running_loop()

    async def check(conn: socket.socket) -> bool:
        await loop.sock_sendall(conn, line.encode() + b"\n")
        if await read_line(conn, 3.0) != proof(secret, line):
            logger.info("a punched connection to %s:%d failed its check: the peer did not prove it is the host", *target)
            return False
        return True

    passed = await meet(sock, target, deadline, check, first=True)
    return passed[0] if passed else None


def direct_paths() -> DirectPaths:
    """This process's (a forked child starts with none)."""
    return context().get("direct_paths", DirectPaths)


def note_calls(endpoints: Iterable[str], secret: bytes | None) -> None:
    """Count answered calls to ``endpoints`` (one entry per call) in this process's :class:`DirectPaths`."""
    direct_paths().note_calls(endpoints, secret)
