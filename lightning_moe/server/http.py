"""The host's HTTP endpoints: ``GET /info``, ``POST /forward/<uid>``, ``POST /backward/<uid>``.

Bodies are :mod:`lightning_moe.wire` messages. Handler threads only read, validate, queue and
write: compute happens in the Runtime thread. Errors are JSON ``{"error": ..., "uid": ...}``.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import socketserver
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeoutError
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Mapping
from urllib.parse import unquote

import lightning_moe
from lightning_moe import auth, wire
from lightning_moe.server.backend import ExpertBackend
from lightning_moe.server.task_pool import PoolClosedError

logger = logging.getLogger(__name__)

DIRECTIONS = ("forward", "backward")
DRAIN_CHUNK = 1 << 16
BODY_CHUNK = 1 << 20
DRAIN_LIMIT = 4 << 20  # an unwanted body up to this size is read and dropped to keep the connection; larger: close
MAX_CLOCK_SKEW = 300.0  # seconds a signed request's X-Timestamp may differ from the host's clock


class _RequestError(Exception):
    """Answer the request with ``status`` and this message; ``close`` when the body was not read."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.close = status, close


class ExpertRequestHandler(BaseHTTPRequestHandler):
    """One keep-alive connection; each request is read, validated, queued, awaited and answered."""

    protocol_version = "HTTP/1.1"
    server_version = f"lightning_moe/{lightning_moe.__version__}"
    sys_version = ""
    disable_nagle_algorithm = True
    server: "ExpertHTTPServer"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # an idle keep-alive connection closes after this
        super().setup()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s", self.address_string(), format % args)

    # ---- helpers ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, close: bool = False, extra: Mapping[str, str] = {}) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra.items():
            self.send_header(key, value)
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_error_json(self, status: int, message: str, uid: str | None, close: bool = False, extra: Mapping[str, str] = {}) -> None:
        body = json.dumps({"error": message, "uid": uid}).encode()
        self.server.count_error(status)
        self._send(status, body, "application/json", close, extra)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors that http.server raises itself (bad request line, huge headers) as JSON, then close."""
        if self.request_version == "HTTP/0.9":  # unparsable request line: still answer with a status line
            self.request_version = "HTTP/1.0"
        self._send_error_json(code, message or explain or self.responses.get(code, ("error",))[0], None, close=True)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it."""
        try:
            self._content_length()
        except _RequestError as e:
            self._send_error_json(e.status, str(e), None, close=True)
            return False
        return super().handle_expect_100()

    def _route(self) -> tuple[str, str | None]:
        """``("info", None)``, ``(direction, uid)`` or ``("", None)`` for an unknown path."""
        path = self.path.split("?", 1)[0]
        if path == "/info":
            return "info", None
        parts = path.split("/")
        if len(parts) == 3 and parts[0] == "" and parts[1] in DIRECTIONS and parts[2]:
            return parts[1], unquote(parts[2])
        return "", None

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise _RequestError(413, "chunked bodies are not supported: send Content-Length", close=True)
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise _RequestError(413, "Content-Length is required", close=True)
        raw = raw.strip()
        if not raw.isdigit() or len(raw) > 18:
            raise _RequestError(413, f"invalid Content-Length {raw[:40]!r}", close=True)
        length = int(raw)
        if length > self.server.max_body_bytes:
            raise _RequestError(413, f"body of {length} bytes exceeds the limit of {self.server.max_body_bytes}", close=True)
        return length

    def _discard_body(self) -> bool:
        """Read and drop the body so the connection stays usable; False if it cannot (then close)."""
        if self.headers.get("Transfer-Encoding"):
            return False
        raw = (self.headers.get("Content-Length") or "0").strip()
        if not raw.isdigit() or int(raw) > min(DRAIN_LIMIT, self.server.max_body_bytes):
            return False
        left = int(raw)
        try:
            self.connection.settimeout(self.server.body_timeout)
            while left > 0:
                chunk = self.rfile.read(min(left, DRAIN_CHUNK))
                if not chunk:
                    return False
                left -= len(chunk)
            self.connection.settimeout(self.server.idle_timeout)
        except OSError:
            return False
        return True

    def _read_body(self, length: int) -> bytearray:
        """The body, read in chunks: memory grows with the bytes that arrive, not with what Content-Length claims."""
        body = bytearray()
        try:
            self.connection.settimeout(self.server.body_timeout)
            while len(body) < length:
                chunk = self.rfile.read(min(length - len(body), BODY_CHUNK))
                if not chunk:
                    break
                body += chunk
            self.connection.settimeout(self.server.idle_timeout)
        except TimeoutError:
            raise _RequestError(408, f"timed out reading the body after {len(body)} of {length} bytes", close=True) from None
        if len(body) < length:
            raise _RequestError(400, f"truncated body: got {len(body)} of {length} bytes", close=True)
        return body

    def _authenticate(self, body: bytes | bytearray) -> None:
        """In a private swarm, check X-Timestamp and X-Signature (HMAC of method, path, timestamp, nonce, compression, body)."""
        secret = self.server.secret
        if secret is None:
            return
        timestamp = self.headers.get("X-Timestamp", "").strip()
        signature = self.headers.get("X-Signature", "").strip()
        if not timestamp or not signature:
            raise _RequestError(401, "this host serves a private swarm: sign requests with the swarm's secret "
                                     "(X-Timestamp and X-Signature headers)")
        try:
            skew = abs(time.time() - float(timestamp))
        except ValueError:
            raise _RequestError(401, f"invalid X-Timestamp {timestamp[:40]!r}") from None
        if not skew <= MAX_CLOCK_SKEW:  # also refuses nan
            raise _RequestError(401, f"X-Timestamp is {skew:.0f} s away from the host's clock (limit {MAX_CLOCK_SKEW:.0f} s)")
        compression = self.headers.get("X-Compression", "none").strip()
        nonce = self.headers.get("X-Nonce", "").strip()
        parts = (self.command.encode(), self.path.encode("latin-1"), timestamp.encode(), nonce.encode(), compression.encode(), body)
        if not auth.verify(secret, signature, *parts):
            raise _RequestError(401, "bad X-Signature: the request was not signed with this swarm's secret")
        if not self.server.replays.first_use(signature, float(timestamp)):
            raise _RequestError(401, "replayed request: this signature was already used")

    def _reject(self, status: int, message: str, uid: str | None, extra: Mapping[str, str] = {}) -> None:
        """Answer an error before the body was read: drain it if small, else close the connection."""
        close = not self._discard_body()
        self._send_error_json(status, message, uid, close, extra)

    # ---- methods ---------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        route, uid = self._route()
        if route == "info":
            if not self._discard_body():
                self.close_connection = True
            try:
                self._authenticate(b"")
            except _RequestError as e:
                return self._send_error_json(e.status, str(e), None, close=self.close_connection)
            self.server.count_request("info", None)
            self._send(200, self.server.info_bytes, "application/json", close=self.close_connection)
        elif route:
            self._reject(405, f"use POST for /{route}/<uid>", uid, {"Allow": "POST"})
        else:
            self._reject(404, f"no such path: {self.path[:200]}", None)

    do_HEAD = do_GET  # noqa: N815

    def do_POST(self) -> None:  # noqa: N802
        route, uid = self._route()
        if route == "info":
            return self._reject(405, "use GET for /info", None, {"Allow": "GET"})
        if not route:
            return self._reject(404, f"no such path: {self.path[:200]}", None)
        backend = self.server.backends.get(uid)
        if backend is None:
            return self._reject(404, f"no expert {uid[:200]!r} on this host", uid[:200])
        self.server.count_request(route, uid)
        try:
            payload = self._serve(route, backend)
        except _RequestError as e:
            self.server.count_request_error(route, uid)
            close = e.close or (self._body_unread and not self._discard_body())
            return self._send_error_json(e.status, str(e), uid, close)
        self._send(200, payload, "application/octet-stream")

    def _unsupported(self) -> None:
        route, uid = self._route()
        if route:
            allow = "GET" if route == "info" else "POST"
            self._reject(405, f"method {self.command} is not allowed here; use {allow}", uid, {"Allow": allow})
        else:
            self._reject(404, f"no such path: {self.path[:200]}", None)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _unsupported  # noqa: N815

    def _serve(self, direction: str, backend: ExpertBackend) -> bytes:
        """Read, validate, queue, wait; returns the response body or raises _RequestError."""
        self._body_unread = True
        compression = self.headers.get("X-Compression", "none").strip()
        if compression not in wire.COMPRESSIONS:
            raise _RequestError(400, f"unknown X-Compression {compression[:40]!r}; choose one of {list(wire.COMPRESSIONS)}")
        body = self._read_body(self._content_length())
        self._body_unread = False
        self._authenticate(body)
        try:
            tensors = wire.deserialize(body, self.server.max_body_bytes)
            if direction == "forward":
                tensors = backend.validate_forward(tensors)
            else:
                tensors = backend.validate_backward(tensors)
        except ValueError as e:  # WireError is a ValueError
            raise _RequestError(400, f"{direction}: {e}") from None
        if tensors[0].shape[0] == 0:
            outputs = backend.empty_outputs(direction)
        else:
            pool = backend.forward_pool if direction == "forward" else backend.backward_pool
            future = pool.submit(*tensors)
            try:
                outputs = future.result(timeout=self.server.request_timeout)
            except FutureTimeoutError:
                future.cancel()
                raise _RequestError(504, f"{direction}: no answer within {self.server.request_timeout} s (host overloaded?)") from None
            except PoolClosedError as e:
                raise _RequestError(503, f"{direction}: {e}") from None
            except Exception as e:  # noqa: BLE001 - the expert's own error goes back to the caller
                logger.warning("expert %s %s failed: %s: %s", backend.name, direction, type(e).__name__, e)
                raise _RequestError(500, f"{direction}: {type(e).__name__}: {e}") from None
        try:
            return wire.serialize(outputs, self.server.compression or compression)
        except ValueError as e:
            raise _RequestError(500, f"{direction}: cannot serialize the outputs: {e}") from None


