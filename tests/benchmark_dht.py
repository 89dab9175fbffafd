"""DHT benchmark on loopback: every peer is a real ``lightning_moe.dht.DHT`` node.

Peers run as separate processes by default (``--mode processes``: one process per peer,
commands sent over a pipe, like hivemind's DHT which runs in its own process), or as nodes
in this process (``--mode threads``: each node still has its own event loop thread and socket).

Scenario 1 (hivemind's benchmarks/benchmark_dht.py, same defaults): ``--threads`` concurrent
tasks each run ``--rounds`` rounds; a round picks ``--store-peers`` random peers that
concurrently store one sub-key each under a fresh key, then ``--get-peers`` random peers
get that key. A get succeeds only if it sees every sub-key with its value.
``int(failure_rate * peers)`` peers (never used for store/get) are killed (SIGKILL, no
goodbye) at random rounds during the run. Prints per-round store/get wall time and success.

Scenario 2 (expert discovery): a host node declares a ``--grid`` of experts, a client-mode
trainer node gets all of them and runs beam search for the ``--k-best`` live experts of a
batch of ``--batch`` score vectors. Both join the swarm of scenario 1.

    python tests/benchmark_dht.py --peers 16 --rounds 16 --failure-rate 0.1
    python tests/benchmark_dht.py --peers 64 --rounds 16 --failure-rate 0.1
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import logging
import multiprocessing as mp
import random
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_moe.dht import DHT  # noqa: E402  (no torch import here: spawned peers stay light)

HIVEMIND_REFERENCE = "hivemind 1.1.12, 16 peers, its defaults: store 0.65 s, get 0.53 s per round, 100% success"


# ----------------------------------------------------------------------------- peers
def _peer_main(conn, initial_peers: list, dht_kwargs: dict) -> None:
    """A peer process: one DHT node; requests arrive over the pipe and run concurrently on
    the node's loop (``return_future=True``); replies are sent when each finishes."""
    logging.basicConfig(level=logging.ERROR)
    dht = DHT(initial_peers=initial_peers, **dht_kwargs)
    conn.send(dht.address)
    send_lock = threading.Lock()

    def reply(req_id: int, future: concurrent.futures.Future) -> None:
        try:
            result = (True, future.result())
        except Exception as e:  # noqa: BLE001 - reported to the driver
            result = (False, repr(e))
        with send_lock:
            conn.send((req_id, result))

    try:
        while True:
            message = conn.recv()
            if message is None:
                break
            req_id, op, args = message
            try:
                future = getattr(dht, op)(*args, return_future=True)
            except Exception as e:  # noqa: BLE001
                future = concurrent.futures.Future()
                future.set_exception(e)
            future.add_done_callback(lambda f, req_id=req_id: reply(req_id, f))
    except (EOFError, OSError):
        pass
    finally:
        dht.shutdown()


class ProcessPeer:
    def __init__(self, ctx, initial_peers: list, dht_kwargs: dict):
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_peer_main, args=(child, initial_peers, dht_kwargs), daemon=True)
        self.process.start()
        if not self._conn.poll(60):
            raise RuntimeError("peer did not start")
        self.address = self._conn.recv()
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                req_id, (ok, result) = self._conn.recv()
                future = self._futures.pop(req_id)
                if ok:
                    future.set_result(result)
                else:
                    future.set_exception(RuntimeError(result))
        except (EOFError, OSError):
            for future in list(self._futures.values()):
                if not future.done():
                    future.set_exception(RuntimeError("peer is gone"))

    def call(self, op: str, *args) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            req_id = next(self._ids)
            self._futures[req_id] = future
            self._conn.send((req_id, op, args))
        return future

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                with self._lock:
                    self._conn.send(None)
            except OSError:
                pass
            self.process.join(15)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)


class ThreadPeer:
    def __init__(self, initial_peers: list, dht_kwargs: dict):
        self.dht = DHT(initial_peers=initial_peers, **dht_kwargs)
        self.address = self.dht.address

    def call(self, op: str, *args) -> concurrent.futures.Future:
        try:
            return getattr(self.dht, op)(*args, return_future=True)
        except Exception as e:  # noqa: BLE001 - e.g. the peer was stopped
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_exception(e)
            return future

    def kill(self) -> None:
        self.dht.shutdown()

    close = kill


