"""A small network emulator in pure asyncio (stdlib only), for tests and benchmarks on 127.0.0.1.

Kernel netem is not available on every machine, so this puts user-space relays between the
parts of a swarm (trainers, hosts, DHT nodes) and adds delay, jitter, a bandwidth limit and,
for datagrams, loss:

- :class:`Link` holds the settings of one direction of a link. A relay applies ``link`` from
  client to target and ``reverse`` (default: the same Link) back, so a round trip costs
  ``2 * delay`` with one symmetric Link.
- :class:`DelayProxy` (TCP) listens on ``127.0.0.1:0`` and forwards every accepted
  connection to one target ``(host, port)``, e.g. an ExpertHost's HTTP port.
- :class:`UDPRelay` stands in front of ONE datagram endpoint, e.g. a DHT node.
- :class:`UDPNetwork` joins MANY datagram endpoints (a DHT of many nodes) as the internet does:
  each endpoint has a public address, and what it sends arrives FROM that public address, so
  the addresses peers learn from datagrams (and pass on in routing tables) work for everyone.

Each relay runs its own event loop in a daemon thread: ``start()`` returns the relay with
``.port`` / ``.address`` set, ``close()`` closes every socket and joins the thread; both are
context managers. Only loopback addresses are accepted, as listen and target addresses.

How the timing works (one direction): bytes that arrive at time ``now`` are first serialized
at ``bandwidth_bps`` (a rate limiter: a transmitter that is busy until ``tx_free``; equivalent
to a token bucket whose depth is one chunk), then travel for ``delay + uniform(-jitter,
+jitter)`` seconds. The transmitter of a direction is shared by all connections (clients) of a
relay, as the access link of the target's machine is, unless ``per_connection_bandwidth``
(``per_client_bandwidth``) gives each its own; a shared one is a FIFO queue, so a bulk transfer
delays the small messages behind it by up to ``max_buffer_bytes`` of serialization time.
TCP keeps the bytes of a connection in order, so a chunk is released at
``max(previous release, arrival)``; datagrams are independent and may be reordered by jitter,
as on a real network.

TCP loss is not emulated: TCP retransmits lost segments, so from the application's side a
loss is only extra delay (plus a smaller congestion window); a Link's ``loss`` is ignored by
DelayProxy. Use jitter / lower bandwidth to approximate a lossy path, or the UDPRelay for
protocols that see loss themselves.

Backpressure (TCP): a direction stops reading from its source while more than
``max_buffer_bytes`` are queued in it, so a slow link slows the sender down instead of growing
memory. The UDP relay tail-drops a datagram when its direction already holds that many bytes
(counted in ``dropped``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import random
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

Address = tuple[str, int]

__all__ = ["DelayProxy", "Link", "UDPNetwork", "UDPRelay"]


@dataclasses.dataclass(frozen=True)
class Link:
    """One direction of an emulated link.

    delay: one-way delay in seconds. jitter: uniform +- seconds added to each chunk/datagram
    (the sum is clipped at 0). bandwidth_bps: bits per second, None for unlimited.
    loss: probability of dropping a datagram (UDPRelay only; ignored for TCP, see the module).
    """

    delay: float = 0.0
    jitter: float = 0.0
    bandwidth_bps: float | None = None
    loss: float = 0.0

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {self.delay}, {self.jitter}")
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ValueError(f"bandwidth_bps must be > 0 or None, got {self.bandwidth_bps}")
        if not 0.0 <= self.loss <= 1.0:
            raise ValueError(f"loss must be in [0, 1], got {self.loss}")


class _Transmitter:
    """The emulated transmitter of one direction: busy until ``tx_free``. Shared by every
    connection (or client) of a relay unless bandwidth is per connection."""

    def __init__(self) -> None:
        self.tx_free = 0.0


class _Shaper:
    """Release times for one direction: serialization at the link's rate, then the delay."""

    def __init__(self, link: Link, rng: random.Random, in_order: bool, tx: _Transmitter | None = None):
        self.link, self.rng, self.in_order = link, rng, in_order
        self.tx = tx or _Transmitter()
        self.last_release = 0.0

    def release_time(self, nbytes: int, now: float) -> float:
        sent = now
        if self.link.bandwidth_bps is not None:
            sent = max(now, self.tx.tx_free) + nbytes * 8.0 / self.link.bandwidth_bps
            self.tx.tx_free = sent
        jitter = self.rng.uniform(-self.link.jitter, self.link.jitter) if self.link.jitter else 0.0
        release = sent + max(0.0, self.link.delay + jitter)
        if self.in_order:
            release = max(release, self.last_release)
        self.last_release = max(self.last_release, release)
        return release


