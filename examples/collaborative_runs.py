"""One model from many volunteers: three trainers with and without swarm averaging.

    python examples/collaborative_runs.py                      # 3 trainers x 2 modes, default length
    python examples/collaborative_runs.py --steps 100 --every 2 model.lr=1e-3
    python examples/collaborative_runs.py --compare-every 20    # + plain vs DiLoCo-style, every 20 steps

Each mode starts a fresh local swarm (a DHT node and two host processes serving the 16 experts),
then three trainer processes that train the example char-LM on disjoint thirds of the training text
(``data.shard=i data.num_shards=3``) through that swarm, for the same number of steps, from the same
initial model (``seed``). Mode ``alone``: each trainer keeps its own dense parameters. Mode
``averaged``: each adds ``callbacks/swarm_averaging`` (gossip averaging every ``--every`` steps).

Prints each trainer's final validation bits per character in both modes, the largest relative
distance between trainers' dense parameters (``||a - b|| / ||b||``, compared at equal step counts)
over time, and the bytes exchanged. Extra arguments are Hydra overrides for every trainer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from typing import Any

import torch

MODES = ("alone", "averaged")
NUM_TRAINERS = 3


def _compose(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_module

    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _trainer(mode: str, index: int, peers: list[str], args: argparse.Namespace, out_dir: str, barrier: Any) -> None:
    """One trainer process: train on shard ``index``, save its dense parameters every ``--probe`` steps."""
    import pytorch_lightning as pl

    from lightning_moe.averaging import SwarmAveraging
    from lightning_moe.lightning.train import train

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    overrides = ["trainer.enable_checkpointing=false", "~logger", "trainer.enable_progress_bar=false",
                 f"paths.output_dir={out_dir}/hydra/{mode.replace('@', '_')}{index}", f"data.shard={index}", f"data.num_shards={NUM_TRAINERS}",
                 f"dht.initial_peers=[{','.join(peers)}]", f"trainer.max_steps={args.steps}",
                 f"trainer.val_check_interval={args.steps}", "+trainer.check_val_every_n_epoch=null", f"trainer.limit_val_batches={args.val_batches}",
                 "+run_id=collaborative_runs"]
    if mode != "alone":
        kind, _, every = mode.partition("@")
        overrides += ["callbacks=swarm_averaging", f"callbacks.swarm_averaging.config.every_n_steps={every or args.every}"]
        if kind == "diloco":
            overrides += [f"callbacks.swarm_averaging.config.outer_lr={args.outer_lr}",
                          f"callbacks.swarm_averaging.config.outer_momentum={args.outer_momentum}"]
    else:
        overrides += ["callbacks=none"]
    cfg = _compose(overrides + list(args.overrides))
    summary: dict[str, Any] = {}

    class Probe(pl.Callback):
        """Starts the three trainers together; saves the dense parameters every ``--probe`` steps."""

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            barrier.wait()
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % args.probe == 0:
                flat = torch.cat([p.detach().reshape(-1).cpu() for p in pl_module.parameters()])
                torch.save(flat, os.path.join(out_dir, f"{mode}-{index}-{step}.pt"))

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            # after SwarmAveraging's on_train_end, which applies the last exchange: the final model
            flat = torch.cat([p.detach().reshape(-1).cpu() for p in pl_module.parameters()])
            torch.save(flat, os.path.join(out_dir, f"{mode}-{index}-{trainer.global_step}.pt"))
            summary["seconds"] = time.perf_counter() - self.started
            for callback in trainer.callbacks:
                if isinstance(callback, SwarmAveraging) and callback.averager is not None:
                    summary["averaging"] = callback.averager.metrics()

    metrics = train(cfg, extra_callbacks=lambda swarm: [Probe()])
    summary["val_bpc"] = metrics.get("val/bpc", float("nan"))
    with open(os.path.join(out_dir, f"{mode}-{index}.json"), "w") as f:
        json.dump(summary, f)



def start_and_wait(processes: list, timeout: float) -> None:
    """Start the trainer processes; return when all ended, one failed (the others would wait for it at the start
    barrier) or ``timeout`` seconds passed. The caller kills what still runs."""
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in processes):
            break
        time.sleep(0.5)

def run_mode(mode: str, args: argparse.Namespace, out_dir: str) -> dict[int, dict]:
    """A fresh local swarm and three trainer processes; returns each trainer's summary."""
    from lightning_moe.lightning.train import check_config
    from lightning_moe.swarm import LocalSwarm

    cfg = _compose(list(args.overrides))
    host, dht, swarm_config = check_config(cfg)
    swarm = LocalSwarm(host, swarm_config, dht).start()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(NUM_TRAINERS, timeout=600)
    processes = [ctx.Process(target=_trainer, args=(mode, i, swarm.initial_peers, args, out_dir, barrier))
                 for i in range(NUM_TRAINERS)]
    try:
        start_and_wait(processes, args.timeout)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        swarm.shutdown()
    summaries = {}
    for i in range(NUM_TRAINERS):
        path = os.path.join(out_dir, f"{mode}-{i}.json")
        if not os.path.exists(path):
            raise RuntimeError(f"trainer {i} of mode {mode} did not finish (exit code {processes[i].exitcode})")
        with open(path) as f:
            summaries[i] = json.load(f)
    return summaries


