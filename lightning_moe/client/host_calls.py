"""Rows once per host: a layer's expert calls grouped by endpoint into one request per host (``POST /host/forward``
and ``/host/backward``, :mod:`lightning_moe.server.rows_per_host`), each distinct row sent once with each expert's
index list into them; the host answers per expert, and a backward's input gradients come back summed per row. A
backward's output gradients go once per row as well when they are one vector per sample times a coefficient per expert,
as a mixture's are (each expert's is its weight times the layer's output gradient): :func:`factor_rows`.

Everything else stays per expert: each :class:`ExpertCall` gets its own answer or error (naming its uid, the endpoint
and the host's message), so health accounting, re-routing, spot checks and kept forwards work as with one request per
expert. What is per host now: the straggler wait, link measurements, compression and splitting (by distinct rows).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import quote

import torch

from lightning_moe import wire
from lightning_moe.client.call_stats import CallStats
from lightning_moe.client.links import LinkRates
from lightning_moe.client import parallel_call
from lightning_moe.client.parallel_call import ExpertCall, Job
from lightning_moe.client.remote_expert import RemoteExpertError, error_message, post, retry_after
from lightning_moe.client.speed import StragglerWait
from lightning_moe.net.http_client import CallHandle, TransportError

#: Experts in one request (the host's limit, ``max_experts_per_request`` in its /info).
MAX_EXPERTS = 32
#: Characters of the experts' list in a request's query (the host reads at most ``host.limits.max_header_bytes`` of
#: request line and headers: 8 KiB by default).
MAX_QUERY_CHARS = 4096
#: Largest ``X-Experts`` header of an answer that is read.
MAX_STATUS_CHARS = 64 * 1024
#: How far, in units of the floating type's epsilon and relative to a sample's largest output gradient, the gradients
#: may stray from one vector per sample times a coefficient per expert and still be sent factored.
FACTOR_TOLERANCE = 16


class NoneAnswered(Exception):
    """A request in which no expert answered: not an answer for the straggler wait, speeds and links (as one request
    per expert that failed is not); ``result`` holds each call's error."""

    def __init__(self, result: Any):
        super().__init__("no expert answered")
        self.result = result


@dataclass
class HostCall:
    """The calls of one request to a host: ``rows``, the distinct rows of the batch (sorted), and ``index``, each
    call's rows as positions in ``rows``, call after call."""

    endpoint: str
    calls: list[ExpertCall]
    rows: torch.Tensor
    index: torch.Tensor


def _host_call(endpoint: str, calls: list[ExpertCall]) -> HostCall:
    every = torch.cat([call.rows for call in calls])
    rows = torch.unique(every)
    return HostCall(endpoint, calls, rows, torch.searchsorted(rows, every))


def narrow_index(index: torch.Tensor, distinct: int) -> torch.Tensor:
    """``index`` (positions among ``distinct`` rows) in the narrowest integer type that holds them: a quarter of the
    bytes of int64 for any batch under 32,768 rows."""
    return index.to(torch.int16 if distinct <= torch.iinfo(torch.int16).max + 1 else torch.int32)


