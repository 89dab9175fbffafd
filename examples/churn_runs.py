"""Churn you can run: the 4-layer example (experiment=four_layers) on a local swarm of 6 hosts, while every
``--period`` seconds a host is SIGKILLed and a new one (no checkpoint_dir) takes its cells.

Three runs per seed, at equal steps:
- ``steady``: 6 hosts, every cell on 2 of them (``host.replicas=2``), no churn;
- ``churn_r2``: the same swarm under churn; a joiner adopts each cell's state from its live replica;
- ``churn_r1``: every cell on 1 host under churn; a joiner starts its cells from fresh weights.

The victim is a random host among those replaced the fewest times, so every host is replaced in turn. Without
``--period``, the period is the steady run's training time divided by ``2 * 6 + 2``, so that every host is replaced
at least twice; the next kill comes a period after the last one, or once its joiner serves if that took longer. A joiner takes exactly the dead host's cells (the cells with the fewest live replicas, as a joining
volunteer's ``host.cells=N`` chooses them once the dead host's DHT records expire).

    python examples/churn_runs.py                                       # 3 runs, seed 0
    python examples/churn_runs.py trainer.max_steps=200 --seeds 0 1

Prints a table (validation bits per character, steps/s, failed calls, hosts replaced, cells that started from
fresh weights) and ends with ``quality under churn, r=2 vs no churn: +X%``, ``quality under churn, r=1 vs no
churn: +X%`` (the worst seed of each) and ``expert states lost: N of M cells`` (r=2: cells that a joiner started
from fresh weights, in any seed).
"""

from __future__ import annotations

import argparse
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
from hydra import compose, initialize_config_module

from lightning_moe.lightning.train import train
from lightning_moe.swarm import LocalSwarm

NUM_HOSTS = 6
RUNS = {
    "steady": ["host.replicas=2", "local_swarm.replicas=2"],
    "churn_r2": ["host.replicas=2", "local_swarm.replicas=2"],
    "churn_r1": ["host.replicas=1", "local_swarm.replicas=1"],
}
logger = logging.getLogger("churn_runs")


@dataclass
class ChurnReport:
    """What one run measured."""

    name: str
    seed: int
    val_bpc: float = float("nan")
    steps_per_s: float = 0.0
    train_seconds: float = 0.0
    failed: int = 0
    replaced: list[int] = field(default_factory=list)  # per host slot
    cells: int = 0
    lost: set[str] = field(default_factory=set)  # cells a joiner started from fresh weights


class Churn(pl.Callback):
    """Kills a host every ``period`` seconds of training and starts one that takes its cells; counts failed calls."""

    def __init__(self, report: ChurnReport, swarm: LocalSwarm, period: float | None, seed: int):
        self.report, self.swarm, self.period = report, swarm, period
        self.rng = random.Random(seed)
        self.slots = list(range(swarm.config.num_hosts))  # slot -> the swarm's index of the host in it now
        self.cells = [swarm.host_cells(i) for i in self.slots]
        report.replaced = [0] * len(self.slots)
        report.cells = len({uid for cells in self.cells for uid in cells})
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.batch_time, self.batches, self._start = 0.0, 0, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.period is not None:
            self.thread = threading.Thread(target=self._churn, name="churn", daemon=True)
            self.thread.start()

    def _churn(self) -> None:
        joined, wait = 0, self.period
        while not self.stop.wait(wait):
            began = time.monotonic()
            fewest = min(self.report.replaced)
            slot = self.rng.choice([s for s, n in enumerate(self.report.replaced) if n == fewest])
            self.swarm.kill(self.slots[slot])
            joined += 1
            index = self.swarm.add_host(self.cells[slot], seed=1000 * (self.report.seed + 1) + joined)
            self.slots[slot] = index
            self.report.replaced[slot] += 1
            fresh = set(self.cells[slot]) - set(self.swarm.adopted[index])
            self.report.lost |= fresh
            logger.warning("host slot %d replaced (%d times): %d of its %d cells adopted a replica's state", slot,
                           self.report.replaced[slot], len(self.cells[slot]) - len(fresh), len(self.cells[slot]))
            wait = max(self.period - (time.monotonic() - began), 0.0)  # a kill every period, or as soon as a joiner serves

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batch_time += time.perf_counter() - self._start
        self.batches += 1
        for moe in pl_module.moes:
            stats = moe.stats
            self.report.failed += int(stats.get("failed", 0) + stats.get("backward_failed", 0))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=self.swarm.config.start_timeout + 30)
        self.report.steps_per_s = self.batches / max(self.batch_time, 1e-9)
        self.report.train_seconds = self.batch_time


