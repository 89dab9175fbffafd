"""A DecentralizedMoE training step against the same mixture computed locally, in one run.

Default scenario (issue 4): batch 256, hid 1024, k_best 4, 16 ``ffn`` experts on a 4x4 grid
served by 2 host processes (DHT + HTTP on loopback). Each step is forward + backward of the
layer (the hosts step their experts' Adam). The local baseline is LocalMoE with the same experts
in this process: forward + backward + Adam step. Prints steps/s of both and their ratio.

    python tests/benchmark_moe.py
    python tests/benchmark_moe.py --batch-size 128 --compression float16
"""

from __future__ import annotations

import argparse
import functools
import logging
import time

import torch

from lightning_moe.client.local_moe import LocalMoE
from lightning_moe.client.moe import DecentralizedMoE
from lightning_moe.server.experts import make_expert
from lightning_moe.config import HostConfig
from lightning_moe.swarm import LocalSwarm


def measure_local(args: argparse.Namespace, x: torch.Tensor) -> float:
    torch.manual_seed(0)
    moe = LocalMoE(args.hid_dim, args.grid, functools.partial(make_expert, args.expert_cls, args.hid_dim), k_best=args.k_best)
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-4)

    def step() -> None:
        moe(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    begin = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps / (time.perf_counter() - begin)


def measure_remote(args: argparse.Namespace, x: torch.Tensor) -> tuple[float, dict]:
    host = HostConfig(expert=functools.partial(make_expert, args.expert_cls, args.hid_dim), in_features=args.hid_dim,
                      optimizer=functools.partial(torch.optim.Adam, lr=1e-4), grid_size=list(args.grid), max_batch_size=4096,
                      update_period=5.0, stats_every=0)
    swarm = LocalSwarm(host, num_hosts=args.num_hosts)
    with swarm:
        moe = DecentralizedMoE(args.hid_dim, args.grid, "ffn", k_best=args.k_best, initial_peers=swarm.initial_peers,
                               compression=args.compression, forward_timeout=120, backward_timeout=120, cache_ttl=30)
        optimizer = torch.optim.Adam(moe.parameters(), lr=1e-4)

        def step() -> None:
            moe(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

        try:
            step()  # DHT lookups, expert info, keep-alive connections
            begin = time.perf_counter()
            for _ in range(args.steps):
                step()
            elapsed = time.perf_counter() - begin
            return args.steps / elapsed, moe.stats
        finally:
            moe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hid-dim", type=int, default=1024)
    parser.add_argument("--grid", type=int, nargs="+", default=[4, 4])
    parser.add_argument("--k-best", type=int, default=4)
    parser.add_argument("--num-hosts", type=int, default=2)
    parser.add_argument("--expert-cls", default="ffn")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compression", default="none", choices=["none", "float16", "uint8"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    x = torch.randn(args.batch_size, args.hid_dim)
    print(f"DecentralizedMoE step: batch={args.batch_size}, hid={args.hid_dim}, grid={args.grid}, k_best={args.k_best}, "
          f"hosts={args.num_hosts}, compression={args.compression}, steps={args.steps}")
    local = measure_local(args, x)
    print(f"local mixture (one process):   {local:6.2f} steps/s  ({local * args.batch_size:7.1f} samples/s)")
    remote, stats = measure_remote(args, x)
    print(f"DecentralizedMoE over loopback: {remote:6.2f} steps/s  ({remote * args.batch_size:7.1f} samples/s)")
    print(f"last step: {stats}")
    print(f"ratio remote/local: {remote / local:.2f}")


if __name__ == "__main__":
    main()
