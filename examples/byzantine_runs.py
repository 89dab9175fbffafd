"""Volunteers that lie, measured: the 4-layer example (experiment=four_layers) on a local swarm of 6 hosts, every
cell on ``--replicas`` of them (2 by default), at equal steps:

- ``honest``: every host honest;
- ``sign_flip``, ``scale``, ``noise``, ``stale``: host 0 lies in that mode (``local_swarm.host_byzantine``): in its
  forward outputs, its backward input gradients and the parameters it sends its replicas for averaging;
- ``two_liars``: hosts 0 and 3 (no cell in common) lie in ``--two-liars-mode`` (sign_flip);
- ``honest3`` and ``poison3``: three trainers (processes) train through one swarm of honest hosts; in ``poison3``
  trainer 0 sends its gradients 1000x (``moe.poison``). Their quality is that of the two honest trainers.

    python examples/byzantine_runs.py trainer.max_steps=20 trainer.val_check_interval=20 trainer.limit_val_batches=4
    python examples/byzantine_runs.py trainer.max_steps=160 trainer.val_check_interval=160 \\
        trainer.limit_val_batches=20 data.train_bytes=200000 --seeds 0 1

Prints a table (validation bits per character and how it compares with the honest run of the seed, steps/s, liar
hosts the trainer excluded and at which step, honest hosts it excluded, spot checks and disagreements, replica
averagings that centered clipping bounded or the distance check refused) and ends with::

    quality with liars vs honest: +X%        (the worst run with a liar, of any seed)
    liars excluded: N of M within S steps   (lying hosts excluded by the trainer; S: the latest step one was)
    honest hosts excluded: N                (in any run)
    poisoned trainer: quality +X%           (the honest trainers of poison3 vs honest3, the worst seed)

With 2 replicas a trainer cannot tell which replica of one cell lies, but a host disagreeing grossly with the
partners of all its cells is outvoted across cells (README, *Volunteers that lie*); below that, what bounds the harm
is the screen, the hosts' gradient clipping and the replicas' clipped averaging. ``--replicas 3`` lets the trainers'
spot checks outvote a liar within a cell. The ``outvoted`` column counts both (a verdict against a host).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
from collaborative_runs import start_and_wait  # examples/ is on the path of a script run from it

NUM_HOSTS = 6
MODES = ("sign_flip", "scale", "noise", "stale")
SINGLE_RUNS = ("honest", *MODES, "two_liars")
TRAINER_RUNS = ("honest3", "poison3")
POISON = 1000.0
logger = logging.getLogger("byzantine_runs")


@dataclass
class LieReport:
    """What one run measured."""

    name: str
    seed: int
    val_bpc: float = float("nan")
    steps_per_s: float = 0.0
    liars: list[str] = field(default_factory=list)  # the lying hosts' endpoints
    excluded: dict[str, int] = field(default_factory=dict)  # endpoint -> the step its exclusion was first seen
    honest_excluded: list[str] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)  # the trainer's spot checks and screen, summed over layers
    averaging: dict[str, int] = field(default_factory=dict)  # the hosts' replica averaging: rounds, clipped, refused


def liar_hosts(name: str, mode: str) -> list[str]:
    """``local_swarm.host_byzantine`` of run ``name``."""
    if name in MODES:
        return [name]
    if name == "two_liars":
        return [mode, "none", "none", mode]
    return []


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hydra_compose, initialize_config_module

    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def swarm_overrides(replicas: int) -> list[str]:
    return ["experiment=four_layers", f"local_swarm.num_hosts={NUM_HOSTS}", f"local_swarm.replicas={replicas}",
            f"host.replicas={replicas}"]


def host_stats(endpoints: list[str | None]) -> dict[str, int]:
    """The replica averaging counters of every host still serving, summed."""
    from lightning_moe.net import http_client

    total = {"rounds": 0, "clipped": 0, "refused": 0}
    for endpoint in filter(None, endpoints):
        try:
            answer = http_client.request(endpoint, "GET", "/stats", None, {}, 10.0)
            sync = json.loads(bytes(answer.body)).get("replica_sync") or {}
        except Exception as e:  # noqa: BLE001 - a host that does not answer adds nothing
            logger.warning("no stats from %s: %s", endpoint, e)
            continue
        for key in total:
            total[key] += int(sync.get(key, 0))
    return total


class Watch(pl.Callback):
    """Times the steps; records the hosts this trainer excludes as liars (any layer) and the step it first saw it."""

    def __init__(self, report: LieReport, swarm: Any, liars: list[int]):
        self.report, self.swarm, self.liars = report, swarm, liars
        self.batch_time, self.batches, self._start = 0.0, 0, 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report.liars = [self.swarm.endpoints[i] for i in self.liars]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.batch_time += time.perf_counter() - self._start
        self.batches += 1
        for moe in pl_module.moes:
            for endpoint in moe.dispatcher.checks.excluded:
                self.report.excluded.setdefault(endpoint, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report.steps_per_s = self.batches / max(self.batch_time, 1e-9)
        for moe in pl_module.moes:
            for key, value in moe.dispatcher.checks.figures().items():
                self.report.checks[key] = self.report.checks.get(key, 0) + int(value)
        self.report.honest_excluded = [e for e in self.report.excluded if e not in self.report.liars]
        self.report.averaging = host_stats(self.swarm.endpoints)  # before the swarm shuts down


def run_single(name: str, seed: int, args: argparse.Namespace) -> LieReport:
    """One trainer through its own local swarm, host 0 (and 3) lying as ``name`` says."""
    from lightning_moe.lightning.train import train

    report = LieReport(name, seed)
    liars = liar_hosts(name, args.two_liars_mode)
    cfg = compose(["trainer.enable_checkpointing=false", "~logger", "callbacks=none",
                   f"paths.output_dir=outputs/byzantine_runs/{name}-{seed}", f"seed={seed}",
                   *swarm_overrides(args.replicas), f"local_swarm.host_byzantine=[{','.join(liars)}]", *args.overrides])
    lying = [i for i, mode in enumerate(liars) if mode != "none"]
    report.val_bpc = train(cfg, extra_callbacks=lambda swarm: [Watch(report, swarm, lying)]).get("val/bpc", float("nan"))
    return report


def _trainer(index: int, name: str, seed: int, peers: list[str], overrides: list[str], out_dir: str, barrier: Any) -> None:
    """One of three trainer processes; trainer 0 of ``poison3`` poisons its gradients."""
    import torch

    from lightning_moe.lightning.train import train

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    poison = [f"moe.poison={POISON}"] if name == "poison3" and index == 0 else []
    cfg = compose(["trainer.enable_checkpointing=false", "~logger", "callbacks=none", "trainer.enable_progress_bar=false",
                   f"paths.output_dir={out_dir}/hydra/{name}{index}", f"seed={seed * 10 + index}",
                   f"dht.initial_peers=[{','.join(peers)}]", *overrides, *poison])

    class Together(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            barrier.wait()

    metrics = train(cfg, extra_callbacks=lambda swarm: [Together()])
    with open(os.path.join(out_dir, f"{name}-{index}.json"), "w") as f:
        json.dump({"val_bpc": metrics.get("val/bpc", float("nan"))}, f)


def run_trainers(name: str, seed: int, args: argparse.Namespace) -> LieReport:
    """Three trainer processes through one local swarm of honest hosts; the report's quality is the honest trainers'."""
    from lightning_moe.lightning.train import check_config
    from lightning_moe.swarm import LocalSwarm

    report = LieReport(name, seed)
    overrides = [*swarm_overrides(args.replicas), *args.overrides]
    host, dht, swarm_config = check_config(compose(overrides))
    out_dir = tempfile.mkdtemp(prefix="byzantine_runs_")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3, timeout=600)
    swarm = LocalSwarm(host, swarm_config, dht).start()
    processes = [ctx.Process(target=_trainer, args=(i, name, seed, swarm.initial_peers, overrides, out_dir, barrier))
                 for i in range(3)]
    started = time.perf_counter()
    try:
        start_and_wait(processes, args.timeout)
        report.averaging = host_stats(swarm.endpoints)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)
        swarm.shutdown()
    try:
        results = []
        for i in range(3):
            path = os.path.join(out_dir, f"{name}-{i}.json")
            if not os.path.exists(path):
                raise RuntimeError(f"trainer {i} of {name} did not finish (exit code {processes[i].exitcode})")
            with open(path) as f:
                results.append(json.load(f)["val_bpc"])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    report.val_bpc = sum(results[1:]) / 2  # the honest trainers (trainer 0 poisons in poison3)
    report.checks = {"poisoner_val_bpc_x1000": int(1000 * results[0])}
    report.steps_per_s = float("nan")
    logger.warning("%s seed %d: trainers' val bpc %s in %.0f s", name, seed, [round(r, 3) for r in results],
                   time.perf_counter() - started)
    return report


def baseline(report: LieReport, reports: list[LieReport]) -> LieReport | None:
    name = "honest3" if report.name in TRAINER_RUNS else "honest"
    return next((r for r in reports if r.name == name and r.seed == report.seed), None)


def print_table(reports: list[LieReport], steps: int) -> None:
    print(f"\n{'run':<10} {'seed':>4} {'val bpc':>8} {'vs honest':>17} {'steps/s':>8} {'liars excluded':>16} "
          f"{'honest excl.':>12} {'spot checks':>11} {'mismatches':>10} {'outvoted':>8} {'odd':>6} "
          f"{'avg clipped':>11} {'avg refused':>11}")
    for r in reports:
        base = baseline(r, reports)
        vs = f"{r.val_bpc - base.val_bpc:+.3f} ({100 * (r.val_bpc / base.val_bpc - 1):+.1f}%)" if base else "-"
        caught = [r.excluded[e] for e in r.liars if e in r.excluded]
        liars = "-" if not r.liars else f"{len(caught)} of {len(r.liars)}" + (f" (step {max(caught)})" if caught else "")
        c = r.checks
        print(f"{r.name:<10} {r.seed:>4} {r.val_bpc:8.3f} {vs:>17} {r.steps_per_s:8.2f} {liars:>16} "
              f"{len(r.honest_excluded):12d} {c.get('spot_checks', 0):11d} {c.get('mismatches', 0):10d} "
              f"{c.get('outvoted', 0) + c.get('outvoted_across_cells', 0):8d} {c.get('odd_answers', 0):6d} "
              f"{r.averaging.get('clipped', 0):>5d} of {r.averaging.get('rounds', 0):<4d} {r.averaging.get('refused', 0):11d}")
    lying = [(r, baseline(r, reports)) for r in reports if r.liars]
    worst = [100 * (r.val_bpc / b.val_bpc - 1) for r, b in lying if b is not None]
    if worst:
        print(f"quality with liars vs honest: {max(worst):+.1f}%")
    caught = [r.excluded[e] for r, _ in lying for e in r.liars if e in r.excluded]
    print(f"liars excluded: {len(caught)} of {sum(len(r.liars) for r, _ in lying)} within "
          f"{max(caught) if caught else steps} steps")
    print(f"honest hosts excluded: {sum(len(r.honest_excluded) for r in reports)}")
    poisoned = [(r, baseline(r, reports)) for r in reports if r.name == "poison3"]
    poisoned = [100 * (r.val_bpc / b.val_bpc - 1) for r, b in poisoned if b is not None]
    if poisoned:
        print(f"poisoned trainer: quality {max(poisoned):+.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--runs", nargs="+", choices=SINGLE_RUNS + TRAINER_RUNS, default=list(SINGLE_RUNS + TRAINER_RUNS))
    parser.add_argument("--replicas", type=int, default=2, help="hosts per cell (local_swarm.replicas and host.replicas)")
    parser.add_argument("--two-liars-mode", choices=MODES, default="sign_flip", help="the mode of the two_liars run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a three-trainer run may take")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.max_steps=160")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    reports = []
    began = time.perf_counter()
    for seed in args.seeds:
        for name in args.runs:  # the honest runs first: each seed's runs back to back share the machine's mood
            print(f"=== {name} (seed {seed}) ===", flush=True)
            reports.append((run_trainers if name in TRAINER_RUNS else run_single)(name, seed, args))
    steps = int(compose([*swarm_overrides(args.replicas), *args.overrides]).trainer.max_steps)
    print(f"\n{len(reports)} runs in {time.perf_counter() - began:.0f} s, {steps} steps each")
    print_table(reports, steps)


if __name__ == "__main__":
    main()
