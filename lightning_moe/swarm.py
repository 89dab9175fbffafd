"""LocalSwarm: a DHT node and volunteer host processes on this machine (the main job's swarm, and tests')."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from lightning_moe.config import ConfigError, DHTConfig, HostConfig, grid_uids
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
        ready.put((index, None, None, f"{type(e).__name__}: {e}"))
        raise
    ready.put((index, volunteer.endpoint, volunteer.dht.address, None))
    stop.wait()
    results.put((index, volunteer.stop()))


class LocalSwarm:
    """A DHT bootstrap node in this process and volunteer host processes on this machine.

    Each host process runs :func:`~lightning_moe.volunteer.start_volunteer` with ``host``, except
    that host ``i`` serves every ``num_hosts``-th cell of each layer's grid from cell ``i``, with
    seed ``host.seed + i`` (or ``i``) and the delay ``host_delays[i]``. The hosts start in parallel.

    Args:
        host: the host configuration (experts, optimizer, grid, batch sizes, ...); must be picklable
            (``_target_`` configs or importable factories).
        num_hosts: host processes to start (at least 1).
        start_timeout: seconds to wait for the hosts to be ready.
        host_delays: extra seconds per batch for each of the first hosts (to test slow volunteers).
        dht: the ``dht`` group: its ``secret`` (a private swarm), ``host`` and ``announce_host`` (null: loopback)
            apply to the swarm's DHT node and hosts; its peers and port do not (the swarm is a DHT of its own).
    """

    def __init__(
        self,
        host: HostConfig,
        num_hosts: int = 2,
        dht: DHTConfig | None = None,
        start_timeout: float = 120.0,
        host_delays: Sequence[float] = (),
    ):
        if num_hosts < 1:
            raise ConfigError(f"local_swarm.num_hosts must be at least 1 (a swarm needs a host), got {num_hosts}")
        host.check()
        self.config, self.num_hosts = host, num_hosts
        self.dht_config = dataclasses.replace(dht or DHTConfig(), initial_peers=[], port=0)
        self.start_timeout, self.host_delays = start_timeout, list(host_delays)
        self._ctx = mp.get_context("spawn")
        self._ready, self._results = self._ctx.Queue(), self._ctx.Queue()
        self.final_stats: dict[int, dict] = {}
        self.processes: list[Any] = []
        self.endpoints: list[str | None] = []
        self.dht: Any = None

    @property
    def uid_prefix(self) -> str:
        return self.config.uid_prefix

    @property
    def grid_size(self) -> tuple[int, ...]:
        return tuple(self.config.grid_size)

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
        layers = [grid_uids(prefix, self.grid_size) for prefix in self.config.layer_prefixes()]
        try:
            for i in range(self.num_hosts):
                delay = self.host_delays[i] if i < len(self.host_delays) else 0.0
                uids = [uid for layer in layers for uid in layer[i :: self.num_hosts]]
                self.add_host(uids, seed=(self.config.seed or 0) + i, delay=delay, wait=False)
            self._wait_ready(range(self.num_hosts))
        except BaseException:
            self.shutdown()
            raise
        logger.info("local swarm: DHT at %s, %d hosts at %s", self.dht.address, self.num_hosts, self.endpoints)
        return self

    def add_host(self, uids: Sequence[str], seed: int | None = None, delay: float = 0.0, wait: bool = True) -> int:
        """Start one more host process serving ``uids``; returns its index."""
        config = dataclasses.replace(self.config, cells=list(uids), seed=seed, delay=delay, host=self.dht.host, port=0,
                                     announce_host=self.dht_config.announce_host, announce_port=None, checkpoint_dir=None)
        dht = dataclasses.replace(self.dht_config, initial_peers=self.initial_peers, host=self.dht.host)
        index = len(self.processes)
        process = self._ctx.Process(target=_host_process, args=(index, config, dht, self._ready, self._results, os.getpid()),
                                    daemon=True, name=f"lightning_moe-host-{index}")
        process.start()
        self.processes.append(process)
        self.endpoints.append(None)
        if wait:
            self._wait_ready([index])
        return index

    def _wait_ready(self, indices: Iterable[int]) -> None:
        waiting = set(indices)
        deadline = time.monotonic() + self.start_timeout
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"hosts {sorted(waiting)} did not start within {self.start_timeout} s")
            try:
                index, endpoint, _, error = self._ready.get(timeout=min(remaining, 1.0))
            except Exception:  # queue.Empty
                dead = [i for i in waiting if not self.processes[i].is_alive()]
                if dead:
                    raise RuntimeError(f"host process {dead[0]} exited with code {self.processes[dead[0]].exitcode}") from None
                continue
            if error is not None:
                raise RuntimeError(f"host process {index} failed to start: {error}")
            self.endpoints[index] = endpoint
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
