"""A hostile DHT node vs. training, on a real swarm (a DHT node here, two hosts in subprocesses).

The hostile node joins the swarm's DHT and, under the real keys of the ``ffn`` layer, writes raw
garbage, wrong types and oversized values (straight through kademlia, past our validation),
serves garbage instead of records when asked, and declares real uids at closed loopback ports with
the furthest expirations allowed. Trainers must skip all of it and keep training.
"""

import asyncio
import contextlib
import functools
import socket
import time

import pytest
import torch
import umsgpack
from kademlia.utils import digest

from lightning_moe import auth
from lightning_moe.client.moe import DecentralizedMoE
from lightning_moe.dht import DHT, expert_key, prefix_key
from lightning_moe.dht.records import MAX_TTL, encode_record, expert_entries
from lightning_moe.server.experts import make_expert
from lightning_moe.config import HostConfig, LocalSwarmConfig
from lightning_moe.swarm import LocalSwarm, grid_uids

HID = 16
GRID = (4, 4)
STEPS = 8
LAYER_KEYS = [prefix_key("ffn")] + [prefix_key(f"ffn.{i}") for i in range(GRID[0])] + [expert_key(u) for u in grid_uids("ffn", GRID)]
FAR = MAX_TTL - 1  # the furthest ahead an expiration may be


def start_swarm() -> LocalSwarm:
    host = HostConfig(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                      in_features=HID, grid_size=list(GRID), stats_every=0)
    return LocalSwarm(host, LocalSwarmConfig(num_hosts=2, num_threads=1, update_period=2.0)).start()


