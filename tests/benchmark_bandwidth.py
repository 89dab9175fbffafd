"""Bytes per step, quality and speed on a slow link, per wire codec (issue 22).

Two parts:

1. **Quality.** The example (``examples/train.py``: CharLM, one DecentralizedMoE layer on a 4x4 grid, 2 local hosts)
   trained for ``--steps`` steps with each codec as ``moe.compression`` (the hosts answer in kind) and
   ``moe.rows_per_host=true`` (each row once per host, the setting for slow links), ``--repeats`` times per seed;
   validation bits per character (the mean of the repeats) against the uncompressed runs of the same seed. The
   codecs of a seed run one after the other (none, then each codec, then again), so each seed's runs share the
   machine's mood. These runs wait for every expert's answer (``timeout_after_k_min=null``), so the machine's load
   cannot drop answers; runs still differ (the hosts batch and step as requests arrive): two runs of the same codec
   and seed ended 1.3% apart, which is why ``--repeats`` exists.
2. **The link.** The WAN benchmark's swarm (``tests/benchmark_wan.py``: 2 hosts, each behind a user-space proxy that
   delays and paces its traffic) and its one-layer trainer: bytes up and down per step counted at the proxies on an
   unlimited link, and steps/s at 20 Mbit/s and 100 ms RTT. Codecs interleaved (none, int8, ..., none, int8, ...)
   over ``--link-rounds`` rounds.

The link part also runs the step as it was before rows once per host: uncompressed, one request per expert (each row
and each output gradient once per expert), the row ``per-expert``. Bytes and speed are compared with it, the step
that this issue set out to shrink (4.0 MB up and down); the table's ``vs none`` column and the line before the last
three compare with uncompressed rows once per host. Its quality is uncompressed's: the same computation.

The last three lines are for the best codec: the fewest bytes per step among those whose quality, the worst over the
seeds, is within ``--quality-goal`` percent of uncompressed::

    bytes per step vs uncompressed: 1/X
    quality vs uncompressed: +Y%
    steps/s at 20 Mbit/s, 100 ms vs uncompressed: Z

    python tests/benchmark_bandwidth.py                                   # 600 steps x 2 seeds x 5 codecs: about 45 min
    python tests/benchmark_bandwidth.py --steps 100 --seeds 0 --codecs none int8 --link-rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import benchmark_wan  # noqa: E402
from bench_util import spread  # noqa: E402

from lightning_moe.wire import COMPRESSIONS  # noqa: E402

logger = logging.getLogger("benchmark_bandwidth")

SLOW_LINK = (0.1, 20e6)  # 100 ms RTT, 20 Mbit/s per host and direction
ROWS_PER_HOST = True  # every codec, and the uncompressed baseline, sends each row once per host (moe.rows_per_host)
PER_EXPERT = "per-expert"  # the link part's baseline: uncompressed, one request per expert (rows_per_host=False)


@dataclass
class CodecFigures:
    """What one codec measured: bpc per seed, bytes per step and steps/s on the slow link per round."""

    codec: str
    bpc: dict[int, float] = field(default_factory=dict)  # per seed: the mean over the repeats
    runs: dict[int, list[float]] = field(default_factory=dict)  # per seed: each repeat's bpc
    up: list[float] = field(default_factory=list)
    down: list[float] = field(default_factory=list)
    slow_steps: list[float] = field(default_factory=list)

    @property
    def bytes(self) -> float:
        return statistics.median(self.up) + statistics.median(self.down)


def train_example(codec: str, seed: int, steps: int, overrides: Sequence[str]) -> float:
    """Validation bpc of the example trained ``steps`` steps with ``moe.compression=codec`` (validated as the main job
    is: every ``trainer.val_check_interval`` batches of an epoch)."""
    import fault_runs

    # every answer is waited for: on a loaded machine given-up stragglers would change what is computed
    report = fault_runs.run("healthy", ["trainer.enable_checkpointing=false", "~logger", "callbacks=none",
                                        "moe.timeout_after_k_min=null", "moe.backward_timeout_after_k_min=null",
                                        f"moe.rows_per_host={str(ROWS_PER_HOST).lower()}",
                                        f"trainer.max_steps={steps}",
                                        f"moe.compression={codec}", f"paths.output_dir=outputs/bandwidth/{codec}-{seed}",
                                        *overrides], seed=seed)
    return report.val_bpc


def measure_link(figures: dict[str, CodecFigures], rounds: int, steps: int) -> None:
    """Bytes per step (unlimited link) and steps/s at 20 Mbit/s, 100 ms, codecs interleaved round by round."""
    with benchmark_wan.WanSwarm(num_hosts=2) as swarm:
        for i in range(rounds):
            for codec, fig in figures.items():
                kwargs = dict(timeout_after_k_min=1.0, backward_timeout_after_k_min=1.0,
                              compression="none" if codec == PER_EXPERT else codec,
                              rows_per_host=ROWS_PER_HOST and codec != PER_EXPERT)
                fast, slow = benchmark_wan.run_single(swarm, [(0.0, None), SLOW_LINK], steps, 32, kwargs)
                fig.up.append(fast["up"])
                fig.down.append(fast["down"])
                fig.slow_steps.append(1 / statistics.median(slow["step"]))
                print(f"link round {i} {codec:>8}: {fast['up'] / 1024:7.0f} KB up, {fast['down'] / 1024:7.0f} KB down per "
                      f"step; {fig.slow_steps[-1]:.2f} steps/s at 20 Mbit/s, 100 ms", flush=True)


def worst_quality(fig: CodecFigures, base: CodecFigures) -> float:
    """The codec's worst relative bpc change over the seeds, in percent (nan without quality runs)."""
    return max((100 * (fig.bpc[s] / base.bpc[s] - 1) for s in base.bpc if s in fig.bpc), default=float("nan"))


