"""ExpertHost over real HTTP on 127.0.0.1: results, batching, every malformed request, state, shutdown."""

from __future__ import annotations

import copy
import http.client
import json
import os
import socket
import threading

import pytest
import requests
import torch
from torch import nn

import lightning_moe
from lightning_moe import wire
from lightning_moe.client.remote_expert import call_expert, new_keep_id
from lightning_moe.config import HostConfig, HostLimits
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert

HID = 32
WAIT = 30.0


def make_backend(uid: str = "ffn.0", seed: int = 0, optimizer: str = "sgd", **kwargs) -> ExpertBackend:
    torch.manual_seed(seed)
    expert = make_expert("ffn", HID)
    opt = torch.optim.SGD(expert.parameters(), lr=0.1) if optimizer == "sgd" else torch.optim.Adam(expert.parameters(), lr=1e-3)
    kwargs.setdefault("max_batch_size", 16)
    return ExpertBackend(uid, expert, opt, args_schema=[((HID,), torch.float32)], **kwargs)


@pytest.fixture
def host():
    with ExpertHost([make_backend("ffn.0"), make_backend("ffn.1", seed=1)], HostConfig(limits=HostLimits(request_timeout=WAIT))) as h:
        yield h


def url(host: ExpertHost, path: str) -> str:
    return f"http://{host.endpoint}{path}"


def post(session, host: ExpertHost, path: str, tensors: list[torch.Tensor], compression: str = "none") -> list[torch.Tensor]:
    response = session.post(url(host, path), data=wire.serialize(tensors), headers={"X-Compression": compression}, timeout=WAIT)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/octet-stream"
    return wire.deserialize(bytearray(response.content))


def assert_json_error(response: requests.Response, status: int, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "uid"} and isinstance(body["error"], str)
    assert fragment.lower() in body["error"].lower(), body["error"]
    return body


def still_serves(host: ExpertHost) -> None:
    x = torch.randn(3, HID)
    with requests.Session() as session:
        (out,) = post(session, host, "/forward/ffn.0", [x])
    assert out.shape == (3, HID) and torch.isfinite(out).all()


