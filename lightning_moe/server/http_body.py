"""Reading a request's body on the host (the wire header first, checked, then the whole body in one buffer), and
writing an answer's wire parts.

The wire header (at most 8 bytes + 64 KiB) is read before anything is allocated for the tensors: its
sizes must add up to the Content-Length, what it decodes to must fit the body limit, and its rows
the expert's per-request limit. Only then is one buffer of the body's size allocated and filled. A
body that ends early, or a read that fails, empties that buffer before the error leaves: the error
may sit in a reference cycle (wait_for's task) until the cyclic GC runs, and must not keep 60 MB.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

from aiohttp import StreamReader, web

from lightning_moe import wire
from lightning_moe.server.http_protocol import forget_frames

RETRY_AFTER = "1"  # seconds a client waits after a 503
DIRECTIONS = ("forward", "backward")
KEEP_ID = re.compile(r"[0-9a-f]{16,64}")  # a request id whose forward the trainer asks the host to keep


class RequestError(Exception):
    """Answer with ``status`` and this message; ``close`` ends the connection after the answer."""

    def __init__(self, status: int, message: str, uid: str | None = None, close: bool = False,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.uid, self.close, self.headers = status, uid, close, dict(headers or {})


def request_compression(request: web.BaseRequest, uid: str | None) -> str:
    """The request's ``X-Compression`` (the answer's too, unless the host sets one), or 400."""
    compression = request.headers.get("X-Compression", "none").strip()
    if compression not in wire.COMPRESSIONS:
        raise RequestError(400, f"unknown X-Compression {compression[:40]!r}; choose one of {list(wire.COMPRESSIONS)}", uid)
    return compression


async def read_body(content: StreamReader, length: int, uid: str | None, max_rows: int, max_body_bytes: int) -> bytearray:
    """The body in one buffer, allocated once the wire header (sizes, rows) has arrived and passed its checks."""
    head = bytearray()
    if length >= wire.PREFIX_BYTES:  # the wire header: at most 8 + 64 KiB, read before anything is allocated
        for stage in ("prefix", "header"):
            needed = wire.PREFIX_BYTES if stage == "prefix" else header_end(head, length, uid)
            while len(head) < needed:
                chunk = await content.read(needed - len(head))
                if not chunk:
                    raise RequestError(400, f"truncated body: got {len(head)} of {length} bytes", uid, close=True)
                head += chunk
        check_wire_header(head, length, uid, max_rows, max_body_bytes)
    body = bytearray(length)
    view = memoryview(body)
    got = len(head)
    try:
        view[:got] = head
        while got < length:
            chunk = await content.readany()
            if not chunk:
                raise RequestError(400, f"truncated body: got {got} of {length} bytes", uid, close=True)
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
    except BaseException:
        # The error's traceback keeps this frame, and wait_for's task keeps the error in a reference cycle
        # until the cyclic GC runs: empty the buffer now, so that an aborted body costs nothing after it.
        view.release()
        body.clear()
        raise
    view.release()
    return body


def header_end(prefix: bytearray, length: int, uid: str | None) -> int:
    """Where the wire header ends, from the message's prefix."""
    try:
        return min(length, wire.PREFIX_BYTES + wire.header_length(prefix))
    except wire.WireError as e:
        raise RequestError(400, str(e), uid, close=length > len(prefix)) from None


def check_wire_header(head: bytearray, length: int, uid: str | None, max_rows: int, max_body_bytes: int) -> None:
    """Sizes and rows from the wire header, before the buffers are read or anything is allocated for them."""
    close = len(head) < length
    try:
        specs, _, total = wire.parse_header(head)
    except wire.WireError as e:
        raise RequestError(400, str(e), uid, close=close) from None
    if total != length:
        raise RequestError(400, f"header describes {total} bytes but the message has {length}", uid, close=close)
    decoded = sum(math.prod(spec.shape) * spec.dtype.itemsize for spec in specs)
    if decoded > max_body_bytes:  # compressed tensors decode to up to 16x their bytes: bound what we allocate
        raise RequestError(413, f"the body decodes to {decoded} bytes, more than the limit of {max_body_bytes}",
                           uid, close=close)
    rows = wire.batch_rows(specs)
    if rows > max_rows:
        raise RequestError(413, f"{rows} rows exceed the limit of {max_rows} rows per request; split the batch",
                           uid, close=close)


async def write_answer(request: web.BaseRequest, parts: list, host_seconds: float,
                       headers: Mapping[str, str] | None = None) -> web.StreamResponse:
    """Write an answer's wire parts one after another, never joined into one buffer.

    A ``web.Response(body=...)`` would cost a copy of the whole body: aiohttp joins its headers
    and a body into one bytes object before writing (always, on Python before 3.12.9). Here the
    HTTP head goes out with the small wire header, and each tensor's buffer, a view of the
    expert's output, goes to the transport as it is. ``X-Host-Seconds`` says how long the host took from the body
    read to the answer ready, so that the trainer can tell its link's time apart (``compression="auto"``).
    """
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "X-Host-Seconds": f"{host_seconds:.6f}", **(headers or {})})
    response.content_length = sum(len(part) for part in parts)
    await response.prepare(request)
    try:
        for part in parts:
            await response.write(part)
    except ConnectionError as e:  # the client went away mid-answer: nothing more to send
        forget_frames(e)  # its traceback's frames (aiohttp's writes) hold the answer's buffers, in a cycle
        response.force_close()
    return response
