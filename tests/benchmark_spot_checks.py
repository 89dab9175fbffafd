"""What spot checks cost a trainer's step (issue #21: at most 5%): three honest replicas of every cell of a 4x4 grid
(hid 64, the example's experts), one layer (k_best 4, batch 128) alternating blocks of steps with spot checks at the
given rates; step time is forward + backward. Run: ``python tests/benchmark_spot_checks.py [--steps 120]``."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import statistics
import time

import torch

from lightning_moe import DecentralizedMoE
from lightning_moe.client.health import HealthRegistry
from lightning_moe.config import DHTConfig, HostConfig
from lightning_moe.server import make_expert
from lightning_moe.volunteer import start_volunteer

logger = logging.getLogger("benchmark_spot_checks")
HID, GRID = 64, [4, 4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=120, help="steps per rate, in blocks of 10")
    parser.add_argument("--rates", default="0,0.02,0.05")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    rates = [float(r) for r in args.rates.split(",")]
    config = dict(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
                  in_features=HID, grid_size=GRID, cells=16, replicas=3, update_period=2.0, stats_every=0, num_threads=1)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(start_volunteer(HostConfig(**config, seed=0), DHTConfig()))
        peers = DHTConfig(initial_peers=[first.dht.address])
        for seed in (1, 2):
            stack.enter_context(start_volunteer(HostConfig(**config, seed=seed), peers))
        torch.manual_seed(0)
        layer = DecentralizedMoE(HID, GRID, "ffn", k_best=4, initial_peers=[first.dht.address], health=HealthRegistry())
        stack.callback(layer.close)
        times: dict[float, list[float]] = {rate: [] for rate in rates}
        for _ in range(5):  # warm-up
            layer(torch.randn(128, HID)).pow(2).mean().backward()
        for block in range(args.steps // 10):
            for rate in rates if block % 2 == 0 else rates[::-1]:
                layer.spot_check_rate = rate
                for _ in range(10):
                    x = torch.randn(128, HID)
                    start = time.perf_counter()
                    layer(x).pow(2).mean().backward()
                    times[rate].append(time.perf_counter() - start)
        figures = layer.dispatcher.checks.figures()
    base = statistics.median(times[rates[0]])
    print(f"{'rate':>6} {'median step s':>14} {'mean step s':>12} {'vs rate ' + str(rates[0]):>12}")
    for rate in rates:
        median = statistics.median(times[rate])
        print(f"{rate:>6} {median:>14.4f} {statistics.mean(times[rate]):>12.4f} {median / base - 1:>+12.1%}")
    print("checks:", figures)


if __name__ == "__main__":
    main()
