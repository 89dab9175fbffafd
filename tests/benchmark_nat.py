"""A trainer's throughput to a host behind a home NAT (through a relay) against a host it reaches directly.

Network namespaces (tests/netns.py, root): on the test internet, A starts the swarm (its DHT node and a
relay, ``lightning-moe host`` with address flags), D is a public volunteer that the trainer reaches
directly (``host.relay=false``, so it relays for no one), H is a volunteer at home behind a MASQUERADE
router that drops unsolicited inbound traffic, reached through A's relay, and the trainer runs on B.
D and H serve the same experts (the example's 16, hid 64) under two prefixes, ``ffn`` and ``ffr``; D,
H and B have the same uplink (``tc tbf`` at ``--mbit``). The trainer steps a DecentralizedMoE layer of
each prefix (the example's batch: 2,048 rows, k_best 4), interleaved: direct, relayed, direct, ...

Prints every round, then the relayed / direct ratio (median and spread), and the relay's CPU per MB
it relayed: the CPU time of A's whole process (relay, DHT node, one expert) during the run divided by
the bytes that crossed H's router in both directions. B does not punch holes (``hole_punch=False``): its
calls to H stay relayed.

Then hole punching, pair by pair: two trainers at home (T, U, behind MASQUERADE routers) call the
experts of three volunteers at home reached through A's relay, H (``ffr``) and G (``ffg``) behind
MASQUERADE routers and S (``ffs``) behind a router that picks a random port per connection
(``--random-fully``, a symmetric NAT, where punching cannot work), until each trainer's attempts for
each host ended. A pair counts when its attempts made a direct connection and calls then went over it.

    sudo python tests/benchmark_nat.py                   # about 4 minutes
    sudo python tests/benchmark_nat.py --mbit 20 --rounds 5 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_util import REPORT, interleave, spread

from netns import Internet, unavailable, wait_for_line

CLI = [sys.executable, "-m", "lightning_moe.cli"]
ROWS, HID = 2048, 64


def trainer(args: argparse.Namespace) -> None:
    """In B's namespace: interleave direct and relayed steps; one JSON line per figure on stdout."""
    import torch

    from lightning_moe import DecentralizedMoE

    layers = {name: DecentralizedMoE(HID, (4, 4), name, k_best=4, initial_peers=[args.peer], cache_ttl=30.0,
                                     hole_punch=False) for name in ("ffn", "ffr")}
    x = torch.randn(ROWS, HID)

    def samples_per_second(name: str) -> float:
        layer, failed = layers[name], 0
        layer(x.requires_grad_()).sum().backward()  # warm: connections and DHT answers
        begin = time.perf_counter()
        for _ in range(args.steps):
            layer(x.requires_grad_()).sum().backward()
            failed += int(layer.stats["failed"] + layer.stats["backward_failed"])
            if layer.stats["failed"] + layer.stats["backward_failed"]:
                print(json.dumps({"errors": layer.last_stats.errors[:3]}), flush=True)
        rate = args.steps * ROWS / (time.perf_counter() - begin)
        print(json.dumps({"layer": name, "samples_per_s": rate, "failed": failed}), flush=True)
        return rate

    figures = interleave(lambda: samples_per_second("ffn"), lambda: samples_per_second("ffr"), args.rounds,
                         "direct {i}", "relayed {i}", lambda v: f"{v:.0f} samples/s", "relayed / direct",
                         report=lambda line: print(json.dumps({"line": line}), flush=True))
    print(json.dumps({"ratios": figures.ratios}), flush=True)


PAIR_PREFIXES = ("ffr", "ffg", "ffs")


def pair_trainer(args: argparse.Namespace) -> None:
    """In T's or U's namespace: call each home host's experts until every hole-punching attempt ended, then a few
    steps more; one JSON line: per endpoint, direct connections made (-1: not relayed) and calls direct / other."""
    import torch

    from lightning_moe import DecentralizedMoE
    from lightning_moe.client.direct import direct_paths
    from lightning_moe.net import http_client

    endpoints = args.endpoints.split(",")
    layers = [DecentralizedMoE(HID, (4, 4), name, k_best=4, initial_peers=[args.peer], cache_ttl=30.0)
              for name in PAIR_PREFIXES]
    failed, errors = 0, []

    def steps(n: int) -> None:
        nonlocal failed
        for _ in range(n):
            for layer in layers:
                layer(torch.randn(64, HID, requires_grad=True)).sum().backward()
                failed += int(layer.stats["failed"] + layer.stats["backward_failed"])
                if layer.stats["failed"] + layer.stats["backward_failed"]:
                    errors.extend(layer.last_stats.errors[:3])

    paths, deadline = direct_paths(), time.monotonic() + 90
    steps(2)
    for _ in range(200):
        if all(e in paths.outcomes for e in endpoints) or time.monotonic() > deadline:
            break
        steps(1)
    before = {e: http_client.request_counts(e) for e in endpoints}
    steps(3)
    after = {e: http_client.request_counts(e) for e in endpoints}
    print(json.dumps({"failed": failed, "errors": errors[:5], "outcomes": {e: paths.outcomes.get(e) for e in endpoints},
                      "direct": {e: after[e][0] - before[e][0] for e in endpoints},
                      "other": {e: after[e][1] - before[e][1] for e in endpoints}}), flush=True)