def _check_loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise ValueError(f"netem only works on loopback addresses, got {host!r}")


class _LoopThread:
    """An event loop in a daemon thread, with start/close and a context manager."""

    _name = "netem"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.port: int | None = None

    @property
    def address(self) -> Address:
        if self.port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return ("127.0.0.1", self.port)

    @property
    def endpoint(self) -> str:
        """``"127.0.0.1:port"``, the form RemoteExpert and ExpertHost use."""
        host, port = self.address
        return f"{host}:{port}"

    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self):
        if self._thread is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self._name, daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._open())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close every socket, stop the loop and join its thread. Idempotent."""
        if self._closed or self._loop is None:
            self._closed = True
            return
        self._closed = True
        loop = self._loop
        try:
            if self._thread is not None and self._thread.is_alive():
                try:
                    self._call(self._shutdown())
                finally:
                    loop.call_soon_threadsafe(loop.stop)
                    self._thread.join(10.0)
        finally:
            if not loop.is_running():
                loop.close()

    def __enter__(self):
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    async def _open(self) -> int:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError


class DelayProxy(_LoopThread):
    """TCP proxy from ``127.0.0.1:port`` to ``target``: ``link`` client -> target, ``reverse``
    (default ``link``) back. ``target`` is ``(host, port)`` or ``"host:port"`` (an endpoint).

    Counters: ``bytes_up`` (client -> target), ``bytes_down`` (target -> client), both counted
    when written; ``connections`` accepted so far.
    """

    _name = "netem-tcp"

    def __init__(
        self,
        target: Address | str,
        link: Link | None = None,
        *,
        reverse: Link | None = None,
        per_connection_bandwidth: bool = False,
        port: int = 0,
        max_buffer_bytes: int = 256 * 1024,
        chunk_bytes: int = 16 * 1024,
        seed: int | None = None,
        connect_timeout: float = 5.0,
    ):
        super().__init__()
        if isinstance(target, str):
            host, _, p = target.rpartition(":")
            target = (host.strip("[]"), int(p))
        _check_loopback(target[0])
        self.target = (target[0], int(target[1]))
        self.link = link or Link()
        self.reverse = reverse or self.link
        self.per_connection_bandwidth = per_connection_bandwidth
        self._tx_up, self._tx_down = _Transmitter(), _Transmitter()
        self._listen_port = port
        self.max_buffer_bytes, self.chunk_bytes = max_buffer_bytes, chunk_bytes
        self.connect_timeout = connect_timeout
        self._rng = random.Random(seed)
        self.bytes_up = self.bytes_down = self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def _open(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._listen_port)
        return self._server.sockets[0].getsockname()[1]

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        self.connections += 1
        target_w = None
        try:
            try:
                target_r, target_w = await asyncio.wait_for(asyncio.open_connection(*self.target), self.connect_timeout)
            except (OSError, TimeoutError):
                return  # the client sees the connection closed, as with a refused target
            self._writers.add(target_w)
            shared = not self.per_connection_bandwidth
            up_shaper = _Shaper(self.link, self._rng, True, self._tx_up if shared else None)
            down_shaper = _Shaper(self.reverse, self._rng, True, self._tx_down if shared else None)
            up = asyncio.ensure_future(self._pipe(client_r, target_w, up_shaper, "bytes_up"))
            down = asyncio.ensure_future(self._pipe(target_r, client_w, down_shaper, "bytes_down"))
            try:
                await asyncio.gather(up, down)
            finally:
                up.cancel()
                down.cancel()
        except (Exception, asyncio.CancelledError):
            pass  # a reset connection ends both directions; close() cancels this task
        finally:
            for w in (client_w, target_w):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: _Shaper, counter: str) -> None:
        """Read from ``reader``, hold each chunk until its release time, write it in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        queued = 0
        room = asyncio.Event()
        room.set()

        async def send() -> None:
            try:
                await _send_loop()
            finally:
                room.set()  # wakes the reader, which then sees the sender done

        async def _send_loop() -> None:
            nonlocal queued
            while True:
                release, data = await queue.get()
                wait = release - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:  # EOF: half-close the other side, after the bytes before it
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                setattr(self, counter, getattr(self, counter) + len(data))  # before the peer can see it
                writer.write(data)
                await writer.drain()
                queued -= len(data)
                if queued <= self.max_buffer_bytes:
                    room.set()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                await room.wait()
                if sender.done():
                    break
                data = await reader.read(self.chunk_bytes)
                queue.put_nowait((shaper.release_time(len(data), loop.time()), data))
                if not data:
                    break
                queued += len(data)
                if queued > self.max_buffer_bytes:
                    room.clear()
            await sender
        finally:
            sender.cancel()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for w in list(self._writers):
            w.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