class NodeKiller:
    """Kills the chosen peers at the chosen global round numbers (as in hivemind's benchmark)."""

    def __init__(self, victims: list, rounds_to_kill_at: list[int]):
        self.victims, self.at = list(victims), sorted(rounds_to_kill_at)
        self.counter = 0
        self.killed = 0
        self.lock = threading.Lock()

    def check_and_kill(self) -> None:
        with self.lock:
            while self.at and self.at[0] == self.counter and self.victims:
                self.at.pop(0)
                self.victims.pop(random.randrange(len(self.victims))).kill()
                self.killed += 1
            self.counter += 1


# ----------------------------------------------------------------------------- scenario 1
def rounds_task(seed: int, peers: list, args, killer: NodeKiller) -> tuple[list, list, int, int, int, int]:
    rng = random.Random(seed)
    store_times, get_times = [], []
    stores_ok = stores = gets_ok = gets = 0
    for _ in range(args.rounds):
        key = uuid.UUID(int=rng.getrandbits(128)).hex
        start = time.perf_counter()
        store_peers = rng.sample(peers, min(args.store_peers, len(peers)))
        values = {uuid.UUID(int=rng.getrandbits(128)).hex: uuid.UUID(int=rng.getrandbits(128)).hex
                  for _ in store_peers}
        futures = [peer.call("store", key, subkey, value, time.time() + args.expiration)
                   for peer, (subkey, value) in zip(store_peers, values.items())]
        results = [_result(f) for f in futures]
        killer.check_and_kill()
        store_times.append(time.perf_counter() - start)
        stores += len(results)
        stores_ok += sum(r is True for r in results)

        start = time.perf_counter()
        get_peers = rng.sample(peers, min(args.get_peers, len(peers)))
        answers = [_result(f) for f in [peer.call("get", key) for peer in get_peers]]
        get_times.append(time.perf_counter() - start)
        gets += len(answers)
        for answer in answers:
            if isinstance(answer, dict) and len(answer) == len(values) and \
                    all(answer.get(sk, (None,))[0] == v for sk, v in values.items()):
                gets_ok += 1
    return store_times, get_times, stores_ok, stores, gets_ok, gets


def _result(future: concurrent.futures.Future):
    try:
        return future.result(timeout=60)
    except Exception as e:  # noqa: BLE001
        return e


def _fmt(times: list[float]) -> str:
    std = statistics.stdev(times) if len(times) > 1 else 0.0
    return f"mean {statistics.mean(times):.4f} s, std {std:.4f} s, max {max(times):.4f} s"


def scenario_store_get(peers: list, args) -> list:
    rng = random.Random(args.seed)
    victims = rng.sample(peers, min(int(args.failure_rate * len(peers)), len(peers) - 1))
    remaining = [p for p in peers if p not in victims]
    total_rounds = args.threads * args.rounds
    killer = NodeKiller(victims, rng.sample(range(total_rounds), min(len(victims), total_rounds)))
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        outcomes = list(pool.map(lambda i: rounds_task(args.seed * 1000 + i, remaining, args, killer),
                                 range(args.threads)))
    elapsed = time.perf_counter() - started
    store_times = [t for o in outcomes for t in o[0]]
    get_times = [t for o in outcomes for t in o[1]]
    stores_ok, stores, gets_ok, gets = (sum(o[i] for o in outcomes) for i in range(2, 6))
    print(f"\n== scenario 1: store/get rounds ({len(peers)} peers as {args.mode}, {args.threads} concurrent tasks x "
          f"{args.rounds} rounds, {args.store_peers} stores + {args.get_peers} gets per round, "
          f"{killer.killed} of {len(victims)} scheduled peers killed) ==")
    print(f"store wall time per round: {_fmt(store_times)}")
    print(f"get wall time per round:   {_fmt(get_times)}")
    print(f"store success: {100 * stores_ok / stores:.1f}% ({stores_ok}/{stores})")
    print(f"get success:   {100 * gets_ok / gets:.1f}% ({gets_ok}/{gets})")
    print(f"total time: {elapsed:.2f} s   reference: {HIVEMIND_REFERENCE}")
    return remaining


