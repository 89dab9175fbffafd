"""The asyncio side of a DHT node: ``DHTServer`` owns kademlia's routing table and node id, the
storage, the failed-peer table and its tasks, and an ``RPCProtocol`` (protocol.py) on its socket.

Everything here runs on the node's event loop thread (see ``node.DHT``).

RPCs (every request's first argument is the sender's node id, or None from a client-mode node,
which no one adds to a routing table and which answers no requests, so it works behind NAT):

* ``ping(sender)`` -> our node id
* ``lookup(sender, key, want_value, value)`` -> ``[stored, record, packed nearest nodes]``:
  optionally stores ``value`` (None: don't), optionally returns the record (``want_value``); the
  one request our lookups send (lookup.py)
* ``store(sender, key, value)`` -> stored: further chunks of an oversized record, replication
* ``whoami(sender)`` -> ``[ip, port]`` the request came from: how a node behind NAT learns its public address
* ``dialback(sender, nonce, udp_port, tcp_ports)`` -> accepted: have the requester's observed IP dialed
  back, through another node of our table where we have one (``reachability.py``)
* ``dial(sender, ip, nonce, udp_port, tcp_ports)`` -> accepted: from a full node of our table: send a
  probe datagram and ``GET /reachability/<nonce>`` from fresh sockets (rate-limited per target IP)

Requests reach these handlers only from verified addresses (protocol.py), so a node that enters
the routing table has proved its address, and replication (handing our keys to a new node that
is nearer to them, kademlia's rule) only ever goes to such nodes: at most once per address per
``REPLICATE_INTERVAL`` and within a token bucket of ``REPLICATION_BYTES_PER_S``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections import Counter, OrderedDict
from typing import Any, Coroutine, Optional, Sequence

from kademlia.node import Node
from kademlia.routing import RoutingTable
from kademlia.utils import digest

from .lookup import iterative_lookup
from .protocol import MAX_REMEMBERED, Address, RPCProtocol, nearest_nodes, pack_nodes
from .reachability import Dialer
from .records import MAX_TTL, Record, decode_record, encode_record, merge_records, sign_record, split_record
from .storage import SubkeyStorage
from .verify import EndpointVerifier

logger = logging.getLogger(__name__)

RCVBUF_BYTES = 4 * 1024 * 1024
REPLICATE_INTERVAL = 600.0  # seconds between two replications to one address
REPLICATION_BYTES_PER_S = 256 * 1024  # token bucket refill; the burst is 4 s worth
WRONG_SECRET_WARNING = "records signed with another secret were skipped: wrong dht.secret?"
WRONG_SECRET_WARNING_INTERVAL = 300.0


def _is_id(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == 20


class DHTServer:
    def __init__(self, *, stats: Counter, ksize: int = 20, num_replicas: int = 6, alpha: int = 6, rpc_timeout: float = 1.0,
                 client_mode: bool = False, min_patience: float = 0.05, failed_ttl: float = 60.0,
                 refresh_interval: float = 3600.0, maintenance_interval: float = 30.0,
                 max_concurrent_lookups: int = 64, initial_peers: Sequence[tuple[str, int]] = (),
                 secret: Optional[bytes] = None, max_ttl: float = MAX_TTL, verify_endpoints: bool = False,
                 verifier_kwargs: Optional[dict] = None, **storage_kwargs: Any):
        self.stats, self.secret, self.max_ttl = stats, secret, float(max_ttl)
        # a node id from os.urandom: `random` is often seeded identically in DDP ranks (seed_everything)
        self.node = Node(os.urandom(20))
        self.ksize, self.alpha, self.rpc_timeout = ksize, alpha, rpc_timeout
        self.router = RoutingTable(self, ksize, self.node)
        # strangers' expert declarations are served once their endpoint answered (verify.py)
        self.verifier = EndpointVerifier(stats, secret, **(verifier_kwargs or {})) if verify_endpoints else None
        self.storage = SubkeyStorage(stats, secret=secret, max_ttl=self.max_ttl, verifier=self.verifier, **storage_kwargs)
        self.protocol = RPCProtocol(self.handle_request, stats, rpc_timeout, client_mode)
        self.num_replicas = min(num_replicas, ksize)
        self.response_neighbours = min(ksize, 2 * self.num_replicas)
        self.client_mode, self.min_patience, self.failed_ttl = client_mode, min_patience, failed_ttl
        self.refresh_interval, self.maintenance_interval = refresh_interval, maintenance_interval
        self.initial_peers = list(initial_peers)
        self.srtt: Optional[float] = None  # smoothed round-trip time of lookup requests
        self._failed: dict[bytes, float] = {}
        self._addresses: dict[Address, bytes] = {}  # address -> node id in the routing table
        self._replicated: "OrderedDict[Address, float]" = OrderedDict()
        self._tokens, self._tokens_at = 4.0 * REPLICATION_BYTES_PER_S, time.monotonic()
        self._tasks: set[asyncio.Future] = set()
        self._handles: list[asyncio.TimerHandle] = []
        self._lookup_slots = asyncio.Semaphore(max_concurrent_lookups)
        self._last_bootstrap = 0.0
        self._foreign_seen, self._foreign_warned_at = 0, -WRONG_SECRET_WARNING_INTERVAL
        self.dialer = Dialer(self)

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
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: self.protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < RCVBUF_BYTES:
            logger.info("UDP receive buffer is smaller than requested (net.core.rmem_max caps it)")
        self._schedule(self.refresh_interval, self._refresh)
        self._schedule(self.maintenance_interval, self._maintenance)
        return sock.getsockname()[1]

    def _schedule(self, delay: float, callback: Any) -> None:
        self._handles = [h for h in self._handles if not h.cancelled()][-8:]
        self._handles.append(asyncio.get_running_loop().call_later(delay, callback))

    def _refresh(self) -> None:
        self.spawn(self.refresh_table(self.refresh_interval))
        self._schedule(self.refresh_interval, self._refresh)

    async def refresh_table(self, republish_older_than: float) -> None:
        """kademlia's hourly job: look up a random id in each lonely bucket, republish old keys."""
        deadline = time.monotonic() + 10 * self.rpc_timeout
        ids = [random.randint(*b.range).to_bytes(20, "big") for b in self.router.lonely_buckets()]
        await asyncio.gather(*(self.lookup(rid, "node", deadline) for rid in ids))
        deadline = time.monotonic() + 10 * self.rpc_timeout
        await asyncio.gather(*(self.store_blobs(dkey, [blob], deadline)
                               for dkey, blob in self.storage.iter_older_than(republish_older_than)))

    def _maintenance(self) -> None:
        self.storage.cull()
        now = time.monotonic()
        for node_id in [k for k, t in self._failed.items() if t < now]:
            del self._failed[node_id]
        self.spawn(self.ensure_bootstrapped())
        self._schedule(self.maintenance_interval, self._maintenance)

    def stop(self) -> None:
        for handle in self._handles:
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self.verifier is not None:
            self.verifier.close()
        self.protocol.close()

    # ------------------------------------------------------------------ peers
    def mark_failed(self, node: Node) -> None:
        self._failed[node.id] = time.monotonic() + self.failed_ttl

    def is_failed(self, node: Node) -> bool:
        until = self._failed.get(node.id)
        return until is not None and until > time.monotonic()

    def knows(self, address: Address) -> bool:
        """True when a node of the routing table has this address (it proved it receives there)."""
        return address in self._addresses

    async def become_full(self) -> int:
        """A client-mode node found reachable starts answering and joins the peers' routing tables."""
        self.client_mode = self.protocol.client_mode = False
        return await self.bootstrap_to(self.initial_peers, time.monotonic() + 2 * self.rpc_timeout + 1)

    def routing_table_nodes(self) -> list[Node]:
        return [node for bucket in self.router.buckets for node in bucket.get_nodes()]

    def welcome(self, node: Node) -> None:
        """Add or refresh a node whose address is verified; hand it the keys it is now nearer to."""
        self._failed.pop(node.id, None)
        address = (node.ip, node.port)
        if not self.router.is_new_node(node):
            self.router.add_contact(node)  # moves it to the tail of its bucket (recently seen)
            return
        previous = self._addresses.get(address)
        if previous is not None and previous != node.id:  # one id per address: the latest counts
            self.router.remove_contact(Node(previous, *address))
        self._addresses[address] = node.id
        if len(self._addresses) > MAX_REMEMBERED:
            self._addresses = {(n.ip, n.port): n.id for n in self.routing_table_nodes()}
        if not self.client_mode and len(self.storage):
            self._replicate_to(node)
        self.router.add_contact(node)

    def _replicate_to(self, node: Node) -> None:
        address, now = (node.ip, node.port), time.monotonic()
        if now - self._replicated.get(address, -REPLICATE_INTERVAL) < REPLICATE_INTERVAL:
            self.stats["replications_skipped"] += 1
            return
        self._replicated[address] = now
        while len(self._replicated) > MAX_REMEMBERED:
            self._replicated.popitem(last=False)
        self._tokens = min(4.0 * REPLICATION_BYTES_PER_S, self._tokens + (now - self._tokens_at) * REPLICATION_BYTES_PER_S)
        self._tokens_at = now
        for key in self.storage.keys():
            keynode = Node(key)
            neighbours = nearest_nodes(self.router, key, self.num_replicas)
            if neighbours and not (node.distance_to(keynode) < neighbours[-1].distance_to(keynode)
                                   and self.node.distance_to(keynode) < neighbours[0].distance_to(keynode)):
                continue
            blob = self.storage.get(key)
            if blob is None:
                continue
            if self._tokens < len(blob):
                self.stats["replications_rate_limited"] += 1
                return
            self._tokens -= len(blob)
            self.spawn(self.call(node, "store", key, blob))

    async def call_ping(self, node: Node) -> None:
        """Ping ``node`` (kademlia's routing table does, to test a full bucket's head)."""
        await self.call(node, "ping")

    async def call(self, node: Node, name: str, *args: Any) -> tuple[bool, Any]:
        return await self.request(node, name, *args)

    def request(self, node: Node, name: str, *args: Any) -> asyncio.Future:
        """Send an RPC (our id first, None in client mode); the future gives ``(answered, response)``,
        and its outcome updates the routing table and the failed-peer table."""
        sender = None if self.client_mode else self.node.id
        future = self.protocol.request((node.ip, node.port), name, [sender, *args])
        future.add_done_callback(lambda f: None if f.cancelled() else self._after_call(f.result()[0], node))
        return future

    def request_lookup(self, node: Node, key: bytes, want_value: bool, value: Optional[bytes]) -> asyncio.Future:
        return self.request(node, "lookup", key, want_value, value)

    def _after_call(self, answered: bool, node: Node) -> None:
        if answered:
            self.welcome(node)
        else:
            self.stats["rpc_timeouts"] += 1
            self.router.remove_contact(node)
            self.mark_failed(node)

    async def ping_address(self, address: Address) -> Optional[Node]:
        """Ping ``(ip, port)``; the responding node (added to the routing table) or None."""
        sender = None if self.client_mode else self.node.id
        ok, node_id = await self.protocol.request(address, "ping", [sender])
        if not ok or not _is_id(node_id) or node_id == self.node.id:
            return None
        node = Node(node_id, address[0], address[1])
        self.welcome(node)
        return node

    async def bootstrap_to(self, addrs: Sequence[Address], deadline: float) -> int:
        """Ping ``addrs``, then look up our own id to fill the routing table; return how many answered."""
        self._last_bootstrap = time.monotonic()
        if not addrs:
            return 0
        nodes = [n for n in await asyncio.gather(*(self.ping_address(a) for a in addrs)) if n]
        if nodes:
            await self.lookup(self.node.id, "node", deadline, size=self.ksize)
        return len(nodes)

    async def ensure_bootstrapped(self) -> None:
        """Re-bootstrap from the initial peers when the routing table has emptied (rate-limited)."""
        if not self.initial_peers or any(bucket.nodes for bucket in self.router.buckets):
            return
        if time.monotonic() - self._last_bootstrap < min(5.0, self.maintenance_interval):
            return
        reached = await self.bootstrap_to(self.initial_peers, time.monotonic() + 2 * self.rpc_timeout + 1)
        if not reached:
            logger.warning("DHT node %s knows no peers and none of its initial peers %s answer",
                           self.node, self.initial_peers)

    # ------------------------------------------------------------------ requests we answer
    def handle_request(self, name: str, args: list, address: Address) -> Any:
        """Dispatch a verified request; raises on anything malformed (the protocol drops it)."""
        handler = {"ping": self.rpc_ping, "lookup": self.rpc_lookup, "store": self.rpc_store, "whoami": self.rpc_whoami,
                   "dialback": self.dialer.rpc_dialback, "dial": self.dialer.rpc_dial}[name]
        if not args:
            raise ValueError("no sender")
        sender, *rest = args
        if sender is not None:
            if not _is_id(sender) or sender == self.node.id:
                raise ValueError("bad node id")
            self.welcome(Node(sender, address[0], address[1]))
        return handler(address, *rest)

    def rpc_ping(self, address: Address) -> bytes:
        return self.node.id

    def rpc_whoami(self, address: Address) -> list:
        return [address[0], address[1]]

    def rpc_store(self, address: Address, key: Any, value: Any) -> bool:
        return self._store_local(key, value, address)

    def rpc_lookup(self, address: Address, key: Any, want_value: Any, value: Any) -> list:
        if not _is_id(key) or not isinstance(want_value, bool):
            raise ValueError("bad lookup request")
        stored = None if value is None else self._store_local(key, value, address)
        record = self.storage.get(key) if want_value else None
        exclude = Node(b"\x00" * 20, address[0], address[1])
        return [stored, record, pack_nodes(nearest_nodes(self.router, key, self.response_neighbours, exclude))]

    def _store_local(self, key: Any, value: Any, address: Optional[Address] = None) -> bool:
        """Validate (with a secret: authenticate) and merge; False when nothing was stored."""
        source = "" if address is None else f"{address[0]}:{address[1]}"
        stored = self.storage.store_blob(key, value, source)
        self._warn_if_foreign_tags()
        return stored

    def _warn_if_foreign_tags(self) -> None:
        """Log (at most every few minutes) when entries tagged under another secret were skipped."""
        seen = self.stats.get("foreign_tag_entries", 0)
        if seen > self._foreign_seen and self.secret is not None:
            now = time.monotonic()
            if now - self._foreign_warned_at >= WRONG_SECRET_WARNING_INTERVAL:
                self._foreign_warned_at = now
                logger.warning("DHT node %s: %d %s", self.node, seen - self._foreign_seen, WRONG_SECRET_WARNING)
                self._foreign_seen = seen
        elif self.secret is None:
            self._foreign_seen = seen

    # ------------------------------------------------------------------ lookups, store / get
    async def lookup(self, dkey: bytes, mode: str, deadline: float, size: Optional[int] = None,
                     value: Optional[bytes] = None) -> tuple[list[Node], list[Any]]:
        """See ``lookup.iterative_lookup`` (at most ``max_concurrent_lookups`` at a time)."""
        async with self._lookup_slots:
            return await iterative_lookup(self, dkey, mode, deadline, size or self.num_replicas, value)

    async def store_record(self, key: str, record: Record, deadline: float) -> bool:
        """Store ``record`` under ``key`` on the nearest nodes (and here, if this node is one);
        with a secret, every entry is tagged first."""
        dkey = digest(key)
        if self.secret is not None:
            record = sign_record(self.secret, dkey, record)
        return await self.store_blobs(dkey, [encode_record(c) for c in split_record(record)], deadline)

    async def store_blobs(self, dkey: bytes, blobs: list[bytes], deadline: float) -> bool:
        """The first blob travels with the lookup requests themselves; further chunks of an
        oversized record go to the nodes the lookup found."""
        await self.ensure_bootstrapped()
        nodes, acked = await self.lookup(dkey, "store", deadline, value=blobs[0])
        target = Node(dkey)
        stored_here = False
        if not self.client_mode and (len(nodes) < self.num_replicas
                                     or self.node.distance_to(target) < nodes[-1].distance_to(target)):
            stored_here = all([self._store_local(dkey, blob) for blob in blobs])
        if len(blobs) > 1 and acked:
            results = await asyncio.gather(*(self.call(n, "store", dkey, blob) for n in acked for blob in blobs[1:]))
            return stored_here or all(ok and answer is True for ok, answer in results)
        return stored_here or bool(acked)

    async def get_record(self, key: str, deadline: float) -> Record:
        """Merge of this node's record and every valid record returned by the nearest nodes
        (with a secret: of their authentic entries only)."""
        await self.ensure_bootstrapped()
        dkey = digest(key)
        _, values = await self.lookup(dkey, "value", deadline)
        now = time.time()
        records = [decode_record(v, self.stats, now, self.secret, dkey, self.max_ttl) for v in values]
        self._warn_if_foreign_tags()
        if not self.client_mode:
            records.append(self.storage.get_record(dkey, now))
        return merge_records(records, now)
