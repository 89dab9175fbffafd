"""Attacks on a real host and real DHT nodes over 127.0.0.1, and what a legitimate client sees.

    python tests/benchmark_attacks.py [--quick] [--only http|dht|sybil]

For each attack: the legitimate client's success rate and p50/p99 latency before, during and after,
the host's RSS before, at its peak during, and after, and the CPU used by the host and the attacker
(which share this machine's cores). Goals: success >= 99 % during every attack,
p99 during <= 3x before, RSS after within 10 % of before. The host runs in its own process, each
attacker in another, the client here. Then the DHT attacks of tests/dht_attacks.py (amplification,
eclipse, store flood) and of tests/dht_sybil.py (an eclipse from 240 addresses, fakes next to an honest
host; each with the nodes' endpoint checks off, then on). Then the Sybil attacks on the host, from many addresses: connection slots taken from 64
addresses in one /24 and from 64 addresses each in a /16 of its own (16,384 connections, the host's
limit, reopened whenever the host closes them; the legitimate client opens a new connection per
call), 60 MB bodies cut short by a byte, fake-signed bodies and answers the client does not read
(RSS kept afterwards; goal within 100 MB), and a compute flood (32 connections of back-to-back
16,384-row forwards; goal: p99 at most 10x). The last lines are the worst success during an HTTP
attack and the DHT amplification factor (bytes sent per byte received from unverified addresses;
goal <= 2), then the worst legitimate success with 64 attacking networks (goal >= 99 %) and the RSS
kept after aborted bodies; each only when its section ran.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dht_attacks  # noqa: E402
import dht_sybil  # noqa: E402
from attack_tools import (  # noqa: E402
    Attacker, HostProcess, LegitClient, captured_request, cpu_seconds, huge_rows_request, summarize, sybil_addresses,
)

SECRET = "benchmark secret"
IDLE_TIMEOUT = 10.0  # the host's default: how long an idle connection or an unfinished head is held
RATE = 50 << 20  # bytes/s an attacker sends in all (400 Mbit/s: several volunteers' uplinks); 0: unthrottled


def measure(name: str, host: HostProcess, start_attack: Callable[[], Attacker], phase_s: float,
            during_s: float | None = None, fresh: bool = False) -> dict:
    """Baseline, attack, recovery; the client calls all along.

    The baseline lasts as long as the attack (``during_s``, default twice ``phase_s``), so that both p99
    come from as many calls; the recovery lasts ``phase_s``.

    RSS is sampled every 0.1 s during the attack, and the CPU seconds per second of the host and the
    attacker are measured (on this machine they share the same cores).
    """
    client = LegitClient(host.endpoint, secret=host.secret, fresh=fresh)
    during_s = during_s or 2 * phase_s
    client.run(1.0)  # warm up: connection, host id, first batches
    before = summarize(client.run(during_s))
    rss_before = host.rss()
    attacker = start_attack()
    ready = attacker.wait_ready(60)
    peak, sampling = [rss_before], threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            peak.append(host.rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_start, started = (cpu_seconds(host.pid), cpu_seconds(attacker.proc.pid)), time.monotonic()
    during = summarize(client.run(during_s))
    elapsed = time.monotonic() - started
    cpu = [(cpu_seconds(pid) - start) / elapsed for pid, start in zip((host.pid, attacker.proc.pid), cpu_start)]
    counts = attacker.stop()
    sampling.set()
    sampler.join()
    time.sleep(1.0)
    after = summarize(client.run(phase_s))
    rss_after = host.rss()
    return {"name": name, "before": before, "during": during, "after": after, "ready": ready, "attacker": counts,
            "rss_before": rss_before, "rss_peak": max(peak), "rss_after": rss_after, "cpu": cpu}


def http_attacks(quick: bool, rate: int = RATE) -> list[dict]:
    phase = 2.0 if quick else 4.0
    conns = 2000 if quick else 10_000
    sources = 10 if quick else 40  # 250 connections per address, under the default limit of 256 per address
    held = None if quick else IDLE_TIMEOUT + 2  # the host closes them and they come back, within the window
    results = []
    with HostProcess(idle_timeout=IDLE_TIMEOUT) as host:
        results.append(measure(f"{conns} idle connections", host,
                               lambda: Attacker("idle", host.port, conns, sources, seconds=60), phase, held))
    with HostProcess(idle_timeout=IDLE_TIMEOUT) as host:
        results.append(measure(f"{conns} slowloris connections", host,
                               lambda: Attacker("slowloris", host.port, conns, sources, seconds=60), phase, held))
    with HostProcess() as host:
        results.append(measure("header flood (200 KB each, 200 conns)", host,
                               lambda: Attacker("headers", host.port, 200, 4, seconds=60, rate=rate), phase))
    with HostProcess(secret=SECRET) as host:
        results.append(measure("unsigned 60 MB bodies, private host (64 conns)", host,
                               lambda: Attacker("bigbody", host.port, 64, 4, seconds=60, rate=rate), phase))
    with HostProcess(secret=SECRET) as host:
        results.append(measure("fake-signed 60 MB bodies, private host (16 conns)", host,
                               lambda: Attacker("bigbody", host.port, 16, 4, seconds=60, fake_signature=True,
                                                host_id=host.host_id, rate=rate), phase))
    with HostProcess() as host:
        results.append(measure("forward claiming 200,000 rows (64 conns)", host,
                               lambda: Attacker("rows", host.port, 64, 4, seconds=60, rate=rate,
                                                **huge_rows_request(200_000)), phase))
    with HostProcess(secret=SECRET) as other:
        capture = captured_request(SECRET, other.host_id)  # signed for `other`, replayed to `host`
    with HostProcess(secret=SECRET) as host:
        results.append(measure("cross-host replay (8 conns)", host,
                               lambda: Attacker("replay", host.port, 8, 2, seconds=60, **capture), phase))
    return results


def report_http(results: list[dict]) -> float:
    """Print the table; returns the worst legitimate success rate during an attack."""
    print(f"{'attack':50s} {'phase':7s} {'calls':>6s} {'success':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for r in results:
        for phase in ("before", "during", "after"):
            s = r[phase]
            print(f"{r['name'] if phase == 'before' else '':50s} {phase:7s} {s['calls']:6d} {s['success']:7.1f}% "
                  f"{s['p50_ms']:8.1f} {s['p99_ms']:8.1f}")
        mib = 1 << 20
        print(f"{'':50s} RSS MiB before {r['rss_before'] / mib:.0f}, peak {r['rss_peak'] / mib:.0f}, after "
              f"{r['rss_after'] / mib:.0f} ({100 * (r['rss_after'] / r['rss_before'] - 1):+.1f}%); "
              f"p99 during/before {r['during']['p99_ms'] / r['before']['p99_ms']:.2f}x")
        print(f"{'':50s} CPU during (cores): host {r['cpu'][0]:.2f}, attacker {r['cpu'][1]:.2f}")
        print(f"{'':50s} attacker: {r['attacker']}")
    return min(r["during"]["success"] for r in results)


def fake_signed_body(wide: dict) -> dict:
    """Options of the bigbody attack for a body with a valid wire header: the host reads all of it, then checks the HMAC."""
    return {"prefix": wide["wire_head"], "length": wide["wire_total"]}


def sybil_attacks(quick: bool, rate: int = RATE) -> tuple[list[dict], float]:
    """Attacks from many addresses; returns the results and the most RSS (bytes) a host kept after the memory attacks."""
    phase = 2.0 if quick else 4.0
    per_address = 32 if quick else 256
    conns = 64 * per_address  # the host's whole limit
    limits = dict(idle_timeout=IDLE_TIMEOUT, max_connections=conns, max_connections_per_address=per_address,
                  max_connections_per_network=conns // 16)
    held = None if quick else IDLE_TIMEOUT + 2  # the host closes idle ones and they come back, within the window
    results = []
    for layout, where in (("one24", "64 addresses in one /24"), ("own16", "64 addresses, each its own /16")):
        with HostProcess(**limits) as host:
            ready = conns // 16 if layout == "one24" else 0.9 * conns
            results.append(measure(f"slots: {where}, {conns} conns", host,
                                   lambda: Attacker("idle", host.port, conns, addresses=sybil_addresses(64, layout),
                                                    seconds=60, ready_open=ready), phase, held, fresh=True))
    kept = 0
    wide = huge_rows_request(128, width=(60 << 20) // (128 * 4))  # 60 MiB in 128 rows (the host takes 128)
    with HostProcess() as host:  # public: a truncated body is read to its last byte
        before = host.rss()
        results.append(measure("60 MB bodies cut a byte short, public host (3 conns)", host,
                               lambda: Attacker("truncated", host.port, 3, addresses=sybil_addresses(3, "own16"),
                                                seconds=60, rate=rate, **wide), phase))
        kept = max(kept, host.rss() - before)
    with HostProcess(secret=SECRET) as host:
        before = host.rss()
        results.append(measure("fake-signed 60 MB bodies, private host (3 conns)", host,
                               lambda: Attacker("bigbody", host.port, 3, sources=3, seconds=60, fake_signature=True,
                                                host_id=host.host_id, rate=rate, **fake_signed_body(wide)), phase))
        kept = max(kept, host.rss() - before)
    with HostProcess(max_batch=4096) as host:
        before = host.rss()
        results.append(measure("answers left unread, 16,384 rows (8 conns)", host,
                               lambda: Attacker("abort_answer", host.port, 8, addresses=sybil_addresses(8, "own16"),
                                                seconds=60, **huge_rows_request(16384)), phase))
        kept = max(kept, host.rss() - before)
        results.append(measure("compute flood: 16,384-row forwards, one address (32 conns)", host,
                               lambda: Attacker("compute", host.port, 32, addresses=["127.77.0.2"], seconds=60,
                                                **huge_rows_request(16384)), phase))
    return results, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer connections, shorter phases")
    parser.add_argument("--only", choices=("http", "dht", "sybil"), help="run one section only")
    parser.add_argument("--rate", type=float, default=RATE / (1 << 20),
                        help="MiB/s that each flooding attacker sends in all (0: as fast as loopback takes)")
    args = parser.parse_args()
    started = time.monotonic()
    rate = int(args.rate * (1 << 20))
    sections = {args.only} if args.only else {"http", "dht", "sybil"}
    worst = amplification = sybil = None
    if "http" in sections:
        print(f"HTTP attacks on 127.0.0.1; flooding attackers send {'unthrottled' if not rate else f'{args.rate:g} MiB/s'}")
        worst = report_http(http_attacks(args.quick, rate))
    if "dht" in sections:
        print("\nDHT attacks on 127.0.0.1")
        amplification = dht_attacks.report()
        dht_sybil.report()
    if "sybil" in sections:
        print("\nSybil attacks: many addresses and networks in 127/8; the legitimate client on 127.0.0.1")
        results, kept = sybil_attacks(args.quick, rate)
        report_http(results)
        slots = [r for r in results if r["name"].startswith("slots")]
        sybil = (min(r["during"]["success"] for r in slots), kept)
    print(f"(took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    if worst is not None:
        print(f"worst legitimate success during an attack: {worst:.1f}%")
    if amplification is not None:
        print(f"DHT amplification: {amplification:.3f}")
    if sybil is not None:
        print(f"worst legitimate success with 64 attacking networks: {sybil[0]:.1f}%")
        print(f"RSS kept after aborted bodies: {sybil[1] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
