"""Attackers with many addresses (issue #24), measured: real DHT nodes, a real host (an ``ExpertHost`` serving a 4x4
grid, declaring through a DHT node of its own), attacker datagrams from raw UDP sockets bound to many 127.x
addresses, and trainers' ``DecentralizedMoE`` layers. Bounded loops; everything started is stopped, even on failure.

* ``measure_many_address_eclipse``: each of ``addresses`` addresses (127.0.0.2 and up) stores one short fake entry
  (its own address, a closed port, expiring in 290 s) in each of the layer's 5 prefix records on every storage node.
  How long after the flood does a new trainer's forward succeed?
* ``measure_fakes_next_to_honest``: from one address, fakes pointing at closed ports for every expert, expiring after
  the honest host's entries (so they are listed first). How many failed calls does a new layer pay, and one made
  before the flood once its cache refreshed?

``verify`` turns the storage nodes' endpoint checks (``DHTConfig.verify_endpoints``) on or off, to compare.
"""
from __future__ import annotations

import contextlib
import socket
import time
from collections import Counter
from typing import Any, Iterator

import torch
from kademlia.utils import digest

from lightning_moe.client.health import HealthRegistry
from lightning_moe.client.moe import DecentralizedMoE
from lightning_moe.client.parallel_call import NotEnoughExpertsError
from lightning_moe.config import DHTConfig, HostConfig
from lightning_moe.dht import DHT, prefix_key
from lightning_moe.dht.records import encode_record
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert

from dht_attacks import FAST, RawPeer, _address

HID = 8
GRID = (4, 4)
UIDS = [f"ffn.{i}.{j}" for i in range(GRID[0]) for j in range(GRID[1])]
PREFIXES = ["ffn"] + [f"ffn.{i}" for i in range(GRID[0])]


def closed_port() -> int:
    """A loopback TCP port that was free a moment ago (nobody listens there: connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def attacker_ips(count: int, first: int = 2) -> list[str]:
    """``count`` loopback addresses from 127.0.0.<first> on (255 per third octet)."""
    return [f"127.0.{(first + i) // 255}.{(first + i) % 255 or 1}" for i in range(count)]


def make_backend(uid: str) -> ExpertBackend:
    expert = make_expert("ffn", HID)
    return ExpertBackend(uid, expert, torch.optim.SGD(expert.parameters(), lr=0.01), args_schema=[((HID,), torch.float32)],
                         max_batch_size=64)


@contextlib.contextmanager
def honest_swarm(verify: bool, update_period: float, storage_nodes: int = 2) -> Iterator[dict]:
    """Storage nodes (endpoint checks ``verify``), and an honest host that declares its 16 experts through a
    client-mode node (as behind a NAT: its records live on the storage nodes only)."""
    stack = contextlib.ExitStack()
    with stack:
        storage: list[DHT] = []
        for _ in range(storage_nodes):
            node = DHT(initial_peers=[storage[0].address] if storage else [], verify_endpoints=verify, **FAST)
            stack.callback(node.shutdown)
            storage.append(node)
        host_dht = DHT(initial_peers=[storage[0].address], client_mode=True, **FAST)
        stack.callback(host_dht.shutdown)
        host = ExpertHost([make_backend(uid) for uid in UIDS], HostConfig(update_period=update_period), dht=host_dht)
        stack.callback(host.shutdown)
        host.start()
        settle(storage)
        yield {"storage": storage, "host": host, "update_period": update_period}


def settle(nodes: list[DHT], timeout: float = 5.0) -> None:
    """Wait until no endpoint check is under way on ``nodes``."""
    for node in nodes:
        verifier = node._server.verifier
        if verifier is not None:
            node._call(verifier.wait_idle(timeout), timeout + 1)


def summed(nodes: list[DHT], *names: str) -> dict[str, int]:
    stats = [node.stats for node in nodes]
    return {name: sum(s[name] for s in stats) for name in names}


def new_layer(storage: list[DHT], cache_ttl: float = 5.0) -> DecentralizedMoE:
    """A trainer's layer with a health registry of its own, through a client-mode node."""
    return DecentralizedMoE(HID, GRID, "ffn", k_best=4, dht=DHTConfig(initial_peers=[storage[-1].address]),
                            forward_timeout=5.0, cache_ttl=cache_ttl, health=HealthRegistry())


