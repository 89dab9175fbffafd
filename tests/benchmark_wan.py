"""The swarm over an emulated wide-area network (issue 11): latency and bandwidth vs throughput.

Everything runs on 127.0.0.1 behind the user-space emulator of ``tests/netem.py``:

- each host's HTTP port sits behind its own :class:`~netem.DelayProxy` (round trip = RTT, the
  bandwidth limit is the HOST's access link, shared by all trainers that talk to it); the host
  announces the proxy's port in the DHT (``HostConfig.announce_port``), so trainers only ever
  reach it through the proxy;
- every DHT datagram (bootstrap node, hosts' nodes, trainers' client nodes, the 16-node DHT of
  part 3) goes through one :class:`~netem.UDPNetwork`: each node has a public address there and
  what it sends arrives from that address, so routing tables hold only addresses that lead
  through the emulator (a UDPRelay per node cannot do this; see UDPNetwork's docstring). Any
  two DHT nodes are one RTT apart; DHT traffic has no bandwidth limit.

The links' settings change between rows of a table (one swarm serves every row; a row starts
with a warm-up step). Three parts, each a table over RTT x bandwidth:

1. ``single``: one trainer (this process) training the example model (CharLM, hid 64, one
   DecentralizedMoE layer on a 4x4 grid, k_best 4, 2 hosts). Per step: total, DHT (the layer's
   ``Dispatcher.choose``: beam search over the cached DHT lookups, a real lookup when the cache's
   5 s expired), forward and backward expert calls (``run_in_parallel``), and compute (the rest:
   model, gating, serialization), plus bytes through the proxies and the DHT per step.
2. ``swarm``: N trainer processes (default 8) sharing the 2 hosts; samples/s of the whole swarm,
   median and range over ``--repeats`` windows of ``--swarm-seconds``.
3. ``dht``: 16 DHT nodes (``lightning_moe.dht.DHT``): store and get of a fresh key from random
   nodes, and a beam search (no cache) over a 4x4 grid that 2 of them declare; seconds and RTTs.

    python tests/benchmark_wan.py --quick                        # about 3 minutes
    python tests/benchmark_wan.py --rtts 0,100,200 --bandwidths inf
    python tests/benchmark_wan.py                                # the full grid (RTT 0/50/100/200, inf/100/20 Mbit/s)

4. ``layers4``: one trainer training the 4-layer example (CharLM with 4 DecentralizedMoE layers, ``experiment=
   four_layers``; 2 hosts serve the 4 grids), unpipelined, pipelined and ``model.micro_batches=auto`` (pipelined
   while a link is measured slow; see :class:`lightning_moe.MoEStack`), interleaved step by step; step times and
   round trips per step.

Then ``swarm throughput at 100 ms / 0 ms: X`` (median swarm samples/s at 100 ms over that at 0 ms, at
unlimited bandwidth when that column was run, else the first one). With part 4, the last line is
``4-layer example, round trips per step at 100 ms: X`` (as the +RTTs column: (median step at 100 ms -
median step at 0 ms) / 100 ms, for the example as configured, at unlimited bandwidth when run, else the first).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import multiprocessing as mp
import os
import queue
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netem import DelayProxy, UDPNetwork  # noqa: E402

from lightning_moe.client.pipeline import AUTO_MICRO_BATCHES  # noqa: E402
from lightning_moe.config import HostConfig, grid_uids, layer_prefixes  # noqa: E402

logger = logging.getLogger("benchmark_wan")

HID, GRID, K_BEST = 64, (4, 4), 4


# ---- the emulated network ---------------------------------------------------------------------
class VarLink:
    """A :class:`netem.Link` whose settings change between rows: the relays read ``delay``,
    ``jitter``, ``bandwidth_bps`` and ``loss`` each time they schedule a chunk or datagram, so
    open (keep-alive) connections follow a change at once."""

    def __init__(self, delay: float = 0.0, bandwidth_bps: float | None = None):
        self.delay, self.jitter, self.bandwidth_bps, self.loss = delay, 0.0, bandwidth_bps, 0.0


def parse_rtts(text: str) -> list[float]:
    """``"0,50,100"`` (milliseconds) -> seconds."""
    return [float(x) / 1000 for x in text.split(",") if x.strip()]


def parse_bandwidths(text: str) -> list[float | None]:
    """``"inf,100,20"`` (Mbit/s) -> bits/s, None for unlimited."""
    out: list[float | None] = []
    for x in text.split(","):
        x = x.strip().lower()
        if x:
            out.append(None if x in ("inf", "none", "unlimited") else float(x) * 1e6)
    return out


def bw_name(bps: float | None) -> str:
    return "inf" if bps is None else f"{bps / 1e6:g}M"


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """``median (min-max)``."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def host_config(num_threads: int = 1) -> HostConfig:
    from lightning_moe.server.experts import make_expert

    return HostConfig(expert=functools.partial(make_expert, "ffn", HID), in_features=HID,
                      optimizer=functools.partial(torch.optim.Adam, lr=3e-3), grid_size=list(GRID), cells=1,
                      max_batch_size=4096, update_period=10.0, stats_every=0, num_threads=num_threads, seed=0)


