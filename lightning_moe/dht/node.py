"""``DHT``: one kademlia node per process, its event loop on a background thread, and a
synchronous API with timeouts for PyTorch code."""
from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import socket
import threading
import time
from collections import Counter
from typing import Any, Coroutine, Iterable, Optional, Sequence

from .. import auth
from ..config import ConfigError, DHTConfig
from ..net import resolve_binding
from ..net.addresses import ALL_INTERFACES, is_ipv4
from ..net.reachability import PROBES
from .reachability import observe_address, request_dialbacks
from .records import (
    MAX_KEY_LENGTH,
    MAX_TTL,
    Record,
    check_entry,
    expert_entries,
    parent_and_coordinate,
    parse_children_endpoints,
    parse_endpoint,
    parse_uid_prefix,
    prefix_key,
    strip_tags,
)
from .server import DHTServer

logger = logging.getLogger(__name__)


class DHT:
    """A DHT node. It starts in the constructor and serves until ``shutdown()``.

    :param initial_peers: ``"host:port"`` of nodes already in the DHT. When none of them
        answers, the node logs a warning (it would otherwise form a separate DHT silently)
        and keeps retrying while its routing table is empty.
    :param host: interface to bind; None (the default): loopback while every initial peer is on
        loopback, else all interfaces (see ``lightning_moe.net.addresses``). :param port: 0 picks a free port.
    :param announce_host: / :param announce_port: what ``address`` reports when peers must
        reach this node at another address than the bound one (NAT, 0.0.0.0; None: the bound
        address, or the local address that routes to the initial peers when bound to all). Nodes learn
        peers' addresses from the datagrams they send, once the address is verified (it answered
        a request or returned a cookie, see ``protocol``).
    :param client_mode: a trainer-only node: it reads and writes the DHT but answers no
        requests and never enters other nodes' routing tables (works behind NAT).
    :param rpc_timeout: seconds to wait for one peer's reply (kademlia's default is 5).
    :param wait_timeout: default bound of each blocking call, start-up included.
    :param ksize: routing table bucket size; :param num_replicas: nodes that store each key (a
        lookup looks for that many nearest nodes and merges all their answers);
    :param alpha: requests in flight per lookup.
    :param secret: the swarm's shared secret (default: the ``LIGHTNING_MOE_SECRET`` environment
        variable, see ``lightning_moe.auth.resolve_secret``). With one, every entry this node
        writes carries an HMAC tag, and it stores and reads only entries whose tag verifies:
        anything else (a stranger's records, or records of a swarm with another secret) is
        skipped and counted as ``unauthenticated_entries``. Every node of a private swarm should
        have it: a node without it still stores and serves the tagged records, but also lets a
        stranger's entry replace a tagged one under the same sub-key. When entries tagged under
        another secret are skipped, the node logs a warning (at most every 5 minutes).
    :param max_ttl: the furthest ahead (seconds) an expiration time may be; entries beyond it
        are invalid, here and on every node with this setting (default ``records.MAX_TTL``).
    Further keyword arguments go to ``server.DHTServer`` and its ``storage.SubkeyStorage``
    (``max_bytes``, ``max_bytes_per_source``, ``max_keys``, ``failed_ttl``, ``verify_endpoints``: serve strangers'
    expert declarations only once their endpoint answered /info listing the expert, see ``dht.verify``; off here,
    on in ``DHTConfig``; ``verifier_kwargs`` for its limits).

    Every method is thread-safe and may be called from any thread except the node's own
    loop thread. Expiration times are absolute ``time.time()`` seconds. A call that runs
    out of time returns what the lookups gathered until then (a partial answer) rather
    than raising; only a dead event loop raises ``TimeoutError``. Records read from the
    network are validated; anything invalid is skipped and counted in ``stats``.
    Create the DHT in the process that uses it (it holds a thread and a socket; it cannot
    be pickled or inherited through ``fork``).
    """

    def __init__(self, initial_peers: Sequence[str] = (), host: Optional[str] = None, port: int = 0,
                 announce_host: Optional[str] = None, announce_port: Optional[int] = None,
                 client_mode: bool = False, rpc_timeout: float = 1.0, wait_timeout: float = 5.0,
                 ksize: int = 20, num_replicas: int = 6, alpha: int = 6, secret: str | bytes | None = None,
                 **server_kwargs: Any):
        self._secret = auth.resolve_secret(secret)
        self.max_ttl = float(server_kwargs.get("max_ttl", MAX_TTL))
        self.initial_peers = [_parse_peer(p) for p in initial_peers]
        binding = resolve_binding(host, announce_host, [f"{h}:{p}" for h, p in self.initial_peers])
        self.host, self.client_mode = binding.host, client_mode
        self.rpc_timeout, self.wait_timeout = float(rpc_timeout), float(wait_timeout)
        self._announce_host, self._announce_port = binding.announce, announce_port
        self._stats: Counter = Counter()
        self._pid = os.getpid()
        self._shutdown_lock = threading.Lock()
        self._is_shut_down = False
        self._server: Optional[DHTServer] = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,), name="lightning_moe.DHT", daemon=True)
        self._thread.start()
        try:
            server_kwargs.update(ksize=ksize, num_replicas=num_replicas, alpha=alpha)
            self.port = self._call(self._start(port, server_kwargs), timeout=self.wait_timeout + 5)
        except BaseException:
            self.shutdown()
            raise
        self._thread.name = f"lightning_moe.DHT:{self.port}"

    @classmethod
    def from_config(cls, config: DHTConfig, client_mode: bool = False, **kwargs: Any) -> "DHT":
        """The node the ``dht`` config group describes (a client-mode node binds any free port: it answers
        no one). A port in use is a :class:`ConfigError` that names ``dht.port``."""
        port = 0 if client_mode else config.port
        binding = resolve_binding(config.host, config.announce_host, config.initial_peers)
        discover = not client_mode and config.client_mode is None and config.announce_host is None and \
            binding.host in ALL_INTERFACES
        try:
            node = cls(initial_peers=config.initial_peers, host=config.host, port=port, announce_host=config.announce_host,
                       client_mode=client_mode or bool(config.client_mode) or discover, secret=config.secret,
                       **{"verify_endpoints": config.verify_endpoints, **kwargs})
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ConfigError(f"dht.port={port}: cannot bind {config.host or 'the auto address'}:{port} "
                                  f"({e.strerror}); choose another port or 0 for any free one") from e
            raise
        if discover:
            node.discover()
        return node

    # ------------------------------------------------------------------ reachability
    def observed_address(self, timeout: Optional[float] = None) -> Optional[str]:
        """The IP address that most of (up to 3) peers see this node's requests come from; None if none answers."""
        return self._run(lambda deadline: observe_address(self._server), timeout, False)

    def check_reachable(self, tcp_ports: Sequence[int] = (), udp: bool = True, timeout: float = 5.0) -> dict[str, bool]:
        """Ask (up to 3) peers to dial back this node's UDP port and ``tcp_ports`` from addresses it has not
        contacted (see ``dht.reachability``): ``{"udp": reached, "tcp:PORT": reached, ...}``. A home NAT
        drops such traffic, so reached means strangers reach that port."""
        nonce = PROBES.expect()
        ports = [int(p) for p in tcp_ports]
        expected = ({"udp"} if udp else set()) | {f"tcp:{port}" for port in ports}
        try:
            asked = self._run(lambda deadline: request_dialbacks(self._server, nonce, self.port if udp else 0, ports),
                              min(timeout, self.wait_timeout), False)
            seen = PROBES.wait(nonce, expected, timeout if asked else 0.0)
        finally:
            PROBES.forget(nonce)
        return {label: label in seen for label in sorted(expected)}

    def discover(self) -> Optional[str]:
        """A client-mode node learns its public IP from its peers and, when strangers reach its UDP port, becomes
        a full node announced at that IP; returns the public IP (None when no peer answered)."""
        public = self.observed_address()
        if public is None:
            logger.warning("DHT node: no peer told us our public address; staying in client mode")
            return None
        if self.check_reachable(udp=True)["udp"]:
            self._announce_host = public
            self._call(self._server.become_full(), self.wait_timeout + 5)
            self.client_mode = False
            logger.info("DHT node reachable at %s: serving requests as a full node", self.address)
        else:
            logger.info("DHT node: strangers cannot reach UDP port %d at %s (NAT or firewall): client mode, it "
                        "answers no one and enters no routing table", self.port, public)
        return public

    async def _start(self, port: int, server_kwargs: dict) -> int:
        loop = asyncio.get_running_loop()
        peers = []
        for peer_host, peer_port in self.initial_peers:
            if is_ipv4(peer_host):
                peers.append((peer_host, peer_port))
                continue
            try:
                infos = await loop.getaddrinfo(peer_host, peer_port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
                peers.append((infos[0][4][0], peer_port))
            except OSError:
                logger.warning("cannot resolve initial peer %s:%s", peer_host, peer_port)
        self._server = DHTServer(stats=self._stats, rpc_timeout=self.rpc_timeout, client_mode=self.client_mode,
                                 initial_peers=peers, secret=self._secret, **server_kwargs)
        bound = await self._server.listen_on(self.host, port)
        if self.initial_peers:
            reached = await self._server.bootstrap_to(peers, time.monotonic() + self.wait_timeout)
            if not reached:
                logger.warning(
                    "DHT node at %s:%d could not reach ANY of its %d initial peers %s: it runs alone and "
                    "forms a separate DHT until one answers (wrong address, firewall, or peers down?)",
                    self.host, bound, len(self.initial_peers), [f"{h}:{p}" for h, p in self.initial_peers])
        return bound

    # ------------------------------------------------------------------ plumbing
    @property
    def address(self) -> str:
        """``"host:port"`` that other peers should use as an initial peer."""
        return f"{self._announce_host}:{self._announce_port or self.port}"

    @property
    def secret(self) -> bytes | None:
        """The swarm's secret this node signs and checks records with (None: a public swarm)."""
        return self._secret

    @property
    def is_private(self) -> bool:
        """True when this node has a swarm secret (authenticates the records it writes and reads)."""
        return self._secret is not None

    @property
    def stats(self) -> Counter:
        """A copy of the counters (missing ones read 0): ``invalid_records``, ``invalid_entries``,
        ``invalid_expert_entries``, ``invalid_prefix_entries``, ``unauthenticated_entries``,
        ``rejected_stores``, ``foreign_tag_entries``, ``bad_datagrams``, ``bad_requests``, ``rpc_timeouts``,
        ``bytes_sent`` / ``bytes_received`` and their ``_unverified`` parts (to and from addresses
        that have not proved they receive what is sent there), ``challenges_sent``,
        ``entries_evicted_by_source_quota``, ``entries_evicted_by_storage_cap``,
        ``stragglers_abandoned``, ``entries_dropped_by_size_cap``, ``unverified_entries_refused`` / ``_dropped``,
        ``endpoint_checks_ok`` / ``_failed`` / ``_rate_limited`` / ``_dropped`` (``dht.verify``), ..."""
        if self.is_alive and threading.current_thread() is not self._thread:
            try:  # copy on the loop thread, which is the only one that writes the counters
                return self._call(_copy_counter(self._stats), self.wait_timeout)
            except (RuntimeError, TimeoutError):
                pass
        return Counter(self._stats)

    @property
    def owner_pid(self) -> int:
        """The process that created this node (a node cannot cross a fork)."""
        return self._pid

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._is_shut_down

    def _submit(self, coro: Coroutine) -> concurrent.futures.Future:
        if os.getpid() != self._pid:
            coro.close()
            raise RuntimeError("this DHT was created in another process; create one in each process")
        if self._is_shut_down or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("the DHT is shut down")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine, timeout: Optional[float]) -> Any:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking DHT call from the DHT's own event loop thread")
        future = self._submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"DHT call did not finish within {timeout} s") from None

    def _run(self, make_coro, timeout: Optional[float], return_future: bool) -> Any:
        """Run ``make_coro(deadline)`` on the loop. The coroutine's deadline comes slightly
        before ``timeout`` so that it returns partial results rather than being cut off."""
        timeout = self.wait_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + max(0.0, timeout - 0.05)
        if return_future:
            return self._submit(make_coro(deadline))
        return self._call(make_coro(deadline), timeout + 1.0)

    # ------------------------------------------------------------------ generic records
    # Every call below blocks until done (at most ``timeout``, default ``wait_timeout``), or,
    # with ``return_future=True``, returns a ``concurrent.futures.Future`` of the same result.
    def store(self, key: str, subkey: str, value: Any, expiration_time: float,
              timeout: Optional[float] = None, return_future: bool = False) -> bool:
        """Store ``value`` under ``key``/``subkey`` until ``expiration_time``; True if at least one
        node (this one included) stored it. Raises ValueError on an invalid entry."""
        records = self._make_records([(key, subkey, value, expiration_time)], self.max_ttl)
        return self._run(lambda deadline: self._store_records(records, deadline, key), timeout, return_future)

    def store_many(self, entries: Iterable[tuple[str, str, Any, float]], timeout: Optional[float] = None,
                   return_future: bool = False) -> dict[str, bool]:
        """Store many ``(key, subkey, value, expiration_time)`` in parallel; ``{key: stored}``.
        Entries of one key travel together."""
        records = self._make_records(entries, self.max_ttl)
        return self._run(lambda deadline: self._store_records(records, deadline), timeout, return_future)

    @staticmethod
    def _make_records(entries: Iterable[tuple[str, str, Any, float]], max_ttl: float) -> dict[str, Record]:
        records: dict[str, Record] = {}
        for key, subkey, value, expiration in entries:
            _check_key(key)
            reason = check_entry(subkey, value, expiration, max_ttl=max_ttl)
            if reason is not None:
                raise ValueError(f"cannot store {key!r}/{subkey!r}: {reason}")
            records.setdefault(key, {})[subkey] = (value, float(expiration))
        return records

    async def _store_records(self, records: dict[str, Record], deadline: float, only: Optional[str] = None) -> Any:
        now = time.time()
        live = {k: {sk: ve for sk, ve in r.items() if ve[1] > now} for k, r in records.items()}
        keys = [k for k in live if live[k]]
        oks = await asyncio.gather(*(self._server.store_record(k, live[k], deadline) for k in keys))
        results = dict.fromkeys(records, False)
        results.update(zip(keys, oks))
        return results[only] if only is not None else results

    def get(self, key: str, timeout: Optional[float] = None,
            return_future: bool = False) -> dict[str, tuple[Any, float]]:
        """Live sub-keys of ``key`` merged over all replicas: ``{subkey: (value, expiration)}``;
        ``{}`` when none. Values come back as msgpack decodes them (tuples become lists)."""
        _check_key(key)

        async def get(deadline: float) -> dict:
            return strip_tags(await self._get_records([key], deadline, key))
        return self._run(get, timeout, return_future)

    def get_many(self, keys: Iterable[str], timeout: Optional[float] = None,
                 return_future: bool = False) -> dict[str, dict[str, tuple[Any, float]]]:
        """``get`` for many keys, looked up in parallel on the loop: ``{key: {subkey: ...}}``."""
        keys = list(dict.fromkeys(keys))
        for key in keys:
            _check_key(key)

        async def get_many(deadline: float) -> dict:
            return {k: strip_tags(r) for k, r in (await self._get_records(keys, deadline)).items()}
        return self._run(get_many, timeout, return_future)

    async def _get_records(self, keys: list[str], deadline: float, only: Optional[str] = None) -> Any:
        records = await asyncio.gather(*(self._server.get_record(k, deadline) for k in keys))
        return records[0] if only is not None else dict(zip(keys, records))

    # ------------------------------------------------------------------ expert records
    def declare_experts(self, uids: Sequence[str], endpoint: str, expiration_time: float,
                        timeout: Optional[float] = None, return_future: bool = False) -> bool:
        """Announce that ``uids`` are served at ``endpoint`` until ``expiration_time`` (at most
        ``max_ttl`` ahead): for a grid uid ``ffn.3.14``, the child entries of ``ffn`` and ``ffn.3``.
        True if every record was stored on at least one node. Meant to be called every few
        seconds from a host's background thread, with an expiration a few periods ahead.
        Raises ValueError on a malformed uid or endpoint."""
        records = expert_entries(uids, endpoint, expiration_time)
        for key, record in records.items():
            for subkey, (value, expiration) in record.items():
                reason = check_entry(subkey, value, expiration, max_ttl=self.max_ttl)
                if reason is not None:
                    raise ValueError(f"cannot declare {key!r}/{subkey!r}: {reason}")

        async def declare(deadline: float) -> bool:
            results = await self._store_records(records, deadline)
            failed = [k for k, ok in results.items() if not ok]
            if failed:
                logger.warning("declare_experts: %d of %d records not stored (e.g. %s)",
                               len(failed), len(results), failed[0])
            return not failed
        return self._run(declare, timeout, return_future)

    def get_experts(self, uids: Sequence[str], timeout: Optional[float] = None, return_future: bool = False,
                    all_endpoints: bool = False) -> list[Any]:
        """The live endpoint of each uid (the latest-expiring valid declaration), or None. Read
        from the entries of the uid's parent prefix record (``ffn.3`` for ``ffn.3.14``).
        With ``all_endpoints=True``: every live endpoint of each uid, latest-expiring first
        (``[]`` when none), so a caller can fall back when one fails."""
        parents = [parent_and_coordinate(uid) for uid in uids]
        keys = [prefix_key(parent) for parent, _ in parents]

        async def find(deadline: float) -> list[Any]:
            records = await self._get_records(list(dict.fromkeys(keys)), deadline)
            children = {k: parse_children_endpoints(records[k], self._stats) for k in set(keys)}
            found = [children[k].get(coord, []) for k, (_, coord) in zip(keys, parents)]
            return found if all_endpoints else [endpoints[0] if endpoints else None for endpoints in found]
        return self._run(find, timeout, return_future)

    def get_active_children(self, prefixes: Sequence[str], timeout: Optional[float] = None,
                            return_future: bool = False, all_endpoints: bool = False) -> dict[str, dict[int, Any]]:
        """For each prefix (``"ffn"``, ``"ffn.3"``), its live children: ``{coordinate: endpoint}``.

        The endpoint of a child is one live expert below it; for the last grid dimension it is
        that expert's own endpoint (of the latest-expiring declaration when several hosts serve
        the uid). With ``all_endpoints=True`` each child maps to the list of every endpoint
        declared for it, latest-expiring first: for the last dimension, every host of that uid,
        so a caller can skip one that fails (say, a stranger's declaration pointing at a closed
        port, which no expiration it claims can make hide the honest hosts). Prefixes are
        looked up in parallel."""
        for prefix in prefixes:
            parse_uid_prefix(prefix)
        keys = {p: prefix_key(p) for p in prefixes}

        async def find(deadline: float) -> dict[str, dict[int, Any]]:
            records = await self._get_records(list(keys.values()), deadline)
            children = {p: parse_children_endpoints(records[k], self._stats) for p, k in keys.items()}
            if all_endpoints:
                return children
            return {p: {c: endpoints[0] for c, endpoints in found.items()} for p, found in children.items()}
        return self._run(find, timeout, return_future)

    # ------------------------------------------------------------------ introspection
    def routing_table(self) -> list[str]:
        """``"ip:port"`` of every peer in this node's routing table."""
        async def collect():
            return [f"{n.ip}:{n.port}" for n in self._server.routing_table_nodes()]
        return self._call(collect(), self.wait_timeout)

    def republish(self, older_than: float = 0.0, timeout: Optional[float] = None) -> None:
        """Run kademlia's periodic refresh now, republishing keys written more than
        ``older_than`` seconds ago (live entries only). Normally runs every hour by itself."""
        self._run(lambda deadline: self._server.refresh_table(older_than), timeout, False)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the node: close its socket (the port is free afterwards), cancel its tasks, stop
        the loop and join the thread. Idempotent."""
        with self._shutdown_lock:
            if self._is_shut_down:
                return
            self._is_shut_down = True
        if os.getpid() != self._pid:
            return
        if self._thread.is_alive():
            async def stop():
                if self._server is not None:
                    self._server.stop()
            try:
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout)
            except Exception:  # noqa: BLE001 - shutting down regardless
                logger.debug("error while stopping the DHT server", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("DHT event loop thread did not stop within %s s", timeout)

    def __enter__(self) -> "DHT":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"DHT(address={self.address!r}, client_mode={self.client_mode}, alive={self.is_alive})"

    def __getstate__(self):
        raise TypeError("a DHT cannot be pickled; create one in each process")


async def _copy_counter(counter: Counter) -> Counter:
    return Counter(counter)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def _parse_peer(peer: str) -> tuple[str, int]:
    try:
        return parse_endpoint(peer)
    except ValueError:
        raise ValueError(f"initial peer {peer!r} is not host:port") from None


def _check_key(key: Any) -> None:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise ValueError(f"invalid DHT key {key!r}")
