"""A DecentralizedMoE training step against the same mixture computed locally, interleaved in one run.

Default scenario (issue 4): batch 256, hid 1024, k_best 4, 16 ``ffn`` experts on a 4x4 grid
served by 2 host processes (DHT + HTTP on loopback). Each step is forward + backward of the
layer (the hosts step their experts' Adam). The layer runs with its default settings (DHT cache,
timeouts, straggler cut-off); only ``--compression`` is passed. The local baseline is LocalMoE
with the same experts in this process: forward + backward + Adam step.

Both models are built once and warmed up; then rounds run interleaved: local, remote, local,
remote, ..., local (``--steps`` steps each), because a shared machine drifts. Each round's ratio
divides the remote figure by the mean of the local figures just before and after it. Prints every
round (with the remote steps' expert calls: asked, answered, failed, and the commonest errors),
the median and spread (min, max) of local, remote and the ratio; the last line is
``remote / local median X (min A, max B)``. The layer's defaults cut off late answers (after
``timeout_after_k_min`` / ``backward_timeout_after_k_min``): on a loaded machine a remote step
may drop expert calls and so do less work than a local one; the call counts show it.

    python tests/benchmark_moe.py
    python tests/benchmark_moe.py --rounds 5 --steps 20
    python tests/benchmark_moe.py --batch-size 128 --compression float16
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from typing import Callable

import torch

from lightning_moe.client.local_moe import LocalMoE
from lightning_moe.client.moe import DecentralizedMoE
from lightning_moe.config import HostConfig, LocalSwarmConfig
from lightning_moe.server.experts import make_expert
from lightning_moe.swarm import LocalSwarm

from bench_util import interleave, spread


COUNTS = ("asked", "answered", "failed", "timed_out", "backward_asked", "backward_answered", "backward_failed")


def steps_per_second(step: Callable[[], None], steps: int) -> float:
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - begin)


def training_step(moe: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """forward + backward + Adam step of ``moe``'s own parameters (LocalMoE: the experts; remote: the gating)."""
    optimizer = torch.optim.Adam(moe.parameters(), lr=1e-4)

    def step() -> None:
        moe(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hid-dim", type=int, default=1024)
    parser.add_argument("--grid", type=int, nargs="+", default=[4, 4])
    parser.add_argument("--k-best", type=int, default=4)
    parser.add_argument("--num-hosts", type=int, default=2)
    parser.add_argument("--expert-cls", default="ffn")
    parser.add_argument("--steps", type=int, default=10, help="steps per round, of each of local and remote")
    parser.add_argument("--rounds", type=int, default=3, help="remote rounds, each between two local rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each before the first round")
    parser.add_argument("--compression", default="none", choices=["none", "float16", "uint8", "int8", "int4"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    expert = functools.partial(make_expert, args.expert_cls, args.hid_dim)
    x = torch.randn(args.batch_size, args.hid_dim)
    print(f"DecentralizedMoE step: batch={args.batch_size}, hid={args.hid_dim}, grid={args.grid}, k_best={args.k_best}, "
          f"hosts={args.num_hosts}, compression={args.compression}, steps={args.steps} per round, rounds={args.rounds}, "
          f"torch threads={torch.get_num_threads()}", flush=True)

    torch.manual_seed(0)
    local_step = training_step(LocalMoE(args.hid_dim, args.grid, expert, k_best=args.k_best), x)
    host = HostConfig(expert=expert, in_features=args.hid_dim, optimizer=functools.partial(torch.optim.Adam, lr=1e-4),
                      grid_size=list(args.grid), max_batch_size=4096, stats_every=0)
    with LocalSwarm(host, LocalSwarmConfig(num_hosts=args.num_hosts, num_threads=None, update_period=5.0)) as swarm:
        moe = DecentralizedMoE(args.hid_dim, args.grid, "ffn", k_best=args.k_best, initial_peers=swarm.initial_peers,
                               compression=args.compression)
        counts: dict[str, int] = {}  # expert calls of this round's remote steps
        totals: dict[str, int] = {}  # of all rounds
        errors: dict[str, int] = {}
        try:
            remote_step = training_step(moe, x)
            for _ in range(args.warmup):  # DHT lookups, expert info, keep-alive connections; allocator warm-up
                local_step()
                remote_step()

            def counted_step() -> None:
                remote_step()
                for key, value in moe.stats.items():  # the last forward and its backward
                    if key in COUNTS:
                        counts[key] = counts.get(key, 0) + int(value)
                        totals[key] = totals.get(key, 0) + int(value)
                for error in getattr(moe.last_stats, "errors", ()):
                    kind = str(error)[:120]
                    errors[kind] = errors.get(kind, 0) + 1

            def remote() -> float:
                counts.clear()
                errors.clear()
                figure = steps_per_second(counted_step, args.steps)
                print("  calls: " + ", ".join(f"{key} {value}" for key, value in counts.items()), flush=True)
                for kind, times in sorted(errors.items(), key=lambda item: -item[1])[:3]:
                    print(f"  {times} x {kind}", flush=True)
                return figure

            figures = interleave(
                lambda: steps_per_second(local_step, args.steps), remote, args.rounds,
                baseline_label="local {i} (one process)", measured_label="remote {i} (DecentralizedMoE over loopback)",
                show=lambda value: f"{value:6.2f} steps/s ({value * args.batch_size:7.1f} samples/s)",
                ratio_label="remote / local",
            )
        finally:
            moe.close()
    if totals:  # the layer's default cut-offs drop late answers: a remote step may have done less work than a local one
        print(f"remote calls, all rounds: forward answered {totals.get('answered', 0)} of {totals.get('asked', 0)}, "
              f"backward answered {totals.get('backward_answered', 0)} of {totals.get('backward_asked', 0)}")
    print(f"local:  {spread(figures.baselines, 2, ' steps/s')}")
    print(f"remote: {spread(figures.measured, 2, ' steps/s')}")
    print(f"remote / local {spread(figures.ratios)}")


if __name__ == "__main__":
    main()