def _udp_socket() -> socket.socket:
    """A non-blocking datagram socket with a large receive buffer (best effort, up to the
    kernel's rmem_max): a burst of datagrams must wait in the relay, not overflow the socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    except OSError:
        pass
    return sock


class _ClientSession(asyncio.DatagramProtocol):
    """The upstream socket of one client: the target's replies to it go back to that client."""

    def __init__(self, relay: "UDPRelay", client: Address):
        self.relay, self.client = relay, client
        self.transport: asyncio.DatagramTransport | None = None
        shared = not relay.per_client_bandwidth
        self.up = _Shaper(relay.link, relay._rng, False, relay._tx_up if shared else None)
        self.down = _Shaper(relay.reverse, relay._rng, False, relay._tx_down if shared else None)
        self.queued_up = self.queued_down = 0
        self.last_seen = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.last_seen = time.monotonic()
        self.relay._relay(self, data, upstream=False)


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, relay: "UDPRelay"):
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._from_client(data, (addr[0], addr[1]))


class UDPRelay(_LoopThread):
    """Datagram relay in front of ONE target (e.g. a DHT node), with a Link per direction.

    Design: the relay listens on ``127.0.0.1:port``. For each distinct client source address it
    opens its own upstream socket connected to the target, so the target sees each client as a
    distinct peer (at the upstream socket's address) and its replies come back on that socket;
    the relay sends them to the client from the listening socket, so the client sees the reply
    come from the address it sent to (as request/reply protocols check). Each client session
    has its own delay/jitter per direction; bandwidth is shared by all clients per direction
    unless ``per_client_bandwidth``. Loss drops a datagram with probability ``link.loss``
    (upstream) or ``reverse.loss`` (back), independently per datagram.

    Limitation: addresses the target learns are the relay's upstream sockets, which only lead
    back to their own client through this relay; a third node that the target tells about a
    client cannot use them. Put one relay in front of each node that should look remote, and
    announce the relay's port.

    Counters: ``bytes_up`` / ``bytes_down`` (relayed, counted when sent), ``datagrams_up`` /
    ``datagrams_down``, ``dropped`` (loss or a full queue). Sessions idle for ``idle_timeout``
    seconds are closed.
    """

    _name = "netem-udp"

    def __init__(
        self,
        target: Address,
        link: Link | None = None,
        *,
        reverse: Link | None = None,
        per_client_bandwidth: bool = False,
        port: int = 0,
        max_buffer_bytes: int = 1024 * 1024,
        seed: int | None = None,
        idle_timeout: float = 120.0,
        max_sessions: int = 4096,
    ):
        super().__init__()
        _check_loopback(target[0])
        self.target = (target[0], int(target[1]))
        self.link = link or Link()
        self.reverse = reverse or self.link
        self.per_client_bandwidth = per_client_bandwidth
        self._tx_up, self._tx_down = _Transmitter(), _Transmitter()
        self._listen_port = port
        self.max_buffer_bytes, self.idle_timeout, self.max_sessions = max_buffer_bytes, idle_timeout, max_sessions
        self._rng = random.Random(seed)
        self.bytes_up = self.bytes_down = self.datagrams_up = self.datagrams_down = self.dropped = 0
        self._listener: asyncio.DatagramTransport | None = None
        self._sessions: dict[Address, _ClientSession] = {}
        self._pending: set[asyncio.TimerHandle] = set()
        self._opening: dict[Address, asyncio.Future] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    async def _open(self) -> int:
        loop = asyncio.get_running_loop()
        sock = _udp_socket()
        sock.bind(("127.0.0.1", self._listen_port))
        self._listener, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), sock=sock)
        self._sweeper = loop.call_later(min(self.idle_timeout, 5.0), self._sweep)
        return self._listener.get_extra_info("sockname")[1]

    def _sweep(self) -> None:
        now = time.monotonic()
        for client, session in list(self._sessions.items()):
            if now - session.last_seen > self.idle_timeout and session.transport is not None:
                session.transport.close()
                del self._sessions[client]
        assert self._loop is not None
        self._sweeper = self._loop.call_later(min(self.idle_timeout, 5.0), self._sweep)

    def _from_client(self, data: bytes, client: Address) -> None:
        session = self._sessions.get(client)
        if session is not None:
            session.last_seen = time.monotonic()
            self._relay(session, data, upstream=True)
            return
        if len(self._sessions) + len(self._opening) >= self.max_sessions:
            self.dropped += 1
            return
        # The upstream socket opens asynchronously; datagrams that arrive meanwhile wait for it.
        opening = self._opening.get(client)
        if opening is None:
            opening = self._opening[client] = asyncio.ensure_future(self._new_session(client))
        opening.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self._relay(f.result(), data, True))

    async def _new_session(self, client: Address) -> _ClientSession:
        loop = asyncio.get_running_loop()
        try:
            sock = _udp_socket()
            sock.bind(("127.0.0.1", 0))
            sock.connect(self.target)
            _, session = await loop.create_datagram_endpoint(lambda: _ClientSession(self, client), sock=sock)
            self._sessions[client] = session
            return session
        finally:
            self._opening.pop(client, None)

    def _relay(self, session: _ClientSession, data: bytes, upstream: bool) -> None:
        """Drop (loss or full queue) or schedule one datagram of one session."""
        queued = session.queued_up if upstream else session.queued_down
        loss = (self.link if upstream else self.reverse).loss
        if (loss and self._rng.random() < loss) or queued + len(data) > self.max_buffer_bytes:
            self.dropped += 1
            return
        loop = asyncio.get_running_loop()
        shaper = session.up if upstream else session.down
        release = shaper.release_time(len(data), loop.time())
        if upstream:
            session.queued_up += len(data)
        else:
            session.queued_down += len(data)
        handle: asyncio.TimerHandle

        def deliver() -> None:
            self._pending.discard(handle)
            if upstream:
                session.queued_up -= len(data)
                if session.transport is not None and not session.transport.is_closing():
                    self.bytes_up += len(data)
                    self.datagrams_up += 1
                    session.transport.sendto(data)
            else:
                session.queued_down -= len(data)
                if self._listener is not None and not self._listener.is_closing():
                    self.bytes_down += len(data)
                    self.datagrams_down += 1
                    self._listener.sendto(data, session.client)

        handle = loop.call_at(release, deliver)
        self._pending.add(handle)

    async def _shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for handle in list(self._pending):
            handle.cancel()
        self._pending.clear()
        for fut in list(self._opening.values()):
            fut.cancel()
        for session in list(self._sessions.values()):
            if session.transport is not None:
                session.transport.close()
        self._sessions.clear()
        if self._listener is not None:
            self._listener.close()
        await asyncio.sleep(0)  # let the transports finish closing their sockets


