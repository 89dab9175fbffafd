"""Averager: gossip averaging of one module's parameters with the other trainers of a run.

Threads and who touches what:

- the *training thread* owns the module: at each step boundary it calls :meth:`Averager.step_boundary`,
  which applies the result of a finished exchange (in place, so the optimizer's state stays attached
  to the parameters) and, when asked, publishes a CPU snapshot of the parameters;
- the *gossip thread* declares this trainer in the DHT (unless it is in client mode) and runs the
  exchanges this trainer initiates with peers picked at random;
- the *server thread* (:class:`~.server.AveragingServer`) answers peers' exchanges and joiners.

One exchange at a time: while one is in flight, peers that ask get 503 (they try someone else); an
answer waits for the trainer's next step boundary, which applies the last result before it snapshots. Averaging is symmetric and
pairwise: both sides add half of (peer - own snapshot), so both land at the pair's mean plus the
steps they took while the exchange ran. With ``aggregate="centered_clip"`` (the default) each side first clips
(peer - own snapshot) to a radius it measures itself (:mod:`.robust`), so a lying peer pulls it a bounded amount.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter
from typing import Any

import torch
from torch import nn

from lightning_moe.net import http_client, resolve_binding
from lightning_moe.dht.records import is_valid_endpoint

import lightning_moe.averaging.state as state
from .robust import METHOD as CENTERED_CLIP
from .robust import ClipRadius
from .server import AveragingServer, Unavailable, verify_answer
from .state import RefusedState

logger = logging.getLogger(__name__)

KEY_PREFIX = "averaging:"


def run_key(run_id: str) -> str:
    """The DHT key under which the trainers of run ``run_id`` declare their averaging endpoints."""
    return KEY_PREFIX + run_id


class PeerError(RuntimeError):
    """One exchange with one peer failed (no answer, an error status, a bad answer)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Averager:
    """Averages ``module``'s parameters with the trainers declared under ``averaging:{run_id}`` in ``dht``.

    Args:
        module: whose parameters (all of them) are averaged.
        run_id: trainers with the same run id average together.
        dht: this process's DHT node (``lightning_moe.shared.process_dht``), or None (no peers).
        client_mode: only initiate (behind NAT); no server, not declared, never asked.
        host / port / announce_host: the server's bind address and the address peers are told (None: as
            :func:`lightning_moe.net.resolve_binding` decides from the DHT node's address).
        secret: a private swarm's secret (signs requests and answers).
        max_distance: refuse a peer whose parameters are farther than this from ours
            (``||peer - ours|| / ||ours||``), and leave that peer out for ``ban_seconds``.
        timeout: seconds an exchange or a download may take.
        compression: wire compression of the parameters (none or float16).
        declare_ttl: lifetime of this trainer's DHT entry (re-declared every third of it).
        snapshot_wait: how long an answer waits for the trainer's next step boundary (fresh parameters).
        outer_lr / outer_momentum: 1 and 0: plain averaging (move to the pair's mean). Otherwise a
            DiLoCo-style outer step: the pseudo-gradient ``anchor - mean`` (anchor: our parameters after
            the previous outer step) goes through Nesterov momentum with this learning rate.
        aggregate / clip_min / clip_factor: ``centered_clip`` clips the peer's pull to a radius of at least
            ``clip_min`` of our parameters' norm and ``clip_factor`` times our own move since our last averaging
            (:class:`~.robust.ClipRadius`); ``mean`` trusts every peer.
    """

    def __init__(self, module: nn.Module, run_id: str, dht: Any, client_mode: bool = False, host: str | None = None,
                 port: int = 0, announce_host: str | None = None, secret: bytes | None = None, max_distance: float = 0.5,
                 ban_seconds: float = 60.0, timeout: float = 10.0, compression: str = "none", declare_ttl: float = 30.0,
                 snapshot_wait: float = 2.0, outer_lr: float = 1.0, outer_momentum: float = 0.0,
                 aggregate: str = CENTERED_CLIP, clip_min: float = 0.05, clip_factor: float = 2.0):
        if aggregate not in (CENTERED_CLIP, "mean"):
            raise ValueError(f"unknown aggregate {aggregate!r}; choose {CENTERED_CLIP} or mean")
        self.module, self.run_id, self.key, self.dht = module, run_id, run_key(run_id), dht
        self.layout = state.Layout.of(module)
        self.client_mode, self.secret, self.compression = client_mode, secret, compression
        self.max_distance, self.ban_seconds, self.timeout = float(max_distance), float(ban_seconds), float(timeout)
        self.declare_ttl, self.snapshot_wait = float(declare_ttl), float(snapshot_wait)
        self.max_body = self.layout.message_bytes()
        self.stats: Counter = Counter()  # rounds, initiated, answered, refused, failed, busy, bytes_total, clipped
        self.clip = ClipRadius(clip_min, clip_factor) if aggregate == CENTERED_CLIP else None
        self.last: dict[str, float] = {}  # bytes, seconds, distance of the last exchange
        self.banned: dict[str, float] = {}
        self._cond = threading.Condition()
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_step, self._version, self._wanted = 0, 0, False
        self._boundary = -1  # the step of the last step boundary
        self._exchanging = False  # an exchange is in flight (initiated or answered)
        # (the pair's mean, the snapshot it was computed from), applied at the next step boundary
        self._pending: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self.outer_lr, self.outer_momentum = float(outer_lr), float(outer_momentum)
        self._anchor: list[torch.Tensor] | None = None  # DiLoCo-style: parameters after the last outer step
        self._momentum_buffer: list[torch.Tensor] | None = None
        self._rounds: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self.server: AveragingServer | None = None
        self.endpoint: str | None = None
        if not client_mode:
            own = getattr(dht, "address", None)  # None (auto): loopback when our DHT node is on loopback
            binding = resolve_binding(host, announce_host, [own] if own else [])
            self.server = AveragingServer(self._answer_average, self._answer_state, self.max_body, host=binding.host,
                                          port=port, secret=secret, on_refused=self._count_refused)
            self.endpoint = f"{binding.announce}:{self.server.port}"
        self._thread = threading.Thread(target=self._gossip_loop, name="lightning_moe.averaging.gossip", daemon=True)
        self._thread.start()

    # ---- the training thread ------------------------------------------------------------------
    def step_boundary(self, step: int, start_round: bool = False) -> bool:
        """Apply a finished exchange's result; publish a snapshot if a peer or a new round needs one.
        Returns True if parameters changed. Call between optimizer steps, on the training thread."""
        with self._cond:
            pending, self._pending = self._pending, None
            wanted = self._wanted or pending is not None
            self._boundary = int(step)
        delta = None if pending is None else self._outer_step(*pending)
        if delta is not None:
            state.apply_delta(self.module, self.layout, delta)
        if wanted or start_round:
            self.publish(step)  # after the delta: a later exchange starts from the averaged parameters
        if start_round and self.dht is not None:
            try:
                self._rounds.put_nowait(step)
            except queue.Full:
                pass  # the previous round has not started yet
        return delta is not None

    @property
    def plain(self) -> bool:
        """True for plain averaging (no outer optimizer)."""
        return self.outer_lr == 1.0 and self.outer_momentum == 0.0

    def _outer_step(self, mean: list[torch.Tensor], ours: list[torch.Tensor]) -> list[torch.Tensor]:
        """What to add to the parameters: ``mean - ours`` (plain), or a Nesterov outer step from the anchor."""
        if self.plain or self._anchor is None:
            return [m - o for m, o in zip(mean, ours)]
        gradient = [a - m for a, m in zip(self._anchor, mean)]
        mu = self.outer_momentum
        if self._momentum_buffer is None:
            self._momentum_buffer = [torch.zeros_like(g) for g in gradient]
        self._momentum_buffer = [mu * b + g for b, g in zip(self._momentum_buffer, gradient)]
        new = [a - self.outer_lr * (g + mu * b) for a, g, b in zip(self._anchor, gradient, self._momentum_buffer)]
        self._anchor = new
        return [n - o for n, o in zip(new, ours)]

    def find_reachability(self) -> None:
        """Ask DHT peers to dial the server's port back: reached, declare the public address they see; not
        reached (behind NAT), stop answering and only initiate exchanges."""
        if self.server is None or self.dht is None:
            return
        port, public = self.server.port, self.dht.observed_address()
        if public is not None and self.dht.check_reachable([port], udp=False)[f"tcp:{port}"]:
            self.endpoint = f"{public}:{port}"
            logger.info("averaging: peers reach this trainer at %s", self.endpoint)
            return
        logger.info("averaging: strangers cannot reach port %d (NAT or firewall): this trainer initiates "
                    "exchanges and answers none", port)
        self.client_mode, self.endpoint = True, None
        server, self.server = self.server, None
        server.stop()

    def publish(self, step: int) -> None:
        """Snapshot the parameters (CPU copy) for answers and exchanges."""
        flats = state.snapshot(self.module, self.layout)
        if not self.plain and self._anchor is None:
            self._anchor = [f.clone() for f in flats]
        if self.clip is not None and self.clip.anchor is None:
            self.clip.averaged(flats)  # own moves count from the first snapshot (or the downloaded parameters)
        with self._cond:
            self._snapshot, self._snapshot_step = flats, int(step)
            self._boundary = int(step)  # publishing happens at a step boundary (or before the first step)
            self._version += 1
            self._wanted = False
            self._cond.notify_all()

    def load_from_peers(self) -> int | None:
        """Download the parameters of the most advanced declared peer into the module (in place);
        returns its global step, or None when no peer answered with valid parameters."""
        for endpoint in self._peers(order_by_step=True)[:3]:
            try:
                flats, step, _ = self._request(endpoint, "GET", "/state", b"")
            except (PeerError, RefusedState) as e:
                logger.warning("could not load parameters from %s: %s", endpoint, e)
                continue
            state.load(self.module, self.layout, flats)
            self._anchor = None  # the outer step starts from the downloaded parameters (set by the next publish)
            if self.clip is not None:
                self.clip.anchor = None
            logger.info("loaded parameters of run %r from %s (step %d)", self.run_id, endpoint, step)
            return step
        return None

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs: the outer step's anchor and momentum buffer (None until they exist, and
        always in plain averaging) and the cumulative counters. Call on the training thread."""
        with self._cond:
            stats = dict(self.stats)
        return {"anchor": _clone(self._anchor), "momentum_buffer": _clone(self._momentum_buffer), "stats": stats}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (before the first step boundary); ValueError if it is another model's."""
        want = [(sum(self.layout.numel(i) for i in indices),) for _, indices in self.layout.groups]
        for key in ("anchor", "momentum_buffer"):
            if saved.get(key) is not None and [tuple(f.shape) for f in saved[key]] != want:
                raise ValueError(f"the checkpoint's averaging {key} has shapes {[tuple(f.shape) for f in saved[key]]}, "
                                 f"this model's are {want}")
        self._anchor, self._momentum_buffer = _clone(saved.get("anchor")), _clone(saved.get("momentum_buffer"))
        with self._cond:
            self.stats = Counter(saved.get("stats", {}))

    # ---- the gossip thread ---------------------------------------------------------------------
    def _gossip_loop(self) -> None:
        next_declare = 0.0
        while not self._stop.is_set():
            if (self.endpoint is not None and self.dht is not None and self._snapshot is not None
                    and time.monotonic() >= next_declare):
                next_declare = time.monotonic() + self.declare_ttl / 3
                self._declare()
            try:
                wait = 0.1 if next_declare == 0.0 else max(0.05, min(1.0, next_declare - time.monotonic()))
                self._rounds.get(timeout=wait)  # until declared once, look often: declare right after the first snapshot
            except queue.Empty:
                continue
            if not self._stop.is_set():
                self._round()

    def _declare(self) -> None:
        try:
            self.dht.store(self.key, self.endpoint, int(self._snapshot_step), time.time() + self.declare_ttl,
                           timeout=self.timeout)
        except Exception as e:  # noqa: BLE001 - a DHT hiccup must not stop the gossip thread
            logger.warning("could not declare averaging endpoint %s: %s", self.endpoint, e)

    def _peers(self, order_by_step: bool = False) -> list[str]:
        if self.dht is None:
            return []
        try:
            entries = self.dht.get(self.key, timeout=self.timeout)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not look up averaging peers: %s", e)
            return []
        now = time.monotonic()
        peers = [(endpoint, value) for endpoint, (value, _) in entries.items()
                 if endpoint != self.endpoint and is_valid_endpoint(endpoint) and self.banned.get(endpoint, 0) <= now]
        random.shuffle(peers)
        if order_by_step:
            peers.sort(key=lambda p: p[1] if isinstance(p[1], int) and not isinstance(p[1], bool) else -1, reverse=True)
        return [endpoint for endpoint, _ in peers]

    def _round(self) -> None:
        """Exchange with one random peer (a second one if the first is busy or gone)."""
        peers = self._peers()
        for endpoint in peers[:2]:
            if not self._begin(wait=self.snapshot_wait):
                return  # answering a peer (that is this round's exchange), or the trainer stopped stepping
            with self._cond:
                ours, step = self._snapshot, self._snapshot_step
            started = time.perf_counter()
            try:
                body = state.encode(self.layout, ours, step, self.compression)
                theirs, _, received = self._request(endpoint, "POST", "/average", body, reference=ours)
            except RefusedState as e:
                self._end(None)
                self._count_refused(str(e))
                self.banned[endpoint] = time.monotonic() + self.ban_seconds
                logger.warning("refused parameters of %s (left out for %.0f s): %s", endpoint, self.ban_seconds, e)
                return
            except PeerError as e:
                self._end(None)
                busy = e.status == 503
                with self._cond:
                    self.stats["busy" if busy else "failed"] += 1
                if not busy:  # gone or broken: its DHT entry outlives it until it expires
                    self.banned[endpoint] = time.monotonic() + min(self.ban_seconds, self.declare_ttl)
                logger.info("averaging with %s failed: %s", endpoint, e)
                continue
            except Exception:  # noqa: BLE001
                self._end(None)
                logger.exception("averaging with %s failed", endpoint)
                return
            self._end((self._combine(theirs, ours), ours), len(body) + received, time.perf_counter() - started,
                      initiated=True, distance=state.relative_distance(theirs, ours))
            return

    def _request(self, endpoint: str, method: str, path: str, body: bytes,
                 reference: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], int, int]:
        headers = {"Content-Type": "application/octet-stream", **http_client.signed(self.secret, method, path, body)}
        try:
            response = http_client.request(endpoint, method, path, body or None, headers, self.timeout,
                                           max_answer_bytes=self.max_body)
        except http_client.TransportError as e:
            raise PeerError(str(e)) from e
        content = bytes(response.body)
        if response.status != 200:
            raise PeerError(f"HTTP {response.status}: {content[:300]!r}", response.status)
        verify_answer(self.secret, path, headers.get("X-Nonce", ""), response.headers, content)
        flats, step = state.decode(content, self.layout, self.max_body)
        if reference is not None:
            self._check_distance(flats, reference)
        return flats, step, len(content)

    def _combine(self, theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pair's mean, or with centered clipping ours plus half the clipped pull (runs inside an exchange)."""
        if self.clip is None:
            return [(t + o) / 2 for t, o in zip(theirs, ours)]
        result, clipped = self.clip.combine(ours, [theirs])
        with self._cond:
            self.stats["clipped"] += clipped
        return result

    def _check_distance(self, theirs: list[torch.Tensor], ours: list[torch.Tensor]) -> None:
        distance = state.relative_distance(theirs, ours)
        if distance > self.max_distance:
            raise RefusedState(f"parameters at relative distance {distance:.3g} from ours (limit {self.max_distance})")

    # ---- the server thread ---------------------------------------------------------------------
    def _fresh_snapshot(self) -> tuple[list[torch.Tensor], int]:
        """The snapshot of the last step boundary if one was taken there, else ask the training thread for one at
        its next boundary (the latest snapshot if none comes in time)."""
        with self._cond:
            if self._snapshot is not None and self._snapshot_step == self._boundary and self._pending is None:
                return self._snapshot, self._snapshot_step
            version = self._version
            self._wanted = True
            self._cond.wait_for(lambda: self._version != version or self._stop.is_set(), timeout=self.snapshot_wait)
            if self._snapshot is None:
                raise Unavailable("this trainer has no parameters to share yet")
            return self._snapshot, self._snapshot_step

    def _answer_average(self, body: bytes) -> bytes:
        started = time.perf_counter()
        theirs, _ = state.decode(body, self.layout, self.max_body)  # raises RefusedState
        if not self._begin(wait=0.0, answering=True):
            with self._cond:
                self.stats["busy"] += 1
            raise Unavailable("busy with another exchange")
        try:
            ours, step = self._fresh_snapshot()  # the next step boundary applies any pending result first
            with self._cond:
                if self._pending is not None:
                    self.stats["busy"] += 1
                    raise Unavailable("busy: the last exchange's result is not applied yet")
            self._check_distance(theirs, ours)
            answer = state.encode(self.layout, ours, step, self.compression)
        except BaseException:
            self._end(None)
            raise
        self._end((self._combine(theirs, ours), ours), len(body) + len(answer), time.perf_counter() - started,
                  initiated=False, distance=state.relative_distance(theirs, ours))
        return answer

    def _answer_state(self) -> bytes:
        ours, step = self._fresh_snapshot()
        return state.encode(self.layout, ours, step, self.compression)

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _begin(self, wait: float, answering: bool = False) -> bool:
        """Start an exchange: none in flight, and (for an initiator) no result waiting to be applied,
        so that our snapshot holds every result applied so far."""
        def ready() -> bool:
            return not self._exchanging and (answering or self._pending is None)

        with self._cond:
            if not self._cond.wait_for(lambda: ready() or self._stop.is_set(), timeout=wait) or self._stop.is_set():
                return False
            if self._snapshot is None:
                return False
            self._exchanging = True
            return True

    def _end(self, delta: tuple[list[torch.Tensor], list[torch.Tensor]] | None, nbytes: int = 0, seconds: float = 0.0, initiated: bool = False,
             distance: float = 0.0) -> None:
        with self._cond:
            self._exchanging = False
            self._cond.notify_all()
            if delta is None:
                return
            self._pending = delta  # the training thread adds it at its next step boundary
            self.stats["rounds"] += 1
            self.stats["initiated" if initiated else "answered"] += 1
            self.stats["bytes_total"] += nbytes
            self.stats["seconds_total"] += seconds
            self.last = {"bytes": float(nbytes), "seconds": seconds, "distance": distance}

    def _count_refused(self, reason: str) -> None:
        with self._cond:
            self.stats["refused"] += 1
        logger.info("averaging: refused: %s", reason)

    def metrics(self) -> dict[str, float]:
        """``averaging/*``: rounds, refused, failed, busy, bytes_total, seconds_total, clipped (cumulative) and the last
        exchange's bytes, seconds and distance (between the pair's parameters before they averaged)."""
        with self._cond:
            metrics = {f"averaging/{name}": float(self.stats[name])
                       for name in ("rounds", "refused", "failed", "busy", "bytes_total", "seconds_total", "clipped")}
            metrics.update({f"averaging/{name}": value for name, value in self.last.items()})
        return metrics

    def shutdown(self) -> None:
        """Stop the gossip thread and the server (joins both)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        try:
            self._rounds.put_nowait(-1)  # wake the gossip thread
        except queue.Full:
            pass
        self._thread.join(self.timeout + 5)
        if self.server is not None:
            self.server.stop()


def _clone(flats: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    return None if flats is None else [f.detach().clone() for f in flats]
