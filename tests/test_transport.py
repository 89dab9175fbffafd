"""The client's HTTP transport on 127.0.0.1: keep-alive reuse, a closed idle connection, refusal, and
calls given up at once (a hung host does not hold the caller's threads)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from lightning_moe.net import http_client as transport
from lightning_moe.client.parallel_call import ExpertCall, call_in_parallel
from lightning_moe.config import HostConfig, HostLimits
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert

HID = 8
WAIT = 30.0


@pytest.fixture
def host():
    expert = make_expert("linear", HID)
    backend = ExpertBackend("linear.0", expert, None, args_schema=[((HID,), torch.float32)])
    with ExpertHost([backend], HostConfig(limits=HostLimits(idle_timeout=0.3))) as h:
        yield h


class HungHost:
    """Accepts connections, reads whatever comes, never answers; records when each connection ends."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(WAIT)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(WAIT)
            try:
                while conn.recv(65536):  # bounded by WAIT: recv times out
                    pass
            except OSError:
                return
            self.closed.set()  # the client shut its socket down

    def close(self) -> None:
        self.sock.close()
        self.thread.join(WAIT)


def test_connections_are_reused_and_one_the_host_closed_is_replaced(host):
    assert transport.request(host.endpoint, "GET", "/info", timeout=WAIT).status == 200
    assert transport.request(host.endpoint, "GET", "/info", timeout=WAIT).status == 200
    assert host.http_stats()["connections_accepted"] == 1
    time.sleep(0.6)  # longer than the host's idle_timeout: it closes the idle connection
    assert transport.request(host.endpoint, "GET", "/info", timeout=WAIT).status == 200
    assert host.http_stats()["connections_accepted"] == 2


def test_warm_up_opens_connections_ahead(host):
    assert transport.warm_up(host.endpoint, 3) == 3
    for _ in range(3):
        assert transport.request(host.endpoint, "GET", "/info", timeout=WAIT).status == 200
    assert host.http_stats()["connections_accepted"] == 3


def test_a_refused_connection_says_so():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(transport.TransportError) as info:
        transport.request(f"127.0.0.1:{port}", "GET", "/info", timeout=WAIT)
    assert info.value.refused and "refused" in str(info.value)


def test_a_cancelled_call_returns_at_once_and_closes_its_socket():
    hung = HungHost()
    handle = transport.CallHandle()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            transport.request(hung.endpoint, "POST", "/forward/x", b"0" * 100, timeout=WAIT, handle=handle)
        except transport.TransportError as e:
            errors.append(e)

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(0.2)
    handle.cancel()
    worker.join(WAIT / 2)  # far less than the request's timeout
    assert not worker.is_alive() and errors and errors[0].cancelled
    assert hung.closed.wait(WAIT)
    hung.close()


def test_calls_given_up_by_call_in_parallel_free_their_workers():
    hung = HungHost()
    calls = [ExpertCall("ffn.0.0", hung.endpoint, torch.tensor([0]), torch.tensor([0]))]
    results = call_in_parallel(calls, "forward", [[torch.randn(1, HID)]], timeout=0.3)
    assert isinstance(results[0], TimeoutError)
    assert hung.closed.wait(WAIT)  # the worker's socket was shut down, not left waiting for WAIT seconds
    hung.close()
