"""Private swarms: hosts with a shared secret refuse unsigned, forged, stale and replayed requests."""

from __future__ import annotations

import functools
import time

import pytest
import requests
import torch

from lightning_moe import auth, wire
from lightning_moe.client.moe import DecentralizedMoE
from lightning_moe.client.parallel_call import NotEnoughExpertsError
from lightning_moe.client.remote_expert import RemoteExpert, RemoteExpertError
from lightning_moe.net.http_client import signed
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert
from lightning_moe.config import DHTConfig, HostConfig, LocalSwarmConfig
from lightning_moe.swarm import LocalSwarm

HID = 16
WAIT = 30.0
SECRET = b"correct horse battery staple"


@pytest.fixture(autouse=True)
def _no_secret_from_the_environment(monkeypatch):
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)


def make_host(secret: bytes | None = None, port: int = 0) -> ExpertHost:
    torch.manual_seed(0)
    expert = make_expert("ffn", HID)
    backend = ExpertBackend("ffn.0", expert, torch.optim.SGD(expert.parameters(), lr=0.1), args_schema=[((HID,), torch.float32)])
    return ExpertHost([backend], HostConfig(port=port), secret=secret)


def signed_post(session: requests.Session, host: ExpertHost, body: bytes, headers: dict[str, str]) -> requests.Response:
    return session.post(f"http://{host.endpoint}/forward/ffn.0", data=body, headers=headers, timeout=WAIT)