def step(layer: DecentralizedMoE) -> str:
    """One forward and backward: "" when it worked, else the error."""
    try:
        x = torch.randn(8, HID)
        layer(x).pow(2).mean().backward()
        return ""
    except NotEnoughExpertsError as e:
        return str(e).splitlines()[0]


# ----------------------------------------------------------------------------- eclipse from many addresses
def sybil_flood(targets: list[tuple], ips: list[str], port: int, expires_in: float = 290.0) -> dict:
    """From each of ``ips``: the cookie handshake with every target, then one short fake entry (``cell@ip:port``)
    in each prefix record of the layer on every target. Returns the datagrams and the seconds it took."""
    peers: list[RawPeer] = []
    try:
        for ip in ips:
            peers.append(RawPeer(ip, rcvbuf=64 * 1024))
        for peer in peers:
            for target in targets:
                peer.call(target, "ping", [None], timeout=1.0)
        started, sent = time.monotonic(), 0
        far = time.time() + expires_in
        for i, (peer, ip) in enumerate(zip(peers, ips)):
            for prefix in PREFIXES:
                record = encode_record({f"{i % GRID[0]}@{ip}:{port}": (None, far)})
                for target in targets:
                    peer.send(target, "store", [None, digest(prefix_key(prefix)), record])
                    sent += 1
        seconds = time.monotonic() - started  # the targets' 4 MiB receive buffers hold all of it
        for peer in peers:
            peer.drain(quiet=0.005, limit=0.5)
        return {"datagrams": sent, "seconds": seconds}
    finally:
        for peer in peers:
            peer.close()


def honest_cells(storage: list[DHT], endpoint: str) -> int:
    """In how many of the 16 cells a new trainer's lookup lists the honest host."""
    with DHT(initial_peers=[storage[-1].address], client_mode=True, **FAST) as trainer:
        found = trainer.get_experts(UIDS, all_endpoints=True)
    return sum(endpoint in endpoints for endpoints in found)


def measure_many_address_eclipse(addresses: int = 240, verify: bool = True, update_period: float = 2.0,
                                 periods: float = 3.0) -> dict:
    """The flood of ``addresses`` addresses, then a new trainer's forward, tried every 0.1 s for ``periods`` declare
    periods (``ok_after``: seconds from the end of the flood to its first success, None if none)."""
    with honest_swarm(verify, update_period) as swarm:
        storage, host = swarm["storage"], swarm["host"]
        flood = sybil_flood([_address(node) for node in storage], attacker_ips(addresses), closed_port())
        flooded = time.monotonic()
        listed = honest_cells(storage, host.endpoint)
        layer = new_layer(storage)
        attempts, errors, ok_after = 0, [], None
        try:
            while time.monotonic() < flooded + periods * update_period:
                attempts += 1
                error = step(layer)
                if not error:
                    ok_after = time.monotonic() - flooded
                    break
                errors.append(error)
                time.sleep(0.1)
            failed_calls = layer.last_stats.failed
        finally:
            layer.close()
        settle(storage)
        return {
            "addresses": addresses, "verify": verify, "update_period": update_period, **flood,
            "honest_cells_after_flood": listed, "ok_after": ok_after, "attempts": attempts,
            "failed_calls_last_forward": failed_calls, "errors": errors[:3],
            **summed(storage, "unverified_entries_refused", "unverified_entries_dropped", "entries_dropped_by_size_cap",
                     "endpoint_checks_ok", "endpoint_checks_failed", "endpoint_checks_rate_limited",
                     "endpoint_checks_dropped"),
        }


# ----------------------------------------------------------------------------- fakes next to the honest host
def fake_endpoints(count: int, port: int) -> list[str]:
    """``count`` endpoints on loopback addresses nobody listens on (127.0.9.x): each refuses connections."""
    return [f"127.0.9.{1 + i % 250}:{port + i // 250}" for i in range(count)]


