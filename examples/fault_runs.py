"""Learning under faults: the example trained with a local mixture, a healthy swarm, churn and a slow host;
and a 4-layer model (experiment=four_layers, 4 hosts) healthy, with every expert failing 10% of its batches,
with one host 0.3 s late per batch (with and without latency-aware routing), and with one host 1.0 s late.

    python examples/fault_runs.py                       # the 1-layer runs at the default length
    python examples/fault_runs.py trainer.max_steps=200 --runs local healthy churn
    python examples/fault_runs.py trainer.max_steps=300 --runs layers4 layers4_slow layers4_slow1 --seeds 0 1

Prints a table: validation bits per character, training steps/s, failed, timed-out, given-up (stragglers
not waited for) and shed (503) expert calls, and for churn the forward samples that the late joiner served.
With slow-host runs it ends with ``slow host: step time vs healthy X, quality vs healthy +Y%``: the worst
of them against the healthy run of the same model and seed. Extra arguments are Hydra overrides applied to
every run; ``--seeds`` repeats every run per seed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
from hydra import compose, initialize_config_module

from lightning_moe.lightning.train import train
from lightning_moe.swarm import LocalSwarm, grid_uids

RUNS = ("local", "healthy", "churn", "slow", "layers4", "layers4_flaky", "layers4_slow", "layers4_slow_norouting",
        "layers4_slow1")
DEFAULT_RUNS = RUNS[:4]
EXTRA_OVERRIDES = {
    "local": ["experiment=baseline"],
    "slow": ["local_swarm.host_delays=[2.0]"],
    "layers4": ["experiment=four_layers"],
    "layers4_flaky": ["experiment=four_layers", "host.fault_rate=0.1"],
    "layers4_slow": ["experiment=four_layers", "local_swarm.host_delays=[0.3]"],
    "layers4_slow_norouting": ["experiment=four_layers", "local_swarm.host_delays=[0.3]", "moe.latency_margin=0"],
    "layers4_slow1": ["experiment=four_layers", "local_swarm.host_delays=[1.0]"],
}
SLOW_RUNS = ("slow", "layers4_slow", "layers4_slow_norouting", "layers4_slow1")


@dataclass
class RunReport:
    """What one run measured."""

    name: str
    seed: int = 0
    val_bpc: float = float("nan")
    steps_per_s: float = 0.0
    failed: int = 0
    timed_out: int = 0
    given_up: int = 0
    shed: int = 0
    joiner_samples: int | None = None
    notes: list[str] = field(default_factory=list)


class FaultMonitor(pl.Callback):
    """Counts failed, timed-out, given-up and shed expert calls and times the training batches.

    With ``kill_at``/``join_at`` (fractions of max_steps) it SIGKILLs host 0 of the swarm, and
    later starts a new host serving the dead host's cells.
    """

    def __init__(self, report: RunReport, swarm: LocalSwarm | None, kill_at: float | None = None, join_at: float | None = None):
        self.report, self.swarm, self.kill_at, self.join_at = report, swarm, kill_at, join_at
        self.batch_time, self.batches, self.joiner = 0.0, 0, None
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step, total = trainer.global_step, trainer.max_steps
        if self.swarm is not None and self.kill_at is not None and step == int(self.kill_at * total):
            self.swarm.kill(0, signal.SIGKILL)
            self.report.notes.append(f"host 0 killed at step {step}")
        if self.swarm is not None and self.join_at is not None and step == int(self.join_at * total):
            uids = [uid for prefix in self.swarm.host_config.layer_prefixes()
                    for uid in grid_uids(prefix, self.swarm.grid_size)[0 :: self.swarm.config.num_hosts]]
            self.joiner = self.swarm.add_host(uids, seed=100)
            self.report.notes.append(f"new host joined at step {step} with {len(uids)} experts")
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batch_time += time.perf_counter() - self._start
        self.batches += 1
        for moe in pl_module.moes:
            stats = getattr(moe, "stats", None) or {}
            self.report.failed += int(stats.get("failed", 0) + stats.get("backward_failed", 0))
            self.report.timed_out += int(stats.get("timed_out", 0))
            self.report.given_up += int(stats.get("given_up", 0) + stats.get("backward_given_up", 0))
            self.report.shed += int(stats.get("shed", 0))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report.steps_per_s = self.batches / max(self.batch_time, 1e-9)


def run(name: str, overrides: list[str], seed: int = 0) -> RunReport:
    """Train once under the named condition and report what happened."""
    report = RunReport(name, seed)
    extra = EXTRA_OVERRIDES.get(name, [])
    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.output_dir=outputs/fault_runs/{name}-{seed}", f"seed={seed}",
                                                       *overrides, *extra])
    monitors: list[FaultMonitor] = []

    def callbacks(swarm: LocalSwarm | None) -> list[pl.Callback]:
        kill_join = {"kill_at": 1 / 3, "join_at": 1 / 2} if name == "churn" else {}
        monitors.append(FaultMonitor(report, swarm, **kill_join))
        return monitors

    metrics = train(cfg, extra_callbacks=callbacks)
    report.val_bpc = metrics.get("val/bpc", float("nan"))
    if name == "churn" and monitors and monitors[0].joiner is not None:
        report.joiner_samples = monitors[0].swarm.served_samples(monitors[0].joiner)
    return report


def healthy_of(report: RunReport, reports: list[RunReport]) -> RunReport | None:
    """The healthy run of the same model (1 layer, or layers4 for layers4_*) and seed."""
    name = "layers4" if report.name.startswith("layers4") else "healthy"
    return next((r for r in reports if r.name == name and r.seed == report.seed), None)


def print_table(reports: list[RunReport]) -> None:
    """One row per run; each is compared with the healthy run of its model and seed."""
    print(f"\n{'run':<23} {'seed':>4} {'val bpc':>8} {'vs local':>9} {'vs healthy':>17} {'steps/s':>8} {'speed':>6} "
          f"{'failed':>7} {'timed out':>9} {'given up':>8} {'shed':>6} {'joiner samples':>14}")
    for r in reports:
        local = next((o for o in reports if o.name == "local" and o.seed == r.seed), None)
        healthy = healthy_of(r, reports)
        vs_local = f"{r.val_bpc - local.val_bpc:+.3f}" if local is not None and not r.name.startswith("layers4") else "-"
        vs_healthy = f"{r.val_bpc - healthy.val_bpc:+.3f} ({100 * (r.val_bpc / healthy.val_bpc - 1):+.1f}%)" if healthy else "-"
        speed = f"{r.steps_per_s / healthy.steps_per_s:.2f}" if healthy else "-"
        joiner = "-" if r.joiner_samples is None else str(r.joiner_samples)
        print(f"{r.name:<23} {r.seed:>4} {r.val_bpc:8.3f} {vs_local:>9} {vs_healthy:>17} {r.steps_per_s:8.2f} {speed:>6} "
              f"{r.failed:7d} {r.timed_out:9d} {r.given_up:8d} {r.shed:6d} {joiner:>14}")
        for note in r.notes:
            print(f"{'':<23} {note}")
    slow = [(r, healthy_of(r, reports)) for r in reports if r.name in SLOW_RUNS]
    slow = [(r, h) for r, h in slow if h is not None]
    if slow:
        step_time = max(h.steps_per_s / r.steps_per_s for r, h in slow)
        quality = max(100 * (r.val_bpc / h.val_bpc - 1) for r, h in slow)
        print(f"slow host: step time vs healthy {step_time:.2f}, quality vs healthy {quality:+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(DEFAULT_RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="run everything once per seed")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.max_steps=200")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = ["trainer.enable_checkpointing=false", "~logger", "callbacks=none", *args.overrides]
    reports = []
    for seed in args.seeds:
        for name in args.runs:  # interleaved: the healthy and the slow runs of a seed share the machine's mood
            print(f"=== {name} (seed {seed}) ===", flush=True)
            reports.append(run(name, overrides, seed))
    print_table(reports)


if __name__ == "__main__":
    main()
