"""The one HTTP client: expert calls, ``/info`` and ``/stats``, averaging exchanges; keep-alive connections to
peers, with calls that can be given up at once, and requests signed for a private swarm (:func:`signed`).

A call blocks a worker thread until the host answers. When the caller stops waiting (enough
experts answered, or its deadline passed) :meth:`CallHandle.cancel` shuts the call's socket
down, so the worker returns now instead of at the end of the request timeout, and a hung host
cannot fill the caller's thread pool. Answers are read into one preallocated buffer (no copy).
Idle connections are kept per endpoint and process and reused; :func:`warm_up` opens some ahead.
A *direct* connection (:func:`add_direct`: hole-punched past the relay that ``endpoint`` names,
:mod:`lightning_moe.client.direct`) is taken before any other connection to that endpoint.
"""

from __future__ import annotations

import http.client
import math
import select
import socket
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from lightning_moe import auth
from lightning_moe.process import context

MAX_IDLE_PER_ENDPOINT = 64
MAX_ANSWER_BYTES = 1 << 31


class TransportError(OSError):
    """No answer from the host: ``refused`` (nobody listens), ``timed_out``, ``cancelled``, or another failure."""

    def __init__(self, message: str, refused: bool = False, timed_out: bool = False, cancelled: bool = False):
        super().__init__(message)
        self.refused, self.timed_out, self.cancelled = refused, timed_out, cancelled


@dataclass
class Answer:
    status: int
    reason: str
    headers: Mapping[str, str]
    body: bytearray