def raw_request(port: int, data: bytes, shutdown_write: bool = False) -> tuple[int, dict, bytes]:
    """Send raw bytes on a fresh connection; return the status, headers and JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(data)
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


def test_info(host):
    info = requests.get(url(host, "/info"), timeout=WAIT).json()
    assert info["version"] == lightning_moe.__version__
    assert info["compression"] == ["none", "float16", "uint8", "int8", "int4"]
    assert info["max_body_bytes"] == host.config.limits.max_body_bytes == 64 * 2**20
    schema = [{"shape": [HID], "dtype": "float32"}]
    assert info["experts"] == {
        uid: {"args_schema": schema, "outputs_schema": schema, "max_batch_size": 16, "max_rows_per_request": 64} for uid in ("ffn.0", "ffn.1")
    }
    assert info["host_id"] == host.host_id and len(info["host_id"]) == 32 and not info["private"]


@pytest.mark.parametrize("rows", [1, 16, 40])  # 40 rows: split into batches of 16, 16, 8
def test_forward_equals_the_local_expert(rows):
    backend = make_backend()
    local = copy.deepcopy(backend.expert)
    x = torch.randn(rows, HID)
    with ExpertHost([backend]) as host, requests.Session() as session:
        (out,) = post(session, host, "/forward/ffn.0", [x])
        for compression in ("float16", "uint8"):
            (approx,) = post(session, host, "/forward/ffn.0", [x], compression)
            assert torch.allclose(approx, out, atol=0.05)
    with torch.no_grad():
        expected = local(x)
    assert torch.allclose(out, expected, atol=1e-5)


def test_host_compression_applies_to_every_answer():
    backend = make_backend()
    x = torch.randn(16, HID)
    with torch.no_grad():
        expected = copy.deepcopy(backend.expert)(x)
    with ExpertHost([backend], HostConfig(compression="float16")) as host, requests.Session() as session:
        response = session.post(url(host, "/forward/ffn.0"), data=wire.serialize([x]), timeout=WAIT)  # asks for none
        assert response.status_code == 200, response.text
        (out,) = wire.deserialize(bytearray(response.content))
    assert len(response.content) < len(wire.serialize([expected])) * 0.6
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-2) and not torch.equal(out, expected)
    with pytest.raises(ValueError, match="host.compression"):
        ExpertHost([make_backend()], HostConfig(compression="zip"))


def test_zero_rows(host):
    with requests.Session() as session:
        (out,) = post(session, host, "/forward/ffn.0", [torch.randn(0, HID)])
        (grad,) = post(session, host, "/backward/ffn.0", [torch.randn(0, HID), torch.randn(0, HID)])
    assert out.shape == (0, HID) and grad.shape == (0, HID)


def test_backward_equals_local_autograd_and_steps_the_optimizer():
    backend = make_backend()
    local = copy.deepcopy(backend.expert)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    x, grad_out = torch.randn(12, HID), torch.randn(12, HID)
    with ExpertHost([backend]) as host, requests.Session() as session:
        (grad_in,) = post(session, host, "/backward/ffn.0", [x, grad_out])
        stats = host.stats()["ffn.0"]
    x_local = x.clone().requires_grad_(True)
    local(x_local).backward(grad_out)
    local_opt.step()
    assert torch.allclose(grad_in, x_local.grad, atol=1e-5)
    for (name, remote_p), local_p in zip(backend.expert.named_parameters(), local.parameters()):
        assert torch.allclose(remote_p, local_p, atol=1e-6), name
    assert backend.update_count == 1 and stats["updates"] == 1
    assert stats["backward"]["requests"] == 1 and stats["backward"]["samples"] == 12 and stats["backward"]["batches"] == 1


def test_update_every_accumulates_gradients():
    backend = make_backend(update_every=20)
    local = copy.deepcopy(backend.expert)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1)
    before = copy.deepcopy(backend.expert.state_dict())
    batches = [(torch.randn(8, HID), torch.randn(8, HID)) for _ in range(3)]
    with ExpertHost([backend]) as host, requests.Session() as session:
        for i, (x, g) in enumerate(batches):
            post(session, host, "/backward/ffn.0", [x, g])
            local(x).backward(g)
            if i < 2:  # 8 and 16 samples: below 20, no step yet
                assert backend.update_count == 0
                assert all(torch.equal(before[k], v) for k, v in backend.expert.state_dict().items())
    local_opt.step()  # one step with the gradients of all 24 samples
    assert backend.update_count == 1 and backend.samples_since_update == 0
    for remote_p, local_p in zip(backend.expert.parameters(), local.parameters()):
        assert torch.allclose(remote_p, local_p, atol=1e-5)
        assert remote_p.grad is None  # zeroed after the step


def test_concurrent_clients_get_batched_within_the_limit():
    backend = make_backend(max_batch_size=16)
    local = copy.deepcopy(backend.expert)
    sizes: list[int] = []
    original_forward = backend.forward_pool.process_fn

    def recording_forward(*inputs):
        sizes.append(inputs[0].shape[0])
        return original_forward(*inputs)

    backend.forward_pool.process_fn = recording_forward
    inputs = [torch.randn(rows, HID) for rows in (5, 23, 40, 1, 17, 33, 9, 16)]
    outputs: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with requests.Session() as session:
                for _ in range(3):
                    (outputs[i],) = post(session, host, "/forward/ffn.0", [inputs[i]])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    with ExpertHost([backend]) as host:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(inputs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        stats = host.stats()["ffn.0"]["forward"]
    assert not errors and not any(t.is_alive() for t in threads)
    with torch.no_grad():
        for i, x in enumerate(inputs):
            assert torch.allclose(outputs[i], local(x), atol=1e-5)
    assert max(sizes) <= 16 and sum(sizes) == 3 * sum(x.shape[0] for x in inputs)
    assert stats["max_batch_size_seen"] <= 16 and stats["requests"] == 3 * len(inputs)


def test_malformed_requests_get_4xx_and_the_host_keeps_serving(host):
    x = torch.randn(4, HID)
    good = wire.serialize([x])
    endpoint = url(host, "/forward/ffn.0")
    session = requests.Session()
    cases = {
        "random bytes": (os.urandom(1000), 400, "magic"),
        "lying header": (good + b"\0" * 8, 400, "header describes"),
        "wrong dtype": (wire.serialize([x.double()]), 400, "dtype"),
        "wrong shape": (wire.serialize([torch.randn(4, HID + 1)]), 400, "shape"),
        "wrong rank": (wire.serialize([torch.randn(4, 2, HID)]), 400, "shape"),
        "too many tensors": (wire.serialize([x, x]), 400, "2"),
        "no tensors": (wire.serialize([]), 400, "0"),
        "empty body": (b"", 400, "prefix"),
    }
    for name, (body, status, fragment) in cases.items():
        response = session.post(endpoint, data=body, timeout=WAIT)
        assert assert_json_error(response, status, fragment)["uid"] == "ffn.0", name
        (out,) = post(session, host, "/forward/ffn.0", [x])  # same keep-alive connection still works
    bwd = url(host, "/backward/ffn.0")
    lying = bytearray(wire.serialize([x, x]))
    lying[8:] = bytes(lying[8:]).replace(b'"nbytes":512', b'"nbytes":511', 1)
    for name, body, fragment in [
        ("backward with one tensor", wire.serialize([x]), "got 1 tensors"),
        ("grad of the wrong batch", wire.serialize([x, torch.randn(3, HID)]), "batch"),
        ("NaN grads", wire.serialize([x, torch.full((4, HID), float("nan"))]), "non-finite"),
        ("Inf grads", wire.serialize([x, torch.full((4, HID), float("inf"))]), "non-finite"),
        ("nbytes off by one", bytes(lying), "bytes"),
    ]:
        assert_json_error(session.post(bwd, data=body, timeout=WAIT), 400, fragment)
    response = session.post(endpoint, data=good, headers={"X-Compression": "zip"}, timeout=WAIT)
    assert_json_error(response, 400, "X-Compression")
    assert_json_error(session.post(url(host, "/forward/nope"), data=good, timeout=WAIT), 404, "nope")
    assert_json_error(session.get(url(host, "/nothing"), timeout=WAIT), 404, "no such path")
    assert_json_error(session.post(url(host, "/forward/"), data=good, timeout=WAIT), 404)
    assert_json_error(session.get(endpoint, timeout=WAIT), 405, "POST")
    assert_json_error(session.put(endpoint, data=good, timeout=WAIT), 405)
    assert_json_error(session.post(url(host, "/info"), data=b"{}", timeout=WAIT), 405, "GET")
    session.close()
    assert host.backends["ffn.0"].update_count == 0  # no bad request reached the optimizer
    stats = host.stats()["ffn.0"]
    assert stats["errors"] >= 13 and stats["forward"]["failed_batches"] == 0
    still_serves(host)


def test_broken_http_framing(host):
    port = host.port
    body = wire.serialize([torch.randn(4, HID)])
    head = f"POST /forward/ffn.0 HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    status, headers, content = raw_request(port, head + body[: len(body) // 2], shutdown_write=True)
    assert status == 400 and b"truncated" in content and headers["Content-Type"] == "application/json"
    huge = b"POST /forward/ffn.0 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
    status, headers, content = raw_request(port, huge)  # no body sent: the host must not wait for it
    assert status == 413 and headers.get("Connection") == "close" and json.loads(content)["uid"] == "ffn.0"
    status, _, content = raw_request(port, b"POST /forward/ffn.0 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 413 and b"Content-Length" in content
    status, _, content = raw_request(port, b"POST /forward/ffn.0 HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert status in (400, 413) and "error" in json.loads(content)  # aiohttp's parser refuses it: 400
    status, _, content = raw_request(port, b"GARBAGE\r\n\r\n")
    assert status == 400 and "error" in json.loads(content)
    still_serves(host)


def test_body_over_the_limit_is_refused_unread():
    with ExpertHost([make_backend()], HostConfig(limits=HostLimits(max_body_mb=4096 / 2**20))) as host:
        x = torch.randn(64, HID)  # 8 KiB
        response = requests.post(url(host, "/forward/ffn.0"), data=wire.serialize([x]), timeout=WAIT)
        assert_json_error(response, 413, "limit")
        assert requests.get(url(host, "/info"), timeout=WAIT).json()["max_body_bytes"] == 4096
        with requests.Session() as session:
            post(session, host, "/forward/ffn.0", [x[:4]])


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(HID, HID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x > 100).any():
            raise RuntimeError("kaboom: input too large")
        return self.linear(x)


def test_an_expert_that_raises_gives_500_and_the_host_keeps_serving():
    expert = Exploding()
    backend = ExpertBackend("boom", expert, torch.optim.SGD(expert.parameters(), lr=0.1), [((HID,), torch.float32)])
    with ExpertHost([backend, make_backend("ffn.0")]) as host, requests.Session() as session:
        bad = torch.full((2, HID), 1000.0)
        for path, tensors in (("/forward/boom", [bad]), ("/backward/boom", [bad, torch.ones(2, HID)])):
            response = session.post(url(host, path), data=wire.serialize(tensors), timeout=WAIT)
            assert assert_json_error(response, 500, "kaboom")["uid"] == "boom"
        (out,) = post(session, host, "/forward/boom", [torch.ones(2, HID)])
        assert out.shape == (2, HID)
        still_serves(host)


def test_request_timeout_gives_504():
    release = threading.Event()

    class Stuck(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if (x > 100).any():
                release.wait(WAIT)
            return x * 2

    backend = ExpertBackend("stuck", Stuck(), None, [((HID,), torch.float32)])
    with ExpertHost([backend], HostConfig(limits=HostLimits(request_timeout=0.2))) as host, requests.Session() as session:
        try:
            response = session.post(url(host, "/forward/stuck"), data=wire.serialize([torch.full((1, HID), 1e3)]), timeout=WAIT)
            assert_json_error(response, 504, "no answer")
        finally:
            release.set()
        (out,) = post(session, host, "/forward/stuck", [torch.ones(1, HID)])
        assert torch.equal(out, torch.full((1, HID), 2.0))


def test_before_batch_runs_before_every_batch_but_not_the_start_up_check():
    calls: list[str] = []
    fail = threading.Event()

    def before_batch() -> None:
        calls.append(threading.current_thread().name)
        if fail.is_set():
            raise RuntimeError("injected by before_batch")

    backend = make_backend(before_batch=before_batch)
    assert calls == []  # the start-up check is exempt
    x, grad = torch.randn(4, HID), torch.randn(4, HID)
    with ExpertHost([backend], HostConfig(limits=HostLimits(request_timeout=WAIT))) as host, \
            requests.Session() as session:
        post(session, host, "/forward/ffn.0", [x])
        post(session, host, "/backward/ffn.0", [x, grad])  # recomputes its forward: one batch
        key = new_keep_id()
        call_expert("ffn.0", host.endpoint, "forward", [x], keep=key)
        call_expert("ffn.0", host.endpoint, "backward", [grad], keep=key)  # through the kept graph
        assert host.load_report()["kept_forwards"]["graph_backwards"] == 1
        assert len(calls) == 4 and set(calls) == {"lightning_moe-runtime"}
        fail.set()
        response = session.post(url(host, "/forward/ffn.0"), data=wire.serialize([x]), timeout=WAIT)
        assert_json_error(response, 500, "injected by before_batch")
        assert backend.forward_batches == 2 and backend.backward_batches == 2  # the failed batch computed nothing


def test_state_round_trip(tmp_path):
    backend = make_backend(optimizer="adam")
    with ExpertHost([backend]) as host, requests.Session() as session:
        for _ in range(2):
            post(session, host, "/backward/ffn.0", [torch.randn(8, HID), torch.randn(8, HID)])
        path = tmp_path / "host.pt"
        host.save(path)
        saved = host.state_dict()
        post(session, host, "/backward/ffn.0", [torch.randn(8, HID), torch.randn(8, HID)])  # move away
        assert not torch.equal(backend.expert.ffn.weight, saved["ffn.0"]["expert"]["ffn.weight"])
        host.load(path)
    restored = backend.state_dict()
    fresh = make_backend(seed=5, optimizer="adam")
    with ExpertHost([fresh]) as other:
        other.load(path)
        loaded = fresh.state_dict()
    for state in (restored, loaded):
        assert state["counters"]["update_count"] == 2
        for key, value in saved["ffn.0"]["expert"].items():
            assert torch.equal(state["expert"][key], value), key
        for pid, param_state in saved["ffn.0"]["optimizer"]["state"].items():
            for key, value in param_state.items():
                assert torch.equal(state["optimizer"]["state"][pid][key], value), (pid, key)
        assert state["optimizer"]["param_groups"] == saved["ffn.0"]["optimizer"]["param_groups"]
    with pytest.raises(KeyError):
        ExpertHost([make_backend("other")]).load_state_dict(saved)


def test_keep_alive_reuses_one_connection(host):
    with requests.Session() as session:
        x = torch.randn(2, HID)
        for _ in range(3):
            post(session, host, "/forward/ffn.0", [x])
            post(session, host, "/backward/ffn.1", [x, x])
            assert session.get(url(host, "/info"), timeout=WAIT).status_code == 200
        assert_json_error(session.post(url(host, "/forward/ffn.0"), data=b"junk", timeout=WAIT), 400)
        post(session, host, "/forward/ffn.0", [x])
    assert host.http_stats()["connections_accepted"] == 1


def test_connections_over_the_cap_are_closed_and_the_host_keeps_serving():
    backend = make_backend()
    with ExpertHost([backend], HostConfig(limits=HostLimits(max_connections=2))) as host:
        idle = [socket.create_connection(("127.0.0.1", host.port), timeout=WAIT) for _ in range(2)]
        try:
            for _ in range(50):  # bounded: the two handler threads register within a few ms
                if host.http_stats()["open_connections"] == 2:
                    break
                threading.Event().wait(0.05)
            extra = socket.create_connection(("127.0.0.1", host.port), timeout=WAIT)
            with extra:
                assert extra.recv(1) == b""  # closed by the host without an answer
            assert host.http_stats()["connections_refused"] == 1
        finally:
            for sock in idle:
                sock.close()
        for _ in range(100):
            if host.http_stats()["open_connections"] == 0:
                break
            threading.Event().wait(0.05)
        still_serves(host)


def test_shutdown_joins_every_thread_and_frees_the_port():
    before = set(threading.enumerate())
    host = ExpertHost([make_backend()]).start()
    port = host.port
    session = requests.Session()  # left open on purpose: the host must close its side itself
    post(session, host, "/forward/ffn.0", [torch.randn(2, HID)])
    assert set(threading.enumerate()) - before  # runtime, server loop, one connection
    host.shutdown()
    host.shutdown()  # idempotent
    assert set(threading.enumerate()) == before
    with pytest.raises(requests.ConnectionError):
        session.post(url(host, "/forward/ffn.0"), data=wire.serialize([torch.randn(2, HID)]), timeout=WAIT)
    session.close()
    with ExpertHost([make_backend()], HostConfig(port=port)) as again:  # the same port binds again
        assert again.port == port
        still_serves(again)
    assert set(threading.enumerate()) == before


class FakeDHT:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str, float]] = []
        self.enough = threading.Event()

    def declare_experts(self, uids: list[str], endpoint: str, expiration_time: float) -> None:
        self.calls.append((uids, endpoint, expiration_time))
        if len(self.calls) >= 3:
            self.enough.set()


def test_dht_declarations_repeat_until_shutdown():
    dht = FakeDHT()
    before = set(threading.enumerate())
    host = ExpertHost([make_backend("ffn.0"), make_backend("ffn.1")], HostConfig(update_period=0.05, announce_host="10.1.2.3"),
                      dht=dht)
    with host:
        assert dht.calls, "start() declares once before it returns"
        assert host.endpoint == f"10.1.2.3:{host.port}"
        assert dht.enough.wait(WAIT)
    assert set(threading.enumerate()) == before
    count = len(dht.calls)
    uids, endpoint, expiration = dht.calls[0]
    assert uids == ["ffn.0", "ffn.1"] and endpoint == host.endpoint and expiration > 0
    assert len(dht.calls) == count  # nothing declared after shutdown
