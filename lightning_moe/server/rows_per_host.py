"""``POST /host/forward`` and ``POST /host/backward``: several experts of this host in one request, each distinct row once.

The query names the experts: ``?experts=<JSON>``, a list of ``[uid, rows, keep]`` (``keep``: the request id under
which the host keeps that expert's forward for its backward, or null), at most :data:`MAX_EXPERTS`; a backward also
says ``&rows=R``, its number of distinct rows. The query is signed with the path in a private swarm. The body is a wire
message (:mod:`lightning_moe.wire`):

- forward: ``[*inputs, index]``: ``inputs`` holds the ``R`` distinct rows in the experts' args schema (the experts of
  one request share their schemas), ``index`` (int16, int32 or int64, ``sum(rows)`` long) each expert's rows into them, expert after
  expert;
- backward: ``[*inputs, *grad_outputs, index]``, or ``[*grad_outputs, index]`` when every expert has a keep (its kept
  forward is used); ``grad_outputs`` has ``sum(rows)`` rows, in the order of ``index``. With ``&factored=1`` the output
  gradients come once per distinct row: ``[*inputs, *grad_rows, coeffs, index]``, ``grad_rows`` with ``R`` rows and
  ``coeffs`` (1-D, floating, ``sum(rows)`` long) giving each index entry's output gradients as
  ``coeffs[i] * grad_rows[index[i]]`` (a mixture's output gradients: a weight per expert times one vector per sample).

The answer is a wire message and the header ``X-Experts``: a JSON list of ``[status, message]`` per expert, 200 and
``""`` for those that answered, else what the expert would have answered alone (409: kept forward missed, 500: the
expert's error, 504, ...). The message holds the forward's outputs of the experts that answered, expert after expert
(``rows`` each), or the backward's input gradients of the ``R`` distinct rows summed over the experts that answered.

Everything is checked before any row is gathered or queued: the experts (known, their schemas shared; an expert
named twice, as after re-routing, has different keeps), each
one's row count (within its ``max_rows``), the index (length, dtype, range), the tensors (schemas, finite values);
the usual limits of a request (compression, signature, body size, in-flight budget, load shedding) apply as to one
expert's. A malformed request gets one 4xx naming the problem. Each expert's rows then go to its own pool as a
request of their own would (batching, fair shares per network, kept forwards, gradient bounds).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from aiohttp import web

from lightning_moe import wire
from lightning_moe.net.addresses import netgroup
from lightning_moe.server.backend import ExpertBackend
from lightning_moe.server.http_body import DIRECTIONS, KEEP_ID, RequestError, request_compression, write_answer

MAX_EXPERTS = 32  # experts in one request (their uids and keep ids travel in the request line)
MAX_MESSAGE_CHARS = 300  # of one expert's error message in X-Experts
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)  # the index; a client sends the narrowest that holds its rows


@dataclass
class Entry:
    """One expert of a request: its uid, backend, row count and keep id."""

    uid: str
    backend: ExpertBackend
    rows: int
    keep: str | None


async def serve_host_call(server: Any, request: web.BaseRequest, direction: str) -> web.StreamResponse:
    """``POST /host/<direction>`` on the :class:`~lightning_moe.server.http.ExpertHTTPServer` ``server``."""
    if direction not in DIRECTIONS:
        raise RequestError(404, f"no such path: /host/{direction}", None)
    if request.method != "POST":
        raise RequestError(405, f"method {request.method} is not allowed here; use POST", None, headers={"Allow": "POST"})
    route = f"host/{direction}"
    compression = request_compression(request, None)
    length = server.content_length(request, None)
    server.check_headers(request, post=True)
    entries = parse_experts(request.query, server.backends, server.max_rows, route)
    for entry in entries:
        server.count_request(direction, entry.uid)
    group = netgroup(request.remote) if request.remote else None
    try:
        if direction == "forward":
            server.shed_if_behind(entries[0].uid, group)
        server.reserve(length, None)
        try:
            body = await server.read_verified(request, length, None, sum(server.max_rows[e.uid] for e in entries))
            started = time.monotonic()
            try:
                inputs, grads, indices, distinct = check_body(wire.deserialize(body, server.max_body_bytes), entries,
                                                              direction, request.query)
                if grads is not None:  # one trainer's pull is bounded, per expert
                    grads = [e.backend.bound_gradients(g, request.remote) for e, g in zip(entries, grads)]
            except ValueError as e:  # WireError is a ValueError
                raise RequestError(400, f"{route}: {e}", None) from None
            results = await asyncio.gather(*(
                compute(server, direction, entry, inputs, None if grads is None else grads[i], indices[i], group,
                        request.remote) for i, entry in enumerate(entries)))
            statuses = [[200, ""] if not isinstance(r, RequestError) else [r.status, str(r)[:MAX_MESSAGE_CHARS]]
                        for r in results]
            for entry, result in zip(entries, results):
                if isinstance(result, RequestError):
                    server.count_request_error(direction, entry.uid)
                    server.count_error(result.status)
            outputs = answer(direction, entries, results, indices, distinct)
            try:
                parts = wire.serialize_parts(outputs, server.compression or compression, stochastic=direction == "backward")
            except ValueError as e:
                raise RequestError(500, f"{route}: cannot serialize the outputs: {e}", None) from None
        finally:
            server.budget.release(length)
    except RequestError:
        for entry in entries:
            server.count_request_error(direction, entry.uid)
        raise
    server.count_route(route, length, sum(len(part) for part in parts))
    return await write_answer(request, parts, time.monotonic() - started,
                              {"X-Experts": json.dumps(statuses, separators=(",", ":"))})


def parse_experts(query: Mapping[str, str], backends: Mapping[str, ExpertBackend], max_rows: Mapping[str, int],
                  route: str) -> list[Entry]:
    """The request's experts from its query, checked (404 for an unknown uid, 413 for too many rows, else 400)."""
    raw = query.get("experts")
    if raw is None:
        raise RequestError(400, f"{route}: name the experts in the query: ?experts=[[uid, rows, keep], ...]", None)
    try:
        items = json.loads(raw)
    except ValueError as e:
        raise RequestError(400, f"{route}: experts is not JSON: {e}", None) from None
    if not isinstance(items, list) or not items:
        raise RequestError(400, f"{route}: experts must be a non-empty list of [uid, rows, keep]", None)
    if len(items) > MAX_EXPERTS:
        raise RequestError(400, f"{route}: {len(items)} experts in one request; at most {MAX_EXPERTS}", None)
    entries: list[Entry] = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and type(item[1]) is int
                and (item[2] is None or isinstance(item[2], str))):
            raise RequestError(400, f"{route}: each expert must be [uid (string), rows (integer), keep (string or "
                                    f"null)], got {str(item)[:120]}", None)
        uid, rows, keep = item[0][:200], item[1], item[2]
        backend = backends.get(uid)
        if backend is None:
            raise RequestError(404, f"{route}: no expert {uid!r} on this host", uid)
        if keep is not None and any(entry.uid == uid and entry.keep == keep for entry in entries):
            raise RequestError(400, f"{route}: expert {uid!r} is named twice with the same keep", uid)
        if rows < 0:
            raise RequestError(400, f"{route}: expert {uid!r}: rows must not be negative, got {rows}", uid)
        if rows > max_rows[uid]:
            raise RequestError(413, f"{route}: {rows} rows for expert {uid!r} exceed the limit of {max_rows[uid]} rows "
                                    "per request; split the batch", uid)
        if keep is not None and not KEEP_ID.fullmatch(keep):
            raise RequestError(400, f"{route}: expert {uid!r}: keep must be 16 to 64 lowercase hex digits, got "
                                    f"{keep[:80]!r}", uid)
        first = entries[0].backend if entries else backend
        if (backend.args_schema, backend.outputs_schema) != (first.args_schema, first.outputs_schema):
            raise RequestError(400, f"{route}: the experts of one request must share their schemas; {uid!r} differs "
                                    f"from {entries[0].uid!r}", uid)
        entries.append(Entry(uid, backend, rows, keep))
    return entries