def factor_rows(grad_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rows, coeffs)`` with ``grad_outputs[b, k] == coeffs[b, k] * rows[b]`` within float rounding, or None when
    the output gradients (samples x slots x ...) are not of that form."""
    if grad_outputs.dim() < 3 or not grad_outputs.is_floating_point():
        return None
    kind = torch.float64 if grad_outputs.dtype == torch.float64 else torch.float32
    flat = grad_outputs.flatten(2).to(kind)
    norms = flat.abs().amax(dim=2)  # samples x slots
    rows = flat[torch.arange(len(flat)), norms.argmax(dim=1)]  # each sample's largest slot
    squares = (rows * rows).sum(dim=1, keepdim=True)
    coeffs = torch.where(squares > 0, torch.einsum("bkd,bd->bk", flat, rows) / squares.clamp_min(torch.finfo(kind).tiny),
                         0.0)
    residual = (flat - coeffs[..., None] * rows[:, None]).abs().amax(dim=2)
    tolerance = FACTOR_TOLERANCE * torch.finfo(grad_outputs.dtype).eps * norms.amax(dim=1, keepdim=True)
    if not bool(torch.isfinite(coeffs).all()) or bool((residual > tolerance).any()):
        return None
    return rows.view(len(flat), *grad_outputs.shape[2:]).to(grad_outputs.dtype), coeffs.to(kind)


def _query_chars(call: ExpertCall) -> int:
    return len(quote(json.dumps([call.uid, len(call.rows), call.keep or "0" * 32]))) + 3


def group_by_host(calls: list[ExpertCall], max_rows: int, split: bool = True) -> list[HostCall]:
    """The ``calls`` as requests to their hosts, at most :data:`MAX_EXPERTS` experts each. ``split`` (a forward): a
    host's distinct rows are cut into runs of ``max_rows``, one request each, and a call across runs into its part of
    each (new calls, without a keep). Else (a backward: each call's keep covers its forward's rows) whole calls are
    packed into requests of at most ``max_rows`` distinct rows, as their forwards were: the input gradients come back
    once per row, while the output gradients (one per expert row) may make the request larger."""
    by_host: dict[str, list[ExpertCall]] = {}
    for call in calls:
        by_host.setdefault(call.endpoint, []).append(call)
    out: list[HostCall] = []
    for endpoint, group in by_host.items():
        runs = [group]
        if split:
            chunks = torch.unique(torch.cat([call.rows for call in group])).split(max_rows)
            runs = [[call if bool(inside.all()) else ExpertCall(call.uid, endpoint, call.rows[inside], call.slots[inside])
                     for call in group if bool((inside := torch.isin(call.rows, chunk)).any())] for chunk in chunks]
        for run in runs:
            taken: list[ExpertCall] = []
            rows: set[int] = set()
            chars = 0
            for call in run:
                call_rows = set() if split else set(call.rows.tolist())
                if taken and (len(taken) == MAX_EXPERTS or chars + _query_chars(call) > MAX_QUERY_CHARS
                              or len(rows | call_rows) > max_rows):
                    out.append(_host_call(endpoint, taken))
                    taken, rows, chars = [], set(), 0
                taken.append(call)
                rows |= call_rows
                chars += _query_chars(call)
            if taken:
                out.append(_host_call(endpoint, taken))
    return out


def experts_query(calls: Sequence[ExpertCall], keep: bool = True) -> str:
    """The ``experts`` query of a request: ``[[uid, rows, keep], ...]`` (``keep`` False: null for every expert)."""
    experts = [[call.uid, len(call.rows), call.keep if keep else None] for call in calls]
    return "experts=" + quote(json.dumps(experts, separators=(",", ":")))


def _each(calls: Sequence[ExpertCall], endpoint: str, method: str, message: str, status: int | None = None,
          retry: float | None = None, cause: BaseException | None = None) -> list[BaseException]:
    """The same failure as each call's own error (naming its expert)."""
    errors: list[BaseException] = []
    for call in calls:
        error = RemoteExpertError(call.uid, endpoint, message if message.startswith(f"{method}:") else f"{method}: {message}",
                                  status, retry)
        error.__cause__ = cause
        errors.append(error)
    return errors


def _request(host: HostCall, calls: Sequence[ExpertCall], method: str, query: str, tensors: list[torch.Tensor],
             compression: str, stochastic: list[bool], timeout: float | None, secret: bytes | None,
             handle: CallHandle, codecs: Sequence[str] | None = None
             ) -> tuple[list[torch.Tensor] | None, list[BaseException | None]]:
    """One request; the answer's tensors (None if the request failed as a whole) and each call's error or None. The
    body's tensors go in ``compression`` (the answer's too), or in ``codecs``, one per tensor."""
    endpoint = host.endpoint
    try:
        response = post(endpoint, f"/host/{method}?{query}", wire.serialize(tensors, codecs or compression, stochastic),
                        compression, timeout, secret, handle)
    except TransportError as e:
        return None, _each(calls, endpoint, method, str(e), cause=e)
    except RemoteExpertError as e:
        return None, _each(calls, endpoint, method, e.message, e.status, cause=e)
    if response.status != 200:
        return None, _each(calls, endpoint, method, error_message(response), response.status,
                           retry_after(response) if response.status == 503 else None)
    try:
        raw = response.headers.get("x-experts", "")
        statuses = json.loads(raw) if len(raw) <= MAX_STATUS_CHARS else None
        if not (isinstance(statuses, list) and len(statuses) == len(calls) and all(
                isinstance(s, list) and len(s) == 2 and type(s[0]) is int and isinstance(s[1], str) for s in statuses)):
            raise ValueError(f"X-Experts must list [status, message] for each of the {len(calls)} experts")
        answer = wire.deserialize(response.body)
    except ValueError as e:  # WireError is a ValueError
        return None, _each(calls, endpoint, method, f"malformed answer: {e}", 200)
    errors: list[BaseException | None] = [
        None if status == 200 else RemoteExpertError(call.uid, endpoint, message if message.startswith(f"{method}:")
                                                     else f"{method}: {message}", status)
        for call, (status, message) in zip(calls, statuses)]
    return answer, errors


