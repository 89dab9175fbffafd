"""Volunteer hosts in their own processes, and LocalSwarm: a DHT and several hosts on this machine."""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_moe.server import ExpertBackend, ExpertHost

logger = logging.getLogger(__name__)

ExpertFactory = Callable[[], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def grid_uids(uid_prefix: str, grid_size: Sequence[int]) -> list[str]:
    """Every uid of a grid, e.g. ``ffn.0.0 .. ffn.3.3`` for prefix ``ffn`` and grid ``(4, 4)``."""
    uids = [uid_prefix]
    for size in grid_size:
        uids = [f"{uid}.{i}" for uid in uids for i in range(size)]
    return uids


def choose_cells(dht: Any, uid_prefix: str, grid_size: Sequence[int], count: int, seed: int | None = None) -> list[str]:
    """``count`` grid cells that no one declares in the DHT yet; random busy ones if too few are free."""
    uids = grid_uids(uid_prefix, grid_size)
    if not 1 <= count <= len(uids):
        raise ValueError(f"cells must be between 1 and {len(uids)} for grid {list(grid_size)}, got {count}")
    taken = dht.get_experts(uids)
    rng = random.Random(seed)
    free = [uid for uid, endpoint in zip(uids, taken) if endpoint is None]
    rng.shuffle(free)
    chosen = free[:count]
    if len(chosen) < count:
        logger.warning("only %d free cells in %s%s; also hosting cells that others declare", len(free), uid_prefix, list(grid_size))
        chosen += rng.sample([uid for uid in uids if uid not in chosen], count - len(chosen))
    return sorted(chosen)


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


@dataclass
class HostSpec:
    """All a host process needs to start; plain data and importable factories, so it pickles.

    ``uids`` is the list of experts to host, or a number of free cells of ``uid_prefix``/``grid_size``.
    """

    uids: list[str] | int
    expert: ExpertFactory
    optimizer: OptimizerFactory | None
    in_features: int
    initial_peers: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    dht_port: int = 0
    announce_host: str | None = None
    max_batch_size: int = 1024
    update_period: float = 5.0
    seed: int | None = None
    num_threads: int | None = None
    delay: float = 0.0
    dtype: torch.dtype = torch.float32
    uid_prefix: str = "ffn"
    grid_size: Sequence[int] = ()
    secret: str | bytes | None = None
    compression: str | None = None


def serve(spec: HostSpec, on_ready: Callable[[ExpertHost, Any], None], stop: threading.Event) -> dict[str, Any]:
    """Host ``spec``'s experts with a DHT node until ``stop`` is set; returns the host's final stats.

    ``on_ready(host, dht)`` is called once both serve.
    """
    from lightning_moe.dht import DHT

    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    with DHT(initial_peers=spec.initial_peers, host=spec.host, port=spec.dht_port, announce_host=spec.announce_host,
             secret=spec.secret) as dht:
        uids = spec.uids
        if isinstance(uids, int):
            uids = choose_cells(dht, spec.uid_prefix, spec.grid_size, uids, spec.seed)
        backends = make_backends(uids, spec.expert, spec.optimizer, spec.in_features, spec.max_batch_size,
                                 dtype=spec.dtype, seed=spec.seed)
        if spec.delay:
            for backend in backends.values():
                _add_delay(backend, spec.delay)
        with ExpertHost(backends, host=spec.host, port=spec.port, announce_host=spec.announce_host, dht=dht,
                        update_period=spec.update_period, secret=spec.secret, compression=spec.compression) as host:
            on_ready(host, dht)
            stop.wait()
            return host.stats()


def _add_delay(backend: ExpertBackend, seconds: float) -> None:
    """Make every batch of ``backend`` take ``seconds`` longer (to test slow volunteers)."""
    for pool in (backend.forward_pool, backend.backward_pool):
        process = pool.process_fn

        @functools.wraps(process)
        def slow(*args: Any, _process: Callable = process) -> Any:
            time.sleep(seconds)
            return _process(*args)

        pool.process_fn = slow


def _host_process(index: int, spec: HostSpec, ready: Any, results: Any, parent_pid: int) -> None:
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
        stats = serve(spec, lambda host, dht: ready.put((index, host.endpoint, dht.address, None)), stop)
        results.put((index, stats))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        ready.put((index, None, None, f"{type(e).__name__}: {e}"))
        raise


class LocalSwarm:
    """A DHT bootstrap node in this process and volunteer hosts in child processes, on loopback.

    Args:
        uid_prefix: the experts' uid prefix.
        grid_size: the grid; its cells are dealt round-robin to the hosts.
        num_hosts: host processes to start.
        expert: a picklable factory of one expert module (e.g. ``functools.partial``).
        optimizer: a picklable factory ``params -> Optimizer``, or None for frozen experts.
        in_features: the experts' input size.
        max_batch_size: rows per batch a host forms.
        update_period: seconds between a host's DHT declarations (records live two periods).
        host: the loopback address to bind.
        start_timeout: seconds to wait for each host to be ready.
        num_threads: torch threads per host process (None: torch's default).
        dtype: the experts' dtype.
        host_delays: extra seconds per batch for each of the first hosts (to test slow volunteers).
        secret: a private swarm's shared secret (default: the ``LIGHTNING_MOE_SECRET`` environment variable).
    """

    def __init__(
        self,
        uid_prefix: str,
        grid_size: Sequence[int],
        num_hosts: int,
        expert: ExpertFactory,
        optimizer: OptimizerFactory | None,
        in_features: int,
        max_batch_size: int = 1024,
        update_period: float = 5.0,
        host: str = "127.0.0.1",
        start_timeout: float = 120.0,
        num_threads: int | None = None,
        dtype: torch.dtype = torch.float32,
        host_delays: Sequence[float] = (),
        secret: str | bytes | None = None,
    ):
        self.uid_prefix, self.grid_size, self.num_hosts = uid_prefix, tuple(grid_size), num_hosts
        self.expert, self.optimizer, self.in_features = expert, optimizer, in_features
        self.max_batch_size, self.update_period, self.host = max_batch_size, update_period, host
        self.start_timeout, self.num_threads = start_timeout, num_threads
        self.dtype, self.host_delays, self.secret = dtype, list(host_delays), secret
        self._ctx = mp.get_context("spawn")
        self._ready, self._results = self._ctx.Queue(), self._ctx.Queue()
        self.final_stats: dict[int, dict] = {}
        self.processes: list[Any] = []
        self.endpoints: list[str | None] = []
        self.dht: Any = None

    @property
    def initial_peers(self) -> list[str]:
        """What a trainer or another volunteer passes as ``initial_peers``."""
        return [self.dht.address]

    def start(self) -> "LocalSwarm":
        from lightning_moe.dht import DHT

        self.dht = DHT(host=self.host, port=0, secret=self.secret)
        uids = grid_uids(self.uid_prefix, self.grid_size)
        try:
            for i in range(self.num_hosts):
                delay = self.host_delays[i] if i < len(self.host_delays) else 0.0
                self.add_host(uids[i :: self.num_hosts], seed=i, delay=delay, wait=False)
            self._wait_ready(range(self.num_hosts))
        except BaseException:
            self.shutdown()
            raise
        logger.info("local swarm: DHT at %s, %d hosts at %s", self.dht.address, self.num_hosts, self.endpoints)
        return self

    def add_host(self, uids: Sequence[str], seed: int | None = None, delay: float = 0.0, wait: bool = True) -> int:
        """Start one more host process serving ``uids``; returns its index."""
        spec = HostSpec(list(uids), self.expert, self.optimizer, self.in_features, initial_peers=self.initial_peers,
                        host=self.host, max_batch_size=self.max_batch_size, update_period=self.update_period,
                        seed=seed, num_threads=self.num_threads, delay=delay, dtype=self.dtype, secret=self.secret)
        index = len(self.processes)
        process = self._ctx.Process(target=_host_process, args=(index, spec, self._ready, self._results, os.getpid()), daemon=True,
                                    name=f"lightning_moe-host-{index}")
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