def check_body(tensors: list[torch.Tensor], entries: Sequence[Entry], direction: str, query: Mapping[str, str]
               ) -> tuple[tuple[torch.Tensor, ...] | None, list[tuple[torch.Tensor, ...]] | None, list[torch.Tensor], int]:
    """The distinct rows' inputs (None in a backward of kept forwards), each expert's output gradients (None in a
    forward), each expert's index into the distinct rows, and their number; raises ValueError naming the problem."""
    backend = entries[0].backend
    num_args, num_outputs = len(backend.args_schema), len(backend.outputs_schema)
    total = sum(entry.rows for entry in entries)
    factored = direction == "backward" and query.get("factored") == "1"
    grad_count = num_outputs + factored  # the output gradients, and the coefficients when factored
    expected = [num_args + 1] if direction == "forward" else [grad_count + 1, num_args + grad_count + 1]
    if len(tensors) not in expected:
        what = ("inputs and the index" if direction == "forward" else
                "[inputs,] output gradients by row, their coefficients and the index" if factored else
                "[inputs,] output gradients and the index")
        raise ValueError(f"the body holds {len(tensors)} tensors; expected {' or '.join(map(str, expected))} ({what})")
    index = tensors[-1]
    if index.dtype not in INDEX_DTYPES or index.dim() != 1:
        raise ValueError(f"the index must be a 1-D int16, int32 or int64 tensor, got "
                         f"{wire.dtype_name(index.dtype)}{list(index.shape)}")
    index = index.long()
    if len(index) != total:
        raise ValueError(f"the index has {len(index)} entries but the experts' rows add up to {total}")
    has_inputs = len(tensors) == num_args + 1 + (grad_count if direction == "backward" else 0)
    inputs = backend.validate_forward(tensors[:num_args]) if has_inputs else None
    if direction == "forward":
        distinct = inputs[0].shape[0] if inputs else 0
    else:
        distinct = _int(query.get("rows"), "rows")
        if inputs is not None and inputs[0].shape[0] != distinct:
            raise ValueError(f"rows={distinct} but the inputs hold {inputs[0].shape[0]} rows")
        missing = [entry.uid for entry in entries if entry.keep is None]
        if inputs is None and missing:
            raise ValueError(f"experts without a keep ({missing[:4]}) need the inputs: send [*inputs, *grad_outputs, index]")
    if distinct > total:
        raise ValueError(f"{distinct} distinct rows but the experts' rows add up to {total}: send each row once, used")
    if total and not bool(((index >= 0) & (index < distinct)).all()):
        raise ValueError(f"index values must lie in [0, {distinct}), the distinct rows")
    indices = list(index.split([entry.rows for entry in entries]))
    if direction == "forward":
        return inputs, None, indices, distinct
    grads = list(tensors[-1 - grad_count:-1])
    if factored:
        grads = _expand(grads[:-1], grads[-1], index, distinct, total)
    for i, grad in enumerate(grads):
        if grad.dim() == 0 or grad.shape[0] != total:
            raise ValueError(f"grad_output {i} holds {list(grad.shape)[:1]} rows; expected {total}, one per index entry")
    parts = zip(*(grad.split([entry.rows for entry in entries]) for grad in grads))
    return inputs, [entry.backend.validate_grads(part) for entry, part in zip(entries, parts)], indices, distinct


