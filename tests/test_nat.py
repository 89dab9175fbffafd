"""Volunteers behind home NATs, across real network stacks (tests/netns.py): public addresses learned from
peers, dial-backs that tell a reachable node from one behind NAT, relays, and hole punching past them."""

from __future__ import annotations

import json
import sys

import pytest

from netns import Internet, unavailable, wait_for_line

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable(nat=True) is not None, reason=str(unavailable(nat=True)))]

CLI = [sys.executable, "-m", "lightning_moe.cli"]


def public_host(machine, tmp_path, *extra: str):
    """`lightning-moe host` on a public machine with every address flag (a swarm's first node)."""
    log = tmp_path / f"{machine.name}-host.log"
    process = machine.popen(CLI + ["host", "host.host=0.0.0.0", f"host.announce_host={machine.address}", "host.port=31338",
                                   "dht.host=0.0.0.0", f"dht.announce_host={machine.address}", "dht.port=31337",
                                   "model.hid_dim=16", *extra], log, cwd=tmp_path)
    wait_for_line(log, "others join with", process, timeout=120)
    return process, log


DISCOVER = """
from lightning_moe.config import DHTConfig
from lightning_moe.dht import DHT
node = DHT.from_config(DHTConfig(initial_peers=["{peer}"]))
print("client_mode", node.client_mode, "address", node.address, "observed", node.observed_address())
node.shutdown()
"""


def test_a_node_learns_its_public_address_and_answers_requests_only_when_strangers_reach_it(tmp_path):
    with Internet() as internet:
        a, b, home = internet.machine("A"), internet.machine("B"), internet.home("H")
        public_host(a, tmp_path, "host.cells=4")
        out = b.python(DISCOVER.format(peer=f"{a.address}:31337"))
        assert f"client_mode False address {b.address}:" in out and f"observed {b.address}" in out, out
        out = home.python(DISCOVER.format(peer=f"{a.address}:31337"))
        assert "client_mode True" in out and f"observed {home.public_address}" in out, out


TRAIN = """
import torch
from lightning_moe import DecentralizedMoE
moe = DecentralizedMoE(16, (4, 4), "ffn", k_best=4, initial_peers=["{peer}"], cache_ttl=1.0)
answered = failed = 0
for _ in range({steps}):
    x = torch.randn(32, 16, requires_grad=True)
    moe(x).sum().backward()
    answered += int(moe.stats["answered"]); failed += int(moe.stats["failed"])
print("answered", answered, "failed", failed)
moe.close()
"""


def home_volunteer(home, tmp_path, peer: str, *extra: str):
    """`lightning-moe host` at home with no address flag at all."""
    log = tmp_path / f"{home.name}-host.log"
    process = home.popen(CLI + ["host", f"dht.initial_peers=[{peer}]", "model.hid_dim=16", "host.cells=16",
                                "host.update_period=2", *extra], log, cwd=tmp_path)
    wait_for_line(log, "others join with", process, timeout=120)
    return process, log


def served(process, log) -> int:
    process.terminate()
    assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
    line = wait_for_line(log, "stopped; served", process, timeout=5)
    return int(line.split("served ")[1].split()[0])


def test_a_home_volunteer_with_no_address_flags_serves_public_and_natted_trainers_through_a_relay(tmp_path):
    with Internet() as internet:
        a, b = internet.machine("A"), internet.machine("B")
        home, other_home = internet.home("H"), internet.home("G")
        public_host(a, tmp_path, "host.cells=1")  # the swarm's first node; it relays
        volunteer, log = home_volunteer(home, tmp_path, f"{a.address}:31337")
        text = log.read_text()
        assert "serving through a relay" in text and f"reachable through relay {a.address}:" in text, text
        assert "client mode" in text, text  # its DHT node: strangers cannot reach its UDP port
        for trainer in (b, other_home):
            out = trainer.python(TRAIN.format(peer=f"{a.address}:31337", steps=10), timeout=180)
            answered, failed = int(out.split()[1]), int(out.split()[3])
            assert answered > 0 and failed <= 0.01 * answered, out
        listing = b.python("import sys; sys.argv = ['lightning-moe', 'swarm', "
                           f"'dht.initial_peers=[{a.address}:31337]', 'model.hid_dim=16']\n"
                           "from lightning_moe.cli import main; main()", timeout=120)
        relayed_at = text.split("reachable through relay ")[1].split(" at ")[1].split()[0]
        assert relayed_at in listing and "16 of 16 cells alive" in listing, listing
        assert served(volunteer, log) > 0


