"""Kademlia DHT where hosts announce their experts and trainers find them.

``DHT`` is the node (one per process, synchronous API); ``records`` holds the record
formats and the validation helpers (``parse_uid``, ``parse_endpoint``) other modules reuse.
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