def _forward(host: HostCall, x: torch.Tensor, compression: str, secret: bytes | None, timeout: float | None,
             handle: CallHandle) -> list[Any]:
    """Each call's outputs or error."""
    tensors = [x[host.rows], narrow_index(host.index, len(host.rows))]
    answer, errors = _request(host, host.calls, "forward", experts_query(host.calls), tensors,
                              compression, [False, False], timeout, secret, handle)
    if answer is None or all(error is not None for error in errors):
        raise NoneAnswered(errors)
    answered = [call for call, error in zip(host.calls, errors) if error is None]
    sizes = [len(call.rows) for call in answered]
    if any(out.dim() == 0 or out.shape[0] != sum(sizes) for out in answer):
        shapes = [list(out.shape) for out in answer]
        raise NoneAnswered(_each(host.calls, host.endpoint, "forward", f"answered shapes {shapes} for {sum(sizes)} rows", 200))
    outputs = iter(zip(*(out.split(sizes) for out in answer)))
    return [list(next(outputs)) if error is None else error for error in errors]


def _backward(host: HostCall, x: torch.Tensor, grads: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
              compression: str, secret: bytes | None, timeout: float | None, handle: CallHandle
              ) -> tuple[torch.Tensor | None, list[BaseException | None]]:
    """The input gradients of ``host.rows`` summed over the calls that answered, and each call's error or None. Sends
    only the output gradients of kept forwards first; calls whose host no longer keeps theirs (409) go once more with
    the inputs. ``grads``: the calls' output gradients, call after call, or ``(rows, coeffs)``, the factored form of
    :func:`factor_rows` (a row per sample of the batch, a coefficient per row of a call, call after call)."""
    starts = torch.tensor([0] + [len(call.rows) for call in host.calls]).cumsum(0).tolist()
    total: torch.Tensor | None = None
    errors: list[BaseException | None] = [None] * len(host.calls)
    todo = list(range(len(host.calls)))
    for kept in (True, False) if all(call.keep for call in host.calls) else (False,):
        calls = [host.calls[i] for i in todo]
        index = torch.cat([host.index[starts[i]:starts[i + 1]] for i in todo])
        rows = torch.unique(index)  # the host numbers only this request's rows
        local = narrow_index(torch.searchsorted(rows, index), len(rows))
        query = f"{experts_query(calls, keep=kept)}&rows={len(rows)}"
        if isinstance(grads, tuple):  # the coefficients are never quantized: float16 at most
            coeffs = torch.cat([grads[1][starts[i]:starts[i + 1]] for i in todo])
            grad_parts = [grads[0][host.rows[rows]], coeffs]
            part_codecs = [compression, "none" if compression == "none" else "float16"]
            query += "&factored=1"
        else:
            grad_parts = [torch.cat([grads[starts[i]:starts[i + 1]] for i in todo])]
            part_codecs = [compression]
        stochastic = [True] + [False] * (len(grad_parts) - 1) + [False]
        tensors = [*grad_parts, local] if kept else [x[host.rows[rows]], *grad_parts, local]
        codecs = [*part_codecs, "none"] if kept else [compression, *part_codecs, "none"]
        answer, round_errors = _request(host, calls, "backward", query, tensors, compression,
                                        stochastic if kept else [False, *stochastic], timeout, secret, handle, codecs)
        if answer is not None and (len(answer) != 1 or tuple(answer[0].shape) != (len(rows), *x.shape[1:])):
            shape = [list(a.shape) for a in answer]
            answer, round_errors = None, _each(calls, host.endpoint, "backward", f"answered shapes {shape}", 200)
        if answer is not None:
            summed = torch.zeros(len(host.rows), *x.shape[1:], dtype=x.dtype)
            summed[rows] = answer[0].to(x.dtype)
            total = summed if total is None else total + summed
        for i, error in zip(todo, round_errors):
            errors[i] = error
        todo = [i for i in todo if kept and host.calls[i].keep is not None and isinstance(errors[i], RemoteExpertError)
                and errors[i].status == 409]
        if not todo:
            break
    if total is None:
        raise NoneAnswered((None, errors))
    return total, errors


