"""Hole punching on loopback: a trainer and a relayed host agree through the relay on a direct TCP connection
(simultaneous open), the calls then go over it, and a host's limits bound what strangers make it spend.

Across MASQUERADE routers in network namespaces, see tests/test_nat.py.
"""

from __future__ import annotations

import json
import secrets

import pytest
import torch

from lightning_moe.client.direct import DirectPaths
from lightning_moe.client.remote_expert import RemoteExpert
from lightning_moe.net import http_client
from lightning_moe.net import loop as net_loop
from lightning_moe.net.punch import PunchLimits, PunchService, observe
from lightning_moe.net.relay_client import split_endpoint

from test_relay import HID, relayed, start_relay, stop_relay, volunteer, wait_until  # noqa: F401 - the fixture

SECRET = b"punch secret"


def punching(volunteer, relay, secret: bytes | None = None, limits: PunchLimits | None = None):  # noqa: F811
    client, _ = relayed(volunteer, [relay], secret=secret)
    service = PunchService(lambda: client.relay, split_endpoint(volunteer.endpoint), secret=secret, limits=limits)
    volunteer.host.server.punch = service
    return client, service


def test_a_relay_tells_a_socket_the_address_it_sees():
    relay = start_relay()
    try:
        sock, address = net_loop.run(observe(("127.0.0.1", relay.port), 0, 5), 10)
        try:
            assert address == f"127.0.0.1:{sock.getsockname()[1]}" and relay.stats["observed"] == 1
        finally:
            sock.close()
    finally:
        stop_relay(relay)


def test_calls_to_a_relayed_host_go_direct_after_a_punch_and_back_through_the_relay_when_it_closes(volunteer):  # noqa: F811
    relay = start_relay()
    client, service = punching(volunteer, relay)
    try:
        endpoint = client.endpoint
        x = torch.randn(4, HID)
        expected = RemoteExpert("ffn.0.0", endpoint).forward(x)
        made = net_loop.run(DirectPaths(pairs=3).upgrade(endpoint, None), 30)
        assert made == 3 and http_client.direct_connections(endpoint) == 3
        assert wait_until(lambda: service.direct_connections == 3, 5)
        relayed_before, (direct_before, other_before) = relay.stats["bytes_relayed"], http_client.request_counts(endpoint)
        for _ in range(10):
            assert torch.allclose(RemoteExpert("ffn.0.0", endpoint).forward(x), expected)
        direct, other = http_client.request_counts(endpoint)
        assert direct - direct_before >= 10 and other == other_before
        assert relay.stats["bytes_relayed"] == relayed_before
        service.stop()  # the host ends its direct connections: the next calls go through the relay again
        for _ in range(5):
            assert torch.allclose(RemoteExpert("ffn.0.0", endpoint).forward(x), expected)
        assert http_client.direct_connections(endpoint) == 0 and relay.stats["bytes_relayed"] > relayed_before + 5 * 4 * HID * 4
    finally:
        service.stop()
        client.stop()
        stop_relay(relay)


def test_a_trainer_punches_after_enough_calls_and_a_private_host_proves_the_secret(volunteer):  # noqa: F811

    relay = start_relay()
    client, service = punching(volunteer, relay, secret=SECRET)
    try:
        paths = DirectPaths(after_calls=3)
        paths.note_calls([client.endpoint] * 2, None)
        assert paths.stats["attempts"] == 0
        paths.note_calls([client.endpoint], SECRET)  # the third call starts one attempt in the background
        assert paths.running == 1 or paths.outcomes
        net_loop.run(_until(lambda: client.endpoint in paths.outcomes), 30)
        assert paths.outcomes[client.endpoint] == 4 and paths.stats["succeeded"] == 1
        paths.note_calls([client.endpoint] * 10, SECRET)  # direct connections open: no new attempt
        assert paths.stats["attempts"] == 1
        wrong = DirectPaths()
        assert net_loop.run(wrong.upgrade(client.endpoint, b"another secret"), 30) == 0  # no proof from the host
    finally:
        service.stop()
        client.stop()
        stop_relay(relay)


async def _until(condition, timeout: float = 20.0) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition() and loop.time() < deadline:
        await asyncio.sleep(0.05)


def post_punch(endpoint: str, body: dict | bytes) -> http_client.Answer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http_client.request(endpoint, "POST", "/punch", data, {"Content-Type": "application/json"}, 10)


def test_a_host_refuses_malformed_and_excess_punch_requests_with_reasons(volunteer):  # noqa: F811
    relay = start_relay()
    client, service = punching(volunteer, relay, limits=PunchLimits(max_concurrent=1, max_per_address=2,
                                                                    attempt_seconds=1.0))
    try:
        endpoint = client.endpoint
        offer = json.loads(http_client.request(endpoint, "GET", "/punch", timeout=10).body)
        assert offer == {"relay": client.relay, "max_pairs": 4}
        assert post_punch(endpoint, b"not json").status == 400
        assert post_punch(endpoint, b"x" * 5000).status == 413
        assert post_punch(endpoint, {"id": "x", "addresses": ["127.0.0.1:9"]}).status == 400
        ident = secrets.token_hex(16)
        many = {"id": ident, "addresses": [f"127.0.0.1:{9000 + i}" for i in range(5)]}
        assert b"1 to 4" in post_punch(endpoint, many).body
        assert post_punch(endpoint, {"id": ident, "addresses": ["224.0.0.1:9"]}).status == 400
        assert post_punch(endpoint, {"id": ident, "addresses": ["127.0.0.1:9", "127.0.0.2:9"]}).status == 400
        # a port where nobody answers: the attempt takes its 1 s; a second one meanwhile is refused
        assert post_punch(endpoint, {"id": ident, "addresses": ["127.0.0.1:9"]}).status == 200
        busy = post_punch(endpoint, {"id": ident, "addresses": ["127.0.0.1:9"]})
        assert busy.status == 429 and b"in progress" in busy.body
        net_loop.run(_until(lambda: service.stats["pairs"] >= 1), 10)
        assert post_punch(endpoint, {"id": ident, "addresses": ["127.0.0.1:9"]}).status == 200
        net_loop.run(_until(lambda: service.stats["pairs"] >= 2), 10)
        late = post_punch(endpoint, {"id": ident, "addresses": ["127.0.0.1:9"]})
        assert late.status == 429 and b"towards 127.0.0.1" in late.body
        assert service.stats["direct"] == 0
        volunteer.host.server.punch = None  # host.hole_punch=false, or not relayed
        assert http_client.request(endpoint, "GET", "/punch", timeout=10).status == 404
    finally:
        service.stop()
        client.stop()
        stop_relay(relay)


def test_hole_punch_keys_compose_from_yaml_and_a_wrong_key_fails_by_name():
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    from lightning_moe.config import HostConfig, to_dataclass

    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        defaults = compose("config", overrides=["moe=decentralized"])
        off = compose("config", overrides=["moe=decentralized", "host.hole_punch=false", "moe.hole_punch=false"])
        with pytest.raises(ConfigCompositionException, match="hole_punching"):
            compose("config", overrides=["host.hole_punching=false"])
        with pytest.raises(ConfigCompositionException, match="hole_punchh"):
            compose("config", overrides=["moe=decentralized", "moe.hole_punchh=false"])
    assert defaults.host.hole_punch is True and defaults.moe.hole_punch is True
    assert to_dataclass(off.host, HostConfig).hole_punch is False and off.moe.hole_punch is False
