"""Hostile input: an ExpertHost fuzzed with generated malformed requests keeps serving correct ones."""

import json
import random
import socket
import struct
import threading

import pytest
import requests
import torch

from lightning_moe import wire
from lightning_moe.config import HostConfig, HostLimits
from lightning_moe.server import ExpertBackend, ExpertHost
from lightning_moe.server.experts import make_expert

HID = 16
UID = "ffn.0.0"


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def raw_request(address: tuple[str, int], data: bytes, timeout: float = 5.0) -> int | None:
    """Send raw bytes, return the HTTP status of the answer (None if the host closed without one)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        answer = b""
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # a body shorter than declared ends here
        except OSError:
            pass  # the host already answered (e.g. 431 for a long header) and closed; its answer may still be readable
        try:
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except (TimeoutError, OSError):
            return None
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def malformed_requests(rng: random.Random, count: int):
    """(kind, how to send it) pairs: ("http", method, path, headers, body) or ("raw", bytes)."""
    good = wire.serialize([torch.randn(4, HID)])
    grad_body = wire.serialize([torch.randn(4, HID), torch.randn(4, HID)])
    octet = {"Content-Type": "application/octet-stream"}
    header_len = struct.unpack_from("<I", good, 4)[0]
    makers = [
        lambda: ("http", "POST", f"/forward/{UID}", octet, rng.randbytes(rng.randrange(0, 3000))),
        lambda: ("http", "POST", f"/forward/{UID}", octet, good[: rng.randrange(0, len(good))]),
        lambda: ("http", "POST", f"/backward/{UID}", octet, grad_body[: rng.randrange(0, len(grad_body))]),
        lambda: ("http", "POST", f"/forward/{UID}", octet, _mutate(rng, good, 8, 8 + header_len)),
        lambda: ("http", "POST", f"/forward/{UID}", octet, wire.serialize([torch.randn(4, HID).to(rng.choice([torch.float64, torch.int64, torch.float16, torch.bool]))])),
        lambda: ("http", "POST", f"/forward/{UID}", octet, wire.serialize([torch.randn(*rng.choice([(4, HID + 1), (4, 2, HID), (HID,), (4, 0)]))])),
        lambda: ("http", "POST", f"/forward/{UID}", octet, wire.serialize([torch.randn(4, HID), torch.randn(4, HID)])),
        lambda: ("http", "POST", f"/forward/{UID}", octet, wire.serialize([torch.full((4, HID), rng.choice([float("nan"), float("inf"), -float("inf")]))])),
        lambda: ("http", "POST", f"/backward/{UID}", octet, wire.serialize([torch.randn(4, HID), torch.full((4, HID), rng.choice([float("nan"), float("inf")]))])),
        lambda: ("http", "POST", f"/backward/{UID}", octet, wire.serialize([torch.randn(4, HID), torch.randn(3, HID)])),
        lambda: ("http", "POST", f"/forward/{rng.choice(['nope', 'ffn.9.9', '..%2f..', 'x' * 300])}", octet, good),
        lambda: ("http", rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS"]), f"/forward/{UID}", octet, good),
        lambda: ("http", "GET", f"/{rng.choice(['forward', 'backward'])}/{UID}", {}, b""),
        lambda: ("http", "POST", "/info", octet, good),
        lambda: ("http", "POST", f"/forward/{UID}", {**octet, "X-Compression": rng.choice(["gzip", "", "uint9", "none\x00"])}, good),
        lambda: ("raw", f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\nContent-Length: {rng.choice([10**12, 2**63, 10**30])}\r\n\r\n".encode() + good[:100]),
        lambda: ("raw", f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(good) + rng.randrange(1, 500)}\r\n\r\n".encode() + good),
        lambda: ("raw", f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\nContent-Length: {rng.choice(['-5', 'abc', '1e3', ' '])}\r\n\r\n".encode() + good),
        lambda: ("raw", f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode()),
        lambda: ("raw", f"POST /forward/{UID} HTTP/1.1\r\nHost: x\r\n\r\n".encode() + good),
        lambda: ("raw", rng.randbytes(rng.randrange(1, 400)) + b"\r\n\r\n"),
        lambda: ("raw", b"GET /info HTTP/1.1\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n"),
    ]
    for _ in range(count):
        yield makers[rng.randrange(len(makers))]()


def _mutate(rng: random.Random, data: bytes, start: int, end: int) -> bytes:
    """Change a few bytes of the wire header (dtype, shape, sizes: lies in the header)."""
    out = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        out[rng.randrange(start, end)] = rng.randrange(32, 127)
    return bytes(out)


@pytest.fixture
def host():
    torch.manual_seed(0)
    expert = make_expert("ffn", HID)
    backend = ExpertBackend(UID, expert, torch.optim.SGD(expert.parameters(), lr=0.1), [((HID,), torch.float32)], max_batch_size=64)
    with ExpertHost([backend], HostConfig(limits=HostLimits(body_timeout=1.0, max_body_mb=1.0))) as host:
        yield host


@pytest.mark.slow
def test_thousand_malformed_requests_get_errors_and_correct_ones_still_succeed(host):
    rng = random.Random(1234)
    address = ("127.0.0.1", host.port)
    base = f"http://{host.endpoint}"
    session = requests.Session()
    x = torch.randn(5, HID)
    expected = host.backends[UID].expert(x).detach()
    threads_before = threading.active_count()
    rss_before = rss_bytes()
    statuses: dict[int | None, int] = {}
    correct = 0
    for i, request in enumerate(malformed_requests(rng, 1100)):
        if request[0] == "http":
            _, method, path, headers, body = request
            response = session.request(method, base + path, headers=headers, data=body, timeout=10)
            status = response.status_code
            if method != "HEAD" and status >= 400:
                assert "error" in json.loads(response.content), (path, status, response.content[:200])
        else:
            status = raw_request(address, request[1])
        statuses[status] = statuses.get(status, 0) + 1
        assert status is None or 400 <= status < 600, (request[:3] if request[0] == "http" else request[1][:80], status)
        if i % 10 == 0:  # a correct request between the malformed ones
            answer = requests.post(f"{base}/forward/{UID}", data=wire.serialize([x]), timeout=10)
            assert answer.status_code == 200
            torch.testing.assert_close(wire.deserialize(answer.content)[0], expected)
            correct += 1
    assert sum(statuses.values()) == 1100 and correct == 110
    assert statuses.get(None, 0) < 100, statuses  # nearly every malformed request got an answer, not just a closed socket
    assert all(s is None or s < 500 for s in statuses), f"malformed input must be the client's error: {statuses}"
    assert rss_bytes() - rss_before < 200 * 1024 * 1024, "the host's memory grew by more than 200 MiB"
    assert threading.active_count() <= threads_before + 8, "handler threads piled up"
    weights = [p.detach().clone() for p in host.backends[UID].expert.parameters()]
    assert all(torch.isfinite(w).all() for w in weights), "a NaN or Inf reached the expert's weights"
    print(f"status counts over 1100 malformed requests: {sorted(statuses.items(), key=str)}")


def test_nonfinite_gradients_are_rejected_and_do_not_touch_the_weights(host):
    before = [p.detach().clone() for p in host.backends[UID].expert.parameters()]
    body = wire.serialize([torch.randn(4, HID), torch.full((4, HID), float("nan"))])
    answer = requests.post(f"http://{host.endpoint}/backward/{UID}", data=body, timeout=10)
    assert answer.status_code in (400, 422)
    assert "finite" in answer.json()["error"].lower() or "nan" in answer.json()["error"].lower()
    for old, new in zip(before, host.backends[UID].expert.parameters()):
        assert torch.equal(old, new)