class _Endpoint:
    """One endpoint of a UDPNetwork: its real address, its public socket, its access link."""

    __slots__ = ("real", "sock", "public", "up", "down", "queued_up", "queued_down", "added")

    def __init__(self, real: Address, sock: socket.socket, up: _Shaper, down: _Shaper, added: bool):
        self.real, self.sock, self.public = real, sock, sock.getsockname()[:2]
        self.up, self.down, self.added = up, down, added
        self.queued_up = self.queued_down = 0


class UDPNetwork(_LoopThread):
    """A datagram network between many endpoints on 127.0.0.1, each behind its own access link.

    Why not one UDPRelay per node: a relay's target sees every client at one of the relay's
    upstream sockets, which leads back to that client only from the target; a third node that
    learns it from a routing table cannot use it, so a DHT of relayed nodes degenerates into a
    star around the bootstrap node. Here, as on the internet (or behind a full-cone NAT), a
    datagram that endpoint A sends to B's public address arrives at B FROM A's public address.

    ``add(target)`` gives an endpoint (e.g. a DHT node bound at ``target``) a public address;
    peers send there. A source that was never added (a client node) gets a public address on its
    first datagram (``auto_added``), as a NAT maps it. A datagram from A to B is shaped by A's
    uplink (``link``) and then B's downlink (``reverse``, default ``link``): with ``Link(delay=d)``
    on every endpoint the one-way delay is ``2 d`` and the round trip between any two is ``4 d``.
    Bandwidth is per endpoint and direction (its access link); loss applies on both links.

    Counters: ``datagrams`` / ``bytes`` delivered, ``dropped`` (loss, full queue, send error),
    ``auto_added``; ``endpoints`` maps each public address to the real one.
    """

    _name = "netem-udpnet"

    def __init__(self, link: Link | None = None, *, reverse: Link | None = None, max_buffer_bytes: int = 1024 * 1024,
                 seed: int | None = None, max_endpoints: int = 1024):
        super().__init__()
        self.link = link or Link()
        self.reverse = reverse or self.link
        self.max_buffer_bytes, self.max_endpoints = max_buffer_bytes, max_endpoints
        self._rng = random.Random(seed)
        self.datagrams = self.bytes = self.dropped = self.auto_added = 0
        self._by_real: dict[Address, _Endpoint] = {}
        self._by_public: dict[Address, _Endpoint] = {}
        self._pending: set[asyncio.TimerHandle] = set()

    @property
    def endpoints(self) -> dict[Address, Address]:
        return {ep.public: ep.real for ep in list(self._by_public.values())}

    async def _open(self) -> int:
        return 0  # no socket of its own: one per endpoint

    def add(self, target: Address | str, link: Link | None = None, *, reverse: Link | None = None) -> Address:
        """Give the endpoint at ``target`` a public address (returned); ``link`` / ``reverse``
        override the network's access link for it."""
        if isinstance(target, str):
            host, _, p = target.rpartition(":")
            target = (host, int(p))
        _check_loopback(target[0])

        async def add() -> Address:
            return self._add((target[0], int(target[1])), link, reverse, added=True).public
        return self._call(add())

    def public_address(self, target: Address) -> Address | None:
        """The public address of the endpoint at ``target`` (None if it has none yet)."""
        ep = self._by_real.get((target[0], int(target[1])))
        return None if ep is None else ep.public

    def _add(self, real: Address, link: Link | None, reverse: Link | None, added: bool) -> _Endpoint:
        if real in self._by_real:
            raise ValueError(f"{real} already has a public address")
        if len(self._by_real) >= self.max_endpoints:
            raise RuntimeError("too many endpoints")
        sock = _udp_socket()
        sock.bind(("127.0.0.1", 0))
        up_link = link or self.link
        down_link = reverse or (link if link is not None else self.reverse)
        ep = _Endpoint(real, sock, _Shaper(up_link, self._rng, False), _Shaper(down_link, self._rng, False), added)
        self._by_real[real], self._by_public[ep.public] = ep, ep
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._readable, ep)
        return ep

    def _readable(self, dest: _Endpoint) -> None:
        for _ in range(64):  # bounded: other sockets get their turn
            try:
                data, source = dest.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._route(data, (source[0], source[1]), dest)

    def _route(self, data: bytes, source: Address, dest: _Endpoint) -> None:
        if source in self._by_public:  # a public socket never sends to another by itself
            self.dropped += 1
            return
        sender = self._by_real.get(source)
        if sender is None:
            if len(self._by_real) >= self.max_endpoints:
                self.dropped += 1
                return
            sender = self._add(source, None, None, added=False)
            self.auto_added += 1
        up, down = sender.up.link, dest.down.link
        lost = (up.loss and self._rng.random() < up.loss) or (down.loss and self._rng.random() < down.loss)
        if lost or sender.queued_up + len(data) > self.max_buffer_bytes or dest.queued_down + len(data) > self.max_buffer_bytes:
            self.dropped += 1
            return
        loop = asyncio.get_running_loop()
        release = dest.down.release_time(len(data), sender.up.release_time(len(data), loop.time()))
        sender.queued_up += len(data)
        dest.queued_down += len(data)
        handle: asyncio.TimerHandle

        def deliver() -> None:
            self._pending.discard(handle)
            sender.queued_up -= len(data)
            dest.queued_down -= len(data)
            try:
                sender.sock.sendto(data, dest.real)  # from the sender's public address
            except OSError:
                self.dropped += 1
                return
            self.datagrams += 1
            self.bytes += len(data)

        handle = loop.call_at(release, deliver)
        self._pending.add(handle)

    async def _shutdown(self) -> None:
        for handle in list(self._pending):
            handle.cancel()
        self._pending.clear()
        loop = asyncio.get_running_loop()
        for ep in list(self._by_real.values()):
            loop.remove_reader(ep.sock.fileno())
            ep.sock.close()
        self._by_real.clear()
        self._by_public.clear()
