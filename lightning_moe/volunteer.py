"""Starting a volunteer: the one way `lightning-moe host`, the local swarm and ExpertHostCallback host experts.

:func:`start_volunteer` joins (or reuses) a DHT node, picks the cells to host (fewest live replicas first), takes
a busy cell's state from a live replica (:mod:`lightning_moe.server.handover`) or restores them from
``host.checkpoint_dir``, starts an :class:`~lightning_moe.server.ExpertHost`, and keeps a thread
that saves checkpoints and logs a one-line stats report every ``host.stats_every`` seconds.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_moe import shared
from lightning_moe.config import ConfigError, DHTConfig, HostConfig, grid_uids
from lightning_moe.dht import DHT
from lightning_moe.net import resolve_binding
from lightning_moe.net.addresses import ALL_INTERFACES
from lightning_moe.net.presence import Presence
from lightning_moe.server import ExpertBackend, ExpertHost
from lightning_moe.server.byzantine import Liar
from lightning_moe.server.handover import adopt_states

logger = logging.getLogger(__name__)

ExpertFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
CHECKPOINT_FILE = "experts.pt"


def choose_cells(dht: Any, uid_prefix: str, grid_size: Sequence[int], count: int, seed: int | None = None,
                 replicas: int = 1) -> dict[str, list[str]]:
    """``count`` grid cells, those with the fewest live replicas in the DHT first (free cells first, at random among
    equals), each with the endpoints of its live replicas."""
    uids = grid_uids(uid_prefix, grid_size)
    if not 1 <= count <= len(uids):
        raise ValueError(f"cells must be between 1 and {len(uids)} for grid {list(grid_size)}, got {count}")
    hosts = dict(zip(uids, dht.get_experts(uids, all_endpoints=True)))
    rng = random.Random(seed)
    order = sorted(uids, key=lambda uid: (len(hosts[uid]), rng.random()))
    chosen = {uid: list(hosts[uid]) for uid in order[:count]}
    busy = sum(bool(endpoints) for endpoints in chosen.values())
    full = sum(len(endpoints) >= replicas for endpoints in chosen.values())
    if full:
        logger.warning("%d of the %d cells taken in %s%s already have %d or more replicas (host.replicas=%d)", full, count,
                       uid_prefix, list(grid_size), replicas, replicas)
    elif busy:
        logger.info("%d of the %d cells taken in %s%s have live replicas", busy, count, uid_prefix, list(grid_size))
    return dict(sorted(chosen.items()))


def make_backends(
    uids: Sequence[str],
    expert: ExpertFactory,
    optimizer: OptimizerFactory | None,
    in_features: int,
    max_batch_size: int = 1024,
    update_every: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> dict[str, ExpertBackend]:
    """One ExpertBackend per uid, each with a new expert and its own optimizer."""
    if seed is not None:
        torch.manual_seed(seed)
    backends = {}
    for uid in uids:
        module = expert().to(dtype)
        backends[uid] = ExpertBackend(
            uid,
            module,
            optimizer(module.parameters()) if optimizer is not None else None,
            args_schema=[((in_features,), dtype)],
            max_batch_size=max_batch_size,
            update_every=update_every,
        )
    return backends


class InjectedFault(RuntimeError):
    """The error of ``host.fault_rate``: a volunteer that fails now and then."""


def injected_trouble(config: HostConfig, uid: str) -> Callable[[], None] | None:
    """``host.fault_rate`` and ``host.delay`` as the ``before_batch`` hook of expert ``uid`` (None when both are 0):
    each batch fails with probability ``fault_rate`` (its requests get HTTP 500), else takes ``delay`` s longer."""
    delay, rate = config.delay, config.fault_rate
    if not delay and not rate:
        return None
    rng = random.Random(None if config.seed is None else f"{config.seed}:{uid}")

    def before_batch() -> None:
        if rate and rng.random() < rate:
            raise InjectedFault(f"injected fault (host.fault_rate={rate})")
        if delay:
            time.sleep(delay)

    return before_batch


def _address_in_use(error: OSError) -> bool:
    return error.errno in (errno.EADDRINUSE, errno.EACCES)


class Volunteer:
    """A running volunteer: its ExpertHost, its DHT node, and a thread for checkpoints and stats reports.

    Made by :func:`start_volunteer`; :meth:`stop` saves a last checkpoint and shuts everything down.
    """

    def __init__(self, config: HostConfig, host: ExpertHost, dht: Any, owns_dht: bool, checkpoint: Path | None,
                 restored: int, presence: Presence, threads_before: int | None = None, adopted: dict[str, str] | None = None):
        self.config, self.host, self.dht, self.checkpoint, self.restored = config, host, dht, checkpoint, restored
        self.adopted = dict(adopted or {})  # uid -> the replica whose state the cell adopted when it started
        self.presence = presence
        self._owns_dht, self._threads_before = owns_dht, threads_before
        self._stop = threading.Event()
        self._last_report = (time.monotonic(), self._totals())
        self._thread = threading.Thread(target=self._run, name="lightning_moe-volunteer", daemon=True)
        self._thread.start()

    @property
    def hosted_uids(self) -> list[str]:
        return sorted(self.host.backends)

    @property
    def endpoint(self) -> str:
        return self.host.endpoint

    def _totals(self) -> tuple[int, int, int]:
        stats = self.host.stats().values()
        requests = sum(e["forward"]["requests"] + e["backward"]["requests"] for e in stats)
        samples = sum(e["forward"]["samples"] for e in stats)
        return requests, samples, sum(e["errors"] + e["forward"]["failed_batches"] + e["backward"]["failed_batches"] for e in stats)

    def report(self) -> str:
        """One line: requests, forward samples/s and errors since the last report."""
        now, totals = time.monotonic(), self._totals()
        (then, before), self._last_report = self._last_report, (now, totals)
        elapsed = max(now - then, 1e-9)
        requests, samples, errors = (a - b for a, b in zip(totals, before))
        return (f"host {self.endpoint}: {requests} requests, {samples / elapsed:.1f} samples/s, {errors} errors "
                f"in the last {elapsed:.0f} s ({totals[1]} samples in all)")

    def save_checkpoint(self) -> None:
        """Write the experts' weights and optimizer states to ``host.checkpoint_dir`` (atomically)."""
        if self.checkpoint is not None:
            self.host.save(self.checkpoint)
            logger.info("saved %d experts to %s", len(self.host.backends), self.checkpoint)

    def _run(self) -> None:
        relaying = self.presence.relay is not None
        period = [p for p in (self.config.stats_every, self.config.checkpoint_every if self.checkpoint else 0,
                              self.config.update_period if relaying else 0) if p > 0]
        if not period:
            return
        next_report = next_save = time.monotonic()
        while not self._stop.wait(min(period)):
            now = time.monotonic()
            if relaying:
                self.presence.declare()
            if self.config.stats_every > 0 and now - next_report >= self.config.stats_every:
                next_report = now
                logger.info(self.report())
            if self.checkpoint is not None and now - next_save >= self.config.checkpoint_every:
                next_save = now
                try:
                    self.save_checkpoint()
                except OSError:
                    logger.warning("saving host checkpoint %s failed", self.checkpoint, exc_info=True)

    def stop(self) -> dict[str, Any]:
        """Save a last checkpoint, stop the host (and the DHT node if this volunteer made it), give the process its
        torch threads back; returns final stats."""
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.save_checkpoint()
        finally:
            stats = self.host.stats()
            self.presence.stop()
            self.host.shutdown()
            if self._owns_dht:
                shared.unregister_process_dht(self.dht)
                self.dht.shutdown()
            if self._threads_before is not None:
                torch.set_num_threads(self._threads_before)
        return stats

    def __enter__(self) -> "Volunteer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_volunteer(config: HostConfig, dht: DHTConfig | Any, device: str | torch.device | None = None,
                    state: dict | None = None, checkpoint_name: str = CHECKPOINT_FILE) -> Volunteer:
    """Host ``config``'s experts: join the DHT, pick cells, restore, serve and declare them.

    Every key of ``config`` applies here, whoever calls (`lightning-moe host`, LocalSwarm, ExpertHostCallback):
    ``num_threads`` sets this process's torch threads until :meth:`Volunteer.stop`; ``host`` and
    ``announce_host`` null are resolved from the DHT peers (:func:`lightning_moe.net.resolve_binding`).

    Args:
        config: what to host and how.
        dht: a :class:`DHTConfig` (a node is started, owned and shared with this process's layers), or
            a running DHT node to use (its secret is the host's too).
        device: overrides ``config.device``.
        state: experts' state to restore (e.g. from a Lightning checkpoint); a file in
            ``config.checkpoint_dir`` takes precedence only when ``state`` is None.
        checkpoint_name: the file name under ``checkpoint_dir`` (one per DDP rank, say).
    """
    config.check()
    owns_dht = isinstance(dht, DHTConfig)
    node = DHT.from_config(dht) if owns_dht else dht
    presence = None
    peers = dht.initial_peers if owns_dht else [f"{host}:{port}" for host, port in node.initial_peers]
    binding = resolve_binding(config.host, config.announce_host, peers)
    host = None
    threads_before = torch.get_num_threads() if config.num_threads else None
    try:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        checkpoint = Path(config.checkpoint_dir) / checkpoint_name if config.checkpoint_dir else None
        if state is None and checkpoint is not None and checkpoint.exists():
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # our own file, weights only
            logger.info("restored %d experts from checkpoint %s", len(state), checkpoint)
        live: dict[str, list[str]] = {}  # the live replicas of the cells chosen
        if state:
            uids = sorted(state)
        elif isinstance(config.cells, int):
            for layer in config.layer_prefixes():
                live.update(choose_cells(node, layer, config.grid_size, config.cells, config.seed, config.replicas))
            uids = list(live)
        else:
            uids = sorted(config.cells)
            if config.replicas > 1:  # cells named by hand: adopt their state too where a replica lives
                live = dict(zip(uids, node.get_experts(uids, all_endpoints=True)))
        backends = make_backends(uids, config.make_expert(), config.make_optimizer(), config.in_features,
                                 config.max_batch_size, config.update_every, dtype=getattr(torch, config.dtype), seed=config.seed)
        for uid, backend in backends.items():
            backend.before_batch = injected_trouble(config, uid)
            if config.byzantine != "none":  # a lying volunteer (tests and demos)
                backend.answers = Liar(config.byzantine, config.byzantine_rate,
                                       None if config.seed is None else f"{config.seed}:{uid}")
        adopted: dict[str, str] = {}
        if config.replicas > 1 and any(live.values()):  # before the cells are declared: trainers never see fresh weights
            adopted = adopt_states(backends, live, node.secret)
        resolved = dataclasses.replace(config, host=binding.host, announce_host=binding.announce)
        host = ExpertHost(backends, resolved, dht=node, device=device, secret=node.secret)
        if state:
            host.load_state_dict(state)
        for backend in backends.values():
            if isinstance(backend.answers, Liar):
                backend.answers.take_snapshot(backend.expert)  # a stale liar answers with the weights it starts with
        discover = config.announce_host is None and binding.host in ALL_INTERFACES
        if discover:
            host.announce_at(None)  # nothing to declare until peers tell how strangers reach it
        try:
            host.start()
        except OSError as e:
            if _address_in_use(e):
                raise ConfigError(f"host.port={config.port}: cannot bind {binding.host}:{config.port} ({e.strerror}); "
                                  "choose another port or 0 for any free one") from e
            raise
        presence = Presence(node, (binding.host, host.port), None if discover else host.endpoint, host.announce_at,
                            secret=host.secret, relay=config.relay, update_period=config.update_period,
                            hole_punch=config.hole_punch)
        if discover:
            host.announce_at(presence.start())
        else:
            presence.start()
        if presence.punch is not None and host.server is not None:
            host.server.punch = presence.punch  # relayed: trainers may ask for a direct path (GET/POST /punch)
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
        if owns_dht:
            shared.register_process_dht(node)
        logger.info("hosting %d cells of %s%s at %s: %s%s", len(uids), ",".join(config.layer_prefixes()), list(config.grid_size),
                    host.endpoint, ", ".join(uids), f" (restored {len(state)} experts)" if state else "")
        return Volunteer(config, host, node, owns_dht, checkpoint, len(state) if state else 0, presence, threads_before,
                         adopted)
    except BaseException:
        if presence is not None:
            presence.stop()
        if host is not None:
            host.shutdown()
        if owns_dht:
            node.shutdown()
        if threads_before is not None:
            torch.set_num_threads(threads_before)
        raise