def _expand(grad_rows: list[torch.Tensor], coeffs: torch.Tensor, index: torch.Tensor, distinct: int, total: int
            ) -> list[torch.Tensor]:
    """A factored backward's output gradients, one per index entry: ``coeffs[i] * grad_rows[index[i]]``."""
    if not coeffs.is_floating_point() or coeffs.dim() != 1 or len(coeffs) != total:
        raise ValueError(f"the coefficients must be a 1-D floating tensor of {total} entries, one per index entry, got "
                         f"{wire.dtype_name(coeffs.dtype)}{list(coeffs.shape)}")
    if not bool(torch.isfinite(coeffs).all()):
        raise ValueError("the coefficients hold NaN or Inf")
    for i, rows in enumerate(grad_rows):
        if rows.dim() == 0 or rows.shape[0] != distinct or not rows.is_floating_point():
            raise ValueError(f"grad_output {i} by row holds {wire.dtype_name(rows.dtype)}{list(rows.shape)[:1]} rows; "
                             f"expected {distinct} floating rows, one per distinct row")
    return [rows[index] * coeffs.to(rows.dtype).view(-1, *[1] * (rows.dim() - 1)) for rows in grad_rows]


def _int(value: str | None, name: str) -> int:
    if value is None or not value.isdigit() or len(value) > 9:
        raise ValueError(f"the query needs {name}=N, a non-negative integer, got {str(value)[:20]!r}")
    return int(value)


async def compute(server: Any, direction: str, entry: Entry, inputs: Sequence[torch.Tensor] | None,
                  grads: Sequence[torch.Tensor] | None, index: torch.Tensor, group: str | None,
                  source: str | None) -> Any:
    """One expert's part, queued in its pool as a request of its own; its outputs, or the RequestError it would have
    answered alone."""
    gathered = [] if inputs is None or (direction == "backward" and entry.keep) else [t[index] for t in inputs]
    try:
        return await server.compute(direction, entry.uid, entry.backend, [*gathered, *(grads or ())], entry.keep, group,
                                    source)
    except RequestError as e:
        return e


def answer(direction: str, entries: Sequence[Entry], results: Sequence[Any], indices: Sequence[torch.Tensor],
           distinct: int) -> list[torch.Tensor]:
    """The forward's outputs of the experts that answered, expert after expert; or the backward's input gradients of
    the distinct rows, summed."""
    done = [(i, result) for i, result in enumerate(results) if not isinstance(result, RequestError)]
    backend = entries[0].backend
    if direction == "forward":
        empty = backend.empty_outputs("forward")
        return [torch.cat([result[j] for _, result in done]) if done else empty[j] for j in range(len(empty))]
    sums = [torch.zeros(distinct, *shape, dtype=dtype) for shape, dtype in backend.args_schema]
    for i, result in done:
        for total, grad in zip(sums, result):
            total.index_add_(0, indices[i], grad.to(total.dtype))
    return sums
