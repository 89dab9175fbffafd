"""LocalSwarm: a DHT node and volunteer host processes on this machine (the main job's swarm, and tests')."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning_moe.config import DHTConfig, HostConfig, LocalSwarmConfig, grid_uids, to_dataclass
from lightning_moe.volunteer import start_volunteer

logger = logging.getLogger(__name__)

__all__ = ["LocalSwarm", "grid_uids"]


def _host_process(index: int, config: HostConfig, dht: DHTConfig, ready: Any, results: Any, parent_pid: int) -> None:
    """Entry point of a host process: serves until SIGTERM/SIGINT or until its parent dies, then reports its stats."""
    logging.basicConfig(level=logging.WARNING, format=f"[host {index}] %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def watch_parent() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent_pid:
                stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    try:
        volunteer = start_volunteer(config, dht)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        ready.put((index, None, {}, f"{type(e).__name__}: {e}"))
        raise
    ready.put((index, volunteer.endpoint, volunteer.adopted, None))
    stop.wait()
    results.put((index, volunteer.stop()))


class LocalSwarm:
    """A DHT bootstrap node in this process and volunteer host processes on this machine.

    Each host process runs :func:`~lightning_moe.volunteer.start_volunteer` with ``host``, except for
    the keys ``config`` sets (:class:`~lightning_moe.config.LocalSwarmConfig` documents them: how many
    hosts, their cells, seeds, delays, threads and update period); they bind where the swarm's DHT
    node does, on ports of their own, without host checkpoints. The hosts start in parallel, in waves
    (:meth:`start_waves`; one wave without replicas): a cell starts on one host, and each later host adopts its cells'
    state from a live replica (as any joiner does), so the replicas of a cell start equal and can average.

    Args:
        host: the hosts' configuration (:class:`~lightning_moe.config.HostConfig` or its mapping); must be
            picklable (``_target_`` configs or importable factories).
        config: the swarm's (:class:`~lightning_moe.config.LocalSwarmConfig` or its mapping; None: the defaults).
        dht: the ``dht`` group (:class:`~lightning_moe.config.DHTConfig` or its mapping): its ``secret`` (a private
            swarm), ``host`` and ``announce_host`` (null: loopback) apply to the swarm's DHT node and hosts; its
            peers and port do not (the swarm is a DHT of its own).

    ``self.config``, ``self.host_config`` (``host`` with the swarm's keys applied) and ``self.dht_config`` are
    the checked dataclasses.
    """

    def __init__(
        self,
        host: HostConfig | Mapping[str, Any],
        config: LocalSwarmConfig | Mapping[str, Any] | None = None,
        dht: DHTConfig | Mapping[str, Any] | None = None,
    ):
        self.config: LocalSwarmConfig = to_dataclass(config if config is not None else LocalSwarmConfig(), LocalSwarmConfig)
        self.config.check()
        host = to_dataclass(host, HostConfig)
        self.host_config: HostConfig = dataclasses.replace(host, num_threads=self.config.num_threads,
                                                           update_period=self.config.update_period)
        self.host_config.check()
        dht = to_dataclass(dht if dht is not None else DHTConfig(), DHTConfig)
        self.dht_config: DHTConfig = dataclasses.replace(dht, initial_peers=[], port=0)
        self._ctx = mp.get_context("spawn")
        self._ready, self._results = self._ctx.Queue(), self._ctx.Queue()
        self.final_stats: dict[int, dict] = {}
        self.processes: list[Any] = []
        self.endpoints: list[str | None] = []
        self.adopted: list[dict[str, str]] = []  # per host: uid -> the replica whose state it adopted at start
        self.dht: Any = None

    @property
    def uid_prefix(self) -> str:
        return self.host_config.uid_prefix

    @property
    def grid_size(self) -> tuple[int, ...]:
        return tuple(self.host_config.grid_size)

    @property
    def initial_peers(self) -> list[str]:
        """What a trainer or another volunteer passes as ``initial_peers``."""
        return [self.dht.address]

    def start_dht(self) -> "LocalSwarm":
        """Start only the bootstrap DHT node (so its address is known before the hosts start)."""
        from lightning_moe.dht import DHT

        if self.dht is None:
            self.dht = DHT.from_config(self.dht_config)
        return self

    def start(self) -> "LocalSwarm":
        """Start the DHT node and all hosts in parallel; returns once every host serves."""
        self.start_dht()
        num_hosts, delays, liars = self.config.num_hosts, self.config.host_delays, self.config.host_byzantine
        try:
            for i in range(num_hosts):
                self._new_host(self.host_cells(i), (self.host_config.seed or 0) + i,
                               delays[i] if i < len(delays) else self.host_config.delay,
                               liars[i] if i < len(liars) else None)
            for hosts in self.start_waves():
                for i in hosts:
                    self.processes[i].start()
                self._wait_ready(hosts)
        except BaseException:
            self.shutdown()
            raise
        logger.info("local swarm: DHT at %s, %d hosts at %s", self.dht.address, num_hosts, self.endpoints)
        return self

    def start_waves(self) -> list[list[int]]:
        """The first ``num_hosts`` hosts in the order they start: no two hosts of a wave share a cell that no earlier
        wave serves, so every cell starts on one host and its other replicas adopt that host's state."""
        live: set[str] = set()
        waves, waiting = [], list(range(self.config.num_hosts))
        while waiting:
            wave, fresh = [], set()
            for i in waiting:
                new = set(self.host_cells(i)) - live
                if not new & fresh:
                    wave.append(i)
                    fresh |= new
            waiting = [i for i in waiting if i not in wave]
            live |= fresh
            waves.append(wave)
        return waves

    def host_cells(self, i: int) -> list[str]:
        """The cells host ``i`` of the first ``num_hosts`` serves: of each layer, cell j when i is one of the
        ``replicas`` hosts from ``j mod num_hosts`` on."""
        num_hosts, replicas = self.config.num_hosts, self.config.replicas
        return [uid for prefix in self.host_config.layer_prefixes()
                for j, uid in enumerate(grid_uids(prefix, self.grid_size)) if (i - j) % num_hosts < replicas]

    def add_host(self, uids: Sequence[str], seed: int | None = None, delay: float = 0.0, wait: bool = True,
                 byzantine: str | None = None) -> int:
        """Start one more host process serving ``uids`` (``byzantine``: its ``host.byzantine``, None: the swarm's);
        returns its index."""
        index = self._new_host(uids, seed, delay, byzantine)
        self.processes[index].start()
        if wait:
            self._wait_ready([index])
        return index

    def _new_host(self, uids: Sequence[str], seed: int | None, delay: float, byzantine: str | None) -> int:
        """A host process (not started yet) serving ``uids``; returns its index."""
        config = dataclasses.replace(self.host_config, cells=list(uids), seed=seed, delay=delay, host=self.dht.host, port=0,
                                     byzantine=self.host_config.byzantine if byzantine is None else byzantine,
                                     announce_host=self.dht_config.announce_host, announce_port=None, checkpoint_dir=None)
        dht = dataclasses.replace(self.dht_config, initial_peers=self.initial_peers, host=self.dht.host)
        index = len(self.processes)
        process = self._ctx.Process(target=_host_process, args=(index, config, dht, self._ready, self._results, os.getpid()),
                                    daemon=True, name=f"lightning_moe-host-{index}")
        self.processes.append(process)
        self.endpoints.append(None)
        self.adopted.append({})
        return index

    def _wait_ready(self, indices: Iterable[int]) -> None:
        waiting = set(indices)
        deadline = time.monotonic() + self.config.start_timeout
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"hosts {sorted(waiting)} did not start within {self.config.start_timeout} s "
                                   "(local_swarm.start_timeout)")
            try:
                index, endpoint, adopted, error = self._ready.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty
                dead = [i for i in waiting if not self.processes[i].is_alive()]
                if dead:
                    raise RuntimeError(f"host process {dead[0]} exited with code {self.processes[dead[0]].exitcode}") from None
                continue
            if error is not None:
                raise RuntimeError(f"host process {index} failed to start: {error}")
            self.endpoints[index], self.adopted[index] = endpoint, adopted
            waiting.discard(index)

    def _collect_stats(self, wait: float) -> None:
        while True:
            try:
                index, stats = self._results.get(timeout=wait)
            except Exception:  # queue.Empty: nothing more for now
                return
            self.final_stats[index] = stats

    def served_samples(self, index: int) -> int:
        """Forward samples host ``index`` served, from the stats it reported when it stopped (0 if it was killed)."""
        return sum(expert["forward"]["samples"] for expert in self.final_stats.get(index, {}).values())

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to host ``index`` (SIGKILL: it dies without a goodbye, as a volunteer's laptop does)."""
        process = self.processes[index]
        if process.is_alive():
            os.kill(process.pid, sig)
            process.join(timeout=10)

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop every host (SIGTERM, then SIGKILL after ``timeout``) and the DHT node."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in self.processes) and time.monotonic() < deadline:
            self._collect_stats(wait=0.2)  # read while they exit: a process blocks on exit until its queue is read
        self._collect_stats(wait=0.2)
        for process in self.processes:
            if process.pid is None:
                continue  # never started (the swarm's start failed in an earlier wave)
            process.join(timeout=1)
            if process.is_alive():
                logger.warning("host process %s did not stop in time; killing it", process.name)
                process.kill()
                process.join(timeout=5)
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
