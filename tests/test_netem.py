"""The pure-asyncio network emulator (tests/netem.py): delay, bandwidth, ordering, loss, clean close.

Timing bounds are generous on purpose (lower bounds are physical, upper bounds leave room for
a busy machine).
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time

import pytest
import torch

from lightning_moe.client.remote_expert import RemoteExpert
from lightning_moe.server import ExpertHost, make_expert
from lightning_moe.volunteer import make_backends
from netem import DelayProxy, Link, UDPRelay

HID = 8


# ---- helpers ------------------------------------------------------------------------------
class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


class _Sink(socketserver.BaseRequestHandler):
    """Reads everything, then answers with the byte count (8 bytes)."""

    def handle(self) -> None:
        total = 0
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            total += len(data)
        self.request.sendall(struct.pack("!Q", total))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def tcp_server():
    servers = []

    def start(handler):
        server = _Server(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def udp_echo():
    """A datagram echo server on 127.0.0.1 (replies to the source address, as a DHT node does)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            sock.sendto(data, addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield sock.getsockname()
    stop.set()
    thread.join(2)
    sock.close()


def _ping(address, payload: bytes = b"ping") -> float:
    with socket.create_connection(address, timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            got += chunk
        elapsed = time.monotonic() - start
    assert got == payload
    return elapsed


def _netem_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("netem")]


# ---- TCP ----------------------------------------------------------------------------------
def test_link_validates_its_settings():
    with pytest.raises(ValueError):
        Link(delay=-1)
    with pytest.raises(ValueError):
        Link(bandwidth_bps=0)
    with pytest.raises(ValueError):
        Link(loss=1.5)
    with pytest.raises(ValueError, match="loopback"):
        DelayProxy(("10.0.0.1", 80))


def test_a_ping_through_the_proxy_costs_twice_the_one_way_delay(tcp_server):
    echo = tcp_server(_EchoHandler)
    direct = min(_ping(echo) for _ in range(3))
    assert direct < 0.05
    with DelayProxy(echo, Link(delay=0.05)) as proxy:
        rtts = [_ping(proxy.address) for _ in range(3)]
        assert proxy.bytes_up == proxy.bytes_down == 12 and proxy.connections == 3
    for rtt in rtts:
        assert 0.1 <= rtt < 0.1 + 0.5
    with DelayProxy(echo, Link(delay=0.05), reverse=Link(delay=0.01)) as proxy:  # asymmetric
        assert 0.06 <= _ping(proxy.address) < 0.06 + 0.5


def test_bandwidth_limit_paces_a_bulk_transfer(tcp_server):
    sink = tcp_server(_Sink)
    size = 2 * 1000 * 1000  # 16 Mbit at 8 Mbit/s: about 2 s
    with DelayProxy(sink, Link(delay=0.01, bandwidth_bps=8e6)) as proxy:
        with socket.create_connection(proxy.address, timeout=10) as sock:
            start = time.monotonic()
            sock.sendall(b"x" * size)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while len(reply) < 8:
                chunk = sock.recv(8)
                assert chunk
                reply += chunk
            elapsed = time.monotonic() - start
        assert struct.unpack("!Q", reply)[0] == size
        assert proxy.bytes_up == size
    assert 1.3 <= elapsed <= 4.0, elapsed


def _upload(address, size: int) -> float:
    with socket.create_connection(address, timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(b"x" * size)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8:
            chunk = sock.recv(8)
            assert chunk
            reply += chunk
        assert struct.unpack("!Q", reply)[0] == size
        return time.monotonic() - start


@pytest.mark.parametrize("per_connection", [False, True])
def test_connections_share_the_bandwidth_unless_per_connection(tcp_server, per_connection):
    sink = tcp_server(_Sink)
    with DelayProxy(sink, Link(bandwidth_bps=8e6), per_connection_bandwidth=per_connection) as proxy:
        times = []
        threads = [threading.Thread(target=lambda: times.append(_upload(proxy.address, 1_000_000))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert len(times) == 2
    expected = 1.0 if per_connection else 2.0  # 8 Mbit each, on their own or a shared 8 Mbit/s
    assert 0.5 * expected <= max(times) <= 1.5 * expected + 0.3, times


def test_jitter_keeps_the_bytes_of_a_connection_in_order(tcp_server):
    echo = tcp_server(_EchoHandler)
    chunks = [struct.pack("!I", i) + bytes([i % 251]) * 1000 for i in range(200)]
    expected = b"".join(chunks)
    with DelayProxy(echo, Link(delay=0.02, jitter=0.02), chunk_bytes=512, seed=1) as proxy:
        with socket.create_connection(proxy.address, timeout=10) as sock:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            got = bytearray()
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                got += data
    assert bytes(got) == expected


def test_backpressure_bounds_the_queue_of_a_slow_link(tcp_server):
    sink = tcp_server(_Sink)
    with DelayProxy(sink, Link(bandwidth_bps=1e6), max_buffer_bytes=64 * 1024) as proxy:
        with socket.create_connection(proxy.address, timeout=10) as sock:
            sock.setblocking(False)
            sent, deadline = 0, time.monotonic() + 1.0
            while time.monotonic() < deadline:  # write as fast as the proxy lets us, for 1 s
                try:
                    sent += sock.send(b"y" * 65536)
                except BlockingIOError:
                    time.sleep(0.01)
    # 1 Mbit/s for 1 s is 125 kB; the proxy's queue and the kernel's socket buffers add a few MB
    # at most, far from what an unbounded proxy would take (hundreds of MB in a second).
    assert sent < 16 * 1024 * 1024, sent


def test_a_refused_target_closes_the_client_connection():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()  # bound but not listening: connections are refused
        with DelayProxy(dead) as proxy:
            with socket.create_connection(proxy.address, timeout=5) as sock:
                sock.settimeout(5)
                assert sock.recv(10) == b""


def test_remote_expert_through_the_proxy_pays_the_round_trip():
    """A real ExpertHost behind the proxy; the proxy's endpoint is what the DHT hands out (the
    host declares nothing itself here: ExpertHost announces its own port)."""
    from lightning_moe.dht import DHT

    torch.manual_seed(0)
    backends = make_backends(["ffn.0"], lambda: make_expert("ffn", HID), None, HID)
    delay = 0.05
    dht = DHT(rpc_timeout=1.0, wait_timeout=5.0)
    try:
        with ExpertHost(backends) as host, DelayProxy(host.endpoint, Link(delay=delay)) as proxy:
            dht.declare_experts(["ffn.0"], proxy.endpoint, expiration_time=time.time() + 60)
            (endpoint,) = dht.get_experts(["ffn.0"])
            assert endpoint == proxy.endpoint
            x = torch.randn(3, HID)
            direct = RemoteExpert("ffn.0", host.endpoint)(x)
            start = time.monotonic()
            through = RemoteExpert("ffn.0", endpoint)(x)
            elapsed = time.monotonic() - start
            torch.testing.assert_close(through, direct)
            assert proxy.bytes_up > 0 and proxy.bytes_down > 0
    finally:
        dht.shutdown()
    assert 2 * delay <= elapsed < 2 * delay + 2.0, elapsed


def test_close_joins_the_threads_and_frees_the_ports(tcp_server, udp_echo):
    echo = tcp_server(_EchoHandler)
    before = len(_netem_threads())
    proxy = DelayProxy(echo, Link(delay=0.01)).start()
    relay = UDPRelay(udp_echo, Link(delay=0.01)).start()
    assert len(_netem_threads()) == before + 2
    # an open connection and a live session while closing
    sock = socket.create_connection(proxy.address, timeout=5)
    _ping(proxy.address)
    usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    usock.sendto(b"hi", relay.address)
    time.sleep(0.1)
    tcp_port, udp_port = proxy.port, relay.port
    proxy.close()
    relay.close()
    proxy.close()  # idempotent
    assert len(_netem_threads()) == before
    sock.settimeout(5)
    assert sock.recv(10) == b""  # the proxy closed the client's connection
    sock.close()
    usock.close()
    with socket.socket() as s:  # SO_REUSEADDR, as any server: the closed connections sit in TIME_WAIT
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", tcp_port))
        s.listen()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", udp_port))


# ---- UDP ----------------------------------------------------------------------------------
def _udp_round_trips(address, count: int, timeout: float) -> tuple[int, list[float]]:
    """Send ``count`` numbered datagrams; return how many came back and their RTTs."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sent_at = {}
        for i in range(count):
            sent_at[i] = time.monotonic()
            sock.sendto(struct.pack("!I", i), address)
        sock.settimeout(0.2)
        rtts, deadline = {}, time.monotonic() + timeout
        while time.monotonic() < deadline and len(rtts) < count:
            try:
                data, addr = sock.recvfrom(65536)
            except socket.timeout:
                continue
            assert addr == tuple(address)  # replies come from the address we sent to
            (i,) = struct.unpack("!I", data)
            rtts[i] = time.monotonic() - sent_at[i]
    return len(rtts), list(rtts.values())


def test_udp_relay_adds_the_round_trip_and_keeps_one_session_per_client(udp_echo):
    with UDPRelay(udp_echo, Link(delay=0.05, jitter=0.005), seed=0) as relay:
        answered, rtts = _udp_round_trips(relay.address, 5, timeout=3)
        assert answered == 5
        assert all(0.1 - 0.011 <= rtt < 0.1 + 0.5 for rtt in rtts), rtts
        answered, _ = _udp_round_trips(relay.address, 3, timeout=3)  # a second client socket
        assert answered == 3
        assert relay.sessions == 2 and relay.dropped == 0
        assert relay.datagrams_up == relay.datagrams_down == 8 and relay.bytes_up == 32


def test_udp_relay_loss_drops_about_half(udp_echo):
    with UDPRelay(udp_echo, Link(loss=0.5), reverse=Link(), seed=1) as relay:  # lossy one way only
        answered, _ = _udp_round_trips(relay.address, 200, timeout=1)
        assert 60 <= answered <= 140, answered
        assert relay.dropped == 200 - answered == 200 - relay.datagrams_up
    with UDPRelay(udp_echo, Link(loss=0.5), seed=2) as relay:  # both ways: about a quarter
        answered, _ = _udp_round_trips(relay.address, 200, timeout=1)
        assert 20 <= answered <= 80, answered


def test_udp_relay_bandwidth_paces_datagrams(udp_echo):
    # 50 datagrams of 1000 B at 200 kbit/s: 2 s each way; the two ways overlap
    with UDPRelay(udp_echo, Link(bandwidth_bps=200e3)) as relay, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        start = time.monotonic()
        for i in range(50):
            sock.sendto(struct.pack("!I", i) + b"z" * 996, relay.address)
        sock.settimeout(5)
        for _ in range(50):
            sock.recvfrom(65536)
        elapsed = time.monotonic() - start
        assert relay.dropped == 0
    assert 1.3 <= elapsed <= 4.0, elapsed


def test_a_dht_node_behind_the_relay_answers_with_the_delay():
    """A real lightning_moe DHT node behind the relay: a peer bootstraps from the relay's
    address and reads a record that node stored, in one round trip (>= 2 * delay)."""
    from lightning_moe.dht import DHT

    delay = 0.05
    a = DHT(rpc_timeout=2.0, wait_timeout=10.0)
    try:
        host, port = a.address.rsplit(":", 1)
        with UDPRelay((host, int(port)), Link(delay=delay)) as relay:
            b = DHT(initial_peers=[relay.endpoint], rpc_timeout=2.0, wait_timeout=10.0)
            try:
                assert a.store("key", "sub", "value", time.time() + 60)
                start = time.monotonic()
                found = b.get("key")
                elapsed = time.monotonic() - start
                assert found is not None and found["sub"][0] == "value", found
                assert 2 * delay <= elapsed < 2 * delay + 5.0, elapsed
                assert relay.sessions == 1 and relay.datagrams_up > 0 and relay.datagrams_down > 0
                # b knows a at the relay; a knows b at the relay's upstream socket for b, an
                # address that leads back to b only through this relay (see UDPRelay)
                assert b.routing_table() == [relay.endpoint]
                assert len(a.routing_table()) == 1 and a.routing_table() != [b.address]
            finally:
                b.shutdown()
    finally:
        a.shutdown()


def test_udp_network_keeps_a_dht_whole_and_every_datagram_inside():
    """16 DHT nodes on a UDPNetwork: routing tables fill with public (emulated) addresses only, a
    get pays one round trip, and the nodes received nothing that did not come through the network.
    (With one UDPRelay per node, nodes learn each other at relay-internal addresses that only lead
    back through one relay: the DHT degenerates into a star around the bootstrap node.)"""
    from lightning_moe.dht import DHT
    from netem import UDPNetwork

    delay = 0.01  # per access link and direction: 20 ms one way, 40 ms round trip
    nodes = []
    with UDPNetwork(Link(delay=delay)) as net:
        try:
            nodes.append(DHT(rpc_timeout=2.0, wait_timeout=10.0))
            boot = "%s:%d" % net.add(("127.0.0.1", nodes[0].port))
            for _ in range(15):
                nodes.append(DHT(initial_peers=[boot], rpc_timeout=2.0, wait_timeout=10.0))
            publics = {f"{h}:{p}" for h, p in net.endpoints}
            assert len(publics) == 16 and net.auto_added == 15
            for node in nodes:
                table = node.routing_table()
                assert set(table) <= publics, table
                assert len(table) >= 8, table  # not a star around the bootstrap node
            assert nodes[3].store("key", "sub", "value", time.time() + 60)
            start = time.monotonic()
            found = nodes[9].get("key")
            elapsed = time.monotonic() - start
            assert found["sub"][0] == "value"
            assert 4 * delay <= elapsed < 4 * delay + 5.0, elapsed
            assert sum(n.stats["bytes_received"] for n in nodes) == net.bytes and net.dropped == 0
        finally:
            for node in nodes:
                node.shutdown()
