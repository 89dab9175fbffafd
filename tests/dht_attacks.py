"""Attacks on DHT nodes, measured: real ``lightning_moe.dht.DHT`` nodes on 127.0.0.1 (port 0),
attacked from raw UDP sockets or hostile nodes, in bounded loops (counts and time).

* ``measure_amplification``: a stranger sends requests with forged (never answering) source
  addresses and fresh node ids: how many bytes does the target send there per byte received?
* ``measure_eclipse``: a stranger floods the prefix records of a layer with fake children and
  endpoints at the furthest expiry allowed; does a new trainer still find the honest host?
* ``measure_store_flood``: strangers store thousands of ~5.4 KB records at the furthest expiry
  allowed: how many bytes does the target hold?

Each returns a dict of figures; ``python tests/dht_attacks.py`` prints them. Used by
tests/test_dht_attacks.py (assertions) and by benchmark scripts (figures).
"""
from __future__ import annotations

import contextlib
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import umsgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kademlia.utils import digest  # noqa: E402

from lightning_moe.dht import DHT, prefix_key  # noqa: E402
from lightning_moe.dht.protocol import CHALLENGE, COOKIE_BYTES, ID_BYTES, REPLY, REQUEST  # noqa: E402
from lightning_moe.dht.records import MAX_TTL, encode_record  # noqa: E402

FAST = dict(rpc_timeout=0.5, wait_timeout=5.0)


class RawPeer:
    """A UDP socket that speaks the DHT's wire format by hand (an attacker's tool).

    ``send`` fires requests without waiting; ``call`` does the cookie handshake like an honest
    node (so this peer's own address is verified) and returns the response or None."""

    def __init__(self, ip: str = "127.0.0.1", rcvbuf: int = 4 * 1024 * 1024) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((ip, 0))
        self.sent = self.received = 0
        self.cookies: dict[tuple, bytes] = {}

    @property
    def address(self) -> tuple:
        return self.sock.getsockname()

    def send(self, address: tuple, name: str, args: list, msg_id: Optional[bytes] = None) -> bytes:
        msg_id = msg_id or os.urandom(ID_BYTES)
        packet = REQUEST + msg_id + self.cookies.get(address, bytes(COOKIE_BYTES)) + umsgpack.packb([name, args])
        self.sock.sendto(packet, address)
        self.sent += len(packet)
        return msg_id

    def drain(self, quiet: float = 0.3, limit: float = 10.0) -> list[bytes]:
        """Receive until nothing arrives for ``quiet`` seconds (at most ``limit`` seconds)."""
        out, end = [], time.monotonic() + limit
        self.sock.settimeout(quiet)
        while time.monotonic() < end:
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                break
            self.received += len(data)
            out.append(data)
        return out

    def call(self, address: tuple, name: str, args: list, timeout: float = 2.0) -> Any:
        msg_id = self.send(address, name, args)
        end = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        while time.monotonic() < end:
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                return None
            self.received += len(data)
            if data[1:1 + ID_BYTES] != msg_id:
                continue
            if data[:1] == CHALLENGE:
                self.cookies[address] = data[1 + ID_BYTES:]
                self.send(address, name, args, msg_id)
            elif data[:1] == REPLY:
                return umsgpack.unpackb(data[1 + ID_BYTES:])
        return None

    def close(self) -> None:
        self.sock.close()


def _address(dht: DHT) -> tuple:
    host, port = dht.address.split(":")
    return host, int(port)


