"""The network layer: which addresses a process binds and announces (more of it moves here)."""

from lightning_moe.net.addresses import Binding, is_loopback, netgroup, resolve_binding, route_address

__all__ = ["Binding", "is_loopback", "netgroup", "resolve_binding", "route_address"]