def call_hosts(hosts: list[HostCall], method: str, x: torch.Tensor,
               grads: list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]] | None = None,
               timeout: float | None = None, wait: StragglerWait | None = None, compression: Sequence[str] = (),
               secret: bytes | None = None, deadline: float | None = None, links: LinkRates | None = None,
               traffic: CallStats | None = None) -> list[Any]:
    """One request per host call at once (:func:`~lightning_moe.client.parallel_call.run_in_parallel`). A forward returns each call's outputs or error,
    calls in the order of ``hosts``; a backward (``grads``: each host call's output gradients, call after call, or their
    factored form, see :func:`_backward`) returns
    per host call ``(summed input gradients of its rows or None, each call's error or None)``."""
    jobs = []
    for i, (host, codec) in enumerate(zip(hosts, compression)):
        send = (functools.partial(_forward, host, x, codec, secret) if grads is None
                else functools.partial(_backward, host, x, grads[i], codec, secret))
        label = f"experts {[call.uid for call in host.calls]}"
        jobs.append(Job(host.endpoint, len(host.index), label, send))  # rows the host computes
    results = parallel_call.run_in_parallel(jobs, method, timeout, wait, deadline, links, traffic)
    out: list[Any] = []
    for host, result in zip(hosts, results):
        if isinstance(result, NoneAnswered):
            result = result.result
        elif isinstance(result, BaseException):  # the whole request: given up, timed out, or a bug of ours
            kind, why = type(result), str(result).split(": ", 1)[-1]
            errors = [kind(f"expert {call.uid!r} at {host.endpoint} (one request for {len(host.calls)} experts): {why}")
                      if isinstance(result, TimeoutError) else
                      _each([call], host.endpoint, method, f"{type(result).__name__}: {result}")[0] for call in host.calls]
            result = errors if grads is None else (None, errors)
        if grads is None:
            out += result
        else:
            out.append(result)
    return out


def backward(calls: list[ExpertCall], x: torch.Tensor, grad_outputs: torch.Tensor, scale: float, max_rows: int,
             codec: Callable[[str], str], timeout: float | None, wait: StragglerWait | None, secret: bytes | None,
             links: LinkRates | None, traffic: CallStats | None, grad_x: torch.Tensor) -> tuple[list[ExpertCall], list]:
    """A layer's backward, one request per host: adds the input gradients (the hosts' sums, divided by ``scale``, by
    which the output gradients are multiplied) into ``grad_x``; returns the calls and each one's error or None."""
    hosts = group_by_host(calls, max_rows, split=False)
    factored = factor_rows(grad_outputs)
    if factored is not None:
        rows, coeffs = factored[0] * scale, factored[1]
        grads = [(rows, torch.cat([coeffs[call.rows, call.slots] for call in host.calls])) for host in hosts]
    else:
        grads = [torch.cat([grad_outputs[call.rows, call.slots] for call in host.calls]) * scale for host in hosts]
    answered = call_hosts(hosts, "backward", x, grads, timeout, wait, [codec(host.endpoint) for host in hosts], secret,
                          links=links, traffic=traffic)
    errors: list[BaseException | None] = []
    for host, (summed, host_errors) in zip(hosts, answered):
        if summed is not None:
            grad_x.index_add_(0, host.rows, summed / scale)
        errors += host_errors
    return [call for host in hosts for call in host.calls], errors