def _host_main(index: int, config: HostConfig, bootstrap: str, ready: Any, stop: Any, parent_pid: int) -> None:
    """A host process: its own DHT node (joined through the UDPNetwork) and a volunteer that
    announces the proxy's port; serves until ``stop`` is set or the parent dies (bounded)."""
    logging.basicConfig(level=logging.WARNING, format=f"[host {index}] %(levelname)s %(name)s: %(message)s")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    from lightning_moe.dht import DHT
    from lightning_moe.volunteer import start_volunteer

    dht = volunteer = None
    try:
        dht = DHT(initial_peers=[bootstrap], wait_timeout=10.0)
        volunteer = start_volunteer(config, dht)
        ready.put((index, volunteer.host.port, None))
        deadline = time.monotonic() + 4 * 3600
        while not stop.wait(1.0) and os.getppid() == parent_pid and time.monotonic() < deadline:
            pass
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        ready.put((index, None, f"{type(e).__name__}: {e}"))
    finally:
        if volunteer is not None:
            volunteer.stop()
        if dht is not None:
            dht.shutdown()


class WanSwarm:
    """A bootstrap DHT node, ``num_hosts`` host processes each behind a DelayProxy, one UDPNetwork.

    ``set_link(rtt, bandwidth_bps)`` sets every link: HTTP through a proxy costs ``rtt`` per round
    trip and is paced at ``bandwidth_bps`` per host and direction (shared by all its clients); any
    two DHT nodes are ``rtt`` apart (each access link ``rtt / 4`` one way), no DHT bandwidth limit.
    """

    def __init__(self, num_hosts: int = 2, start_timeout: float = 120.0, num_layers: int = 1):
        self.num_hosts, self.start_timeout, self.num_layers = num_hosts, start_timeout, num_layers
        self.http_link = VarLink()
        self.dht_link = VarLink()
        self.net: UDPNetwork | None = None
        self.proxies: list[DelayProxy] = []
        self.processes: list[Any] = []
        self.bootstrap: Any = None
        self.initial_peers: list[str] = []
        self._ctx = mp.get_context("spawn")
        self._stop = self._ctx.Event()

    def set_link(self, rtt: float, bandwidth_bps: float | None) -> None:
        self.http_link.delay, self.http_link.bandwidth_bps = rtt / 2, bandwidth_bps
        self.dht_link.delay = rtt / 4

    def start(self) -> "WanSwarm":
        from lightning_moe.dht import DHT

        try:
            self.net = UDPNetwork(self.dht_link).start()  # type: ignore[arg-type]
            self.bootstrap = DHT(wait_timeout=10.0)
            public = self.net.add(("127.0.0.1", self.bootstrap.port))
            self.initial_peers = [f"{public[0]}:{public[1]}"]
            layer = [uid for prefix in layer_prefixes("ffn", self.num_layers) for uid in grid_uids(prefix, GRID)]
            ready = self._ctx.Queue()
            for i in range(self.num_hosts):
                # the target is set once the host has bound its port; nobody connects before
                proxy = DelayProxy(("127.0.0.1", 9), self.http_link).start()  # type: ignore[arg-type]
                self.proxies.append(proxy)
                config = dataclasses.replace(host_config(), cells=layer[i :: self.num_hosts], num_layers=self.num_layers,
                                             seed=i, port=0,
                                             announce_host="127.0.0.1", announce_port=proxy.port)
                p = self._ctx.Process(target=_host_main, args=(i, config, self.initial_peers[0], ready, self._stop, os.getpid()),
                                      daemon=True, name=f"wan-host-{i}")
                p.start()
                self.processes.append(p)
            waiting, deadline = set(range(self.num_hosts)), time.monotonic() + self.start_timeout
            while waiting:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"hosts {sorted(waiting)} did not start in {self.start_timeout} s")
                try:
                    index, port, error = ready.get(timeout=1.0)
                except queue.Empty:
                    if any(not self.processes[i].is_alive() for i in waiting):
                        raise RuntimeError("a host process died while starting") from None
                    continue
                if error:
                    raise RuntimeError(f"host {index} failed: {error}")
                self.proxies[index].target = ("127.0.0.1", port)
                waiting.discard(index)
        except BaseException:
            self.shutdown()
            raise
        return self

    def http_bytes(self) -> tuple[int, int]:
        return sum(p.bytes_up for p in self.proxies), sum(p.bytes_down for p in self.proxies)

    def shutdown(self) -> None:
        self._stop.set()
        for p in self.processes:
            _end_process(p, timeout=15)
        for proxy in self.proxies:
            proxy.close()
        if self.bootstrap is not None:
            self.bootstrap.shutdown()
        if self.net is not None:
            self.net.close()

    def __enter__(self) -> "WanSwarm":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _end_process(process: Any, timeout: float) -> None:
    """Wait ``timeout`` s for a process told to stop, then SIGTERM it, then SIGKILL it."""
    process.join(timeout=timeout)
    for end in (process.terminate, process.kill):
        if process.is_alive():
            end()
            process.join(timeout=5)


