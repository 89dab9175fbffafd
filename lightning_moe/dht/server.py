"""The asyncio side of a DHT node: a ``kademlia.network.Server`` with its own lookups.

Everything here runs on the node's event loop thread (see ``node.DHT``).

Lookup (``_lookup``) is kademlia's iterative search with these changes:

* it looks for the ``num_replicas`` nearest nodes (a store goes to them) and does not stop
  at the first node holding a value: every responsive one is asked and the records they
  return are merged by the caller;
* the request it sends (``lookup``, see ``protocol.DHTProtocol.rpc_lookup``) can carry the
  store itself, so a store costs one lookup, not a lookup and then a round of stores;
* a request is launched as soon as a slot frees (``alpha`` in flight), not in lock-step rounds;
* a request that has waited ``patience`` (4x the slowest reply seen in this lookup, at least
  ``min_patience``, at most ``rpc_timeout``) no longer holds a slot, and once every other
  candidate has answered the lookup returns without it. The straggler keeps running in the
  background, and if it times out the peer leaves the routing table and is marked failed
  (skipped by lookups for ``failed_ttl`` seconds, or until it contacts us).
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import os
import socket
import time
from collections import Counter
from typing import Any, Coroutine, Optional, Sequence

from kademlia.network import Server
from kademlia.node import Node
from kademlia.utils import digest

from .protocol import DHTProtocol, nearest_nodes, unpack_nodes
from .records import Record, decode_record, encode_record, merge_records, sign_record, split_record
from .storage import SubkeyStorage

logger = logging.getLogger(__name__)

RCVBUF_BYTES = 4 * 1024 * 1024


class DHTServer(Server):
    protocol_class = DHTProtocol

    def __init__(self, *, stats: Counter, ksize: int = 20, num_replicas: int = 6, alpha: int = 6, rpc_timeout: float = 1.0,
                 client_mode: bool = False, min_patience: float = 0.05, failed_ttl: float = 60.0,
                 refresh_interval: float = 3600.0, maintenance_interval: float = 30.0,
                 max_concurrent_lookups: int = 64, initial_peers: Sequence[tuple[str, int]] = (),
                 secret: Optional[bytes] = None):
        self.stats = stats
        self.secret = secret
        # a node id from os.urandom: kademlia's default uses the `random` module, which DDP ranks
        # often seed identically (seed_everything), and equal ids break routing between them
        super().__init__(ksize=ksize, alpha=alpha, node_id=os.urandom(20))
        self.storage = SubkeyStorage(stats, secret=secret)  # not via the constructor: an empty storage is falsy
        self.rpc_timeout = rpc_timeout
        self.num_replicas = min(num_replicas, ksize)
        self.response_neighbours = min(ksize, 2 * self.num_replicas)
        self.client_mode = client_mode
        self.min_patience = min_patience
        self.failed_ttl = failed_ttl
        self.refresh_interval = refresh_interval
        self.maintenance_interval = maintenance_interval
        self.initial_peers = list(initial_peers)
        self._failed: dict[bytes, float] = {}
        self._srtt: Optional[float] = None  # smoothed round-trip time of lookup requests
        self._tasks: set[asyncio.Future] = set()
        self._lookup_slots = asyncio.Semaphore(max_concurrent_lookups)
        self._last_bootstrap = 0.0
        self._maintenance_handle: Optional[asyncio.TimerHandle] = None

    def _create_protocol(self) -> DHTProtocol:
        return DHTProtocol(self)

    # ------------------------------------------------------------------ lifecycle
    def spawn(self, coro: Coroutine) -> asyncio.Future:
        """Run ``coro`` as a task that ``stop`` cancels; keeps a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def listen_on(self, host: str, port: int) -> int:
        """Bind a UDP socket (4 MiB receive buffer) and start serving; return the bound port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
            sock.bind((host, port))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            self.transport, self.protocol = await loop.create_datagram_endpoint(self._create_protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        bound = sock.getsockname()[1]
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < RCVBUF_BYTES:
            logger.info("UDP receive buffer is smaller than requested (net.core.rmem_max caps it)")
        self.refresh_loop = loop.call_later(self.refresh_interval, self.refresh_table)
        self._maintenance_handle = loop.call_later(self.maintenance_interval, self._maintenance)
        return bound

    def refresh_table(self, interval: Optional[float] = None) -> None:
        """kademlia's hourly job: refresh lonely buckets, republish old keys (live entries only)."""
        self.spawn(self._refresh_table())
        loop = asyncio.get_running_loop()
        self.refresh_loop = loop.call_later(interval or self.refresh_interval, self.refresh_table)

    async def _refresh_table(self, republish_older_than: Optional[float] = None) -> None:
        deadline = time.monotonic() + 10 * self.rpc_timeout
        await asyncio.gather(*(self._lookup(rid, "node", deadline) for rid in self.protocol.get_refresh_ids()))
        older = self.refresh_interval if republish_older_than is None else republish_older_than
        deadline = time.monotonic() + 10 * self.rpc_timeout
        await asyncio.gather(*(self._store_blobs(dkey, [blob], deadline)
                               for dkey, blob in self.storage.iter_older_than(older)))

    def _maintenance(self) -> None:
        self.storage.cull()
        now = time.monotonic()
        for node_id in [k for k, t in self._failed.items() if t < now]:
            del self._failed[node_id]
        self.spawn(self.ensure_bootstrapped())
        self._maintenance_handle = asyncio.get_running_loop().call_later(self.maintenance_interval, self._maintenance)

    def stop(self) -> None:
        super().stop()
        if self._maintenance_handle is not None:
            self._maintenance_handle.cancel()
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ peers
    def mark_failed(self, node: Node) -> None:
        self._failed[node.id] = time.monotonic() + self.failed_ttl

    def clear_failed(self, node: Node) -> None:
        self._failed.pop(node.id, None)

    def is_failed(self, node: Node) -> bool:
        until = self._failed.get(node.id)
        return until is not None and until > time.monotonic()

    def routing_table_nodes(self) -> list[Node]:
        return [node for bucket in self.protocol.router.buckets for node in bucket.get_nodes()]

    async def bootstrap_to(self, addrs: Sequence[tuple[str, int]], deadline: float) -> int:
        """Ping ``addrs``, then look up our own id to fill the routing table; return how many answered."""
        self._last_bootstrap = time.monotonic()
        if not addrs:
            return 0
        nodes = [n for n in await asyncio.gather(*(self.protocol.ping_address(a) for a in addrs)) if n]
        if nodes:
            await self._lookup(self.node.id, "node", deadline, size=self.ksize)
        return len(nodes)

    async def ensure_bootstrapped(self) -> None:
        """Re-bootstrap from the initial peers when the routing table has emptied (rate-limited)."""
        if not self.initial_peers or any(bucket.nodes for bucket in self.protocol.router.buckets):
            return
        if time.monotonic() - self._last_bootstrap < min(5.0, self.maintenance_interval):
            return
        reached = await self.bootstrap_to(self.initial_peers, time.monotonic() + 2 * self.rpc_timeout + 1)
        if not reached:
            logger.warning("DHT node %s knows no peers and none of its initial peers %s answer",
                           self.protocol.source_node, self.initial_peers)

    # ------------------------------------------------------------------ lookup
    def _patience(self, max_rtt: float) -> float:
        """How long a request may take before it is treated as a straggler: 4x the slowest
        reply of this lookup (or the node's smoothed round-trip time before the first one)."""
        reference = max_rtt if max_rtt > 0 else self._srtt
        if reference is None:
            return self.rpc_timeout
        return min(self.rpc_timeout, max(self.min_patience, 4 * reference))

    async def _lookup(self, dkey: bytes, mode: str, deadline: float, size: Optional[int] = None,
                      value: Optional[bytes] = None) -> tuple[list[Node], list[Any]]:
        """Iterative search for the ``size`` (default ``num_replicas``) nodes nearest to ``dkey``.

        Every node on the way gets a ``lookup`` request; ``mode`` says what it carries:
        ``"node"`` (nothing), ``"value"`` (asks for the record: results are the records
        returned) or ``"store"`` (stores ``value``: results are the nodes that stored it).
        Returns (responsive nodes among the nearest, results)."""
        async with self._lookup_slots:
            return await self._lookup_inner(dkey, mode, deadline, size or self.num_replicas, value)

    async def _lookup_inner(self, dkey: bytes, mode: str, deadline: float, size: int,
                            value: Optional[bytes]) -> tuple[list[Node], list[Any]]:
        target = int.from_bytes(dkey, "big")
        known: dict[bytes, Node] = {}  # every node heard of, minus those that failed
        distance: dict[bytes, int] = {}

        def learn(nodes: list[Node]) -> None:
            for n in nodes:
                if n.id not in distance and n.id != self.node.id and not self.is_failed(n):
                    known[n.id] = n
                distance[n.id] = n.long_id ^ target

        learn(nearest_nodes(self.protocol.router, dkey, self.ksize))
        request = self.protocol.request_lookup
        want_value, to_store = mode == "value", value if mode == "store" else None
        contacted: set[bytes] = set()
        pending: dict[asyncio.Future, tuple[Node, float]] = {}
        responded: list[Node] = []
        results: list[Any] = []
        max_rtt = 0.0
        for _ in range(100 * self.ksize):  # bounded: each pass handles at least one reply or ends
            now = time.monotonic()
            if now >= deadline:
                break
            patience = self._patience(max_rtt)
            active = sum(1 for _, t0 in pending.values() if now - t0 < patience)
            nearest = heapq.nsmallest(size, known, key=distance.__getitem__)
            uncontacted = [i for i in nearest if i not in contacted]
            for node_id in uncontacted[: max(0, self.alpha - active)]:
                contacted.add(node_id)
                node = known[node_id]
                try:
                    pending[request(node, dkey, want_value, to_store)] = (node, now)
                except Exception:  # noqa: BLE001 - e.g. a request over the datagram limit
                    logger.warning("lookup request to %s failed", node, exc_info=True)
                    known.pop(node_id, None)
                    continue
                active += 1
            if not pending:
                break
            if active == 0 and responded:  # nothing left to ask but stragglers
                self.stats["stragglers_abandoned"] += len(pending)
                break
            wake = deadline
            active_starts = [t0 for _, t0 in pending.values() if now - t0 < patience]
            if active_starts:
                wake = min(wake, min(active_starts) + patience)
            elif not responded:
                wake = min(wake, now + self.rpc_timeout)
            done, _ = await asyncio.wait(list(pending), timeout=max(0.0, wake - now),
                                         return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                node, t0 = pending.pop(fut)
                ok, data = (False, None) if fut.cancelled() or fut.exception() is not None else fut.result()
                nodes = None
                if ok:
                    if isinstance(data, (list, tuple)) and len(data) == 3:
                        nodes = unpack_nodes(data[2], 2 * self.ksize, distance)
                    if nodes is None:
                        self.stats["bad_responses"] += 1
                if nodes is None:
                    known.pop(node.id, None)
                    continue
                rtt = time.monotonic() - t0
                max_rtt = max(max_rtt, rtt)
                self._srtt = rtt if self._srtt is None else 0.9 * self._srtt + 0.1 * rtt
                responded.append(node)
                if mode == "store" and data[0] is True:
                    results.append(node)
                elif mode == "value" and data[1] is not None:
                    results.append(data[1])
                learn(nodes)
        responded.sort(key=lambda n: distance[n.id])
        return responded[:size], results

    # ------------------------------------------------------------------ store / get
    async def store_record(self, key: str, record: Record, deadline: float) -> bool:
        """Store ``record`` under ``key`` on the nearest nodes (and here, if this node is one);
        with a secret, every entry is tagged first."""
        dkey = digest(key)
        if self.secret is not None:
            record = sign_record(self.secret, dkey, record)
        return await self._store_blobs(dkey, [encode_record(c) for c in split_record(record)], deadline)

    async def _store_blobs(self, dkey: bytes, blobs: list[bytes], deadline: float) -> bool:
        """The first blob travels with the lookup requests themselves; further chunks of an
        oversized record go to the nodes the lookup found."""
        await self.ensure_bootstrapped()
        nodes, acked = await self._lookup(dkey, "store", deadline, value=blobs[0])
        target = Node(dkey)
        stored_here = False
        if not self.client_mode and (len(nodes) < self.num_replicas
                                     or self.node.distance_to(target) < nodes[-1].distance_to(target)):
            stored_here = all([self.protocol._store_local(dkey, blob) for blob in blobs])
        if len(blobs) > 1 and acked:
            calls = [self.protocol.call_store(n, dkey, blob) for n in acked for blob in blobs[1:]]
            results = await asyncio.gather(*calls)
            return stored_here or all(ok and answer is True for ok, answer in results)
        return stored_here or bool(acked)

    async def get_record(self, key: str, deadline: float) -> Record:
        """Merge of this node's record and every valid record returned by the nearest nodes
        (with a secret: of their authentic entries only)."""
        await self.ensure_bootstrapped()
        dkey = digest(key)
        _, values = await self._lookup(dkey, "value", deadline)
        now = time.time()
        records = [decode_record(v, self.stats, now, self.secret, dkey) for v in values]
        if not self.client_mode:
            records.append(self.storage.get_record(dkey, now))
        return merge_records(records, now)


def _is_ipv4(value: str) -> bool:
    try:
        socket.inet_aton(value)
    except OSError:
        return False
    return value.count(".") == 3