def print_table(figures: dict[str, CodecFigures], seeds: Sequence[int], goal: float) -> None:
    base = figures["none"]
    print(f"\n{'codec':>8} {'KB up/step':>11} {'KB dn/step':>11} {'vs none':>8} "
          + " ".join(f"{'bpc s' + str(s):>8}" for s in seeds)
          + f" {'quality':>8} {'steps/s 20M 100ms':>26} {'vs none':>8}")
    for codec, fig in figures.items():
        bpcs = " ".join(f"{fig.bpc.get(s, float('nan')):8.4f}" for s in seeds)
        print(f"{codec:>8} {statistics.median(fig.up) / 1024:11.0f} {statistics.median(fig.down) / 1024:11.0f} "
              f"{'1/' + format(base.bytes / fig.bytes, '.1f'):>8} {bpcs} {worst_quality(fig, base):+7.2f}% "
              f"{spread(fig.slow_steps):>26} "
              f"{statistics.median(fig.slow_steps) / statistics.median(base.slow_steps):8.2f}")
    print(f"quality: the worst over seeds of (mean bpc / mean uncompressed bpc - 1); goal within +{goal}%")
    codecs = [f for f in figures.values() if f.codec != PER_EXPERT]
    within = [f for f in codecs if not worst_quality(f, base) > goal]  # nan (no quality runs) counts in
    best = min(within, key=lambda f: f.bytes)
    before = figures[PER_EXPERT]
    print(f"best codec within the quality goal: {best.codec}; against uncompressed rows once per host: bytes 1/"
          f"{base.bytes / best.bytes:.1f}, steps/s at 20 Mbit/s, 100 ms "
          f"{statistics.median(best.slow_steps) / statistics.median(base.slow_steps):.2f}; below, against the step "
          f"before this issue (uncompressed, one request per expert: "
          f"{statistics.median(before.up) / 1024:.0f} KB up, {statistics.median(before.down) / 1024:.0f} KB down)")
    print(f"bytes per step vs uncompressed: 1/{before.bytes / best.bytes:.1f}")
    print(f"quality vs uncompressed: {worst_quality(best, base):+.1f}%")
    print(f"steps/s at 20 Mbit/s, 100 ms vs uncompressed: "
          f"{statistics.median(best.slow_steps) / statistics.median(before.slow_steps):.2f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codecs", nargs="+", default=["none", "float16", "uint8", "int8", "int4"],
                        choices=COMPRESSIONS, help="codecs to compare (none is always run: the baseline)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=600, help="training steps per quality run")
    parser.add_argument("--repeats", type=int, default=1, help="quality runs per codec and seed (their mean counts)")
    parser.add_argument("--link-rounds", type=int, default=2, help="interleaved rounds of the link part")
    parser.add_argument("--link-steps", type=int, default=6, help="timed steps per codec, round and link setting")
    parser.add_argument("--quality-goal", type=float, default=1.0, help="percent of bpc a codec may lose")
    parser.add_argument("--skip-quality", action="store_true", help="only the link part (no bpc column)")
    parser.add_argument("--save-quality", metavar="JSON", help="write the quality part's val bpc per codec and seed")
    parser.add_argument("--load-quality", metavar="JSON", help="read the quality part from an earlier --save-quality "
                                                                "instead of training (the link part still runs)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the quality runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    codecs = ["none", *[c for c in dict.fromkeys(args.codecs) if c != "none"]]
    figures = {c: CodecFigures(c) for c in codecs}
    began = time.monotonic()
    if args.load_quality:
        with open(args.load_quality) as f:
            saved = json.load(f)
        for codec, fig in figures.items():
            fig.bpc = {int(seed): bpc for seed, bpc in saved[codec].items()}
        args.seeds = sorted(figures["none"].bpc)
        print(f"quality from {args.load_quality}: {saved}")
    elif not args.skip_quality:
        for seed in args.seeds:
            for repeat in range(args.repeats):
                for codec in codecs:
                    runs = figures[codec].runs.setdefault(seed, [])
                    runs.append(train_example(codec, seed, args.steps, args.overrides))
                    figures[codec].bpc[seed] = statistics.mean(runs)
                    print(f"quality seed {seed} repeat {repeat} {codec:>8}: val bpc {runs[-1]:.4f} "
                          f"({time.monotonic() - began:.0f} s)", flush=True)
            spreads = {codec: f"{min(f.runs[seed]):.4f}-{max(f.runs[seed]):.4f}" for codec, f in figures.items()}
            print(f"quality seed {seed}: val bpc over {args.repeats} repeats {spreads}", flush=True)
        if args.save_quality:
            with open(args.save_quality, "w") as f:
                json.dump({codec: fig.bpc for codec, fig in figures.items()}, f)
    else:
        for fig in figures.values():
            fig.bpc = {0: float("nan")}
    figures[PER_EXPERT] = CodecFigures(PER_EXPERT, dict(figures["none"].bpc))  # uncompressed's computation
    measure_link(figures, args.link_rounds, args.link_steps)
    print(f"\nbenchmark_bandwidth: {args.steps} steps x seeds {args.seeds}, {os.cpu_count()} CPUs, "
          f"{time.monotonic() - began:.0f} s")
    print_table(figures, args.seeds if not args.skip_quality else [0], args.quality_goal)


if __name__ == "__main__":
    main()