class CallHandle:
    """Lets another thread give up a call in flight: its socket is shut down and the call raises TransportError.
    Once answered, it holds the bytes sent and received (bodies, summed over its requests) and the time the host says it spent (``X-Host-Seconds``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.cancelled = False
        self.sent_bytes = self.received_bytes = 0
        self.host_seconds: float | None = None

    def _answered(self, sent: int, answer: Answer) -> None:
        self.sent_bytes += sent  # of every request made with this handle (a call may retry)
        self.received_bytes += len(answer.body)
        try:
            seconds = float(answer.headers.get("x-host-seconds", "nan"))
        except ValueError:
            seconds = math.nan
        self.host_seconds = seconds if 0.0 <= seconds < 1e6 else None

    def _attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.cancelled and sock is not None:
                _shutdown(sock)

    def cancel(self) -> None:
        """Give the call up (idempotent; a call that has not started fails as soon as it starts)."""
        with self._lock:
            self.cancelled = True
            if self._sock is not None:
                _shutdown(self._sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Pool:
    """Idle keep-alive connections of this process, per endpoint."""

    def __init__(self) -> None:
        self.idle: dict[str, list[http.client.HTTPConnection]] = {}
        self.direct: dict[str, list[http.client.HTTPConnection]] = {}  # idle direct connections
        self.direct_open: Counter = Counter()  # endpoint -> direct connections open (idle or in use)
        self.requests: Counter = Counter()  # (endpoint, "direct" | "other") -> requests answered
        self.lock = threading.Lock()

    def take(self, endpoint: str) -> http.client.HTTPConnection | None:
        with self.lock:
            for idle in (self.direct.get(endpoint), self.idle.get(endpoint)):
                while idle:
                    conn = idle.pop()
                    if _still_open(conn):
                        return conn
                    self._discard(endpoint, conn)
        return None

    def give_back(self, endpoint: str, conn: http.client.HTTPConnection) -> None:
        with self.lock:
            if getattr(conn, "direct", False):
                self.direct.setdefault(endpoint, []).append(conn)  # bounded by add_direct's count
                return
            idle = self.idle.setdefault(endpoint, [])
            if len(idle) < MAX_IDLE_PER_ENDPOINT:
                idle.append(conn)
                return
        conn.close()

    def discard(self, endpoint: str, conn: http.client.HTTPConnection) -> None:
        with self.lock:
            self._discard(endpoint, conn)

    def _discard(self, endpoint: str, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if getattr(conn, "direct", False):
            conn.direct = False
            self.direct_open[endpoint] -= 1
            if self.direct_open[endpoint] <= 0:
                del self.direct_open[endpoint]

    def count(self, endpoint: str) -> int:
        with self.lock:
            return len(self.idle.get(endpoint, ()))


def _pool() -> _Pool:
    """This process's pool (a forked child starts with none of its parent's sockets)."""
    return context().get("http_pool", _Pool)


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle connection the host has not closed (a readable idle socket is at EOF or holds garbage)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def signed(secret: bytes | None, method: str, path: str, body: bytes | bytearray = b"", compression: str = "none",
           host_id: str = "") -> dict[str, str]:
    """Headers that sign a request for the server instance ``host_id`` of a private swarm (none without a secret;
    checked by :class:`lightning_moe.net.signing.RequestVerifier`)."""
    return auth.request_headers(secret, method, path, body, compression, host_id)


def request(endpoint: str, method: str, path: str, body: bytes | bytearray | memoryview | None = None,
            headers: Mapping[str, str] | None = None, timeout: float | None = None,
            handle: CallHandle | None = None, max_answer_bytes: int = MAX_ANSWER_BYTES) -> Answer:
    """One HTTP request on a kept-alive connection to ``endpoint``; raises TransportError when no answer came,
    or when the answer is longer than ``max_answer_bytes`` (checked from its Content-Length before it is read).

    A reused connection that the host closed in the meantime is retried once on a new one.
    """
    pool = _pool()
    for attempt in range(2):
        conn = pool.take(endpoint) if attempt == 0 else None
        reused = conn is not None
        if conn is None:
            host, port = _split(endpoint)
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            answer = _exchange(conn, method, path, body, headers or {}, timeout, handle, max_answer_bytes)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
            pool.discard(endpoint, conn)
            if reused and not (handle is not None and handle.cancelled):
                continue  # the host closed an idle connection as we reused it (a direct one: the next goes relayed)
            raise _error(e, handle, endpoint) from e
        except (OSError, http.client.HTTPException) as e:
            pool.discard(endpoint, conn)
            raise _error(e, handle, endpoint) from e
        finally:
            if handle is not None:
                handle._attach(None)
        with pool.lock:
            pool.requests[endpoint, "direct" if getattr(conn, "direct", False) else "other"] += 1
        if answer.headers.get("connection", "").lower() == "close":
            pool.discard(endpoint, conn)
        else:
            pool.give_back(endpoint, conn)
        if handle is not None:
            handle._answered(0 if body is None else len(body), answer)
        return answer
    raise AssertionError("unreachable")


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | bytearray | memoryview | None,
              headers: Mapping[str, str], timeout: float | None, handle: CallHandle | None, max_answer_bytes: int) -> Answer:
    if conn.sock is None:
        conn.timeout = timeout
        conn.connect()
        # http.client writes a bytearray body after the head, in a second send: without this, Nagle holds it until
        # the host's delayed ACK of the head (40 ms per request on a real link)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        conn.sock.settimeout(timeout)
    if handle is not None:
        handle._attach(conn.sock)
    conn.request(method, path, body=body, headers=dict(headers))
    response = conn.getresponse()
    length = response.getheader("Content-Length")
    if length is not None and length.isdigit() and int(length) > max_answer_bytes:
        raise http.client.HTTPException(f"answer of {length} bytes exceeds the limit of {max_answer_bytes}")
    if length is None or not length.isdigit():
        data = bytearray(response.read(max_answer_bytes + 1))
        if len(data) > max_answer_bytes:
            raise http.client.HTTPException(f"answer longer than the limit of {max_answer_bytes} bytes")
    else:
        data = bytearray(int(length))
        view, got = memoryview(data), 0
        while got < len(data):
            n = response.readinto(view[got:])
            if not n:
                raise http.client.IncompleteRead(bytes(data[:got]), len(data) - got)
            got += n
    headers_out = {k.lower(): v for k, v in response.getheaders()}
    if response.will_close:
        headers_out["connection"] = "close"
    return Answer(response.status, response.reason, headers_out, data)


def _error(e: BaseException, handle: CallHandle | None, endpoint: str) -> TransportError:
    if handle is not None and handle.cancelled:
        return TransportError(f"given up by the caller ({type(e).__name__})", cancelled=True)
    if isinstance(e, TimeoutError):  # socket.timeout
        return TransportError(f"TimeoutError: no answer from {endpoint} in time", timed_out=True)
    if isinstance(e, ConnectionRefusedError):
        return TransportError(f"connection to {endpoint} refused: nobody listens there", refused=True)
    return TransportError(f"{type(e).__name__}: {e}")


def add_direct(endpoint: str, sock: socket.socket) -> None:
    """Use the connected socket ``sock`` (a direct path to the host that ``endpoint`` reaches through a relay) for the
    next requests to ``endpoint``, before its other connections; it is dropped like any other when it fails."""
    host, port = _split(endpoint)
    conn = http.client.HTTPConnection(host, port)
    sock.setblocking(True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sock = sock
    conn.direct = True  # type: ignore[attr-defined]
    pool = _pool()
    with pool.lock:
        pool.direct_open[endpoint] += 1
        pool.direct.setdefault(endpoint, []).append(conn)


def direct_connections(endpoint: str) -> int:
    """Direct connections to ``endpoint`` open now (idle or in use)."""
    pool = _pool()
    with pool.lock:
        return pool.direct_open.get(endpoint, 0)


def request_counts(endpoint: str) -> tuple[int, int]:
    """Requests to ``endpoint`` answered over a direct connection, and over any other, in this process."""
    pool = _pool()
    with pool.lock:
        return pool.requests[endpoint, "direct"], pool.requests[endpoint, "other"]


def warm_up(endpoint: str, connections: int, timeout: float | None = 5.0) -> int:
    """Open up to ``connections`` idle connections to ``endpoint`` ahead of calls; returns how many are idle now."""
    pool = _pool()
    host, port = _split(endpoint)
    for _ in range(max(0, connections - pool.count(endpoint))):
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.connect()
        except OSError:
            conn.close()
            break
        pool.give_back(endpoint, conn)
    return pool.count(endpoint)