def assert_refused(response: requests.Response, fragment: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert fragment in response.json()["error"], response.json()


def test_private_host_refuses_every_request_not_signed_with_its_secret():
    body = wire.serialize([torch.randn(4, HID)])
    with make_host(secret=SECRET) as host, requests.Session() as session:
        assert_refused(signed_post(session, host, body, {}), "private swarm")
        assert_refused(session.get(f"http://{host.endpoint}/info", timeout=WAIT), "private swarm")
        hid = host.host_id
        assert_refused(signed_post(session, host, body, signed(b"another secret", "POST", "/forward/ffn.0", body, host_id=hid)),
                       "bad X-Signature")
        # the signature covers the body, the path and the compression: changing any of them breaks it
        good = signed(SECRET, "POST", "/forward/ffn.0", body, host_id=hid)
        other_body = wire.serialize([torch.randn(4, HID)])
        assert_refused(signed_post(session, host, other_body, good), "bad X-Signature")
        assert_refused(signed_post(session, host, body, {**signed(SECRET, "POST", "/forward/ffn.1", body, host_id=hid)}),
                       "bad X-Signature")
        assert_refused(signed_post(session, host, body, {**good, "X-Compression": "float16"}), "bad X-Signature")
        stale = signed(SECRET, "POST", "/forward/ffn.0", body, host_id=hid)
        stale["X-Timestamp"] = f"{time.time() - 3600:.3f}"
        assert_refused(signed_post(session, host, body, stale), "away from the host's clock")
        assert_refused(signed_post(session, host, body, {**good, "X-Timestamp": "nan"}), "away from the host's clock")
        # the correctly signed request is answered, once: the same request sent again is a replay
        answered = signed_post(session, host, body, good)
        assert answered.status_code == 200, answered.text
        assert_refused(signed_post(session, host, body, good), "replayed")
        # the host kept serving through all of it, and counted the refusals
        x = torch.randn(3, HID)
        with torch.no_grad():
            expected = host.backends["ffn.0"].expert(x)
        torch.testing.assert_close(RemoteExpert("ffn.0", host.endpoint, secret=SECRET)(x), expected)
        assert RemoteExpert("ffn.0", host.endpoint, secret=SECRET).info(timeout=WAIT)["args_schema"]
        assert host.http_stats()["errors_by_status"][401] == 9


def test_signature_binds_the_host_instance_and_restarts_invalidate_it():
    """A request signed for one host is refused by another host of the same swarm, and by the same host after a restart."""
    body = wire.serialize([torch.randn(4, HID)])
    with make_host(secret=SECRET) as a, make_host(secret=SECRET) as b, requests.Session() as session:
        assert a.host_id != b.host_id
        info = session.get(f"http://{a.endpoint}/info", headers=signed(SECRET, "GET", "/info", b""), timeout=WAIT).json()
        assert info["host_id"] == a.host_id and info["private"]
        for_a = signed(SECRET, "POST", "/forward/ffn.0", body, host_id=a.host_id)
        assert_refused(signed_post(session, b, body, for_a), "another host")  # captured for a, replayed to b
        unbound = signed(SECRET, "POST", "/forward/ffn.0", body)  # no host id at all
        assert_refused(signed_post(session, a, body, unbound), "another host")
        forged = {**for_a, "X-Host-Id": b.host_id}  # claims b's id, but the HMAC covers the id
        assert_refused(signed_post(session, b, body, forged), "bad X-Signature")
        assert signed_post(session, a, body, for_a).status_code == 200
        # /stats is signed like /info
        assert session.get(f"http://{b.endpoint}/stats", timeout=WAIT).status_code == 401
        stats = session.get(f"http://{b.endpoint}/stats", headers=signed(SECRET, "GET", "/stats", b""), timeout=WAIT)
        assert stats.status_code == 200 and stats.json()["host_id"] == b.host_id
    port = a.port
    with make_host(secret=SECRET, port=port) as again, requests.Session() as session:
        fresh = signed(SECRET, "POST", "/forward/ffn.0", body, host_id=a.host_id)  # signed for the old instance
        assert_refused(signed_post(session, again, body, fresh), "another host")
        # RemoteExpert learnt the old host id: it refetches /info once and succeeds
        expert = RemoteExpert("ffn.0", again.endpoint, secret=SECRET)
        from lightning_moe.client import remote_expert
        remote_expert._host_ids[again.endpoint] = a.host_id
        assert expert(torch.randn(2, HID)).shape == (2, HID)
        assert remote_expert._host_ids[again.endpoint] == again.host_id


def test_private_host_refuses_from_the_headers_before_reading_a_body():
    """Unsigned or malformed: 401 with the connection closed, while the client has sent only headers."""
    import http.client
    import socket

    with make_host(secret=SECRET) as host:
        for extra in ("", "X-Timestamp: 1\r\nX-Signature: " + "0" * 64 + "\r\n",
                      f"X-Timestamp: {time.time():.3f}\r\nX-Signature: xyz\r\n",
                      f"X-Timestamp: {time.time():.3f}\r\nX-Signature: {'0' * 64}\r\nX-Host-Id: nope\r\n"):
            with socket.create_connection(("127.0.0.1", host.port), timeout=WAIT) as sock:
                sock.sendall(f"POST /forward/ffn.0 HTTP/1.1\r\nHost: x\r\nContent-Length: 60000000\r\n{extra}\r\n".encode())
                response = http.client.HTTPResponse(sock)
                response.begin()  # answered although no body byte was sent
                assert response.status == 401 and response.getheader("Connection") == "close"
                assert "error" in response.read().decode()


def test_client_without_the_secret_gets_a_clear_error_naming_the_expert():
    with make_host(secret=SECRET) as host:
        with pytest.raises(RemoteExpertError, match=r"ffn\.0.*401.*private swarm|ffn\.0.*private swarm"):
            RemoteExpert("ffn.0", host.endpoint)(torch.randn(2, HID))


def test_secret_comes_from_the_environment_variable(monkeypatch):
    monkeypatch.setenv(auth.SECRET_ENV, SECRET.decode())
    with make_host() as host:
        assert host.secret == SECRET
        monkeypatch.delenv(auth.SECRET_ENV)
        with pytest.raises(RemoteExpertError, match="401"):
            RemoteExpert("ffn.0", host.endpoint)(torch.randn(2, HID))
        y = RemoteExpert("ffn.0", host.endpoint, secret=SECRET)(torch.randn(2, HID))
        assert y.shape == (2, HID)


@pytest.mark.slow
def test_decentralized_moe_trains_in_a_private_swarm_and_strangers_are_refused():
    host = HostConfig(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                      in_features=HID, grid_size=[2, 2], stats_every=0)
    swarm = LocalSwarm(host, LocalSwarmConfig(num_hosts=1, num_threads=1, update_period=2.0), DHTConfig(secret=SECRET)).start()
    member = DecentralizedMoE(HID, (2, 2), "ffn", k_best=2, initial_peers=swarm.initial_peers, secret=SECRET, cache_ttl=1.0)
    stranger = DecentralizedMoE(HID, (2, 2), "ffn", k_best=2, initial_peers=swarm.initial_peers, forward_timeout=10.0)
    try:
        x = torch.randn(8, HID, requires_grad=True)
        member(x).pow(2).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert member.stats["answered"] == member.stats["asked"] > 0
        with pytest.raises(NotEnoughExpertsError):
            stranger(torch.randn(8, HID))
    finally:
        for moe in (member, stranger):
            if moe.dispatcher._dht is not None:
                moe.close()
        swarm.shutdown()
    updates = sum(expert["updates"] for stats in swarm.final_stats.values() for expert in stats.values())
    assert updates > 0  # the hosts' experts learned from the member's backward


def test_replay_guard_forgets_a_signature_once_its_timestamp_is_out_of_the_window():
    guard = auth.ReplayGuard(window=300.0, max_entries=3)
    now = time.time()
    assert guard.first_use("a", now) and not guard.first_use("a", now)
    assert guard.first_use("old", now - 301.0)  # already outside the window: remembered until the next call
    assert guard.first_use("b", now) and len(guard) == 2  # "old" is gone, "a" and "b" stay
    assert guard.first_use("c", now + 1) and guard.first_use("d", now + 2)  # full: "a", closest to expiry, is dropped
    assert len(guard) == 3 and not guard.first_use("d", now + 2) and guard.first_use("a", now)
