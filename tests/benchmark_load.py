"""Load: many concurrent clients against one ExpertHost for a fixed time.

Default: 32 clients (4 processes x 8 threads) send forward + backward of 16 x 256 rows to 8
``ffn`` experts for 60 s. Prints requests/s, latency percentiles, failed requests, and the host's
largest queue and memory growth, sampled every second; and, as the local baseline, the latency
of the same forward + backward computed in this process without the network.

    python tests/benchmark_load.py
    python tests/benchmark_load.py --clients 64 --seconds 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import threading
import time

import torch

from lightning_moe.client.remote_expert import RemoteExpertError, call_backward, call_expert, new_keep_id
from lightning_moe.server import ExpertHost
from lightning_moe.server.experts import make_expert
from lightning_moe.volunteer import make_backends


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def client_process(endpoint: str, uids: list[str], args: argparse.Namespace, seed: int, start, results) -> None:
    torch.set_num_threads(1)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(thread_seed: int) -> None:
        rng = random.Random(thread_seed)
        x = torch.randn(args.rows, args.hid_dim)
        grad = torch.randn(args.rows, args.hid_dim)
        end = start_time + args.seconds
        while time.time() < end:
            uid = rng.choice(uids)
            begin = time.perf_counter()
            try:
                keep = new_keep_id() if args.keep else None  # the host keeps the forward's graph for the backward
                call_expert(uid, endpoint, "forward", [x], timeout=60, keep=keep)
                call_backward(uid, endpoint, keep, [x], [grad], timeout=60)
            except RemoteExpertError as e:
                with lock:
                    failures.append(str(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - begin)

    start.wait()
    start_time = time.time()
    threads = [threading.Thread(target=client, args=(seed * 1000 + i,)) for i in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((latencies, failures[:20], len(failures)))


def local_latency(args: argparse.Namespace) -> float:
    """Median seconds of one request's forward + backward computed here (no network, no batching)."""
    backend = next(iter(make_backends(["ffn.0"], lambda: make_expert("ffn", args.hid_dim), None, args.hid_dim).values()))
    x, grad = torch.randn(args.rows, args.hid_dim), torch.randn(args.rows, args.hid_dim)
    times = []
    for _ in range(20):
        begin = time.perf_counter()
        backend.forward(x)
        backend.backward(x, grad)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hid-dim", type=int, default=256)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--no-keep", dest="keep", action="store_false",
                        help="the host recomputes each forward in backward (the trainer resends the inputs)")
    args = parser.parse_args()
    args.threads = max(1, args.clients // args.processes)
    clients = args.threads * args.processes

    print(f"{clients} clients ({args.processes} processes x {args.threads} threads), {args.seconds:.0f} s, "
          f"{args.experts} ffn experts hid={args.hid_dim}, {args.rows} rows per request, forward + backward")
    print(f"local baseline: forward + backward of one request in-process: {local_latency(args) * 1000:.1f} ms (median)")
    uids = [f"ffn.{i}" for i in range(args.experts)]
    backends = make_backends(uids, lambda: make_expert("ffn", args.hid_dim), lambda p: torch.optim.Adam(p, lr=1e-4),
                             args.hid_dim, max_batch_size=1024)
    ctx = mp.get_context("spawn")
    with ExpertHost(backends) as host:
        start, results = ctx.Event(), ctx.Queue()
        processes = [ctx.Process(target=client_process, args=(host.endpoint, uids, args, i, start, results), daemon=True)
                     for i in range(args.processes)]
        for process in processes:
            process.start()
        time.sleep(5.0)  # let the clients import torch
        rss_before, max_rss, max_queue = rss_bytes(), rss_bytes(), 0
        start.set()
        begin = time.time()
        next_report = begin + 10.0
        while time.time() < begin + args.seconds + 1:
            stats = host.stats()
            queued = sum(e[d]["queued_rows"] for e in stats.values() for d in ("forward", "backward"))
            max_queue, max_rss = max(max_queue, queued), max(max_rss, rss_bytes())
            if time.time() >= next_report:  # progress: one line per 10 s
                served = sum(e["backward"]["requests"] for e in stats.values())
                print(f"  {time.time() - begin:4.0f} s: {served} backward requests served, queue {queued} rows, "
                      f"memory +{(rss_bytes() - rss_before) / 2**20:.1f} MiB", flush=True)
                next_report += 10.0
            time.sleep(1.0)
        latencies, failures, failed = [], [], 0
        for _ in processes:
            got = results.get(timeout=args.seconds + 120)
            latencies += got[0]
            failures += got[1]
            failed += got[2]
        elapsed = time.time() - begin
        for process in processes:
            process.join(timeout=30)
        kept = host.kept.stats()
    print(f"requests (forward+backward pairs): {len(latencies)} ok, {failed} failed; {len(latencies) / elapsed:.1f} pairs/s")
    print("latency per pair: " + ", ".join(f"p{q}={percentile(latencies, q) * 1000:.1f} ms" for q in (50, 90, 99))
          + f", max={max(latencies, default=float('nan')) * 1000:.1f} ms")
    print(f"host: largest queue {max_queue} rows (of at most {clients * args.rows} in flight), "
          f"memory growth {(max_rss - rss_before) / 2**20:.1f} MiB")
    print(f"kept forwards: {kept['graph_backwards']} backwards through their graph, {kept['recomputed']} recomputed, "
          f"{kept['misses']} resent; {kept['used_bytes'] / 2**20:.1f} MiB kept at the end (budget {kept['budget_bytes'] / 2**20:.0f} MiB)")
    for failure in failures[:5]:
        print(f"failure: {failure}")


if __name__ == "__main__":
    main()