def closed_ports(count: int) -> list[int]:
    """Loopback TCP ports that were free a moment ago and that nobody listens on."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def garbage_values() -> list[bytes]:
    far = time.time() + FAR
    return [
        b"\xc1\xc1 not msgpack",
        umsgpack.packb([1, 2, 3]),
        umsgpack.packb("a string, not a record"),
        umsgpack.packb(12345),
        b"\x91" * 3000 + b"\xc0",  # nesting bomb
        umsgpack.packb({f"{i % 4}@127.0.0.1:{20000 + i}": [None, far] for i in range(230)}),  # ~7 KB: over the record cap
        umsgpack.packb({"0@127.0.0.1:1": "not a list", "1": [12345, far], "2@127.0.0.1:2": [None, "soon"],
                        "3@127.0.0.1:3": [None, 1e30], "0@x@y": [None, far], "1@127.0.0.1:4": [None, far, "f" * 63]}),
    ]


class HostileNode:
    """A DHT node that writes whatever it likes and answers lookups of some keys with garbage."""

    def __init__(self, initial_peers: list[str]):
        self.dht = DHT(initial_peers=initial_peers, rpc_timeout=0.5)
        self.served: dict[bytes, bytes] = {}  # key digest -> what it answers instead of its record
        server = self.dht._server
        honest_answer = server.rpc_lookup

        def answer(address, key, want_value, value):
            reply = honest_answer(address, key, want_value, value)
            if want_value and key in self.served:
                reply[1] = self.served[key]
            return reply

        server.rpc_lookup = answer

    def write_raw(self, key: str, blob: bytes) -> None:
        """Send ``blob`` as the value of ``key`` to the nodes nearest to it: no validation, no tag."""
        server = self.dht._server
        coro = server.store_blobs(digest(key), [blob], time.monotonic() + 3.0)
        asyncio.run_coroutine_threadsafe(coro, self.dht._loop).result(10)

    def attack(self, hijacked_uids: list[str], endpoints: list[str]) -> None:
        """Every kind of garbage under every key of the layer, garbage served for some keys, and
        ``hijacked_uids`` declared at ``endpoints`` as far ahead as allowed (``MAX_TTL``)."""
        garbage = garbage_values()
        for key in LAYER_KEYS:
            for blob in garbage:
                self.write_raw(key, blob)
        for i, key in enumerate(LAYER_KEYS[::2]):  # half of the keys: garbage instead of its own record
            self.served[digest(key)] = garbage[-1 - i % len(garbage)]
        far = time.time() + FAR
        records: dict[str, dict] = {}
        for i, uid in enumerate(hijacked_uids):
            for key, record in expert_entries([uid], endpoints[i % len(endpoints)], far).items():
                records.setdefault(key, {}).update(record)
        for key, record in records.items():
            self.write_raw(key, encode_record(record))
            forged = {sk: (value, expiration, "0" * 64) for sk, (value, expiration) in record.items()}
            self.write_raw(key, encode_record(forged))

    def shutdown(self) -> None:
        self.dht.shutdown()


@pytest.fixture
def closing():
    """``closing(thing)`` shuts ``thing`` down when the test ends, last registered first; returns it."""
    with contextlib.ExitStack() as stack:
        yield lambda thing: stack.callback(thing.shutdown) and thing


def train(moe: DecentralizedMoE, steps: int = STEPS) -> list[dict]:
    """A bounded training loop; returns each step's ``moe.stats`` and duration."""
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    history = []
    for _ in range(steps):
        begin = time.monotonic()
        x = torch.randn(16, HID)
        loss = (moe(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        history.append({**moe.stats, "seconds": time.monotonic() - begin})
        assert history[-1]["answered"] > 0, history[-1]
    return history


@pytest.mark.slow
def test_training_goes_on_next_to_a_hostile_node(monkeypatch, closing):
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    torch.manual_seed(0)
    swarm = closing(start_swarm())
    hijacked = grid_uids("ffn", GRID)[:8]  # rows 0 and 1
    closed = [f"127.0.0.1:{port}" for port in closed_ports(4)]
    hostile = closing(HostileNode(swarm.initial_peers))
    hostile.attack(hijacked, closed)
    moe = DecentralizedMoE(HID, GRID, "ffn", k_best=4, initial_peers=swarm.initial_peers, cache_ttl=0.5)
    closing(moe.dht)

    # the hosts' declarations are all still there: nothing was hidden. The swarm's nodes check endpoints
    # (dht.verify_endpoints), so they do not serve the closed ports; only the hostile node itself may
    children = moe.dht.get_active_children([f"ffn.{i}" for i in range(GRID[0])], all_endpoints=True)
    for uid in grid_uids("ffn", GRID):
        _, row, col = uid.split(".")
        endpoints = children[f"ffn.{row}"][int(col)]
        assert set(endpoints) & set(swarm.endpoints), (uid, endpoints)
    for uid, endpoints in zip(grid_uids("ffn", GRID), moe.dht.get_experts(grid_uids("ffn", GRID), all_endpoints=True)):
        assert set(endpoints) & set(swarm.endpoints), (uid, endpoints)
    checked = swarm.dht.stats
    assert checked["endpoint_checks_failed"] > 0, checked
    assert checked["unverified_entries_refused"] + checked["unverified_entries_dropped"] > 0, checked

    history = train(moe)
    assert all(step["timed_out"] == 0 for step in history), history  # a closed port tried is refused at once
    assert history[-1]["failed"] == 0, history  # by then every closed endpoint is banned
    leaf = moe.lookup.get_active_children([f"ffn.{i}" for i in range(GRID[0])])
    assert not {e for row in leaf.values() for e in row.values()} & set(closed), leaf

    stats = moe.dht.stats
    assert stats["invalid_records"] > 0 and stats["invalid_entries"] > 0, stats
    assert stats["invalid_prefix_entries"] > 0, stats
    assert swarm.dht.stats["rejected_stores"] > 0 and swarm.dht.stats["invalid_records"] > 0, swarm.dht.stats


@pytest.mark.slow
def test_training_goes_on_when_every_uid_is_hijacked(monkeypatch, closing):
    """Every uid also declared at a closed port with a far-future expiry: clients fall back to the honest hosts."""
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)
    torch.manual_seed(1)
    swarm = closing(start_swarm())
    closed = [f"127.0.0.1:{port}" for port in closed_ports(4)]
    hostile = closing(HostileNode(swarm.initial_peers))
    hostile.attack(grid_uids("ffn", GRID), closed)
    moe = DecentralizedMoE(HID, GRID, "ffn", k_best=4, initial_peers=swarm.initial_peers, cache_ttl=0.5)
    closing(moe.dht)
    history = train(moe)  # closed ports that the hostile node still serves cost a failed call each, then are excluded
    assert history[-1]["failed"] == 0 and history[-1]["answered"] > 0, history


@pytest.mark.slow
def test_private_swarm_ignores_a_hostile_node_without_the_secret(monkeypatch, closing):
    monkeypatch.setenv(auth.SECRET_ENV, "swarm-secret-for-this-test")  # the spawned hosts inherit it
    torch.manual_seed(2)
    swarm = closing(start_swarm())
    monkeypatch.delenv(auth.SECRET_ENV)
    hostile = closing(HostileNode(swarm.initial_peers))  # no secret
    hostile.attack(grid_uids("ffn", GRID), [f"127.0.0.1:{port}" for port in closed_ports(4)])
    monkeypatch.setenv(auth.SECRET_ENV, "swarm-secret-for-this-test")
    moe = DecentralizedMoE(HID, GRID, "ffn", k_best=4, initial_peers=swarm.initial_peers, cache_ttl=0.5)
    closing(moe.dht)
    history = train(moe)
    assert all(step["failed"] == 0 and step["timed_out"] == 0 for step in history), history
    assert moe.dht.is_private and moe.dht.stats["unauthenticated_entries"] > 0, moe.dht.stats
    assert swarm.dht.stats["unauthenticated_entries"] + swarm.dht.stats["rejected_stores"] > 0, swarm.dht.stats
