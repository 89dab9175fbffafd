"""Throughput of one ExpertHost under many trainer processes, against the same experts run locally.

The scenario of hivemind's benchmarks/benchmark_throughput.py, so the figures compare: one host
with 16 ``ffn`` experts (hid_dim 1024, Adam), 8 client processes each sending 16 batches of 128
rows to random experts, forward + backward. The ceiling is the same experts run locally, forward +
backward + optimizer step in one process, over enough batches to be steady. Ceiling and remote run
are interleaved (ceiling, remote, ceiling, remote, ...) because a shared machine drifts; each
round's ratio divides the remote figure by the ceilings measured just before and after it. Prints
every round, the median and spread of each figure, and last the ratio's median and range.

    python tests/benchmark_throughput.py                     # 3 rounds
    python tests/benchmark_throughput.py --rounds 5 --num-clients 4 --compression uint8
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import random
import time

import torch

from lightning_moe.client.remote_expert import call_backward, call_expert, new_keep_id
from lightning_moe.config import HostConfig, HostLimits
from lightning_moe.server import ExpertBackend, ExpertHost
from lightning_moe.server.experts import make_expert

from bench_util import interleave, spread

logger = logging.getLogger("benchmark_throughput")


def make_backends(args: argparse.Namespace) -> dict[str, ExpertBackend]:
    torch.manual_seed(0)
    backends = {}
    for i in range(args.num_experts):
        expert = make_expert(args.expert_cls, args.hid_dim)
        backends[f"expert.{i}"] = ExpertBackend(
            f"expert.{i}",
            expert,
            torch.optim.Adam(expert.parameters(), lr=1e-4),
            args_schema=[((args.hid_dim,), torch.float32)],
            max_batch_size=args.max_batch_size,
        )
    return backends


def client_process(endpoint: str, uids: list[str], args: argparse.Namespace, seed: int, ready, start, results) -> None:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    x = torch.randn(args.batch_size, args.hid_dim)
    grad = torch.randn(args.batch_size, args.hid_dim)
    call_expert(uids[0], endpoint, "forward", [x[:1]], timeout=60)  # open the keep-alive connection
    ready.release()
    start.wait()
    begin = time.perf_counter()
    for _ in range(args.batches_per_client):
        uid = rng.choice(uids)
        keep = new_keep_id() if args.backprop and args.keep else None
        call_expert(uid, endpoint, "forward", [x], args.compression, timeout=120, keep=keep)
        if args.backprop:
            call_backward(uid, endpoint, keep, [x], [grad], args.compression, timeout=120)
    results.put(time.perf_counter() - begin)


def measure_remote(args: argparse.Namespace) -> float:
    """Samples per second through a real host on loopback, clients in separate processes."""
    ctx = mp.get_context("spawn")
    # a saturation benchmark: every client sends back to back, so the queue is as deep as they make it; shedding
    # (limits.max_queue_wait, for answers a trainer would no longer wait for) would refuse them
    with ExpertHost(make_backends(args), HostConfig(limits=HostLimits(max_queue_wait=None))) as host:
        uids = sorted(host.backends)
        ready, start, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
        clients = [
            ctx.Process(target=client_process, args=(host.endpoint, uids, args, seed, ready, start, results), daemon=True)
            for seed in range(args.num_clients)
        ]
        for client in clients:
            client.start()
        for _ in clients:
            if not ready.acquire(timeout=300):
                raise RuntimeError("a client process did not start within 300 s")
        begin = time.perf_counter()
        start.set()
        for _ in clients:
            results.get(timeout=args.timeout)
        elapsed = time.perf_counter() - begin
        for client in clients:
            client.join(timeout=30)
        stats = host.stats()
        kept = host.kept.stats()
    total = args.num_clients * args.batches_per_client * args.batch_size
    batches = sum(e[d]["batches"] for e in stats.values() for d in ("forward", "backward"))
    rows = sum(e[d]["samples"] for e in stats.values() for d in ("forward", "backward"))
    waits = [e[d]["mean_queue_wait"] for e in stats.values() for d in ("forward", "backward") if e[d]["batches"]]
    errors = sum(e["errors"] for e in stats.values())
    print(f"host: {batches} batches, mean {rows / max(batches, 1):.0f} rows per batch, "
          f"mean queue wait {sum(waits) / max(len(waits), 1) * 1000:.0f} ms, {errors} errors; kept forwards: "
          f"{kept['graph_backwards']} backwards through their graph, {kept['recomputed']} recomputed, {kept['misses']} resent")
    return total / elapsed


def measure_local(args: argparse.Namespace) -> float:
    """Samples per second of the same experts in this process: forward + backward + step."""
    backends = make_backends(args)
    experts = [(b.expert, b.optimizer) for b in backends.values()]
    rng = random.Random(0)
    x = torch.randn(args.batch_size, args.hid_dim)
    grad = torch.randn(args.batch_size, args.hid_dim)

    def step() -> None:
        expert, optimizer = rng.choice(experts)
        out = expert(x.requires_grad_(True))
        if args.backprop:
            out.backward(grad)
            optimizer.step()
            optimizer.zero_grad()

    for _ in range(3):
        step()
    begin = time.perf_counter()
    for _ in range(args.local_batches):
        step()
    return args.local_batches * args.batch_size / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-experts", type=int, default=16)
    parser.add_argument("--expert-cls", default="ffn")
    parser.add_argument("--hid-dim", type=int, default=1024)
    parser.add_argument("--num-clients", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches-per-client", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=2048, help="rows per batch the host forms")
    parser.add_argument("--compression", default="none", choices=["none", "float16", "uint8", "int8", "int4"])
    parser.add_argument("--no-keep", dest="keep", action="store_false",
                        help="the host recomputes each forward in backward (the trainer resends the inputs)")
    parser.add_argument("--no-backprop", dest="backprop", action="store_false", help="forward only")
    parser.add_argument("--local-batches", type=int, default=160, help="batches per ceiling measurement (steady: >= 128)")
    parser.add_argument("--rounds", type=int, default=3, help="remote runs, each between two ceiling measurements")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    print(f"experts={args.num_experts} x {args.expert_cls}(hid={args.hid_dim}), clients={args.num_clients}, "
          f"batch={args.batch_size} x {args.batches_per_client} per client, backprop={args.backprop}, "
          f"compression={args.compression}, torch threads={torch.get_num_threads()}, rounds={args.rounds}")
    figures = interleave(
        lambda: measure_local(args), lambda: measure_remote(args), args.rounds,
        baseline_label="ceiling {i} (one process, no network)", measured_label="remote {i} (through one ExpertHost)",
        show=lambda value: f"{value:8.1f} samples/s",
    )
    for name, values in (("ceiling", figures.baselines), ("remote", figures.measured)):
        print(f"{name}: {spread(values, 1, ' samples/s')}")
    print(f"ratio {spread(figures.ratios)}")


if __name__ == "__main__":
    main()
