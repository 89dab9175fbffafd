"""The DHT's datagram protocol: request/reply over UDP, msgpack (never pickle), and address
verification so that a node cannot be used to flood a forged source address.

Wire format (one datagram each)::

    request    0x00 | message id (8 B) | cookie (16 B, zeros if none) | msgpack [name, args]
    reply      0x01 | message id (8 B) | msgpack response
    challenge  0x02 | message id (8 B) | cookie (16 B)
    probe      0x03 | nonce (16 B)        a dial-back: reported to ``net.reachability.PROBES``, never answered

UDP source addresses can be forged, so an address is *verified* only once it has shown that it
receives what we send there: it answered one of our requests (the reply echoes our random
message id), or its request carries a cookie we handed to that address (an HMAC of the address
under a key of this node that changes every ``COOKIE_PERIOD`` seconds). A well-formed request
from an unverified address gets only a challenge (25 bytes, never more than the request: every
request carries the 16-byte cookie field, so requests are at least 27 bytes); the requester keeps
the cookie and sends the request again with it. This costs one round trip on first contact with
a node, and makes the bytes a node sends to an unverified address at most the bytes it received
from there (``bytes_sent_unverified`` / ``bytes_received_unverified`` in ``stats``).

The protocol knows nothing of the DHT: it hands verified requests to ``handler(name, args, addr)``
and delivers replies to the futures returned by ``request``.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import heapq
import logging
import os
import socket
import time
from collections import Counter, OrderedDict
from typing import Any, Callable, Container, Optional

import umsgpack
from kademlia.node import Node

from ..net.reachability import NONCE_BYTES, PROBES

logger = logging.getLogger(__name__)

MAX_DATAGRAM = 8192 + 64  # no honest request or reply is larger (records are capped at 6000 B)
ID_BYTES = 8
COOKIE_BYTES = 16
COOKIE_PERIOD = 120.0  # a cookie is accepted during this period and the next
MAX_REMEMBERED = 4096  # verified addresses / cookies received, each an LRU of this many
VERIFIED_TTL = 600.0
REQUEST, REPLY, CHALLENGE, PROBE = b"\x00", b"\x01", b"\x02", b"\x03"
_NO_COOKIE = bytes(COOKIE_BYTES)
_NODE_BYTES = 26  # packed node: 20-byte id, IPv4, port

Address = tuple  # (ip, port)
Handler = Callable[[str, list, Address], Any]


def pack_nodes(nodes: list) -> bytes:
    """Nodes as one bytes string (26 bytes each): far cheaper to msgpack than lists of tuples."""
    return b"".join(n.id + socket.inet_aton(n.ip) + n.port.to_bytes(2, "big") for n in nodes)


def unpack_nodes(data: Any, max_nodes: int, skip: Container = ()) -> Optional[list]:
    """Inverse of ``pack_nodes``, leaving out ids in ``skip``; None when malformed. Skips
    unusable addresses (port 0, 0.x.x.x, multicast and above)."""
    if not isinstance(data, bytes) or len(data) % _NODE_BYTES or len(data) > max_nodes * _NODE_BYTES:
        return None
    nodes = []
    for i in range(0, len(data), _NODE_BYTES):
        chunk = data[i: i + _NODE_BYTES]
        if chunk[:20] in skip:
            continue
        port = int.from_bytes(chunk[24:26], "big")
        if port and 0 < chunk[20] < 224:
            nodes.append(Node(chunk[:20], socket.inet_ntoa(chunk[20:24]), port))
    return nodes


def nearest_nodes(router: Any, key: bytes, k: int, exclude: Optional[Node] = None) -> list:
    """The ``k`` nodes of a routing table nearest to ``key`` (exact; kademlia's own
    ``find_neighbors`` stops at the first ``k`` it traverses and costs more)."""
    target = int.from_bytes(key, "big")
    nodes = [n for bucket in router.buckets for n in bucket.nodes.values()]
    if exclude is not None:
        nodes = [n for n in nodes if not (n.ip == exclude.ip and n.port == exclude.port)]
    return heapq.nsmallest(k, nodes, key=lambda n: n.long_id ^ target)


class _Pending:
    __slots__ = ("future", "address", "packet", "timer", "challenged")

    def __init__(self, future: asyncio.Future, address: Address, packet: bytes, timer: asyncio.TimerHandle):
        self.future, self.address, self.packet, self.timer = future, address, packet, timer
        self.challenged = False


class RPCProtocol(asyncio.DatagramProtocol):
    """Requests out, replies in, verified requests to ``handler``; see the module docstring.

    :param client_mode: ignore every request (a trainer behind NAT answers nobody).
    :param stats: counters: ``bytes_sent`` / ``bytes_received`` (and ``_unverified`` variants),
        ``challenges_sent``, ``bad_datagrams``, ``bad_requests``, ``unexpected_responses``, ...
    """

    def __init__(self, handler: Handler, stats: Counter, rpc_timeout: float, client_mode: bool = False):
        self.handler, self.stats, self.rpc_timeout, self.client_mode = handler, stats, rpc_timeout, client_mode
        self.transport: Optional[asyncio.DatagramTransport] = None
        self._outstanding: dict[bytes, _Pending] = {}
        self._cookie_key = os.urandom(32)
        self._cookies: "OrderedDict[Address, bytes]" = OrderedDict()  # cookies others handed us
        self._verified: "OrderedDict[Address, float]" = OrderedDict()  # answered us: until when trusted

    # ------------------------------------------------------------------ lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def close(self) -> None:
        for pending in self._outstanding.values():
            pending.timer.cancel()
            if not pending.future.done():
                pending.future.cancel()
        self._outstanding.clear()
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ verification
    def _cookie(self, address: Address, epoch: int) -> bytes:
        msg = f"{address[0]}:{address[1]}:{epoch}".encode()
        return hmac.new(self._cookie_key, msg, hashlib.sha256).digest()[:COOKIE_BYTES]

    def _cookie_ok(self, cookie: bytes, address: Address) -> bool:
        if cookie == _NO_COOKIE:
            return False
        epoch = int(time.time() // COOKIE_PERIOD)
        return any(hmac.compare_digest(cookie, self._cookie(address, e)) for e in (epoch, epoch - 1))

    def is_verified(self, address: Address) -> bool:
        """True while ``address`` is known to receive what we send there (it answered us)."""
        until = self._verified.get(address)
        return until is not None and until > time.monotonic()

    def _mark_verified(self, address: Address) -> None:
        self._verified[address] = time.monotonic() + VERIFIED_TTL
        self._verified.move_to_end(address)
        while len(self._verified) > MAX_REMEMBERED:
            self._verified.popitem(last=False)

    # ------------------------------------------------------------------ sending
    def _send(self, packet: bytes, address: Address, verified: bool = True) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.sendto(packet, address)
        self.stats["bytes_sent"] += len(packet)
        if not verified:
            self.stats["bytes_sent_unverified"] += len(packet)

    def request(self, address: Address, name: str, args: list, timeout: Optional[float] = None) -> asyncio.Future:
        """Send a request; the future gives ``(answered, response)``: ``(False, None)`` after
        ``timeout`` (default ``rpc_timeout``) without a reply. Raises ValueError when the
        request exceeds the datagram limit."""
        address = (address[0], int(address[1]))
        msg_id = os.urandom(ID_BYTES)
        body = umsgpack.packb([name, args])
        packet = REQUEST + msg_id + self._cookies.get(address, _NO_COOKIE) + body
        if len(packet) > MAX_DATAGRAM:
            raise ValueError(f"request of {len(packet)} bytes exceeds the datagram limit")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        timer = loop.call_later(self.rpc_timeout if timeout is None else timeout, self._timeout, msg_id)
        self._outstanding[msg_id] = _Pending(future, address, body, timer)
        self._send(packet, address)
        return future

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result((False, None))

    # ------------------------------------------------------------------ receiving
    def datagram_received(self, data: bytes, addr: Address) -> None:
        """Handle one datagram synchronously; nothing a stranger sends can raise into the loop."""
        addr = (addr[0], addr[1])
        self.stats["bytes_received"] += len(data)
        kind = data[:1]
        if kind == REQUEST:
            self._on_request(data, addr)
        elif kind == REPLY and len(data) > 1 + ID_BYTES:
            self._on_reply(data, addr)
        elif kind == CHALLENGE and len(data) == 1 + ID_BYTES + COOKIE_BYTES:
            self._on_challenge(data, addr)
        elif kind == PROBE and len(data) == 1 + NONCE_BYTES:
            if not PROBES.arrived(data[1:], "udp"):
                self.stats["unexpected_probes"] += 1
        else:
            self.stats["bad_datagrams"] += 1

    def _on_request(self, data: bytes, addr: Address) -> None:
        head = 1 + ID_BYTES + COOKIE_BYTES
        if self.client_mode:
            self.stats["requests_ignored_in_client_mode"] += 1
            return
        if not head + 2 <= len(data) <= MAX_DATAGRAM:
            self.stats["bad_datagrams"] += 1
            return
        msg_id, cookie = data[1:1 + ID_BYTES], data[1 + ID_BYTES:head]
        verified = self.is_verified(addr) or self._cookie_ok(cookie, addr)
        if not verified:
            self.stats["bytes_received_unverified"] += len(data)
        try:
            name, args = umsgpack.unpackb(data[head:])
            if not isinstance(name, str) or not isinstance(args, list):
                raise ValueError("not [name, args]")
        except Exception:  # noqa: BLE001 - anything a stranger sends
            self.stats["bad_requests"] += 1
            return
        if not verified:
            self.stats["challenges_sent"] += 1
            epoch = int(time.time() // COOKIE_PERIOD)
            self._send(CHALLENGE + msg_id + self._cookie(addr, epoch), addr, verified=False)
            return
        try:
            response = self.handler(name, args, addr)
            reply = REPLY + msg_id + umsgpack.packb(response)
        except Exception:  # noqa: BLE001 - anything a stranger sends
            self.stats["bad_requests"] += 1
            logger.debug("dropped a bad request from %s", addr, exc_info=True)
            return
        self._send(reply, addr)

    def _on_reply(self, data: bytes, addr: Address) -> None:
        msg_id = data[1:1 + ID_BYTES]
        pending = self._outstanding.get(msg_id)
        if pending is None or pending.address != addr:
            self.stats["unexpected_responses"] += 1
            return
        del self._outstanding[msg_id]
        pending.timer.cancel()
        self._mark_verified(addr)
        try:
            response = umsgpack.unpackb(data[1 + ID_BYTES:])
        except Exception:  # noqa: BLE001
            self.stats["bad_datagrams"] += 1
            response = None
        if not pending.future.done():
            pending.future.set_result((True, response))

    def _on_challenge(self, data: bytes, addr: Address) -> None:
        """Keep the cookie for ``addr`` and send the challenged request again, once."""
        msg_id, cookie = data[1:1 + ID_BYTES], data[1 + ID_BYTES:]
        pending = self._outstanding.get(msg_id)
        if pending is None or pending.address != addr or pending.challenged:
            self.stats["unexpected_responses"] += 1
            return
        pending.challenged = True
        self._cookies[addr] = cookie
        self._cookies.move_to_end(addr)
        while len(self._cookies) > MAX_REMEMBERED:
            self._cookies.popitem(last=False)
        self._send(REQUEST + msg_id + cookie + pending.packet, addr)