PUNCH_TRAIN = """
import json, time
import torch
from lightning_moe import DecentralizedMoE
from lightning_moe.client.direct import direct_paths
from lightning_moe.net import http_client
homes = {homes}
layers = {{p: DecentralizedMoE(16, (4, 4), p, k_best=4, initial_peers=["{peer}"], cache_ttl=1.0) for p in ("ffn", "ffr")}}
answered = failed = 0
def steps(n):
    global answered, failed
    for _ in range(n):
        for moe in layers.values():
            moe(torch.randn(32, 16, requires_grad=True)).sum().backward()
            answered += int(moe.stats["answered"]); failed += int(moe.stats["failed"] + moe.stats["backward_failed"])
paths = direct_paths()
deadline = time.monotonic() + 40
steps(2)
for _ in range(100):  # until both homes' attempts ended (each starts after 16 calls)
    if all(e in paths.outcomes for e in homes) or time.monotonic() > deadline:
        break
    steps(1)
before = {{e: http_client.request_counts(e) for e in homes}}
steps(6)
after = {{e: http_client.request_counts(e) for e in homes}}
print(json.dumps({{"answered": answered, "failed": failed, "outcomes": {{e: paths.outcomes.get(e) for e in homes}},
                  "direct": {{e: after[e][0] - before[e][0] for e in homes}}, "other": {{e: after[e][1] - before[e][1] for e in homes}}}}))
for moe in layers.values():
    moe.close()
"""


@pytest.fixture(scope="module")
def punched(tmp_path_factory):
    """A trainer behind one NAT calls experts of a home volunteer behind another NAT (H, ffn) and of one behind a
    symmetric NAT (S, ffr), both reached through A's relay: what its hole punching made of each."""
    tmp_path = tmp_path_factory.mktemp("punch")
    with Internet() as internet:
        a, trainer = internet.machine("A"), internet.home("T")
        home, symmetric = internet.home("H"), internet.home("S", symmetric=True)
        public_host(a, tmp_path, "host.cells=1", "moe.uid_prefix=boot")  # the swarm's first node; it relays
        peer = f"{a.address}:31337"
        logs = {}
        for machine, prefix in ((home, "ffn"), (symmetric, "ffr")):
            logs[machine.name] = log = tmp_path / f"{machine.name}-host.log"
            process = machine.popen(CLI + ["host", f"dht.initial_peers=[{peer}]", "model.hid_dim=16", "host.cells=16",
                                           "host.update_period=2", f"moe.uid_prefix={prefix}"], log, cwd=tmp_path)
            logs[machine.name] = (log, process)
        endpoints = {}
        for name, (log, process) in logs.items():
            line = wait_for_line(log, "reachable through relay", process, timeout=120)
            endpoints[name] = line.split("reachable through relay ")[1].split(" at ")[1].split()[0]
        out = trainer.python(PUNCH_TRAIN.format(peer=peer, homes=sorted(endpoints.values())), timeout=150)
        result = json.loads(out.strip().splitlines()[-1])
        yield result, endpoints, {name: log.read_text() for name, (log, _) in logs.items()}


def test_a_natted_trainer_and_a_home_volunteer_behind_another_nat_go_direct_after_hole_punching(punched):
    result, endpoints, logs = punched
    home = endpoints["H"]
    assert result["outcomes"][home] >= 4, (result, logs["H"][-3000:])  # direct connections punched
    assert result["failed"] == 0 and result["answered"] > 0, result
    # 6 steps send each host 12 requests (a forward and a backward: moe.rows_per_host); most go direct
    assert result["direct"][home] >= 10 and result["direct"][home] > 2 * result["other"][home], result
    assert "direct path to" in logs["H"] and "4 of 4 connections hole-punched" in logs["H"], logs["H"][-3000:]


def test_behind_a_symmetric_nat_hole_punching_fails_and_calls_go_on_through_the_relay(punched):
    result, endpoints, logs = punched
    symmetric = endpoints["S"]
    assert result["outcomes"][symmetric] == 0, result  # tried, and no connection made
    assert result["direct"][symmetric] == 0 and result["other"][symmetric] >= 10, result
    assert result["failed"] == 0, result  # no call failed meanwhile
    assert "no direct path to" in logs["S"], logs["S"][-3000:]


@pytest.mark.soak
def test_when_its_relay_is_killed_a_home_volunteer_serves_again_through_another(tmp_path):
    with Internet() as internet:
        a, c, b, home = internet.machine("A"), internet.machine("C"), internet.machine("B"), internet.home("H")
        first = public_host(a, tmp_path, "host.cells=1", "host.update_period=2")
        second = public_host(c, tmp_path, "host.cells=1", "host.update_period=2", f"dht.initial_peers=[{a.address}:31337]")
        volunteer, log = home_volunteer(home, tmp_path, f"{a.address}:31337")
        relay = log.read_text().split("reachable through relay ")[1].split(":")[0]
        killed, survivor = (first, c) if relay == a.address else (second, a)
        out = b.python(TRAIN.format(peer=f"{survivor.address}:31337", steps=2), timeout=120)
        assert int(out.split()[1]) > 0, out
        killed[0].kill()
        line = wait_for_line(log, f"reachable through relay {survivor.address}:", volunteer, timeout=30)
        out = b.python(TRAIN.format(peer=f"{survivor.address}:31337", steps=10), timeout=180)
        answered, failed = int(out.split()[1]), int(out.split()[3])
        assert answered > 0 and failed <= 0.01 * answered, (out, line)
        assert served(volunteer, log) > 0


