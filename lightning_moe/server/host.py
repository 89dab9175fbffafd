"""ExpertHost: experts, the runtime thread and the HTTP server together, plus DHT announcements."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import resource
import threading
import time
from typing import Any, Iterable, Mapping

import torch

from lightning_moe import auth
from lightning_moe.config import HostConfig
from lightning_moe.net.addresses import LOOPBACK
from lightning_moe.server.backend import ExpertBackend
from lightning_moe.server.grad_bounds import GradientBounds
from lightning_moe.server.http import DIRECTIONS, ExpertHTTPServer
from lightning_moe.server.kept_forwards import KeptForwards, KeptStore
from lightning_moe.server.replica_sync import ReplicaSync
from lightning_moe.server.runtime import Runtime, RuntimePool

logger = logging.getLogger(__name__)


class ExpertHost:
    """Serves ``backends`` over HTTP; one Runtime thread computes, one asyncio loop thread does all I/O.

    Args:
        backends: ``{uid: ExpertBackend}`` or a list of backends (keyed by their names).
        config: how to serve them (:class:`~lightning_moe.config.HostConfig`; None: its defaults). The host
            reads ``host``, ``port`` (0: any free port), ``announce_host``, ``announce_port``, ``update_period``,
            ``limits``, ``compression``, ``kept_forwards_mb``, ``grad_clip``, ``device``, and ``replicas`` with ``replica_*`` (with
            a DHT and ``replicas`` > 1 the replicas of each cell average, :mod:`.replica_sync`); the keys that make experts are
            :func:`~lightning_moe.volunteer.start_volunteer`'s. ``host`` None binds loopback (start_volunteer
            resolves it from the DHT peers first). ``limits.max_connections`` is capped by the process's
            open-files limit, which start() raises to its hard limit.
        dht: anything with ``declare_experts(uids, endpoint, expiration_time=...)``; called every
            ``update_period`` seconds while the host runs.
        device: where the experts live and compute, overriding ``config.device`` (None there too: cpu).
        secret: a private swarm's shared secret (default: the ``LIGHTNING_MOE_SECRET`` environment
            variable); with one, unsigned or wrongly signed requests get 401.

    Forwards that trainers ask to keep (:mod:`~lightning_moe.server.kept_forwards`) share ``kept``, a
    :class:`~lightning_moe.server.kept_forwards.KeptStore` of ``kept_forwards_mb``.
    """

    def __init__(
        self,
        backends: Mapping[str, ExpertBackend] | Iterable[ExpertBackend],
        config: HostConfig | None = None,
        dht: Any = None,
        device: torch.device | str | None = None,
        secret: str | bytes | None = None,
    ):
        if isinstance(backends, Mapping):
            self.backends = dict(backends)
        else:
            self.backends = {}
            for backend in backends:
                if backend.name in self.backends:
                    raise ValueError(f"two backends are named {backend.name!r}")
                self.backends[backend.name] = backend
        if not self.backends:
            raise ValueError("a host needs at least one expert")
        self.config = config = config if config is not None else HostConfig()
        config.check(volunteer=False)
        self.host, self.port = config.host or LOOPBACK, config.port
        self.announce_host, self.announce_port = config.announce_host, config.announce_port
        self.device = torch.device(device or config.device or "cpu")
        self.dht = dht
        self.secret = auth.resolve_secret(secret)
        for backend in self.backends.values():
            backend.to(self.device)
        self.kept = KeptStore(int(config.kept_forwards_mb * 2**20))
        pools: list[RuntimePool] = []
        for backend in self.backends.values():
            backend.kept = KeptForwards(backend, self.kept)
            if config.grad_clip > 0 and backend.grad_bounds is None:  # one trainer's gradients move an expert boundedly
                backend.grad_bounds = GradientBounds(config.grad_clip)
            pools += [backend.forward_pool, backend.backward_pool, backend.kept]
        self.runtime = Runtime(pools, self.device, name="lightning_moe-runtime")
        self.server: ExpertHTTPServer | None = None
        self._started_at = 0.0
        self._samples_history: collections.deque[tuple[float, int]] = collections.deque(maxlen=13)
        self._declare_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lifecycle = threading.Lock()
        self._started = self._stopped = False
        self._announced: str | None = None  # set by announce_at; "" while withheld
        # replicas of a cell average their parameters (host.replicas > 1 and a DHT); r=1: nothing runs, /replica is 404
        self.replica_sync: ReplicaSync | None = None
        if config.replicas > 1 and config.replica_average_period > 0 and dht is not None:
            self.replica_sync = ReplicaSync(self.backends, dht, lambda: self.endpoint, config.replica_average_period,
                                            config.replica_average_timeout, config.replica_aggregate,
                                            config.replica_max_distance, self.secret, config.replica_clip_min,
                                            config.replica_clip_factor)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "ExpertHost":
        """Bind the port, start the runtime, the HTTP server and (with a DHT) the announcements."""
        with self._lifecycle:
            if self._started:
                raise RuntimeError("the host was already started")
            self._started = True
            limits = self.config.limits
            limits = dataclasses.replace(limits, max_connections=min(limits.max_connections, _raise_open_files_limit() - 64))
            server = ExpertHTTPServer((self.host, self.port), self.backends, limits, self.secret,
                                      compression=self.config.compression, stats_fn=self.load_report,
                                      queue_age=self.runtime.queue_age, replica=self.replica_sync)
            self.runtime.start()
            try:
                server.start()
            except BaseException:
                self.runtime.shutdown()
                raise
            self.server, self.port = server, server.server_port
            self._started_at = time.monotonic()
            self._samples_history.append((self._started_at, 0))
            if self._announced is None and self.announce_host is None and self.host in ("0.0.0.0", "::", ""):
                logger.warning("host listens on %s but announces it; set announce_host to an address peers can reach", self.host)
            if self.dht is not None:
                self._declare()  # once now, so that the experts are findable when start() returns
                self._declare_thread = threading.Thread(target=self._declare_loop, name="lightning_moe-declare", daemon=True)
                self._declare_thread.start()
            if self.replica_sync is not None:
                self.replica_sync.start()
        logger.info("serving %d experts at http://%s on %s", len(self.backends), self.endpoint, self.device)
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the HTTP server, the runtime and the announcements; join every thread; free the port. Idempotent."""
        with self._lifecycle:
            if self._stopped:
                return
            self._stopped = True
            self._stop.set()
            if self.replica_sync is not None:
                self.replica_sync.stop(timeout)
            if self.server is not None:
                self.server.stop_accepting()  # no new connections
            self.runtime.shutdown(timeout)  # waiting requests get 503
            if self.server is not None:
                self.server.close(timeout)  # ends the connections, stops the loop, joins its thread
            for thread in (self._declare_thread,):
                if thread is not None:
                    thread.join(timeout)
                    if thread.is_alive():
                        logger.warning("thread %s did not stop within %s s", thread.name, timeout)
        logger.info("host at %s stopped", self.endpoint if self.server is not None else "(never started)")

    def __enter__(self) -> "ExpertHost":
        return self if self._started else self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def host_id(self) -> str:
        """A random id of this start of the host (``/info`` has it); signed requests name it, so a request
        signed for another host, or for this one before a restart, is refused."""
        if self.server is None:
            raise RuntimeError("the host is not started: no host id yet")
        return self.server.host_id

    def announce_at(self, endpoint: str | None) -> None:
        """Declare the experts at ``endpoint`` from now on (a relay's allocation), at once; None: declare nothing
        until the next endpoint (no relay serves this host)."""
        self._announced = endpoint or ""
        if endpoint and self.dht is not None and self.server is not None:
            threading.Thread(target=self._declare, name="lightning_moe-redeclare", daemon=True).start()

    @property
    def endpoint(self) -> str:
        """``"host:port"`` that peers connect to (the announced host and port where given)."""
        if self.server is None:
            raise RuntimeError("the host is not started: no port yet")
        if self._announced:
            return self._announced
        host, port = self.announce_host or self.host, self.announce_port or self.port
        return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"

    # ---- DHT -------------------------------------------------------------------------------
    def _declare(self) -> None:
        uids = sorted(self.backends)
        if self._announced == "":
            return  # no endpoint that strangers reach (between relays)
        try:
            self.dht.declare_experts(uids, self.endpoint, expiration_time=time.time() + 2 * self.config.update_period)
            logger.debug("declared %d experts at %s", len(uids), self.endpoint)
        except Exception:  # noqa: BLE001 - keep announcing; a DHT hiccup must not kill the host
            logger.warning("declaring experts in the DHT failed", exc_info=True)

    def _declare_loop(self) -> None:
        while not self._stop.wait(self.config.update_period):
            self._declare()

    # ---- introspection ---------------------------------------------------------------------
    def stats(self) -> dict[str, dict]:
        """Per expert and direction: requests, samples, batches, mean batch size, queue wait, errors."""
        out: dict[str, dict] = {}
        server = self.server
        for uid, backend in self.backends.items():
            entry: dict[str, Any] = {"updates": backend.update_count}
            for direction in DIRECTIONS:
                pool = backend.forward_pool if direction == "forward" else backend.backward_pool
                pool_stats = pool.stats()
                rejected = server.request_errors[direction, uid] if server is not None else 0
                entry[direction] = {
                    "requests": server.requests[direction, uid] if server is not None else 0,
                    "samples": getattr(backend, f"{direction}_samples"),
                    "batches": pool_stats["batches"],
                    "mean_batch_size": pool_stats["mean_batch_size"],
                    "max_batch_size_seen": pool_stats["max_batch_size_seen"],
                    "mean_queue_wait": pool_stats["mean_queue_wait"],
                    "max_queue_wait": pool_stats["max_queue_wait"],
                    "busy_time": pool_stats["busy_time"],
                    "queued_rows": pool_stats["queued_rows"],
                    "split_tasks": pool_stats["split_tasks"],
                    "errors": rejected,
                    "failed_batches": pool_stats["batch_errors"],
                }
            entry["errors"] = entry["forward"]["errors"] + entry["backward"]["errors"]
            if backend.grad_bounds is not None:
                entry["grad_bounds"] = backend.grad_bounds.stats()
            out[uid] = entry
        return out

    def http_stats(self) -> dict:
        """Connections accepted, refused (over a connection limit), evicted (for a newcomer from a smaller network),
        open, the client addresses and networks holding them, and connections no longer read (their head trickled in); request bytes in flight and requests refused for lack of that budget; forwards shed
        (the queue was too old, see ``host.limits.max_queue_wait``); error responses by HTTP status."""
        server = self.server
        if server is None:
            return {"connections_accepted": 0, "connections_refused": 0, "open_connections": 0, "client_addresses": 0,
                    "client_networks": 0, "connections_evicted": 0, "trickles_stopped": 0, "inflight_bytes": 0, "budget_refused": 0, "shed_forwards": 0,
                    "errors_by_status": {}, "routes": {}}
        return {
            "connections_accepted": server.slots.accepted,
            "connections_refused": server.slots.refused,
            "open_connections": server.slots.open,
            "client_addresses": server.slots.addresses(),
            "client_networks": server.slots.networks(),
            "connections_evicted": server.slots.evicted,
            "trickles_stopped": server.slots.trickles,
            "inflight_bytes": server.budget.used,
            "budget_refused": server.budget.refused,
            "shed_forwards": server.shed,
            "errors_by_status": dict(server.status_errors),
            "routes": _routes(dict(server.routes)),  # a copy in one step (the loop thread counts on)
        }

    def load_report(self) -> dict:
        """What ``GET /stats`` answers: the host's load, as JSON-ready data. Its shape::

            {
              "host_id": str, "version": str, "endpoint": "host:port", "device": str,
              "uptime": float,                # seconds since start()
              "samples_per_second": float,    # forward + backward samples over the last interval
              "interval": float,              # seconds that rate covers (up to about 60, since the oldest
                                              # of the last 13 reports at least 5 s apart)
              "requests": int, "samples": int, "errors": int,   # totals over all experts and directions
              "queued_rows": int,             # rows waiting in every pool now
              "open_connections": int, "connections_accepted": int, "connections_refused": int,
              "client_addresses": int, "trickles_stopped": int, "inflight_bytes": int, "budget_refused": int,
              "shed_forwards": int,
              "errors_by_status": {"401": int, ...},            # every error answer, by HTTP status
              "routes": {"forward" | "host/forward" | ...: {"requests", "bytes_in", "bytes_out"}},  # served, with bodies
              "kept_forwards": {"kept", "hits", "misses", "graph_backwards", "recomputed", "evicted",
                                "used_bytes", "budget_bytes", ...},   # forwards kept for their backward
              "replica_sync": {"rounds", "initiated", "answered", "skipped", "refused", "busy", "bytes", "clipped",
                               "period", "aggregate", "cells": {uid: {"age", "distance", "radius"}}},
                                              # replicas' averaging (absent when off); clipped: replicas whose
                                              # pull centered_clip bounded; radius: the last one, relative
              "experts": {
                uid: {
                  "updates": int,             # optimizer steps
                  "forward":  {"requests", "samples", "errors", "queued_rows", "batches",
                               "mean_batch_size", "mean_queue_wait", "busy_time"},
                  "backward": {... the same keys ...}
                }, ...
              }
            }
        """
        per_expert, keys = {}, ("requests", "samples", "errors", "queued_rows", "batches", "mean_batch_size",
                                "mean_queue_wait", "busy_time")
        totals = dict.fromkeys(("requests", "samples", "errors", "queued_rows"), 0)
        for uid, entry in self.stats().items():
            per_expert[uid] = {"updates": entry["updates"]}
            for direction in DIRECTIONS:
                per_expert[uid][direction] = {key: entry[direction][key] for key in keys}
                for key in totals:
                    totals[key] += entry[direction][key]
        now = time.monotonic()
        history = self._samples_history
        if not history or now - history[-1][0] >= 5.0:
            history.append((now, totals["samples"]))
        then, samples_then = next(((t, n) for t, n in history if now - t >= 1.0), history[0] if history else (now, 0))
        http = self.http_stats()
        http["errors_by_status"] = {str(k): v for k, v in http["errors_by_status"].items()}
        return {
            "host_id": self.server.host_id if self.server is not None else None,
            "version": _version(), "endpoint": self.endpoint if self.server is not None else None,
            "device": str(self.device), "uptime": now - self._started_at if self._started_at else 0.0,
            "samples_per_second": (totals["samples"] - samples_then) / (now - then) if now > then else 0.0,
            "interval": now - then, **totals, **http, "kept_forwards": self.kept.stats(), "experts": per_expert,
            **({"replica_sync": self.replica_sync.report()} if self.replica_sync is not None else {}),
        }

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict]:
        """Weights, optimizer state and counters of every expert, keyed by uid."""
        return {uid: backend.state_dict() for uid, backend in self.backends.items()}

    def load_state_dict(self, state: Mapping[str, dict], strict: bool = True) -> None:
        """Load :meth:`state_dict`; with ``strict``, the uids must match exactly."""
        missing = set(self.backends) - set(state)
        unexpected = set(state) - set(self.backends)
        if strict and (missing or unexpected):
            raise KeyError(f"checkpoint does not match the host: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        for uid, backend in self.backends.items():
            if uid in state:
                backend.load_state_dict(state[uid])

    def save(self, path: str | os.PathLike) -> None:
        """Write a local checkpoint file (atomically: a temporary file, then rename)."""
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike, strict: bool = True) -> None:
        """Read a local checkpoint file written by :meth:`save` (weights_only: no code runs)."""
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=strict)

    def __repr__(self) -> str:
        where = self.endpoint if self.server is not None else "not started"
        return f"ExpertHost({len(self.backends)} experts, {where}, device={self.device})"


def _routes(counts: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """The server's route counters as ``{route: {"requests", "bytes_in", "bytes_out"}}``."""
    routes: dict[str, dict[str, int]] = {}
    for (route, key), value in counts.items():
        routes.setdefault(route, {"requests": 0, "bytes_in": 0, "bytes_out": 0})[key] = value
    return routes


def _version() -> str:
    import lightning_moe

    return lightning_moe.__version__


def _raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (connections are files); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            logger.debug("could not raise the open-files limit from %s to %s", soft, hard)
    return int(hard if soft == resource.RLIM_INFINITY else soft)