class ExpertHTTPServer(ThreadingHTTPServer):
    """A thread per connection; tracks its connections so that :meth:`close_connections` ends them all."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        backends: Mapping[str, ExpertBackend],
        max_body_bytes: int,
        request_timeout: float | None = 300.0,
        body_timeout: float = 60.0,
        idle_timeout: float = 600.0,
        secret: bytes | None = None,
        max_connections: int = 1024,
        compression: str | None = None,
    ):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.backends = dict(backends)
        self.max_body_bytes = int(max_body_bytes)
        self.request_timeout, self.body_timeout, self.idle_timeout = request_timeout, body_timeout, idle_timeout
        self.secret, self.max_connections, self.compression = secret, int(max_connections), compression
        self.connections_refused = 0
        self.replays = auth.ReplayGuard(MAX_CLOCK_SKEW)
        self.info_bytes = json.dumps(
            {
                "version": lightning_moe.__version__,
                "compression": list(wire.COMPRESSIONS),
                "max_body_bytes": self.max_body_bytes,
                "private": secret is not None,
                "experts": {uid: backend.get_info() for uid, backend in self.backends.items()},
            }
        ).encode()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._closing = False
        self.connections_accepted = 0
        self.requests: collections.Counter = collections.Counter()  # (direction, uid) -> requests
        self.request_errors: collections.Counter = collections.Counter()  # (direction, uid) -> rejected or failed
        self.status_errors: collections.Counter = collections.Counter()  # HTTP status -> count
        super().__init__(address, ExpertRequestHandler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup (getfqdn can stall for seconds)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: socket.socket, client_address: object) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True,
            name=f"lightning_moe-http-{self.server_port}-{self.connections_accepted}",
        )
        with self._lock:
            if self._closing or len(self._connections) >= self.max_connections:
                self.connections_refused += not self._closing
                self.shutdown_request(request)
                return
            self._connections[thread] = request
            self.connections_accepted += 1
        thread.start()

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    def handle_error(self, request: object, client_address: object) -> None:
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)

    @property
    def open_connections(self) -> int:
        """Connections being served now."""
        return len(self._connections)

    def count_request(self, direction: str, uid: str | None) -> None:
        with self._lock:
            self.requests[direction, uid] += 1

    def count_request_error(self, direction: str, uid: str | None) -> None:
        with self._lock:
            self.request_errors[direction, uid] += 1

    def count_error(self, status: int) -> None:
        with self._lock:
            self.status_errors[status] += 1

    def close_connections(self, timeout: float = 10.0) -> None:
        """Take no more connections, end the open ones (their sockets are shut down) and join their threads."""
        with self._lock:
            self._closing = True
            connections = list(self._connections.items())
        for _, sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread, _ in connections:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("HTTP connection thread %s did not stop within %s s", thread.name, timeout)
