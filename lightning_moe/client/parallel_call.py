"""Many remote experts called at once, as one autograd Function, with k_min and timeout rules."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from lightning_moe.client.health import HealthRegistry
from lightning_moe.client.remote_expert import RemoteExpertError, call_backward, call_expert, new_keep_id
from lightning_moe.client.transport import CallHandle, TransportError

logger = logging.getLogger(__name__)
# Calls of one forward go out at once; a large grid may ask hundreds of experts, and at 200 ms a call holds its
# worker for the whole round trip. Given-up calls free their workers at once (see call_in_parallel).
MAX_CALLS_IN_FLIGHT = 128
_executors: dict[int, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


def get_executor() -> ThreadPoolExecutor:
    """The thread pool of this process that sends expert calls (recreated after a fork)."""
    pid = os.getpid()
    with _executors_lock:
        if pid not in _executors:
            _executors[pid] = ThreadPoolExecutor(max_workers=MAX_CALLS_IN_FLIGHT, thread_name_prefix="lightning_moe-call")
        return _executors[pid]


class NotEnoughExpertsError(RuntimeError):
    """Fewer than k_min experts answered for some sample; says which experts were tried and why each failed."""


@dataclass
class ExpertCall:
    """The rows of a batch routed to one expert, and the slot (0..k-1) each row holds them in."""

    uid: str
    endpoint: str
    rows: torch.Tensor
    slots: torch.Tensor
    keep: str | None = None  # the request id under which the host keeps this forward for its backward


@dataclass
class CallSettings:
    """How long to wait and how many answers are enough, in one direction; where to report health."""

    k_min: int = 1
    timeout: float | None = None
    timeout_after_k_min: float | None = None
    compression: str = "none"
    secret: bytes | None = None
    health: HealthRegistry | None = None
    max_call_bytes: int | None = None  # larger calls go out as several requests in parallel

    def report(self, call: ExpertCall, result: Any) -> None:
        """Tell the health registry how ``call`` went."""
        if self.health is not None:
            record_outcome(self.health, call.uid, call.endpoint, result)


def record_outcome(health: HealthRegistry, uid: str, endpoint: str, result: Any) -> None:
    """An answer; an error of the expert (the host answered 4xx/500, or a malformed answer); or of the host
    (no answer in time, 503/504, a refused connection: excluded at once)."""
    if not isinstance(result, BaseException):
        health.success(uid, endpoint)
    elif isinstance(result, RemoteExpertError) and result.status is not None and result.status not in (503, 504):
        health.expert_failure(uid, endpoint, str(result))
    else:
        cause = result.__cause__
        while isinstance(cause, RemoteExpertError):  # re-raised with the expert's uid
            cause = cause.__cause__
        refused = isinstance(cause, TransportError) and cause.refused
        health.host_failure(endpoint, str(result), refused=refused)


@dataclass
class CallStats:
    """What happened to the calls of one forward (and its backward)."""

    asked: int = 0
    answered: int = 0
    failed: int = 0
    timed_out: int = 0
    latency: float = 0.0
    backward_asked: int = 0
    backward_answered: int = 0
    backward_failed: int = 0
    errors: list[str] = field(default_factory=list)
    failed_endpoints: set[str] = field(default_factory=set)


def call_in_parallel(
    calls: list[ExpertCall],
    method: str,
    payloads: list[list[torch.Tensor]] | list[tuple[list[torch.Tensor], list[torch.Tensor]]],
    settings: CallSettings,
    deadline: float | None = None,
) -> list[list[torch.Tensor] | BaseException]:
    """Send every call at once; return each call's answer or the exception it failed with.

    A forward payload is the call's inputs (the host keeps the forward if ``call.keep`` is set); a
    backward payload is ``(inputs, grad_outputs)``, sent as :func:`call_backward` does.

    Waits until all calls answered, or ``timeout_after_k_min`` seconds after the first answer, or as long
    again as the first answer took if that is longer (so a slow link is not cut off; stragglers are then given up: a sample they leave short of ``k_min`` is the caller's to
    re-route), or until ``settings.timeout`` (or the earlier ``deadline``, a ``time.monotonic()``
    value) ran out. Calls still out then get TimeoutError.

    Waiting for every sample to reach ``k_min`` first, as hivemind does, lets one slow host
    stall every step in which some sample chose only its experts.
    """
    start = time.monotonic()
    ends = [deadline] if deadline is not None else []
    if settings.timeout is not None:
        ends.append(start + settings.timeout)
    hard_end = min(ends) if ends else None
    request_timeout = None if hard_end is None else max(hard_end - start, 1e-3)
    executor = get_executor()
    futures: dict[Future, int] = {}
    handles = [CallHandle() for _ in calls]
    for i, (c, p, handle) in enumerate(zip(calls, payloads, handles)):
        if method == "backward":
            future = executor.submit(call_backward, c.uid, c.endpoint, c.keep, *p, settings.compression, request_timeout,
                                     settings.secret, handle)
        else:
            future = executor.submit(call_expert, c.uid, c.endpoint, method, p, settings.compression, request_timeout,
                                     settings.secret, c.keep, handle)
        futures[future] = i
    results: list[Any] = [None] * len(calls)
    pending = set(futures)
    soft_end = None
    while pending:
        now = time.monotonic()
        end = min((t for t in (hard_end, soft_end) if t is not None), default=None)
        if end is not None and now >= end:
            break
        done, pending = wait(pending, timeout=None if end is None else end - now, return_when=FIRST_COMPLETED)
        for future in done:
            index = futures[future]
            try:
                results[index] = future.result()
            except Exception as e:  # noqa: BLE001 - every failure is reported per expert
                results[index] = e
                continue
            if soft_end is None and settings.timeout_after_k_min is not None:
                now = time.monotonic()
                soft_end = now + max(settings.timeout_after_k_min, now - start)
    for future in pending:  # given up: their sockets are shut down, so no worker waits for them any longer
        future.cancel()
        index = futures[future]
        handles[index].cancel()
        call = calls[index]
        results[index] = TimeoutError(f"expert {call.uid!r} at {call.endpoint}: no {method} answer in time")
    return results


@dataclass
class MixtureForward:
    """One forward's state: each sample's ``k_best`` slots, what answered in them, and what was tried."""

    outputs: torch.Tensor  # [batch, k_best, *out_shape]
    mask: torch.Tensor  # [batch, k_best]: the slot holds an answer
    coords: torch.Tensor  # [batch, k_best, grid dims]: the grid cell of each slot's expert
    stats: CallStats = field(default_factory=CallStats)
    answered: list[ExpertCall] = field(default_factory=list)
    tried: list[tuple[ExpertCall, BaseException | None]] = field(default_factory=list)
    tried_pairs: dict[int, set[tuple[str, str]]] = field(default_factory=dict)  # sample -> (uid, endpoint) asked

    @classmethod
    def empty(cls, batch: int, k_best: int, out_shape: tuple[int, ...], out_dtype: torch.dtype, grid_dims: int) -> "MixtureForward":
        return cls(torch.zeros(batch, k_best, *out_shape, dtype=out_dtype), torch.zeros(batch, k_best, dtype=torch.bool),
                   torch.zeros(batch, k_best, grid_dims, dtype=torch.long))

    def short(self, k_min: int) -> list[int]:
        """Samples with fewer than ``k_min`` answers."""
        return (self.mask.sum(1) < k_min).nonzero().flatten().tolist()

    def free_slots(self, sample: int) -> list[int]:
        return (~self.mask[sample]).nonzero().flatten().tolist()

    def plan(self, candidates: dict[int, list[tuple[str, str]]]) -> list[ExpertCall]:
        """One call per expert with the rows routed to it, each candidate in a free slot (not one tried before)."""
        samples, slots, keys = [], [], []
        for sample, pairs in candidates.items():
            tried = self.tried_pairs.setdefault(sample, set())
            fresh = [pair for pair in pairs if pair not in tried]
            for slot, pair in zip(self.free_slots(sample), fresh):
                samples.append(sample)
                slots.append(slot)
                keys.append(pair)
                tried.add(pair)
        if not keys:
            return []
        experts = list(dict.fromkeys(keys))
        position = {pair: i for i, pair in enumerate(experts)}
        expert_index = torch.tensor([position[pair] for pair in keys])
        samples_t, slots_t = torch.tensor(samples), torch.tensor(slots)
        cells = torch.tensor([[int(c) for c in uid.split(".")[1:]] for uid, _ in experts])
        self.coords[samples_t, slots_t] = cells[expert_index]
        order = torch.argsort(expert_index, stable=True)
        counts = torch.bincount(expert_index, minlength=len(experts)).tolist()
        return [
            ExpertCall(uid, endpoint, rows, expert_slots)
            for (uid, endpoint), rows, expert_slots in zip(experts, samples_t[order].split(counts), slots_t[order].split(counts))
        ]

    def call(self, calls: list[ExpertCall], x: torch.Tensor, settings: CallSettings, deadline: float | None) -> None:
        """Run every call's forward at once and write the answers into their rows' slots; with grad enabled the
        hosts keep the forwards for the backward."""
        if settings.max_call_bytes is not None and calls:
            row_bytes = max(x[0].numel() * x.element_size(), 1)
            calls = split_calls(calls, max(settings.max_call_bytes // row_bytes, 1))
        if torch.is_grad_enabled():
            for call in calls:
                call.keep = new_keep_id()
        payloads = [[x[call.rows]] for call in calls]
        begin = time.monotonic()
        results = call_in_parallel(calls, "forward", payloads, settings, deadline)
        self.stats.latency += time.monotonic() - begin
        out_shape = tuple(self.outputs.shape[2:])
        for call, result in zip(calls, results):
            self.stats.asked += 1
            if not isinstance(result, BaseException):
                output = result[0] if len(result) == 1 else None
                if output is None or tuple(output.shape) != (len(call.rows), *out_shape):
                    shape = None if output is None else tuple(output.shape)
                    result = RemoteExpertError(call.uid, call.endpoint, f"forward: answered shape {shape}, expected "
                                                                        f"{(len(call.rows), *out_shape)}", status=200)
            settings.report(call, result)
            if isinstance(result, BaseException):
                self.stats.timed_out += isinstance(result, TimeoutError)
                self.stats.failed += not isinstance(result, TimeoutError)
                self.stats.errors.append(str(result))
                self.stats.failed_endpoints.add(call.endpoint)
                self.tried.append((call, result))
                continue
            self.stats.answered += 1
            self.outputs[call.rows, call.slots] = output.to(self.outputs.dtype)
            self.mask[call.rows, call.slots] = True
            self.answered.append(call)
            self.tried.append((call, None))

    def check_k_min(self, k_min: int, excluded: Callable[[], list[str]]) -> None:
        """Raise NotEnoughExpertsError if a sample has fewer than ``k_min`` answers, naming what was tried
        for it and why each failed, or, if nothing was tried, what is excluded and why."""
        short = self.short(k_min)
        if not short:
            return
        sample = short[0]
        answers = int(self.mask[sample].sum())
        lines = [f"  {call.uid} at {call.endpoint}: {error or 'answered'}" for call, error in tried_by(self.tried, sample)]
        if not lines:
            reasons = excluded()
            lines = (["  none tried: every expert found in the DHT is excluded after errors:"] + [f"    {r}" for r in reasons[:8]]
                     if reasons else ["  (none found alive in the DHT)"])
        raise NotEnoughExpertsError(
            f"{len(short)} of {self.mask.shape[0]} samples got fewer than k_min={k_min} expert answers; "
            f"sample {sample} got {answers}, experts tried for it:\n" + "\n".join(lines)
        )


class RemoteMixtureCall(torch.autograd.Function):
    """Connects the experts' outputs (computed by :func:`call_forward`) to ``x`` for autograd.

    ``_dummy`` is a tensor that requires grad, so backward reaches the hosts (whose experts learn)
    even when ``x`` itself needs no gradient, e.g. when the layer sees the data directly.

    Backward sends each answered expert its rows of ``x`` and of the output gradient and adds
    up the input gradients. An expert whose backward fails drops its contribution and is counted.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        answered: list[ExpertCall],
        settings: CallSettings,
        stats: CallStats,
        outputs: list[torch.Tensor],
        _dummy: torch.Tensor,
        x: torch.Tensor,
    ) -> torch.Tensor:
        ctx.calls, ctx.backward_settings, ctx.stats = answered, settings, stats
        ctx.out_dtype = outputs[0].dtype
        ctx.save_for_backward(x)
        return outputs[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        calls: list[ExpertCall] = ctx.calls
        stats: CallStats = ctx.stats
        grad_outputs = grad_outputs.to(ctx.out_dtype)
        payloads = [([x[call.rows]], [grad_outputs[call.rows, call.slots]]) for call in calls]
        results = call_in_parallel(calls, "backward", payloads, ctx.backward_settings)
        grad_x = torch.zeros_like(x)
        answers = torch.zeros(x.shape[0], dtype=torch.long)
        for call, result in zip(calls, results):
            stats.backward_asked += 1
            ctx.backward_settings.report(call, result)
            if isinstance(result, BaseException) or len(result) != 1 or result[0].shape != x[call.rows].shape:
                stats.backward_failed += 1
                stats.errors.append(f"backward: {result}" if isinstance(result, BaseException) else f"backward: expert {call.uid!r} answered a wrong shape")
                continue
            stats.backward_answered += 1
            grad_x.index_add_(0, call.rows, result[0].to(x.dtype))
            answers[call.rows] += 1
        short = int((answers < ctx.backward_settings.k_min).sum())
        if short:
            logger.warning("backward: %d samples got fewer than backward_k_min=%d expert gradients; %d of %d calls failed",
                           short, ctx.backward_settings.k_min, stats.backward_failed, len(calls))
        return None, None, None, None, None, grad_x if ctx.needs_input_grad[5] else None


def split_calls(calls: list[ExpertCall], max_rows: int) -> list[ExpertCall]:
    """Calls of more than ``max_rows`` rows as several calls to the same expert (sent in parallel, each on its own
    connection: a large message on one connection costs a round trip per TCP window; the host batches them again)."""
    out = []
    for call in calls:
        if len(call.rows) <= max_rows:
            out.append(call)
            continue
        for rows, slots in zip(call.rows.split(max_rows), call.slots.split(max_rows)):
            out.append(ExpertCall(call.uid, call.endpoint, rows, slots))
    return out


def tried_by(tried: list[tuple[ExpertCall, BaseException | None]], sample: int) -> list[tuple[ExpertCall, BaseException | None]]:
    """The (call, error) pairs whose rows include ``sample``."""
    return [(call, error) for call, error in tried if bool((call.rows == sample).any())]
