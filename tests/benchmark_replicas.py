"""Drift between the replicas of a cell, with the replicas' averaging every few seconds or off.

Two hosts serve the same cells (the second joins and adopts the first's state, so they start equal). Two
trainers, one per host (as when trainers' traffic lands on different replicas), train a small regression through
the cells: ``x -> dense -> cell 0 -> cell 1 -> MSE`` against one fixed random teacher, each with its own samples.
Every ``--sample-every`` s the relative L2 drift ``||A - B|| / ||A||`` of each cell's parameters between the two
hosts is measured (the max over cells is reported). For each period (0: off) it prints the mean and max drift over
the run, the drift at the end, the bytes the averaging sent per second, the trainers' steps per second and final
losses, and how far training moved the weights in the run (``||W_end - W_start|| / ||W_start||``, for scale).

With ``--aggregates mean,centered_clip`` (the default) every period runs with each aggregate in turn (baseline
first, interleaved, ``--repeats`` times; median and spread over the repeats): ``clipped`` counts the exchanges in
which centered clipping bounded an honest replica's pull, ``d/r`` is the replica's distance over the clipping radius
at each exchange (median and max; above 1 it was clipped).

    python tests/benchmark_replicas.py                              # periods 2, 5, 15 and off; 40 s each
    python tests/benchmark_replicas.py --periods 5,0 --seconds 20
    python tests/benchmark_replicas.py --periods 5,15 --repeats 2  # mean vs centered_clip, interleaved
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import threading
import time

import torch
from torch import nn

from lightning_moe.client.remote_expert import RemoteExpert
from lightning_moe.config import DHTConfig, HostConfig
from lightning_moe.server.experts import make_expert
from lightning_moe.volunteer import start_volunteer

REPORT = functools.partial(print, flush=True)


def flat(backend) -> torch.Tensor:
    with backend._lock:
        return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in backend.expert.parameters()])


PROBE = torch.Generator().manual_seed(99)


def drift(a, b, probe: torch.Tensor) -> tuple[float, float]:
    """The largest relative L2 distance between the two hosts' copies of a cell: of their parameters, and of their
    outputs on ``probe`` (the function trainers see), over the cells."""
    worst, worst_out = 0.0, 0.0
    for uid, backend in a.host.backends.items():
        other = b.host.backends[uid]
        x, y = flat(backend), flat(other)
        worst = max(worst, float((x - y).norm() / x.norm()))
        with torch.no_grad(), backend._lock, other._lock:
            ox, oy = backend.expert(probe), other.expert(probe)
        worst_out = max(worst_out, float((ox - oy).norm() / ox.norm()))
    return worst, worst_out


def trainer(endpoint: str, uids: list[str], hid: int, batch: int, lr: float, seed: int, teacher: nn.Module,
            stop: threading.Event, out: dict, dense_state: dict | None = None) -> None:
    torch.manual_seed(seed)
    dense = nn.Linear(hid, hid)
    if dense_state is not None:
        dense.load_state_dict(dense_state)
    experts = [RemoteExpert(uid, endpoint, forward_timeout=30, backward_timeout=30) for uid in uids]
    optimizer = torch.optim.Adam(dense.parameters(), lr=lr)
    steps, losses = 0, []
    while not stop.is_set():
        x = torch.randn(batch, hid)
        with torch.no_grad():
            target = teacher(x)
        h = dense(x)
        for expert in experts:
            h = expert(h)
        loss = nn.functional.mse_loss(h, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
        losses.append(float(loss.detach()))
    out["steps"], out["loss"] = steps, statistics.mean(losses[-20:]) if losses else float("nan")
    out["dense"] = dense.state_dict()


def host_config(period: float, args: argparse.Namespace, aggregate: str = "mean") -> HostConfig:
    return HostConfig(expert=functools.partial(make_expert, "ffn", args.hid),
                      optimizer=functools.partial(torch.optim.Adam, lr=args.expert_lr), in_features=args.hid,
                      grid_size=[1, args.cells], cells=args.cells, replicas=2, replica_average_period=period,
                      update_period=5.0, stats_every=0, seed=0, num_threads=1, replica_max_distance=args.max_distance,
                      replica_aggregate=aggregate)


def teacher(hid: int) -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(hid, hid), nn.Tanh(), nn.Linear(hid, hid))


def warm_up(args: argparse.Namespace) -> tuple[dict, dict]:
    """One host and one trainer for ``--warmup`` s: the cell a replica joins has trained a while (past Adam's first
    steps, which move every weight by about the learning rate); returns the hosts' and the trainer's state."""
    with start_volunteer(host_config(0.0, args), DHTConfig()) as a:
        stop, out = threading.Event(), {}
        thread = threading.Thread(target=trainer, args=(a.endpoint, sorted(a.host.backends), args.hid, args.batch, args.lr,
                                                        9, teacher(args.hid), stop, out))
        thread.start()
        time.sleep(args.warmup)
        stop.set()
        thread.join(60)
        REPORT(f"warm-up: {out['steps']} steps in {args.warmup:.0f} s, loss {out['loss']:.4f}")
        return a.host.state_dict(), out["dense"]


def exchanges_seen(volunteers, seen: dict) -> None:
    """Record each new averaging's distance over its clipping radius (``seen``: (host, uid, time) -> ratio)."""
    for i, v in enumerate(volunteers):
        sync = v.host.replica_sync
        if sync is None:
            continue
        with sync._lock:
            for uid, at in sync.last_sync.items():
                if uid in sync.last_radius:
                    seen.setdefault((i, uid, at), sync.last_distance[uid] / sync.last_radius[uid])


