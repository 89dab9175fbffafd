"""Many remote experts called at once, with the straggler cut-off; planning the calls; what outcomes tell the health
registry. :mod:`lightning_moe.client.dispatch` uses these for a layer's forward and backward."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lightning_moe.client.call_stats import CallStats
from lightning_moe.client.health import HealthRegistry
from lightning_moe.client.links import LinkRates
from lightning_moe.client.remote_expert import RemoteExpertError, call_backward, call_expert
from lightning_moe.client.speed import HostSpeeds, StragglerWait
from lightning_moe.net.http_client import CallHandle, TransportError
from lightning_moe.process import context

# Calls of one forward go out at once; a large grid may ask hundreds of experts, and at 200 ms a call holds its
# worker for the whole round trip. Given-up calls free their workers at once (see call_in_parallel).
MAX_CALLS_IN_FLIGHT = 128
#: Given-up calls left running to measure their host (more are cancelled): a very slow host must not hold the
#: workers that the next steps' calls need.
MAX_LATE_CALLS = MAX_CALLS_IN_FLIGHT // 4
#: Seconds a request's own timeout waits beyond the wait's end (the wait cancels it first).
REQUEST_TIMEOUT_GRACE = 1.0


def get_executor() -> ThreadPoolExecutor:
    """The thread pool of this process that sends expert calls (recreated after a fork)."""
    return context().get("call_executor", lambda: ThreadPoolExecutor(max_workers=MAX_CALLS_IN_FLIGHT,
                                                                     thread_name_prefix="lightning_moe-call"))


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


class GivenUp(TimeoutError):
    """A call still out when the batch stopped waiting for stragglers: the host is slow, not failing."""


def record_outcome(health: HealthRegistry, uid: str, endpoint: str, result: Any) -> None:
    """An answer; an error of the expert (the host answered 4xx/500, or a malformed answer); or of the host
    (no answer before the timeout, 503/504, a refused connection: excluded at once). A straggler given up
    (:class:`GivenUp`) counts in the host's speed estimate (see :func:`call_in_parallel`), not against its health;
    a host that sheds load (503 with Retry-After) is left alone for that long, not counted as failing either."""
    if isinstance(result, GivenUp):
        return
    if isinstance(result, RemoteExpertError) and result.status == 503 and result.retry_after is not None:
        health.host_busy(endpoint, result.retry_after, str(result))
        return
    if not isinstance(result, BaseException):
        health.success(uid, endpoint)
    elif isinstance(result, RemoteExpertError) and result.status is not None and result.status not in (503, 504):
        health.expert_failure(uid, endpoint, str(result))
    else:
        refused = is_refused(result)
        health.host_failure(endpoint, f"endpoint {endpoint} refused the connection" if refused else str(result), refused=refused)


def is_refused(error: BaseException) -> bool:
    """True when ``error`` is (or was caused by) a refused connection: nobody listens at the endpoint (a host that
    left, or a stranger's record pointing at a closed port)."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, TransportError):
        cause = cause.__cause__
    return cause is not None and cause.refused


@dataclass
class Job:
    """One request of :func:`run_in_parallel`: to ``endpoint`` about ``rows`` rows, for the experts ``label`` names;
    ``send(timeout, handle)`` makes it and returns its answer."""

    endpoint: str
    rows: int
    label: str
    send: Callable[[float | None, CallHandle], Any]


def call_in_parallel(
    calls: list[ExpertCall],
    method: str,
    payloads: list[list[torch.Tensor]] | list[tuple[list[torch.Tensor], list[torch.Tensor]]],
    timeout: float | None = None,
    wait: StragglerWait | None = None,
    compression: str | Sequence[str] = "none",
    secret: bytes | None = None,
    deadline: float | None = None,
    links: LinkRates | None = None,
    traffic: CallStats | None = None,
) -> list[list[torch.Tensor] | BaseException]:
    """Send every call at once, one request per expert (:func:`run_in_parallel`); return each call's answer or the
    exception it failed with.

    A forward payload is the call's inputs (the host keeps the forward if ``call.keep`` is set); a
    backward payload is ``(inputs, grad_outputs)``, sent as :func:`call_backward` does. ``compression`` is one codec
    for every call or one per call.
    """
    codecs = [compression] * len(calls) if isinstance(compression, str) else list(compression)
    jobs = []
    for c, p, codec in zip(calls, payloads, codecs):
        if method == "backward":
            send = functools.partial(_backward, c, p, codec, secret)
        else:
            send = functools.partial(_forward, c, method, p, codec, secret)
        jobs.append(Job(c.endpoint, len(c.rows), f"expert {c.uid!r}", send))
    return run_in_parallel(jobs, method, timeout, wait, deadline, links, traffic)


def _forward(c: ExpertCall, method: str, tensors: list[torch.Tensor], codec: str, secret: bytes | None,
             timeout: float | None, handle: CallHandle) -> list[torch.Tensor]:
    return call_expert(c.uid, c.endpoint, method, tensors, codec, timeout, secret, c.keep, handle)


def _backward(c: ExpertCall, payload: tuple[list[torch.Tensor], list[torch.Tensor]], codec: str, secret: bytes | None,
              timeout: float | None, handle: CallHandle) -> list[torch.Tensor]:
    return call_backward(c.uid, c.endpoint, c.keep, *payload, codec, timeout, secret, handle)


def run_in_parallel(
    jobs: list[Job],
    method: str,
    timeout: float | None = None,
    wait: StragglerWait | None = None,
    deadline: float | None = None,
    links: LinkRates | None = None,
    traffic: CallStats | None = None,
) -> list[Any]:
    """Make every request at once; return each one's answer or the exception it failed with.

    Waits until all answered, or until ``timeout`` (or the earlier ``deadline``, a ``time.monotonic()``
    value) ran out: requests still out then get TimeoutError. With ``wait``, once the first answered, the others
    are waited for only until ``wait.end(...)`` (see :class:`StragglerWait`); stragglers then get :class:`GivenUp`
    (a sample they leave short of ``k_min`` is the caller's to re-route). Each answer's time, and each straggler's
    wait, goes to ``wait.speeds``; each answer's bytes and network time to ``links``; the bytes sent and received to
    ``traffic`` (``bytes_up``, ``bytes_down``).

    Waiting for every sample to reach ``k_min`` first, as hivemind does, lets one slow host
    stall every step in which some sample chose only its experts.
    """
    start = time.monotonic()
    ends = [deadline] if deadline is not None else []
    if timeout is not None:
        ends.append(start + timeout)
    hard_end = min(ends) if ends else None
    # the requests' own timeout comes later than hard_end, so that this loop, not a racing worker, reports it;
    # then it cancels them
    request_timeout = None if hard_end is None else max(hard_end - start, 1e-3) + REQUEST_TIMEOUT_GRACE
    executor = get_executor()
    futures: dict[Future, int] = {}
    handles = [CallHandle() for _ in jobs]
    for i, (job, handle) in enumerate(zip(jobs, handles)):
        futures[executor.submit(job.send, request_timeout, handle)] = i
    speeds = None if wait is None else wait.speeds
    results: list[Any] = [None] * len(jobs)
    answered: dict[str, list] = {}  # endpoint -> [bytes, seconds to its last answer, host seconds (None: unknown)]
    pending = set(futures)
    soft_end, first = None, None
    while pending:
        now = time.monotonic()
        end = min((t for t in (hard_end, soft_end) if t is not None), default=None)
        if end is not None and now >= end:
            break
        done, pending = wait_futures(pending, timeout=None if end is None else end - now, return_when=FIRST_COMPLETED)
        now = time.monotonic()
        for future in done:
            index = futures[future]
            try:
                results[index] = future.result()
            except Exception as e:  # noqa: BLE001 - every failure is reported per request
                results[index] = e
                continue
            if speeds is not None:
                speeds.answered(jobs[index].endpoint, now - start, jobs[index].rows, method)
            if links is not None:
                _add_answer(answered, jobs[index].endpoint, handles[index], now - start)
        if first is None and any(r is not None and not isinstance(r, BaseException) for r in results):
            first = now
        if first is not None and wait is not None and not wait.waits_for_all and pending and done:
            soft_end = wait.end(start, first, [jobs[futures[f]].endpoint for f in pending])
    now = time.monotonic()
    for endpoint, (nbytes, seconds, host_seconds) in answered.items():
        links.measured(endpoint, nbytes, seconds, host_seconds)
    if traffic is not None:
        traffic.bytes_up += sum(handle.sent_bytes for handle in handles)
        traffic.bytes_down += sum(handle.received_bytes for handle in handles)
    given_up = soft_end is not None and (hard_end is None or soft_end < hard_end)
    for future in pending:
        index = futures[future]
        job = jobs[index]
        if given_up:
            results[index] = GivenUp(f"{job.label} at {job.endpoint}: no {method} answer within "
                                     f"{now - start:.3f} s, when the other answers had come (a slow host)")
            if speeds is not None:
                speeds.gave_up(job.endpoint, method)
                late = _late_calls()
                if late.acquire(blocking=False):  # left to finish so that its answer time is measured
                    future.add_done_callback(functools.partial(_measure_late, speeds, job, method, start, late))
                    continue
        else:
            results[index] = TimeoutError(f"{job.label} at {job.endpoint}: no {method} answer in time")
        future.cancel()  # the socket is shut down, so no worker waits for it any longer
        handles[index].cancel()
    return results


def _add_answer(answered: dict[str, list], endpoint: str, handle: CallHandle, seconds: float) -> None:
    """Count an answered request in its host's link measurement. The requests to one host share its link, so the link
    is measured over all of them (their bytes over the time to the last answer, less the host's longest time), not
    per request: each of n requests at once would see about 1/n of the link's rate."""
    entry = answered.setdefault(endpoint, [0, 0.0, 0.0])
    entry[0] += handle.sent_bytes + handle.received_bytes
    entry[1] = max(entry[1], seconds)
    entry[2] = None if entry[2] is None or handle.host_seconds is None else max(entry[2], handle.host_seconds)


def _late_calls() -> threading.BoundedSemaphore:
    """This process's slots for given-up calls left running (at most MAX_LATE_CALLS)."""
    return context().get("late_calls", lambda: threading.BoundedSemaphore(MAX_LATE_CALLS))


def _measure_late(speeds: HostSpeeds, job: Job, method: str, start: float, slots: threading.BoundedSemaphore,
                  future: Future) -> None:
    """A given-up request's answer came after all: its time still tells how fast the host is."""
    slots.release()
    if not future.cancelled() and future.exception() is None:
        speeds.answered(job.endpoint, time.monotonic() - start, job.rows, method)


def plan_calls(candidates: dict[int, list[tuple[str, str]]], mask: torch.Tensor, coords: torch.Tensor,
               asked: dict[int, set[Any]]) -> list[ExpertCall]:
    """One call per expert with the rows routed to it: each sample's candidates ``(uid, endpoint)``, best first, go to
    its free slots (``~mask[sample]``) unless ``asked[sample]`` holds the pair or its uid already (an expert is asked
    once per sample, at one of its replicas, unless :func:`forget_uid` let another replica be asked). Records the
    slots' grid cells in ``coords`` and the new candidates (pair and uid) in ``asked``."""
    samples, slots, keys = [], [], []
    free_rows = (~mask).tolist()  # one conversion, not a tensor op per sample
    for sample, pairs in candidates.items():
        tried = asked.setdefault(sample, set())
        free = [slot for slot, is_free in enumerate(free_rows[sample]) if is_free]
        taken = 0
        for pair in pairs:
            if taken == len(free):
                break
            if pair in tried or pair[0] in tried:
                continue
            samples.append(sample)
            slots.append(free[taken])
            keys.append(pair)
            tried.update((pair, pair[0]))
            taken += 1
    if not keys:
        return []
    experts = list(dict.fromkeys(keys))
    position = {pair: i for i, pair in enumerate(experts)}
    expert_index = torch.tensor([position[pair] for pair in keys])
    samples_t, slots_t = torch.tensor(samples), torch.tensor(slots)
    cells = torch.tensor([[int(c) for c in uid.split(".")[1:]] for uid, _ in experts])
    coords[samples_t, slots_t] = cells[expert_index]
    order = torch.argsort(expert_index, stable=True)
    counts = torch.bincount(expert_index, minlength=len(experts)).tolist()
    return [
        ExpertCall(uid, endpoint, rows, expert_slots)
        for (uid, endpoint), rows, expert_slots in zip(experts, samples_t[order].split(counts), slots_t[order].split(counts))
    ]


def check_k_min(mask: torch.Tensor, tried: list[tuple[ExpertCall, BaseException | None]], k_min: int,
                excluded: Callable[[], list[str]]) -> None:
    """Raise NotEnoughExpertsError if a sample has fewer than ``k_min`` answers (``mask``), naming what was ``tried``
    for it and why each failed, or, if nothing was tried, what is ``excluded()`` and why."""
    short = (mask.sum(1) < k_min).nonzero().flatten().tolist()
    if not short:
        return
    sample = short[0]
    lines = [f"  {call.uid} at {call.endpoint}: {error or 'answered'}" for call, error in tried
             if bool((call.rows == sample).any())]
    if not lines:
        reasons = excluded()
        lines = (["  none tried: every expert found in the DHT is excluded after errors:"] + [f"    {r}" for r in reasons[:8]]
                 if reasons else ["  (none found alive in the DHT)"])
    raise NotEnoughExpertsError(
        f"{len(short)} of {mask.shape[0]} samples got fewer than k_min={k_min} expert answers; "
        f"sample {sample} got {int(mask[sample].sum())}, experts tried for it:\n" + "\n".join(lines)
    )


def forget_uid(asked: dict[int, set[Any]], call: ExpertCall) -> None:
    """The call failed: its rows may ask its expert again at another replica (never at the same endpoint)."""
    for sample in call.rows.tolist():
        asked.get(sample, set()).discard(call.uid)


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
