"""Iterative lookup of a DHT node (kademlia's search, changed).

* It looks for the ``size`` nearest nodes (a store goes to them) and does not stop at the first
  node holding a value: every responsive one is asked and the records they return are merged by
  the caller.
* The request it sends (``lookup``, see ``server.DHTServer.rpc_lookup``) can carry the store
  itself, so a store costs one lookup, not a lookup and then a round of stores.
* A request is launched as soon as a slot frees (``alpha`` in flight), not in lock-step rounds.
* A request that has waited ``patience`` (4x the slowest reply seen in this lookup, at least
  ``min_patience``, at most ``rpc_timeout``) no longer holds a slot, and once every other
  candidate has answered the lookup returns without it. The straggler keeps running in the
  background, and if it times out the peer leaves the routing table and is marked failed.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from typing import Any, Optional, Protocol

from kademlia.node import Node

from .protocol import nearest_nodes, unpack_nodes

logger = logging.getLogger(__name__)


class LookupServer(Protocol):
    """What a lookup needs of its node (``server.DHTServer``; declared here so the two modules do not import each other)."""

    node: Node
    router: Any
    alpha: int
    ksize: int
    rpc_timeout: float
    min_patience: float
    srtt: Optional[float]
    stats: Counter

    def is_failed(self, node: Node) -> bool: ...

    def request_lookup(self, node: Node, key: bytes, want_value: bool, value: Optional[bytes]) -> asyncio.Future: ...


def patience(server: LookupServer, max_rtt: float) -> float:
    """How long a request may take before it is treated as a straggler: 4x the slowest reply of
    this lookup (or the node's smoothed round-trip time before the first one)."""
    reference = max_rtt if max_rtt > 0 else server.srtt
    if reference is None:
        return server.rpc_timeout
    return min(server.rpc_timeout, max(server.min_patience, 4 * reference))


async def iterative_lookup(server: LookupServer, dkey: bytes, mode: str, deadline: float, size: int,
                           value: Optional[bytes]) -> tuple[list[Node], list[Any]]:
    """Search for the ``size`` nodes nearest to ``dkey``; ``mode`` is ``"node"``, ``"value"``
    (results: the records returned) or ``"store"`` (stores ``value``; results: the nodes that
    stored it). Returns (responsive nodes among the nearest, results)."""
    target = int.from_bytes(dkey, "big")
    known: dict[bytes, Node] = {}  # every node heard of, minus those that failed
    distance: dict[bytes, int] = {}
    own_id = server.node.id

    def learn(nodes: list[Node]) -> None:
        for n in nodes:
            if n.id not in distance and n.id != own_id and not server.is_failed(n):
                known[n.id] = n
            distance[n.id] = n.long_id ^ target

    learn(nearest_nodes(server.router, dkey, server.ksize))
    want_value, to_store = mode == "value", value if mode == "store" else None
    contacted: set[bytes] = set()
    pending: dict[asyncio.Future, tuple[Node, float]] = {}
    responded: list[Node] = []
    results: list[Any] = []
    max_rtt = 0.0
    for _ in range(100 * server.ksize):  # bounded: each pass handles at least one reply or ends
        now = time.monotonic()
        if now >= deadline:
            break
        wait = patience(server, max_rtt)
        active = sum(1 for _, t0 in pending.values() if now - t0 < wait)
        nearest = heapq.nsmallest(size, known, key=distance.__getitem__)
        uncontacted = [i for i in nearest if i not in contacted]
        for node_id in uncontacted[: max(0, server.alpha - active)]:
            contacted.add(node_id)
            node = known[node_id]
            try:
                pending[server.request_lookup(node, dkey, want_value, to_store)] = (node, now)
            except Exception:  # noqa: BLE001 - e.g. a request over the datagram limit
                logger.warning("lookup request to %s failed", node, exc_info=True)
                known.pop(node_id, None)
                continue
            active += 1
        if not pending:
            break
        if active == 0 and responded:  # nothing left to ask but stragglers
            server.stats["stragglers_abandoned"] += len(pending)
            break
        wake = deadline
        active_starts = [t0 for _, t0 in pending.values() if now - t0 < wait]
        if active_starts:
            wake = min(wake, min(active_starts) + wait)
        elif not responded:
            wake = min(wake, now + server.rpc_timeout)
        done, _ = await asyncio.wait(list(pending), timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            node, t0 = pending.pop(fut)
            ok, data = (False, None) if fut.cancelled() or fut.exception() is not None else fut.result()
            nodes = None
            if ok:
                if isinstance(data, (list, tuple)) and len(data) == 3:
                    nodes = unpack_nodes(data[2], 2 * server.ksize, distance)
                if nodes is None:
                    server.stats["bad_responses"] += 1
            if nodes is None:
                known.pop(node.id, None)
                continue
            rtt = time.monotonic() - t0
            max_rtt = max(max_rtt, rtt)
            server.srtt = rtt if server.srtt is None else 0.9 * server.srtt + 0.1 * rtt
            responded.append(node)
            if mode == "store" and data[0] is True:
                results.append(node)
            elif mode == "value" and data[1] is not None:
                results.append(data[1])
            learn(nodes)
    responded.sort(key=lambda n: distance[n.id])
    return responded[:size], results