def run(period: float, args: argparse.Namespace, warm: tuple[dict, dict], aggregate: str = "mean") -> dict:
    config = host_config(period, args, aggregate)
    target = teacher(args.hid)
    with start_volunteer(config, DHTConfig(), state=warm[0]) as a, \
            start_volunteer(HostConfig(**{**vars(config), "seed": 1}), DHTConfig(initial_peers=[a.dht.address])) as b:
        assert sorted(a.host.backends) == sorted(b.host.backends)
        uids = sorted(a.host.backends)
        start = {uid: flat(backend) for uid, backend in a.host.backends.items()}
        stop, outs = threading.Event(), [{}, {}]
        threads = [threading.Thread(target=trainer, args=(v.endpoint, uids, args.hid, args.batch, args.lr, 10 + i, target,
                                                          stop, outs[i], warm[1])) for i, v in enumerate((a, b))]
        for thread in threads:
            thread.start()
        samples, outputs, began, ratios = [], [], time.monotonic(), {}
        probe = torch.randn(256, args.hid, generator=PROBE)
        while time.monotonic() - began < args.seconds:
            time.sleep(args.sample_every)
            exchanges_seen((a, b), ratios)
            weights, function = drift(a, b, probe)
            samples.append(weights)
            outputs.append(function)
        stop.set()
        for thread in threads:
            thread.join(60)
        moved = max(float((flat(backend) - start[uid]).norm() / start[uid].norm()) for uid, backend in a.host.backends.items())
        sent = sum(v.host.replica_sync.report()["bytes"] if v.host.replica_sync else 0 for v in (a, b)) / 2
        rounds = sum(v.host.replica_sync.report()["rounds"] if v.host.replica_sync else 0 for v in (a, b)) / 2  # exchanges
        clipped = sum(v.host.replica_sync.report()["clipped"] if v.host.replica_sync else 0 for v in (a, b))
        elapsed = time.monotonic() - began
    steady = samples[len(samples) // 2:]
    return {"period": period, "mean": statistics.mean(samples), "max": max(samples), "end": samples[-1],
            "steady_mean": statistics.mean(steady), "steady_max": max(steady), "out_mean": statistics.mean(outputs),
            "out_max": max(outputs),
            "bytes_per_s": sent / elapsed, "rounds": rounds, "moved": moved, "aggregate": aggregate, "clipped": clipped,
            "ratios": sorted(ratios.values()),
            "steps_per_s": [o.get("steps", 0) / elapsed for o in outs], "loss": [o.get("loss", float("nan")) for o in outs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--periods", default="2,5,15,0", help="averaging periods in seconds, comma-separated (0: off)")
    parser.add_argument("--seconds", type=float, default=40.0, help="training time per period")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds the cells train on one host first")
    parser.add_argument("--sample-every", type=float, default=0.5)
    parser.add_argument("--hid", type=int, default=64, help="the experts' hid_dim (the example model's)")
    parser.add_argument("--cells", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="the trainers' dense learning rate")
    parser.add_argument("--max-distance", type=float, default=HostConfig.replica_max_distance,
                        help="host.replica_max_distance")
    parser.add_argument("--verbose", action="store_true", help="log every skipped or refused exchange")
    parser.add_argument("--expert-lr", type=float, default=3e-3, help="the hosts' Adam learning rate (host default)")
    parser.add_argument("--aggregates", default="mean,centered_clip",
                        help="host.replica_aggregate values, comma-separated, run in turn for each period (baseline first)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each aggregate per period, interleaved")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lightning_moe.server.replica_sync").setLevel(logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(1)
    REPORT(f"2 hosts x {args.cells} ffn cells (hid {args.hid}), 2 trainers (one per host, batch {args.batch}), "
           f"{args.seconds:.0f} s per period")
    warm = warm_up(args)
    REPORT("drift: relative L2 between the replicas' parameters (max over cells): mean and max over the run and over its "
           "second half, at the end; out: of their outputs on a fixed batch")
    REPORT(f"{'period':>8} {'aggregate':>13} {'mean':>8} {'max':>8} {'2nd mean':>9} {'2nd max':>8} {'end':>8} "
           f"{'out mean':>9} {'out max':>8} {'exchanges':>9} {'clipped':>7} {'d/r med':>7} {'d/r max':>7} {'sync B/s':>10} "
           f"{'steps/s':>12} {'loss':>14} {'moved':>7}")
    aggregates = args.aggregates.split(",")
    for period in (float(p) for p in args.periods.split(",")):
        results: dict[str, list[dict]] = {name: [] for name in aggregates}
        for _ in range(args.repeats):
            for aggregate in aggregates if period else aggregates[:1]:
                r = run(period, args, warm, aggregate)
                results[aggregate].append(r)
                ratios = r["ratios"] or [float("nan")]
                REPORT(f"{'off' if period == 0 else f'{period:g} s':>8} {aggregate:>13} {r['mean']:>8.4f} {r['max']:>8.4f} "
                       f"{r['steady_mean']:>9.4f} {r['steady_max']:>8.4f} {r['end']:>8.4f} {r['out_mean']:>9.4f} "
                       f"{r['out_max']:>8.4f} {r['rounds']:>9.0f} {r['clipped']:>7d} {ratios[len(ratios) // 2]:>7.2f} "
                       f"{ratios[-1]:>7.2f} {r['bytes_per_s']:>10,.0f} "
                       f"{'/'.join(f'{s:.1f}' for s in r['steps_per_s']):>12} "
                       f"{'/'.join(f'{x:.4f}' for x in r['loss']):>14} {r['moved']:>7.4f}")
        for aggregate, runs in results.items():
            if len(runs) > 1:
                means = sorted(r["mean"] for r in runs)
                losses = sorted(sum(r["loss"]) / 2 for r in runs)
                REPORT(f"{'':>8} {aggregate:>13} drift mean: median {statistics.median(means):.4f} (spread "
                       f"{means[0]:.4f}-{means[-1]:.4f}); loss: median {statistics.median(losses):.4f} "
                       f"(spread {losses[0]:.4f}-{losses[-1]:.4f}); clipped {sum(r['clipped'] for r in runs)} of "
                       f"{sum(len(r['ratios']) for r in runs)} averagings")


if __name__ == "__main__":
    main()
