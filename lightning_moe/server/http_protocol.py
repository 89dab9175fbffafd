"""Connection-level limits for the host's aiohttp server: slots, header bytes, half-closed peers, JSON errors; and
giving memory back after bursts (:func:`trim_memory`).

aiohttp's :class:`~aiohttp.web_protocol.RequestHandler` serves one connection as a coroutine (no
thread). This subclass adds what a host facing strangers needs before any handler runs:

- connection slots (:class:`~lightning_moe.server.slots.ConnectionSlots`): at most ``max_connections``
  open, at most ``max_per_address`` from one client address and ``max_per_network`` from one network;
  a connection over a limit is closed on arrival, unanswered, and when all are taken a newcomer from
  a network holding fewer evicts the oldest connection of the network holding the most;
- a lobby (:class:`Lobby`): a new connection waits there, with no task, timer or parser, until its
  first request head is complete, and is then handed to aiohttp's handler. An idle or trickling
  connection stays a few small objects (which the cyclic GC must walk, and the loop must set up and
  tear down when a flood reconnects), and is closed at its deadline by a sweeper that closes at
  most ``CLOSES_PER_SWEEP`` at a time, so a flood that opened at once does not close at once;
- header memory: a request whose line and headers exceed ``max_header_bytes`` in total gets 431
  and the connection is closed (aiohttp itself bounds each line and the number of headers);
- trickled heads: clients write a request's head at once, so a head still unfinished after reads
  of under ``TRICKLE_BYTES`` on average is read no further (the socket leaves the event loop's
  selector) until its deadline closes it: a slowloris costs the loop one read, then no more than
  an idle connection;
- a peer that half-closes (sends FIN) mid-body still gets its answer (400, truncated body);
- a host-wide budget of request bytes in flight (:class:`InflightBudget`), used by the handlers;
- every error aiohttp answers itself (unparsable request line, bad headers) is JSON
  ``{"error": ..., "uid": null}`` like the host's own errors.

A header deadline: a new connection must complete its first head within ``keepalive_timeout`` of
opening (the lobby's deadline). After a response, aiohttp's keep-alive timer does the same for the
next request: it is not pushed back by bytes of an unfinished request (a slowloris cannot hold it).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import itertools
import json
import logging
import socket
import threading
import traceback
from http import HTTPStatus
from typing import Any, Callable

from aiohttp import web, web_protocol, web_server
from aiohttp.http_exceptions import LineTooLong

from lightning_moe.server.slots import ConnectionSlots

logger = logging.getLogger(__name__)


def json_error_body(message: str, uid: str | None) -> bytes:
    return json.dumps({"error": message, "uid": uid}).encode()


def stop_if_trickle(transport: Any, slots: ConnectionSlots, head_bytes: int, reads: int) -> None:
    """An unfinished head of ``head_bytes`` in ``reads`` pieces averaging under ``TRICKLE_BYTES`` is a trickle:
    read no more from it (its deadline closes it), and let the kernel hold only a few KiB of what it sends."""
    if transport is None or head_bytes >= TRICKLE_BYTES * reads:
        return
    slots.trickles += 1
    transport.pause_reading()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PAUSED_RCVBUF)
        except OSError:
            pass


def head_too_large(max_header_bytes: int) -> bytes:
    """The whole 431 answer to a request whose line and headers exceed ``max_header_bytes``."""
    body = json_error_body(f"request line and headers exceed {max_header_bytes} bytes", None)
    head = (f"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


PAUSED_RCVBUF = 4096  # bytes of receive buffer left to a connection the host stopped reading (else ~128 KiB each)
TRICKLE_BYTES = 256  # an unfinished head that came in pieces of under this many bytes on average is a trickle
SWEEP_PERIOD = 0.01  # seconds between the lobby sweeper's rounds
CLOSES_PER_SWEEP = 40  # connections past their deadline closed per round (4,000 per second)
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


class FrozenHeap:
    """``gc.freeze()`` while any host of this process serves; ``gc.unfreeze()`` when the last one stops.

    A full collection walks every tracked object and holds the GIL meanwhile: with torch, Lightning
    and a model loaded that is some 10^5-10^6 objects and 0.1-0.5 s during which neither the loop nor
    the Runtime runs. Connection churn (a flood reconnecting) triggers such collections. Frozen, the
    heap that existed when the host started is skipped; cyclic garbage among those objects waits for
    the unfreeze.
    """

    _lock = threading.Lock()
    _holders = 0

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            cls._holders += 1
            gc.freeze()  # also takes what came since an earlier host froze

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0:
                gc.unfreeze()


def forget_frames(error: BaseException, depth: int = 8) -> None:
    """Clear the local variables of the finished frames in ``error``'s traceback, and in those of its causes.

    An exception that ends in a reference cycle (a Future holding it, its traceback holding the frame
    that awaited the Future) keeps every buffer those frames referenced until the cyclic GC runs.
    """
    seen: set[int] = set()
    while error is not None and depth > 0 and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # frames still running are left alone
        error = error.__cause__ or error.__context__
        depth -= 1


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
        address: str,
        slots: ConnectionSlots,
        max_header_bytes: int,
        count_error: Callable[[int], None],
        **kwargs: Any,
    ):
        super().__init__(manager, **kwargs)
        self._lm_slots, self._lm_max_header_bytes, self._lm_count_error = slots, int(max_header_bytes), count_error
        self._lm_address = address  # the slot this connection holds (taken in the lobby)
        self._lm_lost = False
        self._lm_header_bytes = 0  # bytes of the request line and headers received so far
        self._lm_head_reads = 0  # reads that brought bytes of the current request's head
        self._lm_payload: Any = None  # the body stream of the latest parsed request

    def evict(self) -> None:
        """Close now (a newcomer from a smaller network takes the slot): the slot is free at once."""
        self._lm_slots.release(self._lm_address, self)
        transport = self.transport
        if transport is not None:
            transport.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._lm_lost:
            return
        self._lm_lost = True
        self._lm_slots.release(self._lm_address, self)
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
        # aiohttp itself calls this with b"" (its buffered tail, once a handler finished): not a read
        in_body = not data or (self._lm_payload is not None and not self._lm_payload.is_eof())
        if not in_body:
            self._lm_header_bytes += len(data)
            self._lm_head_reads += 1
        parsed_before = self._request_count
        super().data_received(data)
        if self._request_count != parsed_before:  # a request's headers are complete: the rest is its body
            self._lm_header_bytes = self._lm_head_reads = 0
            self._lm_payload = self._messages[-1][1] if self._messages else None
            for message, _ in self._messages:
                error = getattr(message, "exc", None)  # a parse error: its traceback holds this read's bytes
                if isinstance(error, BaseException):
                    error.__traceback__ = None
        elif not in_body and self._lm_header_bytes > self._lm_max_header_bytes:
            self._refuse_headers()
        elif not in_body:  # the keep-alive timer (the header deadline) closes a trickle
            stop_if_trickle(self.transport, self._lm_slots, self._lm_header_bytes, self._lm_head_reads)

    def _refuse_headers(self) -> None:
        transport = self.transport
        if transport is not None and not self._request_in_progress:
            transport.write(head_too_large(self._lm_max_header_bytes))
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


class Lobby(asyncio.Protocol):
    """A connection until its first request head is complete: a slot, the bytes so far, a deadline."""

    __slots__ = ("server", "transport", "address", "head", "reads", "deadline")

    def __init__(self, server: "LimitedServer"):
        self.server, self.transport, self.address = server, None, ""
        self.head, self.reads, self.deadline = bytearray(), 0, 0.0

    def connection_made(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self.server.slots.admit(address, self):
            transport.abort()  # closed on arrival: costs no buffers
            return
        self.transport, self.address = transport, address
        self.server.enter_lobby(self)

    def data_received(self, data: bytes) -> None:
        self.head += data
        self.reads += 1
        if b"\n\r\n" in self.head or b"\n\n" in self.head:
            self.server.promote(self)
        elif len(self.head) > self.server.max_header_bytes:
            self.transport.write(head_too_large(self.server.max_header_bytes))
            self.server.count_error(431)
            self.transport.close()
        else:
            stop_if_trickle(self.transport, self.server.slots, len(self.head), self.reads)

    def eof_received(self) -> bool:
        return False  # the peer sent FIN before a whole head: close (as aiohttp does with no request)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is not None:  # still here: neither refused, evicted nor handed on
            self.transport = None
            self.server.leave_lobby(self)

    def evict(self) -> None:
        """Close now (a newcomer from a smaller network takes the slot): the slot is free at once."""
        transport = self.transport
        if transport is not None:
            self.transport = None
            self.server.leave_lobby(self)
            transport.abort()


class LimitedServer(web_server.Server):
    """aiohttp's low-level server; a connection starts in a :class:`Lobby`, then gets a :class:`LimitedRequestHandler`."""

    def __init__(self, handler: Any, *, slots: ConnectionSlots, max_header_bytes: int,
                 count_error: Callable[[int], None], **kwargs: Any):
        super().__init__(handler, **kwargs)
        self.slots, self.max_header_bytes, self.count_error = slots, int(max_header_bytes), count_error
        self.head_timeout = float(kwargs.get("keepalive_timeout", 75.0))
        self.lobby: dict[Lobby, None] = {}  # in order of arrival, so of deadline

    def __call__(self) -> Lobby:
        return Lobby(self)

    def enter_lobby(self, lobby: Lobby) -> None:
        lobby.deadline = self._loop.time() + self.head_timeout
        self.lobby[lobby] = None

    def leave_lobby(self, lobby: Lobby) -> None:
        self.lobby.pop(lobby, None)
        self.slots.release(lobby.address, lobby)

    def promote(self, lobby: Lobby) -> None:
        """Hand a lobby's connection, with the bytes it sent, to aiohttp's handler; its slot goes along."""
        transport, lobby.transport = lobby.transport, None
        self.lobby.pop(lobby, None)
        handler = LimitedRequestHandler(self, loop=self._loop, address=lobby.address, slots=self.slots,
                                        max_header_bytes=self.max_header_bytes, count_error=self.count_error,
                                        **self._kwargs)
        self.slots.transfer(lobby.address, lobby, handler)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(bytes(lobby.head))

    async def sweep(self) -> None:
        """Close lobby connections past their deadline, at most ``CLOSES_PER_SWEEP`` per round.

        Between rounds it sleeps until the first deadline (a newcomer's comes later), or
        ``SWEEP_PERIOD`` while more connections are past theirs.
        """
        while True:
            now = self._loop.time()
            for lobby in list(itertools.islice(self.lobby, CLOSES_PER_SWEEP)):
                if lobby.deadline > now:
                    break
                self.close_lobby(lobby)
            first = next(iter(self.lobby), None)
            await asyncio.sleep(self.head_timeout if first is None else max(SWEEP_PERIOD, first.deadline - now))

    def close_lobby(self, lobby: Lobby) -> None:
        transport = lobby.transport
        self.lobby.pop(lobby, None)
        if transport is not None:
            transport.close()  # connection_lost releases the slot

    async def shutdown(self, timeout: float | None = None) -> None:
        for lobby in list(self.lobby):
            self.close_lobby(lobby)
        await super().shutdown(timeout)


