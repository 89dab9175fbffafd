"""Which interface a node binds and which address it announces, from the peers it joins.

A socket bound to 127.0.0.1 cannot send to another machine (the kernel answers EINVAL), so a
process whose peers are on other machines must bind a reachable interface. ``host=None`` in a
config means *auto*: loopback while every peer is on loopback (a local swarm, the tests), else all
interfaces, announced at the local address that the kernel routes to the first remote peer (a LAN,
or a machine with a public address; behind NAT that address is private, and only what peers observe
is right). An explicit host or announce address always wins.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_ipv4(host: str) -> bool:
    """True for a dotted-quad IPv4 address."""
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


@functools.lru_cache(maxsize=4096)
def netgroup(ip: str) -> str:
    """The network an address belongs to, for limits that are fair per network (Bitcoin's netgroups).

    IPv4 and IPv4-mapped IPv6: the /24 (``"192.0.2.0/24"``); other IPv6: the /48. What does not parse
    as an IP address (a hostname, ``"?"``) is a group of its own, named by itself.
    """
    try:
        address = ipaddress.ip_address(ip.strip("[]").split("%", 1)[0])
    except ValueError:
        return ip
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 48
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _split(peer: str) -> tuple[str, int]:
    host, _, port = str(peer).rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def route_address(peer_host: str, peer_port: int = 9) -> str | None:
    """The local address the kernel would send from to reach ``peer_host`` (no packet is sent), or None."""
    try:
        infos = socket.getaddrinfo(peer_host, peer_port or 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.connect(address)  # UDP connect only picks a route
                return probe.getsockname()[0]
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class Binding:
    """Where a server binds (``host``) and the address peers are told (``announce``)."""

    host: str
    announce: str

    def endpoint(self, port: int) -> str:
        return f"[{self.announce}]:{port}" if ":" in self.announce else f"{self.announce}:{port}"


def resolve_binding(host: str | None, announce: str | None, peers: Sequence[str]) -> Binding:
    """The interface to bind and the address to announce: explicit values win; None means auto (see module)."""
    remote = [_split(peer) for peer in peers if not is_loopback(_split(peer)[0])]
    if host is None:
        host = ALL_INTERFACES[0] if remote else LOOPBACK
    if announce is None:
        announce = host
        if host in ALL_INTERFACES:
            found = next((address for address in (route_address(*peer) for peer in remote) if address), None)
            if found is None:
                logger.warning("binding all interfaces but no peer gives a route to announce; announcing %s "
                               "(set announce_host to an address peers can reach)", LOOPBACK)
            announce = found or LOOPBACK
    return Binding(host, announce)

