"""Connection-level limits for the host's aiohttp server: slots, header bytes, half-closed peers, JSON errors.

aiohttp's :class:`~aiohttp.web_protocol.RequestHandler` serves one connection as a coroutine (no
thread). This subclass adds what a host facing strangers needs before any handler runs:

- connection slots: at most ``max_connections`` open, and at most ``max_per_address`` from one
  client address; a connection over either limit is closed on arrival, unanswered;
- header memory: a request whose line and headers exceed ``max_header_bytes`` in total gets 431
  and the connection is closed (aiohttp itself bounds each line and the number of headers);
- a peer that half-closes (sends FIN) mid-body still gets its answer (400, truncated body);
- a host-wide budget of request bytes in flight (:class:`InflightBudget`), used by the handlers;
- every error aiohttp answers itself (unparsable request line, bad headers) is JSON
  ``{"error": ..., "uid": null}`` like the host's own errors.

A header deadline comes from aiohttp's keep-alive timer: it is armed when a connection opens and
after each response, and is not pushed back by bytes of an unfinished request, so a connection
must complete its next request's headers within ``keepalive_timeout`` (a slowloris cannot hold it).
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import threading
from http import HTTPStatus
from typing import Any, Callable

from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import LineTooLong

logger = logging.getLogger(__name__)


class ConnectionSlots:
    """Counts open connections in total and per client address; thread-safe reads for stats."""

    def __init__(self, max_connections: int, max_per_address: int):
        self.max_connections, self.max_per_address = int(max_connections), int(max_per_address)
        self._per_address: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.open = self.accepted = self.refused = 0
        self.closing = False

    def admit(self, address: str) -> bool:
        """Take a slot for a new connection from ``address``; False (and counted as refused) if full."""
        with self._lock:
            if self.closing:
                return False
            if self.open >= self.max_connections or self._per_address[address] >= self.max_per_address:
                self.refused += 1
                return False
            self.open += 1
            self.accepted += 1
            self._per_address[address] += 1
            return True

    def release(self, address: str) -> None:
        with self._lock:
            self.open -= 1
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]

    def addresses(self) -> int:
        """How many distinct client addresses hold connections now."""
        with self._lock:
            return len(self._per_address)


def json_error_body(message: str, uid: str | None) -> bytes:
    return json.dumps({"error": message, "uid": uid}).encode()


SMALL_REQUEST = 1 << 20  # requests up to this size may use the last quarter of the in-flight budget; larger ones may not


class InflightBudget:
    """Bytes of request bodies being read or served, host-wide; a request reserves its Content-Length first."""

    def __init__(self, limit: int):
        self.limit, self.used, self.refused, self.reserved_total = int(limit), 0, 0, 0

    def reserve(self, nbytes: int) -> bool:
        cap = self.limit if nbytes <= SMALL_REQUEST else self.limit * 3 // 4  # big bodies cannot starve small ones
        if self.used + nbytes > cap and self.used > 0:  # alone, any body up to max_body_bytes may pass
            self.refused += 1
            return False
        self.used += nbytes
        self.reserved_total += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (gives free heap pages back to the OS), or None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class LimitedRequestHandler(web_protocol.RequestHandler):
    """aiohttp's per-connection protocol with connection slots, a header byte cap and JSON errors."""

    def __init__(
        self,
        manager: web_server.Server,
        *,
        slots: ConnectionSlots,
        max_header_bytes: int,
        count_error: Callable[[int], None],
        **kwargs: Any,
    ):
        super().__init__(manager, **kwargs)
        self._lm_slots, self._lm_max_header_bytes, self._lm_count_error = slots, int(max_header_bytes), count_error
        self._lm_address: str | None = None  # set once the connection holds a slot
        self._lm_header_bytes = 0  # bytes of the request line and headers received so far
        self._lm_payload: Any = None  # the body stream of the latest parsed request

    def connection_made(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self._lm_slots.admit(address):
            transport.abort()  # closed on arrival: costs no buffers, no task
            return
        self._lm_address = address
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._lm_address is None:
            return  # refused in connection_made: nothing was set up
        self._lm_slots.release(self._lm_address)
        self._lm_address = None
        payload = self._lm_payload
        super().connection_lost(exc)
        # A closed connection sits in reference cycles (protocol, request, streams) until the cyclic
        # GC runs, which on a quiet host can take long: drop the body bytes it buffered now.
        self._lm_payload = None
        self._messages.clear()
        buffer = getattr(payload, "_buffer", None)
        if buffer is not None:
            buffer.clear()

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        in_body = self._lm_payload is not None and not self._lm_payload.is_eof()
        if not in_body:
            self._lm_header_bytes += len(data)
        parsed_before = self._request_count
        super().data_received(data)
        if self._request_count != parsed_before:  # a request's headers are complete: the rest is its body
            self._lm_header_bytes = 0
            self._lm_payload = self._messages[-1][1] if self._messages else None
            for message, _ in self._messages:
                error = getattr(message, "exc", None)  # a parse error: its traceback holds this read's bytes
                if isinstance(error, BaseException):
                    error.__traceback__ = None
        elif not in_body and self._lm_header_bytes > self._lm_max_header_bytes:
            self._refuse_headers()

    def _refuse_headers(self) -> None:
        transport = self.transport
        if transport is not None and not self._request_in_progress:
            body = json_error_body(f"request line and headers exceed {self._lm_max_header_bytes} bytes", None)
            head = (f"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
            transport.write(head + body)
        self._lm_count_error(431)
        self.force_close()

    def eof_received(self) -> bool:
        """The peer sent FIN: end the body being read (the handler sees a short body) and close after answering."""
        payload = self._lm_payload
        if payload is not None and not payload.is_eof():
            payload.feed_eof()
        idle = self._waiter is not None and not self._waiter.done() and not self._messages
        if idle:
            self.force_close()
        else:  # a request is queued or being served: answer it, then close
            self.close()
        return True  # keep our side open to write the answer

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """Errors that aiohttp raises itself, as JSON; the connection closes after them."""
        if request.writer.output_size > 0:
            raise ConnectionError("response is sent already, cannot send another one with the error")
        if isinstance(exc, LineTooLong):
            status = 431
        if status >= 500:
            logger.warning("error handling a request from %s", request.remote, exc_info=exc)
        else:
            logger.debug("bad request from %s: %s", request.remote, message or exc)
        text = message or (str(exc) if exc is not None else "") or HTTPStatus(status).phrase
        self._lm_count_error(status)
        response = web.Response(status=status, body=json_error_body(text[:500], None), content_type="application/json")
        response.force_close()
        return response


class LimitedServer(web_server.Server):
    """aiohttp's low-level server, creating a :class:`LimitedRequestHandler` per connection."""

    def __init__(self, handler: Any, *, slots: ConnectionSlots, max_header_bytes: int,
                 count_error: Callable[[int], None], **kwargs: Any):
        super().__init__(handler, **kwargs)
        self._lm_options = {"slots": slots, "max_header_bytes": max_header_bytes, "count_error": count_error}

    def __call__(self) -> LimitedRequestHandler:
        return LimitedRequestHandler(self, loop=self._loop, **self._lm_options, **self._kwargs)
