"""Averaging between the replicas of a cell: hosts that serve the same expert uid keep its parameters close.

Every ``host.replica_average_period`` seconds (jittered by 10%) a host looks up every live endpoint of the cells it
serves in the DHT and, for each cell with other replicas, sends them its parameters (``POST /replica/<uid>``). A
replica answers with its own parameters as they were before the exchange and moves to the pair's aggregate; the
initiator moves to the aggregate of itself and every replica that answered (:func:`aggregate`). The default,
``centered_clip`` (:mod:`lightning_moe.averaging.robust`), is the mean with each replica's pull clipped to a radius
that this host measures itself (how far its own training moved the cell since its last averaging, at least
``host.replica_clip_min`` of the cell's norm), so a lying replica moves a cell at most that far per exchange, also
with 2 replicas; honest replicas within the radius land on the pair's mean. ``median`` and ``trimmed_mean``
(coordinate-wise) outvote a minority of liars once a cell has 3 or more replicas; ``mean`` trusts everyone. A replica that does not answer within
``host.replica_average_timeout`` is skipped for that round, and the log says so. A host that was just averaged by
a replica (within half a period) does not start an exchange of that cell itself, so a pair exchanges once a period.

What is averaged: the expert's parameters only. The optimizer's state (Adam's moments) and buffers stay local; the
averaged values are added in place as ``aggregate - snapshot`` under the backend's lock, so an optimizer step is
never raced and the steps taken while an exchange was in flight are kept (as the trainers' averaging does).

The exchange reuses the trainers' averaging pieces: the message is :func:`lightning_moe.averaging.state.encode`
(names, shapes and dtypes in a JSON header, one flat tensor per dtype; no pickle), checked by
:func:`~lightning_moe.averaging.state.decode` against this host's own expert (names, shapes, dtypes, finite values,
at most the expert's size) and refused beyond ``host.replica_max_distance``; in a private swarm the request is
signed for the replica's host id (the one HTTP client and the one request check) and the answer carries
:func:`~lightning_moe.averaging.server.response_signature`. A refused request gets a 4xx JSON ``{"error": ...}``
saying why; one exchange per cell at a time (503 while one is in flight).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from aiohttp import web

import lightning_moe.averaging.state as state
from lightning_moe.averaging.robust import METHOD as CENTERED_CLIP
from lightning_moe.averaging.robust import ClipRadius, centered_clip, norm
from lightning_moe.averaging.server import signed_answer, verify_answer
from lightning_moe.averaging.state import Layout, RefusedState
from lightning_moe.client.remote_expert import host_id
from lightning_moe.net import http_client
from lightning_moe.server.backend import ExpertBackend
from lightning_moe.server.http_body import RequestError

logger = logging.getLogger(__name__)

PATH = "/replica/"
MAX_PEERS = 4  # replicas one host exchanges a cell with per round
JITTER = 0.1


def mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The plain mean of the replicas' values."""
    return torch.stack(list(values)).mean(dim=0)