def run(name: str, seed: int, overrides: list[str], period: float | None) -> ChurnReport:
    """Train once; churn every ``period`` seconds (None: no churn)."""
    report = ChurnReport(name, seed)
    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "experiment=four_layers", f"local_swarm.num_hosts={NUM_HOSTS}", f"paths.output_dir=outputs/churn_runs/{name}-{seed}",
            f"seed={seed}", *overrides, *RUNS[name]])

    def callbacks(swarm: LocalSwarm | None) -> list[pl.Callback]:
        assert swarm is not None, "churn runs need the local swarm (no dht.initial_peers)"
        return [Churn(report, swarm, period, seed)]

    report.val_bpc = train(cfg, extra_callbacks=callbacks).get("val/bpc", float("nan"))
    return report


def print_table(reports: list[ChurnReport]) -> None:
    print(f"\n{'run':<9} {'seed':>4} {'val bpc':>8} {'vs steady':>17} {'steps/s':>8} {'failed':>7} {'replaced':>18} "
          f"{'cells fresh':>11}")
    for r in reports:
        steady = next((o for o in reports if o.name == "steady" and o.seed == r.seed), None)
        vs = f"{r.val_bpc - steady.val_bpc:+.3f} ({100 * (r.val_bpc / steady.val_bpc - 1):+.1f}%)" if steady else "-"
        replaced = "-" if not sum(r.replaced) else f"{sum(r.replaced)} (each >= {min(r.replaced)})"
        lost = "-" if not sum(r.replaced) else f"{len(r.lost)} of {r.cells}"
        print(f"{r.name:<9} {r.seed:>4} {r.val_bpc:8.3f} {vs:>17} {r.steps_per_s:8.2f} {r.failed:7d} {replaced:>18} {lost:>11}")
    for name, r in (("r=2", "churn_r2"), ("r=1", "churn_r1")):
        pairs = [(c, next((o for o in reports if o.name == "steady" and o.seed == c.seed), None)) for c in reports if c.name == r]
        worst = [100 * (c.val_bpc / s.val_bpc - 1) for c, s in pairs if s is not None]
        if worst:
            print(f"quality under churn, {name} vs no churn: {max(worst):+.1f}%")
    r2 = [r for r in reports if r.name == "churn_r2"]
    if r2:
        print(f"expert states lost: {len(set().union(*(r.lost for r in r2)))} of {r2[0].cells} cells")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--period", type=float, default=None,
                        help="seconds between kills (default: the steady run's training time / 14)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.max_steps=200")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = ["trainer.enable_checkpointing=false", "~logger", "callbacks=none", *args.overrides]
    reports = []
    for seed in args.seeds:
        print(f"=== steady (seed {seed}) ===", flush=True)
        steady = run("steady", seed, overrides, None)
        reports.append(steady)
        period = args.period or steady.train_seconds / (2 * NUM_HOSTS + 2)
        for name in ("churn_r2", "churn_r1"):
            print(f"=== {name} (seed {seed}, a host replaced every {period:.1f} s) ===", flush=True)
            reports.append(run(name, seed, overrides, period))
    print_table(reports)


if __name__ == "__main__":
    main()