@contextlib.contextmanager
def _nodes(*nodes: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for node in reversed(nodes):
            node.shutdown() if hasattr(node, "shutdown") else node.close()


def _swarm(n: int, **kwargs: Any) -> list[DHT]:
    nodes: list[DHT] = []
    try:
        for i in range(n):
            nodes.append(DHT(initial_peers=[nodes[0].address] if nodes else [], **{**FAST, **kwargs}))
    except BaseException:
        for node in nodes:
            node.shutdown()
        raise
    return nodes


# ----------------------------------------------------------------------------- amplification
def measure_amplification(requests: int = 300, keys: int = 200) -> dict:
    """A target that holds ``keys`` records gets ``requests`` datagrams from a socket that never
    answers (as a forged source address would not): pings, ``store``s and value lookups of stored
    keys, each from a fresh node id. ``ratio``: bytes that reached the socket per byte it sent;
    ``target_ratio``: the target's own ``bytes_sent_unverified / bytes_received_unverified``.
    ``verified_ratio``: the same socket after it answers the challenge (its address is then
    proven: replies of any size may follow) and keeps sending pings from fresh ids; replication
    to it is rate-limited, so its ratio stays bounded too."""
    target, writer = _swarm(2)
    victim, prover = RawPeer(), RawPeer()
    with _nodes(target, writer, victim, prover):
        expiration = time.time() + MAX_TTL / 2
        writer.store_many([(f"key{i}", "s", "v" * 500, expiration) for i in range(keys)])
        address = _address(target)
        dkeys = [digest(f"key{i}") for i in range(keys)]
        before = target.stats
        for i in range(requests):
            kind = i % 3
            if kind == 0:
                victim.send(address, "ping", [os.urandom(20)])
            elif kind == 1:
                victim.send(address, "lookup", [os.urandom(20), dkeys[i % keys], True, None])
            else:
                victim.send(address, "store", [os.urandom(20), dkeys[i % keys], encode_record({"x": (1, expiration)})])
            if i % 50 == 49:
                victim.drain(quiet=0.05, limit=1.0)
        victim.drain()
        after = target.stats
        sent_unverified = after["bytes_sent_unverified"] - before["bytes_sent_unverified"]
        received_unverified = after["bytes_received_unverified"] - before["bytes_received_unverified"]

        prover.call(address, "ping", [os.urandom(20)])  # answers the challenge: a verified address
        prover.sent = prover.received = 0
        for i in range(requests // 3):
            prover.send(address, "ping", [os.urandom(20)])
            if i % 50 == 49:
                prover.drain(quiet=0.05, limit=1.0)
        prover.drain(quiet=1.0)
        return {
            "requests": requests,
            "keys_on_target": keys,
            "bytes_received_by_target": victim.sent,
            "bytes_sent_to_victim": victim.received,
            "ratio": victim.received / max(1, victim.sent),
            "target_ratio": sent_unverified / max(1, received_unverified),
            "verified_requests": requests // 3,
            "verified_ratio": prover.received / max(1, prover.sent),
        }


# ----------------------------------------------------------------------------- eclipse
def measure_eclipse(grid: tuple = (4, 4), fakes_per_cell: int = 60, update_period: float = 2.0) -> dict:
    """An honest host declares a ``grid`` of experts (expiring in 2 x ``update_period``); then a
    stranger's node floods every prefix record with ``fakes_per_cell`` fake children per grid cell
    and fake endpoints for the real children, at the furthest expiry allowed (``MAX_TTL``). A new
    client-mode trainer then looks for the experts, within one ``update_period`` of the flood."""
    storage = _swarm(4)
    honest = DHT(initial_peers=[storage[0].address], **FAST)
    attacker = DHT(initial_peers=[storage[1].address], **FAST)
    with _nodes(*storage, honest, attacker):
        endpoint = "127.0.0.1:7000"
        rows, cols = grid
        uids = [f"ffn.{i}.{j}" for i in range(rows) for j in range(cols)]
        assert honest.declare_experts(uids, endpoint, time.time() + 2 * update_period)
        flood_started = time.monotonic()
        far = time.time() + MAX_TTL - 1
        entries = []
        for prefix, width in [("ffn", rows)] + [(f"ffn.{i}", cols) for i in range(rows)]:
            for cell in range(width):
                for f in range(fakes_per_cell):
                    fake_child = width + cell * fakes_per_cell + f
                    entries.append((prefix_key(prefix), f"{fake_child}@10.{f % 250}.{cell}.1:{1000 + f}", None, far))
                    entries.append((prefix_key(prefix), f"{cell}@10.{f % 250}.{cell}.2:{1000 + f}", None, far))
        for start in range(0, len(entries), 100):
            attacker.store_many(entries[start:start + 100])
        with DHT(initial_peers=[storage[2].address], client_mode=True, **FAST) as trainer:
            found = trainer.get_experts(uids, all_endpoints=True)
            children = trainer.get_active_children([f"ffn.{i}" for i in range(rows)], all_endpoints=True)
            elapsed = time.monotonic() - flood_started
        hidden_get = [uid for uid, endpoints in zip(uids, found) if endpoint not in endpoints]
        hidden_children = [f"ffn.{i}.{j}" for i in range(rows) for j in range(cols)
                           if endpoint not in children[f"ffn.{i}"].get(j, [])]
        return {
            "experts": len(uids),
            "fake_entries": len(entries),
            "found_by_get_experts": len(uids) - len(hidden_get),
            "found_by_get_active_children": len(uids) - len(hidden_children),
            "seconds_after_flood": elapsed,
            "within_one_period": elapsed < update_period,
            "attacker_entries_evicted": sum(n.stats["entries_dropped_by_size_cap"] for n in storage),
        }


# ----------------------------------------------------------------------------- store flood
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_store_flood(keys: int = 3000, sources: int = 3, value_bytes: int = 5300,
                        max_bytes: int = 8 * 1024 * 1024, max_bytes_per_source: int = 2 * 1024 * 1024) -> dict:
    """``sources`` stranger addresses store ``keys`` records of ``value_bytes`` each (about 5.4 KB
    encoded) at the furthest expiry allowed onto one node with ``max_bytes`` of storage; an honest
    host's declaration written before must survive. Reports what the target holds."""
    target = DHT(max_bytes=max_bytes, max_bytes_per_source=max_bytes_per_source, **FAST)
    attackers = [RawPeer() for _ in range(sources)]
    with _nodes(target, *attackers):
        honest = DHT(initial_peers=[target.address], **FAST)
        with honest:
            assert honest.declare_experts(["ffn.0.0", "ffn.1.1"], "127.0.0.1:7000", time.time() + MAX_TTL - 1)
        address = _address(target)
        for peer in attackers:
            peer.call(address, "ping", [None])  # the cookie handshake: these are real addresses
        rss_before = _rss_bytes()
        far = time.time() + MAX_TTL - 1
        value = "x" * value_bytes
        blob_size = len(encode_record({"s": (value, far)}))
        started = time.monotonic()
        for i in range(keys):
            peer = attackers[i % sources]
            peer.send(address, "store", [None, digest(f"flood{i}"), encode_record({"s": (value, far)})])
            if i % 100 == 99:  # wait for the target to catch up (its receive buffer is 4 MiB)
                attackers[0].drain(quiet=0.02, limit=2.0)
                for p in attackers[1:]:
                    p.drain(quiet=0.0005, limit=2.0)
        for peer in attackers:
            peer.drain(quiet=0.5)
        seconds = time.monotonic() - started
        stored = target._call(_storage_summary(target), 10)
        rss_after = _rss_bytes()
        with DHT(initial_peers=[target.address], client_mode=True, **FAST) as trainer:
            honest_found = trainer.get_experts(["ffn.0.0", "ffn.1.1"])
        return {
            "records_sent": keys,
            "record_bytes": blob_size,
            "bytes_sent": keys * blob_size,
            "seconds": seconds,
            "keys_held": stored["keys"],
            "bytes_held": stored["bytes_used"],
            "max_bytes": max_bytes,
            "rss_growth": rss_after - rss_before,
            "honest_found": sum(e == "127.0.0.1:7000" for e in honest_found),
        }


async def _storage_summary(dht: DHT) -> dict:
    storage = dht._server.storage
    return {"keys": len(storage), "bytes_used": storage.bytes_used}


def report() -> float:
    """Run the three DHT attacks, print a line for each; returns the amplification factor."""
    amp = measure_amplification()
    print(f"DHT amplification: {amp['ratio']:.3f} bytes sent per byte received from an unverified address "
          f"({amp['requests']} requests, {amp['bytes_received_by_target']} B in, {amp['bytes_sent_to_victim']} B out; "
          f"target counters {amp['target_ratio']:.3f}; verified address with fresh ids {amp['verified_ratio']:.3f})")
    ecl = measure_eclipse()
    print(f"DHT eclipse: {ecl['found_by_get_experts']}/{ecl['experts']} honest experts found by get_experts, "
          f"{ecl['found_by_get_active_children']}/{ecl['experts']} by get_active_children, "
          f"{ecl['seconds_after_flood']:.2f} s after a flood of {ecl['fake_entries']} fake entries")
    flood = measure_store_flood()
    print(f"DHT store flood: {flood['records_sent']} records x {flood['record_bytes']} B "
          f"({flood['bytes_sent'] / 2**20:.1f} MiB) -> {flood['keys_held']} keys, {flood['bytes_held'] / 2**20:.2f} MiB "
          f"accounted (cap {flood['max_bytes'] / 2**20:.0f} MiB), RSS +{flood['rss_growth'] / 2**20:.1f} MiB, "
          f"honest experts found {flood['honest_found']}/2, {flood['seconds']:.1f} s")
    return amp["ratio"]


if __name__ == "__main__":
    report()
