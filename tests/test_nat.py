"""Volunteers behind home NATs, across real network stacks (tests/netns.py): public addresses learned from
peers, dial-backs that tell a reachable node from one behind NAT, and relays."""

from __future__ import annotations

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
