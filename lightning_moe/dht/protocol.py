"""kademlia protocol with validation, a shorter RPC wait, and a client mode.

Client mode: kademlia adds the sender of *every* incoming RPC to its routing table
(``welcome_if_new`` in each ``rpc_*`` handler, keyed by the node id the request carries).
A client-mode node therefore never sends those RPCs. It sends ``client_ping``,
``client_lookup`` and ``client_store`` (and ``client_find_node`` / ``client_find_value``
exist too): the same operations without a node id, which server nodes answer without
touching their routing table. A client node also ignores every request it receives. So it
never appears in anyone's routing table, nobody ever tries to reach it, and a trainer
behind NAT works: it only needs the replies to its own requests.

Wire format: rpcudp's (``0x00`` request / ``0x01`` reply, a 20-byte message id, msgpack of
``[name, args]`` or of the reply), so every stock kademlia RPC is still answered.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import socket
from collections import Counter
from typing import TYPE_CHECKING, Any, Container, Optional

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol


if TYPE_CHECKING:
    from .server import DHTServer

logger = logging.getLogger(__name__)

MAX_DATAGRAM = 8192 + 21  # rpcudp refuses to send a larger request; no honest reply is larger
_RPC_NAMES = frozenset({"ping", "store", "find_node", "find_value", "lookup",
                        "client_ping", "client_store", "client_find_node", "client_find_value", "client_lookup"})
_NODE_BYTES = 26  # packed node: 20-byte id, IPv4, port


def pack_nodes(nodes: list) -> bytes:
    """Nodes as one bytes string (26 bytes each): far cheaper to msgpack than lists of tuples."""
    return b"".join(n.id + socket.inet_aton(n.ip) + n.port.to_bytes(2, "big") for n in nodes)


def nearest_nodes(router: Any, key: bytes, k: int, exclude: Optional[Node] = None) -> list:
    """The ``k`` nodes of a routing table nearest to ``key`` (exact; kademlia's own
    ``find_neighbors`` stops at the first ``k`` it traverses and costs more)."""
    target = int.from_bytes(key, "big")
    nodes = [n for bucket in router.buckets for n in bucket.nodes.values()]
    if exclude is not None:
        nodes = [n for n in nodes if not (n.ip == exclude.ip and n.port == exclude.port)]
    return heapq.nsmallest(k, nodes, key=lambda n: n.long_id ^ target)


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


def _is_id(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == 20


class DHTProtocol(KademliaProtocol):
    """``KademliaProtocol`` hardened for untrusted peers.

    * ``rpc_timeout`` replaces rpcudp's 5 s reply wait; timeouts are not logged as errors.
    * Malformed datagrams, unknown or ill-typed requests and invalid records are dropped and
      counted in ``stats`` instead of raising inside the event loop.
    * Our lookups send one extra RPC, ``lookup`` (see ``rpc_lookup``): it can carry a store,
      returns the record if asked, and always the nearest nodes packed into one bytes string,
      so a lookup keeps crawling past nodes that hold the value (it merges every replica's
      answer) and a store doubles as its own lookup. kademlia's own RPCs are still answered.
    * ``welcome_if_new`` hands keys to a new node with kademlia's rule, on the right key
      (stock kademlia digests the digest again), and always refreshes the contact.
    """

    def __init__(self, server: "DHTServer"):
        KademliaProtocol.__init__(self, server.node, server.storage, server.ksize)
        self._wait_timeout = server.rpc_timeout
        self.server = server
        self.client_mode = server.client_mode
        self.stats: Counter = server.stats

    # ------------------------------------------------------------------ rpcudp plumbing
    def datagram_received(self, data: bytes, addr: tuple) -> None:
        """Handle a datagram synchronously (every ``rpc_*`` here is synchronous): one task less
        per message than rpcudp, and nothing a stranger sends can raise into the loop."""
        if not 22 <= len(data) <= MAX_DATAGRAM:
            self.stats["bad_datagrams"] += 1
            return
        kind, msg_id = data[:1], data[1:21]
        if kind == b"\x00":
            if self.client_mode:
                self.stats["requests_ignored_in_client_mode"] += 1
                return
            try:
                funcname, args = umsgpack.unpackb(data[21:])
                if funcname not in _RPC_NAMES or not isinstance(args, (list, tuple)):
                    raise ValueError("unknown request")
                response = getattr(self, "rpc_" + funcname)(addr, *args)
                reply = b"\x01" + msg_id + umsgpack.packb(response)
            except Exception:  # noqa: BLE001 - anything a stranger sends
                self.stats["bad_requests"] += 1
                logger.debug("dropped a bad request from %s", addr, exc_info=True)
                return
            self.transport.sendto(reply, addr)
        elif kind == b"\x01":
            try:
                response = umsgpack.unpackb(data[21:])
            except Exception:  # noqa: BLE001
                self.stats["bad_datagrams"] += 1
                return
            self._accept_response(msg_id, response, addr)
        else:
            self.stats["bad_datagrams"] += 1

    def _accept_response(self, msg_id: bytes, data: Any, address: tuple) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is None:
            self.stats["unexpected_responses"] += 1
            return
        future, timeout = entry
        timeout.cancel()
        if not future.done():
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

    # ------------------------------------------------------------------ server-side RPCs
    def _source(self, sender: tuple, nodeid: Any) -> Node:
        if not _is_id(nodeid) or nodeid == self.source_node.id:
            raise ValueError("bad node id")
        return Node(nodeid, sender[0], sender[1])

    def _store_local(self, key: Any, value: Any) -> bool:
        """Validate (with a secret: authenticate) and merge; False when nothing was stored."""
        return self.storage.store_blob(key, value)

    def _neighbours(self, key: Any, exclude: Optional[Node] = None) -> list:
        if not _is_id(key):
            raise ValueError("bad key")
        return [tuple(n) for n in nearest_nodes(self.router, key, self.server.response_neighbours, exclude)]

    def _find_value(self, key: Any, exclude: Optional[Node] = None) -> Any:
        value = self.storage.get(key) if _is_id(key) else None
        return self._neighbours(key, exclude) if value is None else {"value": value}

    def rpc_ping(self, sender, nodeid):
        self.welcome_if_new(self._source(sender, nodeid))
        return self.source_node.id

    def rpc_store(self, sender, nodeid, key, value):
        self.welcome_if_new(self._source(sender, nodeid))
        return self._store_local(key, value)

    def rpc_lookup(self, sender, nodeid, key, want_value, value):
        """The one request our lookups send: optionally store ``value`` (None: don't), optionally
        return the record (``want_value``), and always the nearest known nodes, packed.
        Answers ``[stored: bool | None, record: bytes | None, packed nodes]``."""
        source = self._source(sender, nodeid)
        self.welcome_if_new(source)
        return self._lookup_answer(key, want_value, value, source)

    def rpc_find_node(self, sender, nodeid, key):
        source = self._source(sender, nodeid)
        self.welcome_if_new(source)
        return self._neighbours(key, exclude=source)

    def rpc_find_value(self, sender, nodeid, key):
        source = self._source(sender, nodeid)
        self.welcome_if_new(source)
        return self._find_value(key, exclude=source)

    # the same operations for client-mode nodes: no node id, never added to the routing table
    def rpc_client_ping(self, sender):
        return self.source_node.id

    def rpc_client_store(self, sender, key, value):
        return self._store_local(key, value)

    def rpc_client_lookup(self, sender, key, want_value, value):
        return self._lookup_answer(key, want_value, value, None)

    def _lookup_answer(self, key: Any, want_value: Any, value: Any, exclude: Optional[Node]) -> list:
        if not _is_id(key) or not isinstance(want_value, bool):
            raise ValueError("bad lookup request")
        stored = None if value is None else self._store_local(key, value)
        record = self.storage.get(key) if want_value else None
        nodes = nearest_nodes(self.router, key, self.server.response_neighbours, exclude)
        return [stored, record, pack_nodes(nodes)]

    def rpc_client_find_node(self, sender, key):
        return self._neighbours(key)

    def rpc_client_find_value(self, sender, key):
        return self._find_value(key)

    # ------------------------------------------------------------------ outgoing calls
    async def call_ping(self, node_to_ask: Node):
        address = (node_to_ask.ip, node_to_ask.port)
        if self.client_mode:
            result = await self.client_ping(address)
        else:
            result = await self.ping(address, self.source_node.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node):
        address = (node_to_ask.ip, node_to_ask.port)
        if self.client_mode:
            result = await self.client_find_node(address, node_to_find.id)
        else:
            result = await self.find_node(address, self.source_node.id, node_to_find.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node):
        address = (node_to_ask.ip, node_to_ask.port)
        if self.client_mode:
            result = await self.client_find_value(address, node_to_find.id)
        else:
            result = await self.find_value(address, self.source_node.id, node_to_find.id)
        return self.handle_call_response(result, node_to_ask)

    async def call_store(self, node_to_ask: Node, key: bytes, value: bytes):
        address = (node_to_ask.ip, node_to_ask.port)
        if self.client_mode:
            result = await self.client_store(address, key, value)
        else:
            result = await self.store(address, self.source_node.id, key, value)
        return self.handle_call_response(result, node_to_ask)

    def request_lookup(self, node: Node, key: bytes, want_value: bool, value: Optional[bytes]) -> asyncio.Future:
        """Send a ``lookup`` request; the future gives rpcudp's ``(answered, response)``. A
        plain future with a callback, not a task: this is the hot path of every lookup."""
        address = (node.ip, node.port)
        if self.client_mode:
            future = self.client_lookup(address, key, want_value, value)
        else:
            future = self.lookup(address, self.source_node.id, key, want_value, value)
        future.add_done_callback(lambda f: None if f.cancelled() else self.handle_call_response(f.result(), node))
        return future

    async def ping_address(self, address: tuple) -> Optional[Node]:
        """Ping ``(ip, port)``; the responding node (added to the routing table) or None."""
        if self.client_mode:
            ok, node_id = await self.client_ping(address)
        else:
            ok, node_id = await self.ping(address, self.source_node.id)
        if not ok or not _is_id(node_id) or node_id == self.source_node.id:
            return None
        node = Node(node_id, address[0], address[1])
        self.welcome_if_new(node)
        return node

    def handle_call_response(self, result, node: Node):
        if not result[0]:
            self.stats["rpc_timeouts"] += 1
            self.router.remove_contact(node)
            self.server.mark_failed(node)
            return result
        self.welcome_if_new(node)
        return result

    def welcome_if_new(self, node: Node) -> None:
        self.server.clear_failed(node)
        if not self.router.is_new_node(node):
            self.router.add_contact(node)  # moves it to the tail of its bucket (recently seen)
            return
        logger.debug("adding %s to the routing table", node)
        for key, value in self.storage:
            keynode = Node(key)
            neighbors = self.router.find_neighbors(keynode)
            if neighbors:
                new_node_close = node.distance_to(keynode) < neighbors[-1].distance_to(keynode)
                this_closest = self.source_node.distance_to(keynode) < neighbors[0].distance_to(keynode)
            if not neighbors or (new_node_close and this_closest):
                self.server.spawn(self.call_store(node, key, value))
        self.router.add_contact(node)