# ---- a trainer ----------------------------------------------------------------------------------
def build_trainer(initial_peers: list[str], seed: int, layer_kwargs: dict, moe_layers: int = 1) -> tuple[Any, Any, torch.Tensor]:
    """The example model (CharLM with ``moe_layers`` DecentralizedMoE layers), its optimizer and its text."""
    from lightning_moe.client.moe import DecentralizedMoE
    from lightning_moe.lightning.char_lm import CharLM, stdlib_text

    torch.manual_seed(seed)
    moe = functools.partial(DecentralizedMoE, in_features=HID, grid_size=GRID, k_best=K_BEST, initial_peers=initial_peers,
                            forward_timeout=60.0, backward_timeout=60.0, **layer_kwargs)
    model = CharLM(moe, hid_dim=HID, seq_len=64, moe_layers=moe_layers)
    optimizer = model.configure_optimizers()
    text = torch.frombuffer(bytearray(stdlib_text(200_000, skip_bytes=seed * 200_000 % 400_000)), dtype=torch.uint8).long()
    return model, optimizer, text


def train_step(model: Any, optimizer: Any, text: torch.Tensor, rng: random.Random, batch_size: int, seq_len: int) -> float:
    starts = [rng.randrange(0, len(text) - seq_len - 1) for _ in range(batch_size)]
    windows = torch.stack([text[s : s + seq_len + 1] for s in starts])
    logits = model(windows[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), windows[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class StepTimer:
    """Time spent per step in the DHT part of the layer and in expert calls (forward, backward)."""

    def __init__(self) -> None:
        self.dht = self.forward = self.backward = 0.0
        self._undo: list[Callable[[], None]] = []

    def install(self) -> "StepTimer":
        from lightning_moe.client import parallel_call
        from lightning_moe.client.dispatch import Dispatcher

        cls = Dispatcher
        choose, call = cls.choose, parallel_call.run_in_parallel

        def timed_choose(dispatcher: Any, *args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return choose(dispatcher, *args, **kwargs)
            finally:
                self.dht += time.perf_counter() - begin

        def timed_call(jobs: Any, method: str, *args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return call(jobs, method, *args, **kwargs)
            finally:
                setattr(self, method, getattr(self, method) + time.perf_counter() - begin)

        cls.choose, parallel_call.run_in_parallel = timed_choose, timed_call

        def undo() -> None:
            cls.choose, parallel_call.run_in_parallel = choose, call
        self._undo.append(undo)
        return self

    def reset(self) -> None:
        self.dht = self.forward = self.backward = 0.0

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()


# ---- part 1: one trainer ------------------------------------------------------------------------
def run_single(swarm: WanSwarm, cells: list[tuple[float, float | None]], steps: int, batch_size: int,
               layer_kwargs: dict) -> list[dict]:
    """Per (rtt, bandwidth): step times and their split, bytes per step."""
    model, optimizer, text = build_trainer(swarm.initial_peers, seed=100, layer_kwargs=layer_kwargs)
    layer = model.moes[0]
    rng = random.Random(0)
    timer = StepTimer().install()
    rows = []
    try:
        for rtt, bw in cells:
            swarm.set_link(rtt, bw)
            train_step(model, optimizer, text, rng, batch_size, 64)  # warm-up: connections, expert info, DHT cache
            totals, dhts, fwds, bwds, failed = [], [], [], [], 0
            up0, down0 = swarm.http_bytes()
            dht0 = swarm.net.bytes if swarm.net else 0
            for _ in range(steps):
                timer.reset()
                begin = time.perf_counter()
                train_step(model, optimizer, text, rng, batch_size, 64)
                totals.append(time.perf_counter() - begin)
                dhts.append(timer.dht)
                fwds.append(timer.forward)
                bwds.append(timer.backward)
                st = layer.last_stats
                failed += st.failed + st.timed_out + st.backward_failed
            up1, down1 = swarm.http_bytes()
            dht1 = swarm.net.bytes if swarm.net else 0
            computes = [t - d - f - b for t, d, f, b in zip(totals, dhts, fwds, bwds)]
            row = dict(rtt=rtt, bw=bw, step=totals, dht=dhts, fwd=fwds, bwd=bwds, compute=computes, failed=failed,
                       up=(up1 - up0) / steps, down=(down1 - down0) / steps, dht_bytes=(dht1 - dht0) / steps)
            rows.append(row)
            logger.info("single %s", {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in row.items()})
    finally:
        timer.uninstall()
        layer.close()
    return rows


def print_single(rows: list[dict], batch_size: int, compression: str = "none") -> None:
    print(f"\n== 1. one trainer: CharLM (hid {HID}, batch {batch_size}x64), one DecentralizedMoE {GRID[0]}x{GRID[1]} "
          f"k_best {K_BEST}, compression {compression}, 2 hosts; median (min-max) over steps, seconds ==")
    print(f"{'RTT ms':>6} {'bw':>5} {'steps/s':>8} {'step':>18} {'compute':>18} {'fwd calls':>18} {'bwd calls':>18} "
          f"{'DHT':>18} {'+RTTs':>6} {'KB up/st':>9} {'KB dn/st':>9} {'DHT B/st':>8} {'fail':>4}")
    base = {r["bw"]: statistics.median(r["step"]) for r in rows if r["rtt"] == 0}
    for r in rows:
        med = statistics.median(r["step"])
        added = "-"
        if r["rtt"] > 0 and r["bw"] in base:
            added = f"{(med - base[r['bw']]) / r['rtt']:.1f}"
        print(f"{r['rtt'] * 1000:6.0f} {bw_name(r['bw']):>5} {1 / med:8.2f} {spread(r['step'], '{:.3f}'):>18} "
              f"{spread(r['compute'], '{:.3f}'):>18} {spread(r['fwd'], '{:.3f}'):>18} {spread(r['bwd'], '{:.3f}'):>18} "
              f"{spread(r['dht'], '{:.3f}'):>18} {added:>6} {r['up'] / 1024:9.0f} {r['down'] / 1024:9.0f} "
              f"{r['dht_bytes']:8.0f} {r['failed']:4d}")
    print("+RTTs: (median step at this RTT - median step at RTT 0, same bandwidth) / RTT: the round trips a step pays")


# ---- part 2: a swarm of trainer processes -------------------------------------------------------
def _trainer_main(index: int, initial_peers: list[str], batch_size: int, layer_kwargs: dict,
                  commands: Any, results: Any) -> None:
    """A trainer process: on ("warm", cell) one step, then "warm"; on ("run", cell, start_at, until)
    steps from ``start_at`` (time.time()) to ``until`` and report every step's end time."""
    logging.basicConfig(level=logging.WARNING, format=f"[trainer {index}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    model = None
    try:
        model, optimizer, text = build_trainer(initial_peers, seed=index, layer_kwargs=layer_kwargs)
        rng = random.Random(index)
        for _ in range(1000):  # bounded: one command per row and phase
            try:
                command = commands.get(timeout=900)
            except queue.Empty:
                return
            if command is None:
                return
            if command[0] == "warm":
                errors = 0
                try:
                    train_step(model, optimizer, text, rng, batch_size, 64)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors += 1
                    logger.warning("warm-up step failed: %s", e)
                results.put(("warm", index, command[1], errors))
                continue
            _, cell, start_at, until = command
            while time.time() < start_at:
                time.sleep(min(0.01, max(start_at - time.time(), 0)))
            ends, errors, failed_calls = [], 0, 0
            for _ in range(100_000):  # bounded by count and by ``until``
                if time.time() >= until:
                    break
                try:
                    train_step(model, optimizer, text, rng, batch_size, 64)
                    ends.append(time.time())
                    st = model.moes[0].last_stats
                    failed_calls += st.failed + st.timed_out + st.backward_failed
                except Exception as e:  # noqa: BLE001 - counted and reported
                    errors += 1
                    logger.warning("step failed: %s", e)
                    time.sleep(0.1)
            results.put(("run", index, cell, ends, errors, failed_calls))
    except BaseException as e:  # noqa: BLE001
        results.put(("error", index, f"{type(e).__name__}: {e}"))
    finally:
        if model is not None:
            for layer in model.moes:
                layer.close()


def run_swarm(swarm: WanSwarm, cells: list[tuple[float, float | None]], num_trainers: int, seconds: float, repeats: int,
              batch_size: int, layer_kwargs: dict) -> list[dict]:
    """Per (rtt, bandwidth): the swarm's samples/s in each of ``repeats`` windows of ``seconds``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    commands = [ctx.Queue() for _ in range(num_trainers)]
    processes = [ctx.Process(target=_trainer_main, args=(i, swarm.initial_peers, batch_size, layer_kwargs, commands[i],
                                                         results), daemon=True, name=f"wan-trainer-{i}")
                 for i in range(num_trainers)]
    rows = []

    def collect(kind: str, cell: int, timeout: float) -> list[tuple]:
        got, deadline = [], time.monotonic() + timeout
        while len(got) < num_trainers and time.monotonic() < deadline:
            try:
                message = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    break
                continue
            if message[0] == "error":
                raise RuntimeError(f"trainer {message[1]} failed: {message[2]}")
            if message[0] == kind and message[2] == cell:
                got.append(message)
        if len(got) < num_trainers:
            logger.warning("%s: only %d of %d trainers answered in %.0f s", kind, len(got), num_trainers, timeout)
        return got

    try:
        for p in processes:
            p.start()
        for cell, (rtt, bw) in enumerate(cells):
            swarm.set_link(rtt, bw)
            for q in commands:
                q.put(("warm", cell))
            warm = collect("warm", cell, 300)
            up0, down0 = swarm.http_bytes()
            start_at = time.time() + 0.5
            until = start_at + seconds * repeats
            for q in commands:
                q.put(("run", cell, start_at, until))
            ran = collect("run", cell, seconds * repeats + 180)
            up1, down1 = swarm.http_bytes()
            ends = [t for m in ran for t in m[3]]
            windows = []
            for w in range(repeats):
                lo, hi = start_at + w * seconds, start_at + (w + 1) * seconds
                windows.append(sum(lo <= t < hi for t in ends) * batch_size / seconds)
            steps = len(ends)
            row = dict(rtt=rtt, bw=bw, windows=windows, trainers=len(ran), steps=steps,
                       errors=sum(m[4] for m in ran) + sum(m[3] for m in warm), failed_calls=sum(m[5] for m in ran),
                       mb_per_s=(up1 - up0 + down1 - down0) / 2**20 / max(until - start_at, 1e-9),
                       step_time=(seconds * repeats * len(ran) / steps) if steps else math.inf)
            rows.append(row)
            logger.info("swarm %s", row)
    finally:
        for q in commands:
            q.put(None)
        for p in processes:
            _end_process(p, timeout=30)
    return rows


def print_swarm(rows: list[dict], num_trainers: int, batch_size: int, seconds: float) -> None:
    print(f"\n== 2. {num_trainers} trainer processes x batch {batch_size}x64, 2 hosts; bandwidth = each HOST's access link "
          f"(shared by all trainers, per direction); samples/s of the swarm, median (min-max) over windows of {seconds:g} s ==")
    print(f"{'RTT ms':>6} {'bw':>5} {'samples/s':>24} {'vs 0 ms':>8} {'s/step/trainer':>15} {'MiB/s http':>10} "
          f"{'errors':>6} {'failed calls':>12}")
    base = {r["bw"]: statistics.median(r["windows"]) for r in rows if r["rtt"] == 0}
    for r in rows:
        med = statistics.median(r["windows"])
        ratio = f"{med / base[r['bw']]:.2f}" if base.get(r["bw"]) else "-"
        print(f"{r['rtt'] * 1000:6.0f} {bw_name(r['bw']):>5} {spread(r['windows'], '{:.0f}'):>24} {ratio:>8} "
              f"{r['step_time']:15.3f} {r['mb_per_s']:10.2f} {r['errors']:6d} {r['failed_calls']:12d}")


# ---- part 3: the DHT ----------------------------------------------------------------------------
def run_dht(rtts: list[float], num_nodes: int, rounds: int, seed: int = 0) -> list[dict]:
    """16 nodes on one UDPNetwork: store, get, beam search per RTT; also checks that routing tables
    hold only public (emulated) addresses and that every datagram went through the network."""
    from lightning_moe.client.beam_search import beam_search
    from lightning_moe.dht import DHT

    link = VarLink()
    net = UDPNetwork(link).start()  # type: ignore[arg-type]
    nodes: list[Any] = []
    rows = []
    rng = random.Random(seed)
    try:
        first = DHT(wait_timeout=10.0)
        nodes.append(first)
        public = net.add(("127.0.0.1", first.port))
        boot = f"{public[0]}:{public[1]}"
        for _ in range(num_nodes - 1):
            nodes.append(DHT(initial_peers=[boot], wait_timeout=10.0))
        for node in nodes[1:]:  # each got its public address with its first datagram (bootstrap)
            if net.public_address(("127.0.0.1", node.port)) is None:
                net.add(("127.0.0.1", node.port))
        publics = set(net.endpoints)
        tables = [node.routing_table() for node in nodes]
        leaked = sum(1 for table in tables for a in table if (a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) not in publics)
        known = statistics.median(len(t) for t in tables)
        # two "hosts" declare the 4x4 grid (endpoints that are never called)
        uids = grid_uids("bs", GRID)
        for rtt in rtts:
            link.delay = rtt / 4
            expiry = time.time() + 250  # declared again per row (records live at most records.MAX_TTL)
            nodes[1].declare_experts(uids[0::2], "127.0.0.1:9", expiry, timeout=30)
            nodes[2].declare_experts(uids[1::2], "127.0.0.1:10", expiry, timeout=30)
            nodes[3].get("warm-up", timeout=10)  # srtt and cookies settle at the new delay
            stores, gets, beams, ok_get, ok_beam, ok_store = [], [], [], 0, 0, 0
            for r in range(rounds):
                key = f"key-{rtt}-{r}-{rng.random()}"
                a, b, c = rng.sample(range(3, num_nodes), 3)
                begin = time.perf_counter()
                ok_store += bool(nodes[a].store(key, "sub", r, time.time() + 250, timeout=10))
                stores.append(time.perf_counter() - begin)
                begin = time.perf_counter()
                found = nodes[b].get(key, timeout=10)
                gets.append(time.perf_counter() - begin)
                ok_get += bool(found) and found.get("sub", (None,))[0] == r
                scores = [torch.randn(16, g) for g in GRID]
                begin = time.perf_counter()
                chosen = beam_search(nodes[c], "bs", scores, K_BEST, timeout=10)
                beams.append(time.perf_counter() - begin)
                ok_beam += all(len(row) == K_BEST for row in chosen)
            rows.append(dict(rtt=rtt, store=stores, get=gets, beam=beams, ok_store=ok_store, ok_get=ok_get,
                             ok_beam=ok_beam, rounds=rounds))
            logger.info("dht rtt %s: get %s", rtt, statistics.median(gets))
        received = sum(node.stats["bytes_received"] for node in nodes)
        check = dict(nodes=num_nodes, routing_median=known, leaked=leaked, received=received, relayed=net.bytes,
                     auto_added=net.auto_added, dropped=net.dropped)
    finally:
        for node in nodes:
            node.shutdown()
        net.close()
    return [check] + rows


def print_dht(rows: list[dict]) -> None:
    check, rows = rows[0], rows[1:]
    print(f"\n== 3. DHT: {check['nodes']} nodes, every datagram through the emulated network; median (min-max) "
          f"over {rows[0]['rounds'] if rows else 0} rounds; RTTs = seconds / RTT ==")
    print(f"{'RTT ms':>6} {'store s':>20} {'store RTTs':>10} {'get s':>20} {'get RTTs':>8} {'get ok':>7} "
          f"{'beam s':>20} {'beam RTTs':>9} {'beam ok':>7}")
    for r in rows:
        def rtts(values: list[float]) -> str:
            return f"{statistics.median(values) / r['rtt']:.1f}" if r["rtt"] > 0 else "-"
        print(f"{r['rtt'] * 1000:6.0f} {spread(r['store'], '{:.3f}'):>20} {rtts(r['store']):>10} "
              f"{spread(r['get'], '{:.3f}'):>20} {rtts(r['get']):>8} {r['ok_get']:>3}/{r['rounds']:<3} "
              f"{spread(r['beam'], '{:.3f}'):>20} {rtts(r['beam']):>9} {r['ok_beam']:>3}/{r['rounds']:<3}")
    print(f"routing tables: median {check['routing_median']} peers, {check['leaked']} addresses outside the emulator; "
          f"bytes received by the nodes {check['received']}, delivered by the emulator {check['relayed']} "
          f"(equal: nothing bypassed it); stores ok {', '.join(str(r['ok_store']) for r in rows)}")


# ---- part 4: the 4-layer example, pipelined and not ------------------------------------------------
def example_micro_batches() -> int | str:
    """``model.micro_batches`` of the 4-layer example (``experiment=four_layers``; the model group's default if unset):
    an int, or ``"auto"``."""
    from omegaconf import OmegaConf

    import lightning_moe.conf

    folder = os.path.dirname(lightning_moe.conf.__file__)
    experiment = OmegaConf.load(os.path.join(folder, "experiment", "four_layers.yaml"))
    default = OmegaConf.load(os.path.join(folder, "model", "char_lm.yaml")).get("micro_batches", 1)
    value = OmegaConf.select(experiment, "model.micro_batches", default=default)
    return value if value == "auto" else int(value)


def run_layers4(swarm: WanSwarm, cells: list[tuple[float, float | None]], steps: int, batch_size: int, layer_kwargs: dict,
                micro_batches: int) -> list[dict]:
    """Per (rtt, bandwidth): step times of the 4-layer example unpipelined (1 micro-batch), with ``micro_batches`` and
    with ``"auto"``, interleaved step by step (one model; only ``model.moes.micro_batches`` changes), the micro-batches
    auto chose, and bytes per step. The emulated links end on loopback, which auto (as ``compression="auto"``) would
    always take as fast: here it judges them by their measured rates (``links.LOOPBACK_IS_EXACT`` off)."""
    from lightning_moe.client import links

    model, optimizer, text = build_trainer(swarm.initial_peers, seed=100, layer_kwargs=layer_kwargs, moe_layers=swarm.num_layers)
    rng = random.Random(0)
    modes = (1, micro_batches, "auto")
    rows = []
    loopback_is_exact, links.LOOPBACK_IS_EXACT = links.LOOPBACK_IS_EXACT, False
    try:
        for rtt, bw in cells:
            swarm.set_link(rtt, bw)
            for mode in modes:  # warm-up: connections, expert info, DHT cache
                model.moes.micro_batches = mode
                train_step(model, optimizer, text, rng, batch_size, 64)
            times: dict[int | str, list[float]] = {mode: [] for mode in modes}
            chosen: list[int] = []
            failed = 0
            up0, down0 = swarm.http_bytes()
            for _ in range(steps):
                for mode in modes:
                    model.moes.micro_batches = mode
                    begin = time.perf_counter()
                    train_step(model, optimizer, text, rng, batch_size, 64)
                    times[mode].append(time.perf_counter() - begin)
                    if mode == "auto":
                        chosen.append(model.moes.last_micro_batches)
                    failed += sum(layer.last_stats.failed + layer.last_stats.timed_out + layer.last_stats.backward_failed
                                  for layer in model.moes)
            up1, down1 = swarm.http_bytes()
            row = dict(rtt=rtt, bw=bw, base=times[1], piped=times[micro_batches], auto=times["auto"], chosen=chosen,
                       failed=failed,
                       up=(up1 - up0) / (steps * len(modes)), down=(down1 - down0) / (steps * len(modes)))
            rows.append(row)
            logger.info("layers4 %s", {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in row.items()})
    finally:
        links.LOOPBACK_IS_EXACT = loopback_is_exact
        for layer in model.moes:
            layer.close()
    return rows


def added_rtts(rows: list[dict], key: str) -> dict[tuple[float, float | None], float]:
    """(rtt, bw) -> (median step at this RTT - median step at RTT 0, same bandwidth) / RTT, for the ``key`` steps."""
    base = {r["bw"]: statistics.median(r[key]) for r in rows if r["rtt"] == 0}
    return {(r["rtt"], r["bw"]): (statistics.median(r[key]) - base[r["bw"]]) / r["rtt"]
            for r in rows if r["rtt"] > 0 and r["bw"] in base}


def print_layers4(rows: list[dict], batch_size: int, micro_batches: int, num_layers: int) -> None:
    print(f"\n== 4. one trainer: CharLM with {num_layers} DecentralizedMoE layers {GRID[0]}x{GRID[1]} k_best {K_BEST}, "
          f"batch {batch_size}x64, 2 hosts; unpipelined vs {micro_batches} micro-batches vs auto, interleaved step by "
          f"step; median (min-max) over steps, seconds ==")
    print(f"{'RTT ms':>6} {'bw':>5} {'step, 1 micro-batch':>22} {'+RTTs':>6} {f'step, {micro_batches} micro-batches':>22} "
          f"{'+RTTs':>6} {'step, auto':>22} {'+RTTs':>6} {'auto chose':>10} {'speed-up':>8} {'KB up/st':>9} "
          f"{'KB dn/st':>9} {'fail':>4}")
    found = {key: added_rtts(rows, key) for key in ("base", "piped", "auto")}
    for r in rows:
        cell = (r["rtt"], r["bw"])
        b, p, a = (f"{found[key][cell]:.1f}" if cell in found[key] else "-" for key in ("base", "piped", "auto"))
        speedup = statistics.median(r["base"]) / statistics.median(r["auto"])
        chose = "/".join(str(r["chosen"].count(n)) for n in (1, 2))
        print(f"{r['rtt'] * 1000:6.0f} {bw_name(r['bw']):>5} {spread(r['base'], '{:.3f}'):>22} {b:>6} "
              f"{spread(r['piped'], '{:.3f}'):>22} {p:>6} {spread(r['auto'], '{:.3f}'):>22} {a:>6} {chose:>10} "
              f"{speedup:8.2f} {r['up'] / 1024:9.0f} {r['down'] / 1024:9.0f} {r['failed']:4d}")
    print("+RTTs: (median step at this RTT - median step at RTT 0, same bandwidth) / RTT: the round trips a step pays; "
          "auto chose: its steps with 1 / 2 micro-batches; speed-up: 1 micro-batch's median step / auto's")


def layers4_line(rows: list[dict], micro_batches: int) -> str:
    """The last line: the 4-layer example as configured (``model.micro_batches`` of ``experiment=four_layers``) at
    100 ms, at unlimited bandwidth when that was run, else the first bandwidth."""
    example = example_micro_batches()
    key = "auto" if example == "auto" else "base" if example == 1 else "piped"
    if example not in (1, micro_batches, "auto"):
        return f"4-layer example, round trips per step at 100 ms: n/a (the example runs {example} micro-batches, measured {micro_batches})"
    bws = [r["bw"] for r in rows]
    bw = None if None in bws else (bws[0] if bws else None)
    found = added_rtts(rows, key).get((0.1, bw))
    return f"4-layer example, round trips per step at 100 ms: {found:.1f}" if found is not None else \
        "4-layer example, round trips per step at 100 ms: n/a"


# ---- main ---------------------------------------------------------------------------------------
def ratio_line(swarm_rows: list[dict]) -> str:
    bws = [r["bw"] for r in swarm_rows]
    bw = None if None in bws else (bws[0] if bws else None)
    by_rtt = {round(r["rtt"] * 1000): statistics.median(r["windows"]) for r in swarm_rows if r["bw"] == bw}
    if by_rtt.get(0) and 100 in by_rtt:
        return f"swarm throughput at 100 ms / 0 ms: {by_rtt[100] / by_rtt[0]:.2f}"
    return "swarm throughput at 100 ms / 0 ms: n/a"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtts", default=None, help="round-trip times in ms, comma-separated (default 0,50,100,200; "
                                                     "--quick: 0,100)")
    parser.add_argument("--bandwidths", default=None, help="Mbit/s, comma-separated, inf = unlimited "
                                                           "(default inf,100,20; --quick: inf)")
    parser.add_argument("--parts", default="single,swarm,dht,layers4", help="which parts: single, swarm, dht, layers4")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="micro-batches of the pipelined 4-layer runs (default: the example's if it pipelines, else 2)")
    parser.add_argument("--layers", type=int, default=4, help="mixture layers of part 4")
    parser.add_argument("--quick", action="store_true", help="fewer rows, steps, rounds and shorter windows")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row of part 1 (default 8; quick 4)")
    parser.add_argument("--trainers", type=int, default=8)
    parser.add_argument("--swarm-seconds", type=float, default=None, help="window of part 2 (default 10; quick 6)")
    parser.add_argument("--repeats", type=int, default=None, help="windows per row of part 2 (default 3; quick 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--timeout-after-k-min", type=float, default=1.0,
                        help="the layer's timeout_after_k_min and backward_timeout_after_k_min (the example's 1.0)")
    parser.add_argument("--compression", default="none", choices=["none", "float16", "uint8"],
                        help="the layer's wire compression (hosts answer in kind)")
    parser.add_argument("--dht-nodes", type=int, default=16)
    parser.add_argument("--dht-rounds", type=int, default=None, help="default 20; quick 8")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.rtts = parse_rtts(args.rtts or ("0,100" if args.quick else "0,50,100,200"))
    args.bandwidths = parse_bandwidths(args.bandwidths or ("inf" if args.quick else "inf,100,20"))
    args.steps = args.steps or (4 if args.quick else 8)
    args.swarm_seconds = args.swarm_seconds or (6.0 if args.quick else 10.0)
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.dht_rounds = args.dht_rounds or (8 if args.quick else 20)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    example = example_micro_batches()
    args.micro_batches = args.micro_batches or (example if example != "auto" and example > 1 else AUTO_MICRO_BATCHES)
    return args


def run(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Run the chosen parts; returns their rows (the smoke test checks them)."""
    torch.set_num_threads(1)
    cells = [(rtt, bw) for bw in args.bandwidths for rtt in args.rtts]
    out: dict[str, list[dict]] = {}
    layer_kwargs = dict(timeout_after_k_min=args.timeout_after_k_min, backward_timeout_after_k_min=args.timeout_after_k_min,
                        compression=args.compression)
    if args.parts & {"single", "swarm"}:
        with WanSwarm(num_hosts=2) as swarm:
            if "single" in args.parts:
                out["single"] = run_single(swarm, cells, args.steps, args.batch_size, layer_kwargs)
            if "swarm" in args.parts:
                out["swarm"] = run_swarm(swarm, cells, args.trainers, args.swarm_seconds, args.repeats, args.batch_size,
                                         layer_kwargs)
    if "dht" in args.parts:
        out["dht"] = run_dht(args.rtts, args.dht_nodes, args.dht_rounds)
    if "layers4" in args.parts:
        with WanSwarm(num_hosts=2, num_layers=args.layers) as swarm:
            out["layers4"] = run_layers4(swarm, cells, args.steps, args.batch_size, layer_kwargs, args.micro_batches)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    began = time.monotonic()
    out = run(args)
    print(f"\nbenchmark_wan: rtts {[round(r * 1000) for r in args.rtts]} ms, bandwidths "
          f"{[bw_name(b) for b in args.bandwidths]}, {os.cpu_count()} CPUs, {time.monotonic() - began:.0f} s")
    if "single" in out:
        print_single(out["single"], args.batch_size, args.compression)
    if "swarm" in out:
        print_swarm(out["swarm"], args.trainers, args.batch_size, args.swarm_seconds)
    if "dht" in out:
        print_dht(out["dht"])
    print(ratio_line(out.get("swarm", [])))
    if "layers4" in out:
        print_layers4(out["layers4"], args.batch_size, args.micro_batches, args.layers)
        print(layers4_line(out["layers4"], args.micro_batches))


if __name__ == "__main__":
    main()
