"""Relays on loopback: a real host reached through a real relay, failover, limits and refusals.

Across NAT routers in network namespaces, see tests/test_nat.py.
"""

from __future__ import annotations

import functools
import json
import socket
import time

import pytest
import torch

from lightning_moe.client.remote_expert import RemoteExpert
from lightning_moe.config import DHTConfig, HostConfig
from lightning_moe.net import loop as net_loop
from lightning_moe.net.relay import Relay, RelayLimits, register_signature
from lightning_moe.net.relay_client import RelayClient, split_endpoint
from lightning_moe.server import make_expert
from lightning_moe.volunteer import start_volunteer

HID = 8


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def volunteer():
    config = HostConfig(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                        in_features=HID, grid_size=[2, 2], cells=["ffn.0.0", "ffn.1.1"], stats_every=0)
    with start_volunteer(config, DHTConfig()) as running:
        yield running


def start_relay(secret: bytes | None = None, limits: RelayLimits | None = None) -> Relay:
    relay = Relay("127.0.0.1", 0, secret=secret, limits=limits)
    net_loop.run(relay.start(), 5)
    return relay


def stop_relay(relay: Relay) -> None:
    net_loop.run(relay.stop(), 10)


def relayed(volunteer, relays: list[Relay], secret: bytes | None = None) -> tuple[RelayClient, list]:
    seen: list = []
    local = split_endpoint(volunteer.endpoint)
    client = RelayClient(local, lambda: [f"127.0.0.1:{r.port}" for r in relays if r.port], seen.append, secret=secret,
                         retry=0.2)
    return client.start(wait=10), seen


def test_a_trainer_reaches_a_host_through_a_relay_and_gets_the_same_answers(volunteer):
    relay = start_relay()
    client, seen = relayed(volunteer, [relay])
    try:
        assert client.endpoint is not None and client.endpoint != volunteer.endpoint and seen == [client.endpoint]
        x = torch.randn(5, HID)
        direct = RemoteExpert("ffn.0.0", volunteer.endpoint).forward(x)
        through = RemoteExpert("ffn.0.0", client.endpoint).forward(x)
        assert torch.allclose(direct, through)
        for _ in range(20):  # many calls over kept-alive connections, each spliced once
            RemoteExpert("ffn.1.1", client.endpoint).forward(torch.randn(64, HID))
        assert relay.stats["bytes_relayed"] > 20 * 64 * HID * 4
        assert relay.stats["connections"] >= 1 and client.stats["bridges"] == relay.stats["connections"]
    finally:
        client.stop()
        stop_relay(relay)


def test_when_its_relay_dies_the_host_registers_with_another_and_reports_the_new_endpoint(volunteer):
    first, second = start_relay(), start_relay()
    relays = [first, second]
    client, seen = relayed(volunteer, relays)
    try:
        old = client.endpoint
        assert old == f"127.0.0.1:{split_endpoint(old)[1]}" and len(seen) == 1
        dead = first if client.relay.endswith(f":{first.port}") else second
        stop_relay(dead)
        dead.port = 0  # no longer a candidate
        assert wait_until(lambda: client.endpoint is not None and client.endpoint != old)
        assert None in seen and seen[-1] == client.endpoint
        assert RemoteExpert("ffn.0.0", client.endpoint).forward(torch.randn(2, HID)).shape == (2, HID)
    finally:
        client.stop()
        for relay in relays:
            stop_relay(relay)


def send_line(port: int, message: dict) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(json.dumps(message).encode() + b"\n")
        return json.loads(sock.makefile().readline())


def test_a_relay_refuses_clearly_what_exceeds_its_limits_and_what_is_malformed(volunteer):
    relay = start_relay(limits=RelayLimits(max_hosts=3, max_hosts_per_address=1, max_connections_per_host=8))
    client, _ = relayed(volunteer, [relay])
    try:
        refusal = send_line(relay.port, {"op": "register"})
        assert refusal["op"] == "refused" and "more than 1 hosts from one address" in refusal["error"]
        assert send_line(relay.port, {"op": "attach", "id": "x", "token": "y"})["error"].startswith("bad message")
        assert "bad message" in send_line(relay.port, {"no": "op"})["error"]
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:  # a line over the limit
            sock.sendall(b"x" * 10000)
            assert "bad message" in sock.makefile().readline()
        # connections per relayed host: 8 held open, the 9th is closed at once, the host still serves after
        port = split_endpoint(client.endpoint)[1]
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
        assert wait_until(lambda: client.stats["bridges"] >= 8)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            third.settimeout(5)
            assert third.recv(1) == b""
        assert relay.stats["connections_refused"] >= 1
        for sock in held:
            sock.close()
        assert wait_until(lambda: sum(r.connections for r in relay.hosts.values()) == 0)
        assert RemoteExpert("ffn.0.0", client.endpoint).forward(torch.randn(2, HID)).shape == (2, HID)
    finally:
        client.stop()
        stop_relay(relay)


def test_a_private_relay_takes_only_signed_fresh_registrations(volunteer):
    secret = b"swarm secret"
    relay = start_relay(secret=secret)
    try:
        assert "not signed" in send_line(relay.port, {"op": "register", "ts": f"{time.time():.3f}", "nonce": "n"})["error"]
        ts = f"{time.time():.3f}"
        wrong = register_signature(b"other secret", ts, "n")
        assert "not signed" in send_line(relay.port, {"op": "register", "ts": ts, "nonce": "n", "sig": wrong})["error"]
        client, _ = relayed(volunteer, [relay], secret=secret)
        try:
            assert client.endpoint is not None
        finally:
            client.stop()
    finally:
        stop_relay(relay)


def test_a_relay_drops_a_host_whose_control_connection_goes_silent():
    relay = start_relay()
    try:
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        sock.sendall(b'{"op": "register"}\n')
        assert json.loads(sock.makefile().readline())["op"] == "registered"
        assert len(relay.hosts) == 1
        sock.close()
        assert wait_until(lambda: len(relay.hosts) == 0)
    finally:
        stop_relay(relay)
