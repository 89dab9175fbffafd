"""The host's HTTP endpoints on aiohttp: ``GET /info``, ``GET /stats``, ``POST /forward/<uid>``, ``POST /backward/<uid>``;
``GET /state/<uid>`` (handover), ``POST /replica/<uid>`` (replicas' averaging, :mod:`.replica_sync`) and
``GET``/``POST /punch`` for hole punching when the host is relayed (``punch``, :mod:`lightning_moe.net.punch`);
``POST /host/forward`` and ``/host/backward``: several experts' rows in one request (:mod:`.rows_per_host`).

One asyncio loop in one background thread serves every connection (an idle connection costs a
few KiB, no thread). Handlers read, check, queue and write; compute happens in the Runtime thread,
whose futures the handlers await. Errors are JSON ``{"error": ..., "uid": ...}``.

Before a body is read, a POST is checked from its headers alone: path, expert, X-Compression,
Content-Length against ``limits.max_body_mb``, and in a private swarm the signature's form, the
timestamp's window, the target host id and replays. Its Content-Length is then reserved from a
host-wide budget of request bytes in flight (none left: 503 with Retry-After). The wire header is
read first and its row count checked against the expert's limit before the rest is read; the
HMAC is checked over the whole body before decoding. Nothing from the network is unpickled.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import secrets
import socket
import threading
import time
from typing import Any, Callable, Mapping
from urllib.parse import unquote

from aiohttp import web

import lightning_moe
from lightning_moe import wire
from lightning_moe.config import HostLimits
from lightning_moe.net.addresses import netgroup
from lightning_moe.net.reachability import NONCE_BYTES, PROBES
from lightning_moe.net.signing import RequestVerifier, SignatureError
from lightning_moe.server.backend import ExpertBackend
from lightning_moe.server.http_protocol import (
    FrozenHeap, InflightBudget, LimitedServer, forget_frames, json_error_body, trim_memory,
)
from lightning_moe.server.http_body import (
    DIRECTIONS, KEEP_ID, RETRY_AFTER, RequestError, read_body, request_compression, write_answer,
)
from lightning_moe.server.http_routes import serve_info, serve_punch, serve_state
from lightning_moe.server.rows_per_host import MAX_EXPERTS, serve_host_call
from lightning_moe.server.slots import ConnectionSlots
from lightning_moe.server.task_pool import PoolClosedError

logger = logging.getLogger(__name__)

KEEP_MISSED = "backward: this host does not keep the forward of this request (evicted, expired or never kept); send the inputs"
DRAIN_LIMIT = 1 << 20  # an unwanted body up to this size is read and dropped to keep the connection; larger: close
ACCEPTS_PER_TICK = 16
LISTEN_BACKLOG = 4096


class ExpertHTTPServer:
    """The aiohttp server of one ExpertHost, run by an asyncio loop in a thread of its own.

    Args:
        address: ``(host, port)`` to bind (port 0: any free port).
        backends: ``{uid: ExpertBackend}`` it serves.
        limits: what a stranger can make it spend (connections, header and body bytes, rows, timeouts).
        secret: a private swarm's secret (requests must be signed with it), or None.
        compression: how answers are compressed; None: as each request came.
        stats_fn: what ``GET /stats`` answers.
        queue_age: seconds the oldest queued work of a client network has waited (the runtime's); forwards
            are shed past ``limits.max_queue_wait``.
        replica: what answers ``POST /replica/<uid>``, a replica's averaging exchange
            (:class:`~lightning_moe.server.replica_sync.ReplicaSync`); None: no such path.
    """

    def __init__(
        self,
        address: tuple[str, int],
        backends: Mapping[str, ExpertBackend],
        limits: HostLimits,
        secret: bytes | None = None,
        compression: str | None = None,
        stats_fn: Callable[[], dict] | None = None,
        queue_age: Callable[[str | None], float] | None = None,
        replica: Any = None,
    ):
        self.address = address
        self.backends = dict(backends)
        self.limits = limits
        self.max_body_bytes = limits.max_body_bytes
        self.secret, self.compression = secret, compression
        self.max_rows = {uid: b.max_batch_size * limits.max_rows_factor for uid, b in self.backends.items()}
        self.budget = InflightBudget(limits.max_inflight_bytes)
        self.slots = ConnectionSlots(limits.max_connections, limits.max_connections_per_address,
                                     limits.max_connections_per_network)
        self.stats_fn, self.queue_age = stats_fn, queue_age
        self.replica = replica  # answers POST /replica/<uid> (server.replica_sync.ReplicaSync); None: 404
        self.shed = 0  # forwards refused because the queue was too old
        self.state_requests = 0  # GET /state snapshots in progress (touched only on the loop thread)
        self.host_id = secrets.token_hex(16)  # new at every start: signatures for another instance do not verify here
        self.verifier = RequestVerifier(secret, self.host_id, who="host")
        self.info_bytes = json.dumps(
            {
                "version": lightning_moe.__version__,
                "host_id": self.host_id,
                "compression": list(wire.COMPRESSIONS),
                "max_body_bytes": self.max_body_bytes,
                "private": secret is not None,
                "max_experts_per_request": MAX_EXPERTS,  # of POST /host/forward and /host/backward
                "experts": {uid: {**b.get_info(), "max_rows_per_request": self.max_rows[uid]} for uid, b in self.backends.items()},
            }
        ).encode()
        self._lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (direction, uid) -> requests
        self.request_errors: collections.Counter = collections.Counter()  # (direction, uid) -> rejected or failed
        self.status_errors: collections.Counter = collections.Counter()  # HTTP status -> count
        self.routes: collections.Counter = collections.Counter()  # (route, "requests" | "bytes_in" | "bytes_out") -> count
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.ServerRunner | None = None
        self._site: web.SockSite | None = None
        self._housekeeping: list[asyncio.Task] = []
        self._frozen = False  # holds FrozenHeap
        self.server_port = 0
        self.punch: Any = None  # a net.punch.PunchService while the host is relayed and punches (set by its owner)

    # ---- lifecycle (called from the host's thread) ---------------------------------------------
    def start(self) -> None:
        """Bind the port, start the loop thread and serve."""
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.address)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.server_port = int(sock.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"lightning_moe-http-{self.server_port}", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start_site(sock), self._loop).result()
        FrozenHeap.acquire()
        self._frozen = True

    async def _start_site(self, sock: socket.socket) -> None:
        max_header_bytes = self.limits.max_header_bytes
        server = LimitedServer(
            self.handle, slots=self.slots, max_header_bytes=max_header_bytes, count_error=self.count_error,
            keepalive_timeout=self.limits.idle_timeout, max_line_size=max_header_bytes, max_field_size=max_header_bytes,
            max_headers=64, lingering_time=0, access_log=None, auto_decompress=False,
        )
        self._runner = web.ServerRunner(server, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        # asyncio accepts up to `backlog` connections in one loop tick, each set up before any other
        # event runs: a reconnecting flood would stall the loop, so accept in small batches...
        self._site = web.SockSite(self._runner, sock, backlog=ACCEPTS_PER_TICK)
        await self._site.start()
        sock.listen(LISTEN_BACKLOG)  # ...while the kernel queues many more (listen again only resizes the queue)
        loop = asyncio.get_running_loop()
        self._housekeeping = [loop.create_task(trim_memory(self.slots, self.budget)), loop.create_task(server.sweep())]

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections go on."""
        if self._loop is not None and self._site is not None:
            asyncio.run_coroutine_threadsafe(self._site.stop(), self._loop).result(30)

    def close(self, timeout: float = 10.0) -> None:
        """End every connection (waiting at most ``timeout`` for handlers), stop the loop and join its thread."""
        self.slots.closing = True
        if self._frozen:
            self._frozen = False
            FrozenHeap.release()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        for task in self._housekeeping:
            loop.call_soon_threadsafe(task.cancel)
        if self._runner is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout + 5)
            except Exception:  # noqa: BLE001 - shutting down anyway
                logger.warning("closing the HTTP connections failed", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("HTTP loop thread %s did not stop within %s s", thread.name, timeout)
        else:
            loop.close()

    @property
    def open_connections(self) -> int:
        return self.slots.open

    def count_request(self, direction: str, uid: str | None) -> None:
        with self._lock:
            self.requests[direction, uid] += 1

    def count_request_error(self, direction: str, uid: str | None) -> None:
        with self._lock:
            self.request_errors[direction, uid] += 1

    def count_route(self, route: str, bytes_in: int, bytes_out: int) -> None:
        """A request of ``route`` (``forward``, ``host/forward``, ...) with its body and answer sizes."""
        with self._lock:
            self.routes[route, "requests"] += 1
            self.routes[route, "bytes_in"] += bytes_in
            self.routes[route, "bytes_out"] += bytes_out

    def count_error(self, status: int) -> None:
        with self._lock:
            self.status_errors[status] += 1

    # ---- requests (in the loop thread) -----------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except RequestError as e:
            return await self._error(request, e)

    async def _error(self, request: web.BaseRequest, e: RequestError) -> web.StreamResponse:
        """An error answer; drains a small unread body to keep the connection, else closes it."""
        self.count_error(e.status)
        close = e.close
        if not close and not request.content.is_eof():
            close = not await self.drain(request)
        response = web.Response(status=e.status, body=json_error_body(str(e), e.uid), content_type="application/json",
                                headers=e.headers)
        if close:
            response.force_close()
        return response

    async def drain(self, request: web.BaseRequest) -> bool:
        length = request.content_length
        if length is None or length > DRAIN_LIMIT or request.headers.get("Transfer-Encoding"):
            return False
        try:
            await asyncio.wait_for(request.content.read(), min(self.limits.body_timeout, 5.0))
        except (asyncio.TimeoutError, ConnectionError, OSError):
            return False
        return request.content.is_eof()

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        parts = raw_path.split("/")
        if raw_path in ("/info", "/stats"):
            return await serve_info(self, request, raw_path[1:])
        if len(parts) == 3 and parts[0] == "" and parts[1] == "state" and request.method == "GET":
            return await serve_state(self, request, unquote(parts[2])[:200])
        if len(parts) == 3 and parts[0] == "" and parts[1] == "replica" and self.replica is not None:
            return await self.replica.handle(self, request, unquote(parts[2])[:200])
        if len(parts) == 3 and parts[1] == "reachability":  # a peer's dial-back (lightning_moe.net.reachability)
            arrived = PROBES.arrived(parts[2][:2 * NONCE_BYTES], f"tcp:{self.server_port}")
            return web.Response(status=204 if arrived else 404)
        if raw_path == "/punch":
            return await serve_punch(self, request)
        if len(parts) == 3 and parts[0] == "" and parts[1] == "host":
            return await serve_host_call(self, request, parts[2][:40])
        if not (len(parts) == 3 and parts[0] == "" and parts[1] in DIRECTIONS and parts[2]):
            raise RequestError(404, f"no such path: {raw_path[:200]}", None)
        direction, uid = parts[1], unquote(parts[2])[:200]
        if request.method != "POST":
            raise RequestError(405, f"method {request.method} is not allowed here; use POST", uid, headers={"Allow": "POST"})
        backend = self.backends.get(uid)
        if backend is None:
            raise RequestError(404, f"no expert {uid!r} on this host", uid)
        self.count_request(direction, uid)
        try:
            parts, host_seconds = await self._serve(request, direction, uid, backend)
        except RequestError:
            self.count_request_error(direction, uid)
            raise
        self.count_route(direction, request.content_length or 0, sum(len(part) for part in parts))
        return await write_answer(request, parts, host_seconds)

    def content_length(self, request: web.BaseRequest, uid: str) -> int:
        if request.headers.get("Transfer-Encoding"):
            raise RequestError(413, "chunked bodies are not supported: send Content-Length", uid, close=True)
        length = request.content_length
        if length is None:
            raise RequestError(413, "Content-Length is required", uid, close=True)
        if length > self.max_body_bytes:
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {self.max_body_bytes}", uid, close=True)
        return length

    def check_headers(self, request: web.BaseRequest, post: bool, uid: str | None = None) -> None:
        """Private swarm: refuse from the headers alone what cannot verify (before any body is read)."""
        try:
            self.verifier.check_headers(request.headers, post)
        except SignatureError as e:
            raise RequestError(401, str(e), uid) from None

    def verify(self, request: web.BaseRequest, body: bytes | bytearray, uid: str | None = None) -> None:
        try:
            self.verifier.verify(request.method, request.raw_path, request.headers, body, post=request.method == "POST")
        except SignatureError as e:
            raise RequestError(401, str(e), uid) from None

    async def _serve(self, request: web.BaseRequest, direction: str, uid: str, backend: ExpertBackend) -> tuple[list, float]:
        """Check, read, verify, decode, queue, await; returns the answer's wire parts and the seconds from the body
        read to them, or raises RequestError.

        The body is read once into one bytearray (:func:`read_body`) and decoded in place: the
        tensors handed to the expert are views of it, not copies.
        """
        compression = request_compression(request, uid)
        length = self.content_length(request, uid)
        self.check_headers(request, post=True, uid=uid)
        keep = request.query.get("keep")
        if keep is not None and not KEEP_ID.fullmatch(keep):
            raise RequestError(400, f"{direction}: keep must be 16 to 64 lowercase hex digits, got {keep[:80]!r}", uid)
        group = netgroup(request.remote) if request.remote else None
        if direction == "forward":
            self.shed_if_behind(uid, group)
        self.reserve(length, uid)
        try:
            body = await self.read_verified(request, length, uid, self.max_rows[uid])
            started = time.monotonic()
            try:
                tensors = wire.deserialize(body, self.max_body_bytes)
                if direction == "forward":
                    tensors = backend.validate_forward(tensors)
                else:
                    tensors = backend.validate_grads(tensors) if keep else backend.validate_backward(tensors)
                    tensors = backend.bound_gradients(tensors, request.remote)  # one trainer's pull is bounded
            except ValueError as e:  # WireError is a ValueError
                raise RequestError(400, f"{direction}: {e}", uid) from None
            outputs = await self.compute(direction, uid, backend, tensors, keep, group, request.remote)
            try:
                # input gradients are rounded unbiased (int8/int4): see lightning_moe.codecs
                parts = wire.serialize_parts(outputs, self.compression or compression, stochastic=direction == "backward")
                return parts, time.monotonic() - started
            except ValueError as e:
                raise RequestError(500, f"{direction}: cannot serialize the outputs: {e}", uid) from None
        finally:
            self.budget.release(length)

    def reserve(self, length: int, uid: str | None) -> None:
        """Reserve ``length`` bytes of the host-wide budget of bodies in flight (release them after), or 503."""
        if not self.budget.reserve(length):
            raise RequestError(503, f"the host is reading too many request bodies ({self.budget.used} bytes in flight); "
                                    f"retry in {RETRY_AFTER} s", uid, close=True, headers={"Retry-After": RETRY_AFTER})

    async def read_verified(self, request: web.BaseRequest, length: int, uid: str, max_rows: int) -> bytearray:
        """The body (its wire header checked against ``max_rows`` before the rest is read), its signature verified."""
        if request.headers.get("Expect", "").lower() == "100-continue":  # checks passed: ask for the body
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await asyncio.wait_for(read_body(request.content, length, uid, max_rows, self.max_body_bytes),
                                          self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise RequestError(408, f"timed out reading the body of {length} bytes after {self.limits.body_timeout} s",
                               uid, close=True) from None
        except RequestError as e:
            forget_frames(e)  # wait_for's task holds the error, whose traceback holds the task: a cycle
            raise
        self.verify(request, body, uid)
        return body

    def shed_if_behind(self, uid: str, group: str | None) -> None:
        """503 with Retry-After for a forward while the oldest queued work of its client's network (``group``) waited
        over ``limits.max_queue_wait``: its answer would come after the trainer moved on. The pools share their
        batches fairly between networks, so a network that floods the host sheds its own forwards, not others'.
        Backwards are always served: they carry what the experts learn, for forwards already computed."""
        limit = self.limits.max_queue_wait
        age = 0.0 if self.queue_age is None or limit is None else self.queue_age(group)
        if limit is not None and age > limit:
            self.shed += 1
            raise RequestError(503, f"forward: the host is behind: the oldest queued work from this network waited {age:.1f} s "
                                    f"(more than {limit} s); retry in {math.ceil(age)} s", uid,
                               headers={"Retry-After": str(math.ceil(age))})

    async def compute(self, direction: str, uid: str, backend: ExpertBackend, tensors: list, keep: str | None,
                       group: str | None, source: str | None) -> Any:
        """Queue the request's rows in its expert's pool, where they take the share of ``group`` (the client's network),
        in turn with the network's other addresses (``source``: the client's)."""
        if tensors[0].shape[0] == 0:
            return backend.empty_outputs(direction)
        if direction == "forward":
            future = backend.forward_pool.submit(*tensors, key=keep, group=group, source=source)
        elif keep is None:
            future = backend.backward_pool.submit(*tensors, group=group, source=source)
        else:
            try:
                future = backend.kept.backward(keep, tensors, group) if backend.kept is not None else None
            except ValueError as e:
                raise RequestError(400, f"backward: {e}", uid) from None
            if future is None:
                raise RequestError(409, KEEP_MISSED, uid)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.limits.request_timeout)
        except asyncio.TimeoutError:
            future.cancel()
            raise RequestError(504, f"{direction}: no answer within {self.limits.request_timeout} s (host overloaded?)",
                               uid) from None
        except PoolClosedError as e:
            raise RequestError(503, f"{direction}: {e}", uid) from None
        except Exception as e:  # noqa: BLE001 - the expert's own error goes back to the caller
            logger.warning("expert %s %s failed: %s: %s", backend.name, direction, type(e).__name__, e)
            raise RequestError(500, f"{direction}: {type(e).__name__}: {e}", uid) from None
