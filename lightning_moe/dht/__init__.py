"""Kademlia DHT where hosts announce their experts and trainers find them.

``DHT`` (node.py) is the node (one per process, synchronous API). On its event loop,
``server.DHTServer`` owns kademlia's routing table and node ids, the storage (storage.py: bounded
in bytes, fair between the addresses that write) and the lookups (lookup.py), over a datagram
protocol of its own (protocol.py: msgpack, address verification by cookies). ``records`` holds the
record formats and the validation helpers (``parse_uid``, ``parse_endpoint``) other modules reuse.
"""
from .node import DHT
from .records import (
    MAX_RECORD_BYTES,
    expert_key,
    is_valid_endpoint,
    is_valid_uid,
    parse_endpoint,
    parse_uid,
    parse_uid_prefix,
    prefix_key,
)

__all__ = [
    "DHT",
    "MAX_RECORD_BYTES",
    "expert_key",
    "is_valid_endpoint",
    "is_valid_uid",
    "parse_endpoint",
    "parse_uid",
    "parse_uid_prefix",
    "prefix_key",
]