def measure_pairs(internet: Internet, home_host: subprocess.Popen, peer: str, work: Path) -> tuple[int, int]:
    """Hole punching between trainers at home and volunteers at home (see the module); (direct pairs, pairs)."""
    homes = {"ffg": internet.home("G"), "ffs": internet.home("S", symmetric=True)}
    started = {prefix: machine.popen(CLI + ["host", f"dht.initial_peers=[{peer}]", "host.cells=16",
                                            f"moe.uid_prefix={prefix}"], work / f"{prefix}.log", cwd=work)
               for prefix, machine in homes.items()}
    started["ffr"] = home_host
    endpoints = {}
    for prefix in PAIR_PREFIXES:
        log = work / ("H.log" if prefix == "ffr" else f"{prefix}.log")
        line = wait_for_line(log, "reachable through relay", started[prefix], 180)
        endpoints[prefix] = line.split("reachable through relay ")[1].split(" at ")[1].split()[0]
    trainers = {name: internet.home(name) for name in ("T", "U")}
    runs = {name: machine.popen([sys.executable, __file__, "--pair-trainer", f"--peer={peer}",
                                 f"--endpoints={','.join(endpoints.values())}"], work / f"{name}.log",
                                cwd=Path(__file__).parent) for name, machine in trainers.items()}
    direct = pairs = 0
    for name, run in runs.items():
        log = work / f"{name}.log"
        if run.wait(timeout=600) != 0:
            sys.exit(f"pair trainer {name} failed:\n{log.read_text()[-3000:]}")
        record = json.loads(log.read_text().strip().splitlines()[-1])
        for prefix, endpoint in endpoints.items():
            made, calls = record["outcomes"][endpoint], record["direct"][endpoint]
            pairs += 1
            direct += bool(made and made > 0 and calls > 0)
            REPORT(f"trainer {name} (home) x host {prefix} ({'symmetric NAT' if prefix == 'ffs' else 'MASQUERADE'}): "
                   f"{made} direct connections made; after them {calls} calls direct, {record['other'][endpoint]} "
                   f"relayed")
        if record["failed"]:
            REPORT(f"trainer {name}: {record['failed']} failed calls ({'; '.join(record['errors'][:3])})")
    return direct, pairs


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def link_bytes(ns: str, device: str) -> int:
    stats = json.loads(subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", device], capture_output=True,
                                      text=True, check=True).stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def start(machine, argv: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    process = machine.popen(CLI + argv, log, cwd=cwd)
    wait_for_line(log, "others join with", process, timeout=180)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbit", type=float, default=50.0, help="uplink of D, H and B (Mbit/s; 0: unshaped)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pair-trainer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--endpoints", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer:
        return trainer(args)
    if args.pair_trainer:
        return pair_trainer(args)
    reason = unavailable(nat=True)
    if reason:
        sys.exit(f"benchmark_nat needs network namespaces and iptables: {reason}")
    with tempfile.TemporaryDirectory() as tmp, Internet() as internet:
        work = Path(tmp)
        a, d, b, h = internet.machine("A"), internet.machine("D"), internet.machine("B"), internet.home("H")
        for machine in (d, b, h) if args.mbit else ():
            machine.limit(args.mbit)
        peer = f"{a.address}:31337"
        relay = start(a, ["host", "host.host=0.0.0.0", f"host.announce_host={a.address}", "dht.host=0.0.0.0",
                          f"dht.announce_host={a.address}", "dht.port=31337", "moe.uid_prefix=boot", "host.cells=1"],
                      work / "A.log", work)
        start(d, ["host", f"dht.initial_peers=[{peer}]", "host.cells=16", "host.relay=false"], work / "D.log", work)
        home_host = start(h, ["host", f"dht.initial_peers=[{peer}]", "host.cells=16", "moe.uid_prefix=ffr"],
                          work / "H.log", work)
        relayed_at = wait_for_line(work / "H.log", "reachable through relay", relay, 5).split("reachable through relay ")[1]
        REPORT(f"uplinks {args.mbit:g} Mbit/s; direct host D at {d.address}, home host H behind {h.public_address} "
               f"reached through relay {relayed_at}")
        cpu0, bytes0 = process_cpu(relay.pid), link_bytes(h.router.ns, "wan")
        log = work / "trainer.log"
        run = b.popen([sys.executable, __file__, "--trainer", f"--peer={peer}", f"--rounds={args.rounds}",
                       f"--steps={args.steps}"], log, cwd=Path(__file__).parent)
        if run.wait(timeout=1800) != 0:
            sys.exit(f"trainer failed:\n{log.read_text()[-3000:]}")
        cpu, relayed_mb = process_cpu(relay.pid) - cpu0, (link_bytes(h.router.ns, "wan") - bytes0) / 1e6
        ratios, failed, errors = [], 0, []
        for line in log.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if "line" in record:
                    REPORT(record["line"])
                failed += record.get("failed", 0)
                errors += record.get("errors", [])
                ratios = record.get("ratios", ratios)
        REPORT(f"failed calls: {failed}{' (' + '; '.join(errors[:3]) + ')' if errors else ''}; relayed {relayed_mb:.1f} MB through H's router; relay host CPU {cpu:.2f} s")
        direct, pairs = measure_pairs(internet, home_host, peer, work)
        REPORT(f"relayed / direct throughput: {spread(ratios)}")
        REPORT(f"relay CPU per relayed MB: {1000 * cpu / max(relayed_mb, 1e-9):.2f} ms")
        REPORT(f"direct connections after upgrade: {direct} of {pairs} pairs")


if __name__ == "__main__":
    main()