def measure_fakes_next_to_honest(verify: bool = True, fakes_per_uid: int = 2, steps: int = 6,
                                 update_period: float = 2.0) -> dict:
    """One layer takes a step before the flood; then from one address, ``fakes_per_uid`` fake endpoints per expert
    (expiring after the honest entries, so listed first); then a new layer takes ``steps`` steps and the old one
    ``steps`` more after its cache expired. Counts failed calls per endpoint and failed steps."""
    with honest_swarm(verify, update_period) as swarm:
        storage, host = swarm["storage"], swarm["host"]
        old = new_layer(storage, cache_ttl=0.3)
        layers = [old]
        try:
            before_error = step(old)
            fakes = fake_endpoints(fakes_per_uid * len(UIDS), closed_port())
            attacker = RawPeer("127.0.0.1")
            try:
                targets = [_address(node) for node in storage]
                for target in targets:
                    attacker.call(target, "ping", [None])
                later = time.time() + 3 * update_period  # after the honest host's (2 periods): listed first
                records: dict[str, dict] = {}
                for k, uid in enumerate(UIDS):
                    parent, _, coord = uid.rpartition(".")
                    for f in range(fakes_per_uid):
                        records.setdefault(parent, {})[f"{coord}@{fakes[k * fakes_per_uid + f]}"] = (None, later)
                for parent, record in records.items():
                    for target in targets:
                        attacker.call(target, "store", [None, digest(prefix_key(parent)), encode_record(record)])
            finally:
                attacker.close()
            settle(storage)
            listed = honest_cells(storage, host.endpoint)
            new = new_layer(storage, cache_ttl=0.3)
            layers.append(new)
            figures = {"verify": verify, "fakes": len(fakes), "honest_cells_after_flood": listed,
                       "old_layer_before_flood": before_error or "ok"}
            time.sleep(0.4)  # the old layer's answers are past their ttl: its next steps refresh them
            for name, layer in (("new", new), ("old", old)):
                per_endpoint: Counter = Counter()
                failed_steps = 0
                for _ in range(steps):
                    failed_steps += bool(step(layer))
                    for error in layer.last_stats.errors:
                        per_endpoint.update(e for e in fakes + [host.endpoint] if f" at {e} " in error)
                figures[f"{name}_failed_steps"] = failed_steps
                figures[f"{name}_failed_calls"] = sum(per_endpoint.values())
                figures[f"{name}_most_failures_per_endpoint"] = max(per_endpoint.values(), default=0)
                figures[f"{name}_honest_failures"] = per_endpoint[host.endpoint]
            figures.update(summed(storage, "unverified_entries_refused", "unverified_entries_dropped",
                                  "endpoint_checks_failed"))
            return figures
        finally:
            for layer in layers:
                layer.close()


def report() -> dict[str, Any]:
    """Run both attacks with the nodes' endpoint checks off, then on; print a line for each."""
    results: dict[str, Any] = {}
    for verify in (False, True):
        ecl = measure_many_address_eclipse(verify=verify)
        fakes = measure_fakes_next_to_honest(verify=verify)
        label = "endpoint checks on " if verify else "endpoint checks off"
        took = "failed throughout" if ecl["ok_after"] is None else f"ok in {ecl['ok_after']:.2f} s"
        print(f"DHT 240-address eclipse ({label}): {ecl['datagrams']} datagrams in {ecl['seconds']:.2f} s; honest host "
              f"listed in {ecl['honest_cells_after_flood']}/16 cells; new trainer's forward {took} "
              f"({ecl['attempts']} attempts over {3 * ecl['update_period']:g} s); fakes refused/dropped "
              f"{ecl['unverified_entries_refused']}/{ecl['unverified_entries_dropped']}, checks ok/failed/rate-limited "
              f"{ecl['endpoint_checks_ok']}/{ecl['endpoint_checks_failed']}/{ecl['endpoint_checks_rate_limited']}")
        print(f"DHT fakes next to the honest host ({label}): {fakes['fakes']} fakes from one address; honest listed in "
              f"{fakes['honest_cells_after_flood']}/16 cells; new layer {fakes['new_failed_steps']} failed steps, "
              f"{fakes['new_failed_calls']} failed calls (at most {fakes['new_most_failures_per_endpoint']} per "
              f"endpoint); layer from before the flood {fakes['old_failed_steps']} failed steps, "
              f"{fakes['old_failed_calls']} failed calls (at most {fakes['old_most_failures_per_endpoint']} per endpoint)")
        results[label] = (ecl, fakes)
    ecl = results["endpoint checks on "][0]
    took = "failed" if ecl["ok_after"] is None else f"ok in {ecl['ok_after']:.2f} s"
    print(f"new trainer's forward after 240-address eclipse: {took} (declare period {ecl['update_period']:g} s)")
    return results


if __name__ == "__main__":
    report()