# ----------------------------------------------------------------------------- scenario 2
def scenario_discovery(bootstrap: list[str], args, dht_kwargs: dict) -> None:
    import torch  # imported here so that spawned peers do not pay for it

    from lightning_moe.client.beam_search import beam_search

    rows, cols = args.grid
    uids = [f"ffn.{i}.{j}" for i in range(rows) for j in range(cols)]
    uid_set = set(uids)
    endpoint = "127.0.0.1:31337"
    with DHT(initial_peers=bootstrap, **dht_kwargs) as host, \
            DHT(initial_peers=bootstrap, client_mode=True, **dht_kwargs) as trainer:
        start = time.perf_counter()
        declared = host.declare_experts(uids, endpoint, time.time() + args.expiration, timeout=120)
        declare_time = time.perf_counter() - start

        start = time.perf_counter()
        found = trainer.get_experts(uids, timeout=120)
        get_time = time.perf_counter() - start
        num_found = sum(f == endpoint for f in found)

        generator = torch.Generator().manual_seed(args.seed)
        times, complete = [], 0
        for _ in range(args.beam_batches):
            scores = [torch.randn(args.batch, rows, generator=generator), torch.randn(args.batch, cols, generator=generator)]
            start = time.perf_counter()
            best = beam_search(trainer, "ffn", scores, k_best=args.k_best)
            times.append(time.perf_counter() - start)
            complete += sum(len(row) == args.k_best and all(u in uid_set for u in row) for row in best)
    print(f"\n== scenario 2: expert discovery ({rows}x{cols} grid, {len(uids)} experts; host and client-mode "
          f"trainer in the driver process, joined to the swarm) ==")
    print(f"declare {len(uids)} experts: {declare_time:.3f} s (ok={declared}), "
          f"{1000 * declare_time / len(uids):.3f} ms per expert")
    print(f"get_experts: {get_time:.3f} s for {len(uids)}, {1000 * get_time / len(uids):.3f} ms per expert, "
          f"found {num_found}/{len(uids)}")
    print(f"beam search, batch {args.batch}, k_best {args.k_best}: {_fmt(times)} per batch over "
          f"{args.beam_batches} batches; {complete}/{args.batch * args.beam_batches} samples got {args.k_best} live experts")


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=10, help="concurrent round tasks (hivemind's num_threads)")
    parser.add_argument("--store-peers", type=int, default=8)
    parser.add_argument("--get-peers", type=int, default=8)
    parser.add_argument("--initial-peers", type=int, default=4, help="random earlier peers each new peer bootstraps to")
    parser.add_argument("--failure-rate", type=float, default=0.1)
    parser.add_argument("--expiration", type=float, default=300)
    parser.add_argument("--seed", type=int, default=30)
    parser.add_argument("--mode", choices=["processes", "threads"], default="processes")
    parser.add_argument("--rpc-timeout", type=float, default=1.0)
    parser.add_argument("--wait-timeout", type=float, default=5.0)
    parser.add_argument("--grid", type=int, nargs=2, default=[32, 32])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k-best", type=int, default=4)
    parser.add_argument("--beam-batches", type=int, default=10)
    parser.add_argument("--skip-discovery", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    random.seed(args.seed)

    dht_kwargs = dict(rpc_timeout=args.rpc_timeout, wait_timeout=args.wait_timeout)
    ctx = mp.get_context("spawn")
    peers: list = []
    start = time.perf_counter()
    try:
        for _ in range(args.peers):
            initial = [p.address for p in random.sample(peers, min(args.initial_peers, len(peers)))]
            peers.append(ProcessPeer(ctx, initial, dht_kwargs) if args.mode == "processes"
                         else ThreadPeer(initial, dht_kwargs))
        print(f"started {len(peers)} peers ({args.mode}) in {time.perf_counter() - start:.1f} s")
        remaining = scenario_store_get(peers, args)
        if not args.skip_discovery:
            bootstrap = [p.address for p in random.sample(remaining, min(args.initial_peers, len(remaining)))]
            scenario_discovery(bootstrap, args, dht_kwargs)
    finally:
        for peer in peers:
            peer.close()


if __name__ == "__main__":
    main()