TRIM_PERIOD = 2.0
GC_AFTER_CLOSES = 1000  # connections closed since the last collection that make the host collect
GC_PERIOD = 20.0


async def trim_memory(slots: ConnectionSlots, budget: InflightBudget) -> None:
    """Every few seconds after a burst of connections or bodies, give their memory back to the OS.

    A closed aiohttp connection sits in reference cycles until Python's cyclic GC runs, which a
    quiet host may not do for a long time; so once a burst of many closes is over (an attack
    ending) the host collects, and at most every ``GC_PERIOD`` s while closes go on. glibc keeps freed
    buffers in its arenas (the loop thread has its own): ``malloc_trim`` returns them.
    """
    trim = malloc_trim()
    last, closed_before, closed_at_gc, gc_at = (0, 0), 0, 0, 0.0
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(TRIM_PERIOD)
        closed = slots.accepted - slots.open
        burst_over = closed == closed_before  # no connection closed during the last period
        if closed - closed_at_gc >= GC_AFTER_CLOSES and (burst_over or loop.time() - gc_at >= GC_PERIOD):
            gc.collect()
            closed_at_gc, gc_at = closed, loop.time()
        closed_before = closed
        now = (slots.accepted, budget.reserved_total)
        if trim is not None and now != last:
            trim(0)
        last = now