def median(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise median (the mean of the two middle values for an even count)."""
    ordered = torch.stack(list(values)).sort(dim=0).values
    n = ordered.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The coordinate-wise mean without the lowest and highest quarter of the values (none below 4 replicas)."""
    ordered = torch.stack(list(values)).sort(dim=0).values
    cut = ordered.shape[0] // 4
    return ordered[cut:ordered.shape[0] - cut].mean(dim=0)


COORDINATE_WISE: dict[str, Callable[[Sequence[torch.Tensor]], torch.Tensor]] = {
    "mean": mean, "median": median, "trimmed_mean": trimmed_mean}
AGGREGATES = (CENTERED_CLIP, *COORDINATE_WISE)  # lightning_moe.config.REPLICA_AGGREGATES


def aggregate(replicas: Sequence[Sequence[torch.Tensor]], method: str = "mean",
              radius: float | None = None) -> list[torch.Tensor]:
    """One cell's parameters from several replicas' (each a list of flat tensors per dtype group, as
    :func:`~lightning_moe.averaging.state.snapshot` makes; ``replicas[0]`` is ours): ``method`` (:data:`AGGREGATES`),
    in float64 and back to each group's dtype. ``centered_clip`` clips each other replica's difference from ours to
    ``radius`` (absolute L2) before the mean. The one place that combines replicas."""
    if method == CENTERED_CLIP:
        if radius is None:
            raise ValueError("centered_clip needs a radius")
        return centered_clip(replicas[0], replicas[1:], radius)[0]
    combine = COORDINATE_WISE[method]
    return [combine([r[i].double() for r in replicas]).to(replicas[0][i].dtype) for i in range(len(replicas[0]))]


class ReplicaSync:
    """Averages the parameters of ``backends`` with their other live replicas (see the module's doc).

    Args:
        backends: ``{uid: ExpertBackend}`` this host serves.
        dht: anything with ``get_experts(uids, all_endpoints=True, timeout=...)``.
        endpoint: returns this host's announced endpoint (left out of a cell's replicas).
        period: seconds between rounds (0: never start one; requests are still answered).
        timeout: seconds a replica may take to answer.
        method: the aggregate (:data:`AGGREGATES`).
        max_distance: refuse a replica whose parameters are farther than this from ours (relative L2).
        secret: a private swarm's secret.
        clip_min / clip_factor: centered_clip's radius (:class:`~lightning_moe.averaging.robust.ClipRadius`): at
            least ``clip_min`` of the cell's norm and ``clip_factor`` times its own move since its last averaging.
    """

    def __init__(self, backends: Mapping[str, ExpertBackend], dht: Any, endpoint: Callable[[], str], period: float,
                 timeout: float = 10.0, method: str = CENTERED_CLIP, max_distance: float = 0.5,
                 secret: bytes | None = None, clip_min: float = 0.05, clip_factor: float = 2.0):
        if method not in AGGREGATES:
            raise ValueError(f"unknown aggregate {method!r}; choose one of {list(AGGREGATES)}")
        self.backends, self.dht, self.endpoint = dict(backends), dht, endpoint
        self.period, self.timeout, self.method = float(period), float(timeout), method
        self.max_distance, self.secret = float(max_distance), secret
        self.layouts = {uid: Layout.of(b.expert) for uid, b in self.backends.items()}
        self.limits = {uid: layout.message_bytes() for uid, layout in self.layouts.items()}
        self.radii = {uid: ClipRadius(clip_min, clip_factor) for uid in self.backends}
        self._exchanging = {uid: threading.Lock() for uid in self.backends}  # one exchange per cell at a time
        self._lock = threading.Lock()  # counters
        self.stats: Counter = Counter()  # rounds, initiated, answered, skipped, refused, busy, bytes, clipped
        self.last_sync: dict[str, float] = {}  # uid -> time.monotonic() of its last averaging
        self.last_distance: dict[str, float] = {}  # uid -> relative distance to the replica(s) before it
        self.last_radius: dict[str, float] = {}  # uid -> the clipping radius of its last averaging (relative; measured
        # with every aggregate, applied by centered_clip)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Own moves count from here (the cells as the host starts serving them); start the rounds (period > 0)."""
        for uid, backend in self.backends.items():
            if self.radii[uid].anchor is None:
                self.radii[uid].averaged(_snapshot(backend, self.layouts[uid]))
        if self.period > 0 and self._thread is None:
            sent = sum(layout.nbytes() for layout in self.layouts.values())  # each cell's leave about once a period
            logger.info("averaging %d cells (%.0f KB of parameters) with their replicas every %g s: about %.1f Mbit/s "
                        "each way while they have replicas; on a slow uplink raise host.replica_average_period",
                        len(self.backends), sent / 1024, self.period, sent * 8 / self.period / 1e6)
            self._thread = threading.Thread(target=self._loop, name="lightning_moe-replica-sync", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 5 if timeout is None else timeout)
            if self._thread.is_alive():
                logger.warning("thread %s did not stop in time", self._thread.name)

    def _loop(self) -> None:
        while not self._stop.wait(self.period * random.uniform(1 - JITTER, 1 + JITTER)):
            try:
                self.sync_once(skip_recent=True)
            except Exception:  # noqa: BLE001 - a bad round must not end the averaging
                logger.warning("replica averaging round failed", exc_info=True)

    # ---- initiating ---------------------------------------------------------------------------
    def replicas(self, uids: Sequence[str]) -> dict[str, list[str]]:
        """The other live replicas of each uid, as the DHT declares them (this host left out)."""
        found = self.dht.get_experts(list(uids), timeout=self.timeout, all_endpoints=True)
        own = self.endpoint()
        return {uid: [e for e in dict.fromkeys(endpoints or ()) if e != own][:MAX_PEERS] for uid, endpoints in zip(uids, found)}

    def sync_once(self, skip_recent: bool = False) -> dict[str, int]:
        """One round: average every served cell with its other live replicas; returns ``{uid: replicas that
        answered}`` for the cells that have other replicas. ``skip_recent``: leave out the cells averaged less than
        half a period ago."""
        now = time.monotonic()
        uids = [uid for uid in sorted(self.backends)
                if not (skip_recent and now - self.last_sync.get(uid, -1e18) < self.period / 2)]
        if not uids or self._stop.is_set():
            return {}
        try:
            peers = self.replicas(uids)
        except Exception as e:  # noqa: BLE001 - the DHT may hiccup; try again next round
            logger.warning("replica averaging: could not look up the replicas of %d cells: %s", len(uids), e)
            return {}
        return {uid: self._sync_cell(uid, endpoints) for uid, endpoints in peers.items()
                if endpoints and not self._stop.is_set()}

    def _sync_cell(self, uid: str, endpoints: Sequence[str]) -> int:
        lock = self._exchanging[uid]
        if not lock.acquire(blocking=False):
            return 0  # answering a replica right now: this cell is being averaged
        try:
            backend, layout = self.backends[uid], self.layouts[uid]
            ours = _snapshot(backend, layout)
            body = state.encode(layout, _outgoing(backend, ours), backend.update_count)
            theirs, reasons, nbytes = [], [], 0
            for endpoint in endpoints:
                try:
                    flats, received = self._exchange(endpoint, uid, body, ours)
                except (RefusedState, ReplicaError) as e:
                    reasons.append(f"{endpoint}: {e}")
                    continue
                theirs.append(flats)
                nbytes += len(body) + received
            if reasons:
                with self._lock:
                    self.stats["skipped"] += len(reasons)
                logger.info("%s: replica averaging skipped %d of %d replicas: %s", uid, len(reasons), len(endpoints),
                            "; ".join(reasons))
            if theirs:
                self._apply(uid, ours, theirs, nbytes, initiated=True)
            return len(theirs)
        finally:
            lock.release()

    def _exchange(self, endpoint: str, uid: str, body: bytes, ours: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        path = PATH + uid
        try:
            headers = {"Content-Type": "application/octet-stream",
                       **http_client.signed(self.secret, "POST", path, body, "none", host_id(endpoint, self.secret, self.timeout))}
            answer = http_client.request(endpoint, "POST", path, body, headers, self.timeout, max_answer_bytes=self.limits[uid])
        except Exception as e:  # noqa: BLE001 - transport errors and a failed /info alike: no answer in time
            raise ReplicaError(f"no answer: {e}") from e
        content = bytes(answer.body)
        if answer.status != 200:
            raise ReplicaError(f"HTTP {answer.status}: {content[:300].decode(errors='replace')}")
        verify_answer(self.secret, path, headers.get("X-Nonce", ""), answer.headers, content)
        flats, _ = state.decode(content, self.layouts[uid], self.limits[uid])
        self._check_distance(flats, ours)
        return flats, len(content)

    def _check_distance(self, theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> float:
        distance = state.relative_distance(theirs, ours)
        if distance > self.max_distance:
            raise RefusedState(f"parameters at relative distance {distance:.3g} from ours "
                               f"(limit host.replica_max_distance={self.max_distance:g})")
        return distance

    def _apply(self, uid: str, ours: list[torch.Tensor], theirs: list[list[torch.Tensor]], nbytes: int,
               initiated: bool) -> None:
        """Move the cell to the aggregate of ``ours`` and ``theirs``: add ``aggregate - ours`` in place, under the
        backend's lock (never during an optimizer step; steps taken since the snapshot are kept)."""
        radius = self.radii[uid].radius(ours)  # measured with every aggregate: /stats shows what clipping would do
        new = aggregate([ours, *theirs], self.method, radius)
        distances = [state.relative_distance(t, ours) for t in theirs]
        distance, scale = max(distances), max(norm(ours), 1e-12)
        clipped = sum(d * scale > radius for d in distances) if self.method == CENTERED_CLIP else 0
        self.radii[uid].averaged(new)
        backend = self.backends[uid]
        with backend.lock:
            state.apply_delta(backend.expert, self.layouts[uid], [n - o for n, o in zip(new, ours)])
        with self._lock:
            self.stats["rounds"] += 1
            self.stats["initiated" if initiated else "answered"] += 1
            self.stats["bytes"] += nbytes
            self.stats["clipped"] += clipped
            self.last_sync[uid], self.last_distance[uid] = time.monotonic(), distance
            self.last_radius[uid] = radius / scale
        logger.debug("%s: averaged with %d replicas (%s; relative distance before %.3g, radius %.3g, %d clipped)", uid,
                     len(theirs), "initiated" if initiated else "answered", distance, radius / scale, clipped)

    # ---- answering (the host's HTTP server) -----------------------------------------------------
    async def handle(self, server: Any, request: web.BaseRequest, uid: str) -> web.StreamResponse:
        """``POST /replica/<uid>`` on the host's server (``server``: its ExpertHTTPServer): checks, reads, verifies,
        then answers and averages on a worker thread; raises RequestError (a JSON error answer) saying why not."""
        if request.method != "POST":
            raise RequestError(405, f"use POST for {PATH}<uid>", uid, headers={"Allow": "POST"})
        if uid not in self.backends:
            raise RequestError(404, f"no expert {uid!r} on this host", uid)
        limit = self.limits[uid]
        length = request.content_length
        if request.headers.get("Transfer-Encoding") or length is None:
            raise RequestError(411, "replica: send Content-Length (no chunked bodies)", uid, close=True)
        if length > limit:
            raise RequestError(413, f"replica: body of {length} bytes exceeds the limit of {limit} (this expert's "
                                    "parameters)", uid, close=True)
        server.check_headers(request, post=True, uid=uid)
        if not server.budget.reserve(length):
            raise RequestError(503, "replica: the host is reading too many request bodies; retry later", uid, close=True,
                               headers={"Retry-After": "1"})
        try:
            try:
                body = await asyncio.wait_for(request.content.readexactly(length), server.limits.body_timeout)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                raise RequestError(408, f"replica: the body of {length} bytes did not arrive in time", uid,
                                   close=True) from None
            server.verify(request, body, uid)
            server.count_request("replica", uid)
            try:
                answer = await asyncio.get_running_loop().run_in_executor(None, self.answer, uid, body)
            except RefusedState as e:
                with self._lock:
                    self.stats["refused"] += 1
                logger.info("%s: refused a replica's parameters from %s: %s", uid, request.remote, e)
                raise RequestError(400, f"replica: refused: {e}", uid) from None
            except ReplicaBusy as e:
                raise RequestError(503, f"replica: {e}", uid, headers={"Retry-After": "1"}) from None
        finally:
            server.budget.release(length)
        return signed_answer(self.secret, request.raw_path, request.headers.get("X-Nonce", ""), answer)

    def answer(self, uid: str, body: bytes) -> bytes:
        """Our parameters for a replica's (``body``), then move to the pair's aggregate; raises RefusedState or
        ReplicaBusy. Runs on a worker thread."""
        layout = self.layouts[uid]
        theirs, _ = state.decode(body, layout, self.limits[uid])
        lock = self._exchanging[uid]
        if not lock.acquire(blocking=False):
            with self._lock:
                self.stats["busy"] += 1
            raise ReplicaBusy("busy: this cell is averaging with another replica")
        try:
            with self._lock:
                since = time.monotonic() - self.last_sync.get(uid, -1e18)
            if since < self.period / 2:  # anyone may ask: one exchange per half period bounds how far asking moves a cell
                with self._lock:
                    self.stats["busy"] += 1
                raise ReplicaBusy(f"busy: this cell was averaged {since:.1f} s ago (at most once per "
                                  f"{self.period / 2:g} s)")
            backend = self.backends[uid]
            ours = _snapshot(backend, layout)
            self._check_distance(theirs, ours)
            message = state.encode(layout, _outgoing(backend, ours), backend.update_count)
            self._apply(uid, ours, [theirs], len(body) + len(message), initiated=False)
            return message
        finally:
            lock.release()

    def report(self) -> dict:
        """What ``/stats`` says about the replicas' averaging: counters, and per cell the seconds since its last
        averaging and the relative distance before it."""
        now = time.monotonic()
        with self._lock:
            return {**{k: int(self.stats[k]) for k in ("rounds", "initiated", "answered", "skipped", "refused", "busy",
                                                       "bytes", "clipped")},
                    "period": self.period, "aggregate": self.method,
                    "cells": {uid: {"age": round(now - t, 3), "distance": self.last_distance.get(uid, 0.0),
                                    "radius": self.last_radius.get(uid, 0.0)} for uid, t in self.last_sync.items()}}


class ReplicaError(RuntimeError):
    """A replica did not answer, or answered with an error."""


class ReplicaBusy(RuntimeError):
    """The cell is averaging with another replica right now (answered 503)."""


def _snapshot(backend: ExpertBackend, layout: Layout) -> list[torch.Tensor]:
    with backend.lock:
        return state.snapshot(backend.expert, layout)


def _outgoing(backend: ExpertBackend, ours: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters we send a replica: ours, or a lying volunteer's lie (``host.byzantine``)."""
    if backend.answers is None:
        return ours
    with backend.lock:
        return backend.answers.parameters(backend.expert, ours)