def distances(mode: str, args: argparse.Namespace, out_dir: str) -> dict[int, float]:
    """Step -> the largest relative distance between any two trainers' dense parameters at that step."""
    result = {}
    for step in range(args.probe, args.steps + 1, args.probe):
        flats = [torch.load(os.path.join(out_dir, f"{mode}-{i}-{step}.pt")) for i in range(NUM_TRAINERS)]
        result[step] = max(float((a - b).norm() / b.norm()) for a, b in itertools.permutations(flats, 2))
    return result


def print_table(results: dict[str, dict[int, dict]], dist: dict[str, dict[int, float]], args: argparse.Namespace) -> None:
    print(f"\n{args.steps} steps per trainer, averaging every {args.every} steps; val bpc on the same validation text\n")
    print(f"{'trainer':<8} {'val bpc alone':>13} {'val bpc averaged':>16} {'better':>6} {'rounds':>6} {'refused':>7} "
          f"{'failed':>6} {'clipped':>7} {'bytes':>11} {'s/exchange':>10} {'wall s alone/avg':>16}")
    better = 0
    for i in range(NUM_TRAINERS):
        alone, averaged = results["alone"][i], results["averaged"][i]
        avg = averaged.get("averaging", {})
        is_better = averaged["val_bpc"] < alone["val_bpc"]
        better += is_better
        print(f"{i:<8} {alone['val_bpc']:13.3f} {averaged['val_bpc']:16.3f} {'yes' if is_better else 'no':>6} "
              f"{avg.get('averaging/rounds', 0):6.0f} {avg.get('averaging/refused', 0):7.0f} {avg.get('averaging/failed', 0):6.0f} "
              f"{avg.get('averaging/clipped', 0):7.0f} "
              f"{avg.get('averaging/bytes_total', 0):11,.0f} {avg.get('averaging/seconds_total', 0) / max(avg.get('averaging/rounds', 0), 1):10.3f} "
              f"{alone['seconds']:7.0f}/{averaged['seconds']:<7.0f}")
    total = sum(results["averaged"][i].get("averaging", {}).get("averaging/bytes_total", 0) for i in range(NUM_TRAINERS)) / 2
    print(f"bytes exchanged in all (each exchange counted once): {total:,.0f}\n")
    extra = [mode for mode in results if mode not in MODES]
    if extra:  # plain averaging vs a DiLoCo-style outer step at the same (lower) frequency
        print(f"{'mode':<12} " + " ".join(f"{'trainer ' + str(i):>9}" for i in range(NUM_TRAINERS)) + f" {'mean':>7} {'bytes':>13}")
        for mode in ["alone", "averaged", *extra]:
            bpc = [results[mode][i]["val_bpc"] for i in range(NUM_TRAINERS)]
            nbytes = sum(results[mode][i].get("averaging", {}).get("averaging/bytes_total", 0) for i in range(NUM_TRAINERS)) / 2
            name = f"plain@{args.every}" if mode == "averaged" else mode
            print(f"{name:<12} " + " ".join(f"{b:9.3f}" for b in bpc) + f" {sum(bpc) / len(bpc):7.3f} {nbytes:13,.0f}")
        print()
    print(f"{'step':>6} {'max rel. distance alone':>24} " + " ".join(f"{mode:>10}" for mode in ["averaged", *extra]))
    for step in dist["alone"]:
        print(f"{step:6d} {dist['alone'][step]:24.4f} " + " ".join(f"{dist[mode][step]:10.4f}" for mode in ["averaged", *extra]))
    after = [d for step, d in dist["averaged"].items() if step >= 2 * args.every]
    print(f"max relative distance after averaging: {max(after) if after else float('nan'):.4f}")
    print(f"trainers better with averaging: {better} of {NUM_TRAINERS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per trainer")
    parser.add_argument("--every", type=int, default=1, help="averaging every N steps (each trainer initiates)")
    parser.add_argument("--probe", type=int, default=10, help="compare the trainers' parameters every N steps")
    parser.add_argument("--val-batches", type=int, default=40, help="validation batches at the end")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds a mode may take")
    parser.add_argument("--compare-every", type=int, default=0,
                        help="also run plain averaging and a DiLoCo-style outer step every N steps (modes plain@N, diloco@N)")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo-style outer learning rate")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="DiLoCo-style outer Nesterov momentum")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every trainer, e.g. model.lr=1e-3")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out_dir = tempfile.mkdtemp(prefix="collaborative_runs_")
    try:
        results, dist = {}, {}
        modes = list(MODES)
        if args.compare_every:
            modes += [f"plain@{args.compare_every}", f"diloco@{args.compare_every}"]
        for mode in modes:
            started = time.perf_counter()
            print(f"=== {mode}: 3 trainers ===", flush=True)
            results[mode] = run_mode(mode, args, out_dir)
            dist[mode] = distances(mode, args, out_dir)
            print(f"{mode}: {time.perf_counter() - started:.0f} s", flush=True)
        print_table(results, dist, args)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