ATTACK = """
import asyncio, json, time

async def main():
    stop = time.monotonic() + {seconds}
    held, refused = [], 0
    for _ in range(300):  # fake registrations, all from this address
        try:
            reader, writer = await asyncio.open_connection("{relay_host}", {relay_port})
            writer.write(b'{{"op": "register"}}\\n')
            answer = json.loads(await asyncio.wait_for(reader.readline(), 5))
            if answer["op"] == "registered":
                held.append(writer)
            else:
                refused += 1
                writer.close()
        except (OSError, ValueError, asyncio.TimeoutError):
            refused += 1
    flood = []
    for _ in range(1000):  # connections to the relayed host's port, held open
        try:
            flood.append((await asyncio.wait_for(asyncio.open_connection("{relay_host}", {host_port}), 2))[1])
        except (OSError, asyncio.TimeoutError):
            pass
    async def pour():  # bytes: garbage through the relayed host's port until the window ends
        sent = 0
        while time.monotonic() < stop:
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("{relay_host}", {host_port}), 2)
                for _ in range(64):
                    writer.write(b"x" * 65536)
                    await asyncio.wait_for(writer.drain(), 2)
                    sent += 65536
                writer.close()
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.1)
        return sent
    sent = sum(await asyncio.gather(*(pour() for _ in range(4))))
    print("registered", len(held), "refused", refused, "flood", len(flood), "poured", sent)

asyncio.run(main())
"""


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.soak
def test_a_relay_under_a_flood_of_registrations_connections_and_bytes_keeps_its_hosts_served(tmp_path):
    with Internet() as internet:
        a, b, attacker, home = internet.machine("A"), internet.machine("B"), internet.machine("X"), internet.home("H")
        relay_process, _ = public_host(a, tmp_path, "host.cells=1")
        volunteer, log = home_volunteer(home, tmp_path, f"{a.address}:31337")
        relay_at = log.read_text().split("reachable through relay ")[1].split()
        relay_port, host_port = relay_at[0].split(":")[1], relay_at[2].split(":")[1]
        out = b.python(TRAIN.format(peer=f"{a.address}:31337", steps=3), timeout=120)
        before = rss_mb(relay_process.pid)
        attack = attacker.popen([sys.executable, "-c", ATTACK.format(seconds=20, relay_host=a.address, relay_port=relay_port,
                                                                     host_port=host_port)], tmp_path / "attack.log")
        out = b.python(TRAIN.format(peer=f"{a.address}:31337", steps=20), timeout=180)
        assert attack.wait(timeout=120) == 0, (tmp_path / "attack.log").read_text()
        report = (tmp_path / "attack.log").read_text()
        registered, refused = int(report.split()[1]), int(report.split()[3])
        assert registered <= 2 and refused >= 298, report  # RelayLimits.max_hosts_per_address
        answered, failed = int(out.split()[1]), int(out.split()[3])
        assert answered > 0 and failed <= 0.01 * answered, (out, report)
        after = rss_mb(relay_process.pid)
        assert after - before < 64, (before, after, report)
        assert served(volunteer, log) > 0


@pytest.mark.soak
def test_a_volunteer_trainer_at_home_trains_through_its_relay_and_averages_with_a_public_one(tmp_path):
    """`lightning-moe train +volunteer=true` with nothing but the swarm's address, at home and on a public machine:
    both train through the swarm's experts; the home trainer's averaging initiates exchanges (peers cannot dial it)."""
    from test_machines import FAST_TRAIN, final_metrics

    with Internet() as internet:
        a, b, home = internet.machine("A"), internet.machine("B"), internet.home("H")
        public_host(a, tmp_path, "host.cells=16")
        argv = CLI + ["train", "+volunteer=true", f"dht.initial_peers=[{a.address}:31337]", "model.hid_dim=16", "+run_id=r",
                      *FAST_TRAIN, "trainer.max_steps=40"]
        (tmp_path / "B").mkdir()
        (tmp_path / "H").mkdir()
        public = b.popen(argv + ["trainer.max_steps=400"], tmp_path / "B.log", cwd=tmp_path / "B")  # outlasts H's run
        wait_for_line(tmp_path / "B.log", "averaging: peers reach this trainer at", public, timeout=180)
        at_home = home.popen(argv, tmp_path / "H.log", cwd=tmp_path / "H")
        assert at_home.wait(timeout=400) == 0, (tmp_path / "H.log").read_text()[-3000:]
        assert public.wait(timeout=400) == 0, (tmp_path / "B.log").read_text()[-3000:]
        text = (tmp_path / "H.log").read_text()
        assert "serving through a relay" in text and "this trainer initiates exchanges and answers none" in text, text[-3000:]
        for log in (tmp_path / "H.log", tmp_path / "B.log"):
            metrics = final_metrics(log)
            assert metrics["moe/answered"] > 0 and metrics["moe/failed"] <= 0.01 * metrics["moe/answered"], metrics
        assert final_metrics(tmp_path / "H.log")["averaging/rounds"] > 0
