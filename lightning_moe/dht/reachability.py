"""Dial-backs on the DHT: how a node learns its public address and whether strangers reach its ports.

Asking (``observe_address``, ``request_dialbacks``): a node asks a few peers ``whoami`` (the address
its requests come from, as they see it) and ``dialback`` with nonces from
``net.reachability.PROBES``. Answering (:class:`Dialer`): a node asked for a dial-back has the
requester's *observed* IP dialed (never an address the requester names, so no one can aim the swarm
at a third party), through another node of its table where it has one, so the dial comes from an
address the requester has not contacted. The dialing node sends, from fresh sockets, one probe
datagram to the UDP port and ``GET /reachability/<nonce>`` to each TCP port. Every dial is
rate-limited per target IP and in all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections import Counter, OrderedDict, deque
from typing import Any, Optional

from ..net.reachability import NONCE_BYTES
from .protocol import PROBE, Address

logger = logging.getLogger(__name__)

DIAL_WINDOW, DIALS_PER_WINDOW = 60.0, 4  # dial-backs asked for by, or made to, one IP (a node checks UDP, then TCP)
MAX_DIALS_PER_SECOND = 20.0
MAX_TCP_PORTS = 4
DIAL_TIMEOUT = 3.0
MAX_ASKED = 3  # peers a node asks for whoami / dialback


def _ports(udp_port: Any, tcp_ports: Any) -> tuple[int, list[int]]:
    if not isinstance(udp_port, int) or not 0 <= udp_port <= 65535:
        raise ValueError("bad udp port")
    if not isinstance(tcp_ports, list) or len(tcp_ports) > MAX_TCP_PORTS or \
            not all(isinstance(p, int) and 0 < p <= 65535 for p in tcp_ports):
        raise ValueError("bad tcp ports")
    return udp_port, tcp_ports


async def dial(ip: str, nonce: bytes, udp_port: int, tcp_ports: list[int], stats: Counter) -> None:
    """Send ``nonce`` to ``ip``'s UDP port and TCP ports from fresh sockets (what a stranger would do)."""
    loop = asyncio.get_running_loop()
    if udp_port:
        try:
            transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, remote_addr=(ip, udp_port))
            transport.sendto(PROBE + nonce)
            transport.close()
            stats["dials_udp"] += 1
        except OSError:
            pass
    for port in tcp_ports:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), DIAL_TIMEOUT)
            writer.write(f"GET /reachability/{nonce.hex()} HTTP/1.1\r\nHost: {ip}:{port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            await asyncio.wait_for(reader.read(256), DIAL_TIMEOUT)
            stats["dials_tcp"] += 1
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            if writer is not None:
                writer.close()


class Dialer:
    """The ``dialback`` and ``dial`` RPCs of a :class:`~lightning_moe.dht.server.DHTServer`."""

    def __init__(self, server: Any):
        self.server = server
        self._recent: "OrderedDict[str, deque[float]]" = OrderedDict()  # "kind:ip" -> times of its last dials
        self._tokens, self._stamp = MAX_DIALS_PER_SECOND, time.monotonic()

    def _allow(self, key: str) -> bool:
        now = time.monotonic()
        self._tokens = min(MAX_DIALS_PER_SECOND, self._tokens + (now - self._stamp) * MAX_DIALS_PER_SECOND)
        self._stamp = now
        times = self._recent.setdefault(key, deque())
        while times and times[0] < now - DIAL_WINDOW:
            times.popleft()
        if len(times) >= DIALS_PER_WINDOW or self._tokens < 1:
            self.server.stats["dials_refused"] += 1
            return False
        self._tokens -= 1
        times.append(now)
        self._recent.move_to_end(key)
        while len(self._recent) > 4096:
            self._recent.popitem(last=False)
        return True

    def rpc_dialback(self, address: Address, nonce: Any, udp_port: Any, tcp_ports: Any) -> bool:
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise ValueError("bad nonce")
        udp_port, tcp_ports = _ports(udp_port, tcp_ports)
        if not self._allow(f"back:{address[0]}"):
            return False
        helpers = [n for n in self.server.routing_table_nodes() if n.ip != address[0]]
        if helpers:
            helper = random.choice(helpers)
            self.server.spawn(self.server.call(helper, "dial", address[0], nonce, udp_port, tcp_ports))
        else:
            self.server.spawn(dial(address[0], nonce, udp_port, tcp_ports, self.server.stats))
        return True

    def rpc_dial(self, address: Address, ip: Any, nonce: Any, udp_port: Any, tcp_ports: Any) -> bool:
        if not self.server.knows(address):
            raise ValueError("dial asked by a node outside our routing table")
        if not isinstance(ip, str) or not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
            raise ValueError("bad dial request")
        if ipaddress.ip_address(ip).version != 4:
            raise ValueError("bad ip")
        udp_port, tcp_ports = _ports(udp_port, tcp_ports)
        if not self._allow(f"dial:{ip}"):
            return False
        self.server.spawn(dial(ip, nonce, udp_port, tcp_ports, self.server.stats))
        return True


def _askable(server: Any) -> list[Address]:
    """Up to MAX_ASKED addresses to ask: nodes of the routing table, else the initial peers."""
    nodes = [(n.ip, n.port) for n in server.routing_table_nodes()]
    random.shuffle(nodes)
    return (nodes or list(server.initial_peers))[:MAX_ASKED]


async def observe_address(server: Any) -> Optional[str]:
    """The IP that most peers see our requests come from (None when none answers)."""
    answers = await asyncio.gather(*(server.protocol.request(a, "whoami", [None]) for a in _askable(server)))
    seen = Counter(r[0] for ok, r in answers if ok and isinstance(r, list) and len(r) == 2 and isinstance(r[0], str))
    return seen.most_common(1)[0][0] if seen else None


async def request_dialbacks(server: Any, nonce: bytes, udp_port: int, tcp_ports: list[int]) -> int:
    """Ask up to MAX_ASKED peers to have us dialed back; how many accepted."""
    answers = await asyncio.gather(*(server.protocol.request(a, "dialback", [None, nonce, udp_port, tcp_ports])
                                     for a in _askable(server)))
    return sum(1 for ok, accepted in answers if ok and accepted is True)
