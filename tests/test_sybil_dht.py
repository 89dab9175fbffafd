"""Attackers with many addresses (issue #24, the DHT half): records must point at real experts.

Real DHT nodes, a real host and real attacker datagrams from many 127.x addresses (tests/dht_sybil.py), then
the pieces alone: the storage's verdicts and evictions, the endpoint checks and their bounds."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import torch
from kademlia.utils import digest

from lightning_moe import auth
from lightning_moe.dht.records import prefix_key
from lightning_moe.dht.storage import SubkeyStorage
from lightning_moe.dht.verify import FAILED, UNKNOWN, VERIFIED, EndpointVerifier, Listing, failed, fetch_listing
from lightning_moe.net.addresses import netgroup
from lightning_moe.server import ExpertHost

import dht_sybil
from dht_sybil import closed_port, measure_fakes_next_to_honest, measure_many_address_eclipse


@pytest.fixture(autouse=True)
def _no_secret_from_the_environment(monkeypatch):
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)


# ----------------------------------------------------------------------------- the attacks of the issue
def test_a_new_trainer_trains_at_once_after_an_eclipse_from_240_addresses():
    figures = measure_many_address_eclipse(addresses=240, verify=True, update_period=2.0)
    assert figures["datagrams"] == 240 * 5 * 2, figures
    assert figures["honest_cells_after_flood"] == 16, figures  # listed in every cell
    assert figures["ok_after"] is not None and figures["attempts"] == 1, figures  # the first forward worked
    assert figures["failed_calls_last_forward"] == 0, figures  # no fake was even served
    assert figures["endpoint_checks_failed"] > 0 and figures["endpoint_checks_rate_limited"] > 0, figures
    # at most one check per endpoint per node (answers are remembered, failures too), however many datagrams
    checks = figures["endpoint_checks_ok"] + figures["endpoint_checks_failed"]
    assert checks <= 2 * (240 + 1) < figures["datagrams"], figures


def test_fakes_next_to_the_honest_host_cost_a_trainer_at_most_one_failed_call_each():
    """Storage nodes that do not check (or a hostile node that serves them): the trainers' own defence."""
    figures = measure_fakes_next_to_honest(verify=False, fakes_per_uid=2, steps=6)
    assert figures["honest_cells_after_flood"] == 16, figures
    assert figures["new_failed_calls"] > 0, "the fakes were never tried: the test tested nothing"
    for layer in ("new", "old"):
        assert figures[f"{layer}_failed_steps"] == 0, figures
        assert figures[f"{layer}_most_failures_per_endpoint"] == 1, figures
        assert figures[f"{layer}_honest_failures"] == 0, figures
        assert figures[f"{layer}_failed_calls"] <= figures["fakes"], figures


def test_verifying_nodes_do_not_serve_fakes_next_to_the_honest_host():
    figures = measure_fakes_next_to_honest(verify=True, fakes_per_uid=2, steps=3)
    assert figures["honest_cells_after_flood"] == 16, figures
    assert figures["new_failed_calls"] == figures["old_failed_calls"] == 0, figures
    assert figures["new_failed_steps"] == figures["old_failed_steps"] == 0, figures
    assert figures["endpoint_checks_failed"] > 0 and figures["unverified_entries_dropped"] > 0, figures


# ----------------------------------------------------------------------------- storage with a verifier
class FakeVerifier:
    """Verdicts from a dict ``endpoint -> VERIFIED | FAILED`` (others UNKNOWN); counts the checks asked for."""

    def __init__(self, known: dict[str, str], ages: dict[str, float] | None = None):
        self.known, self.requested, self.generation, self.listeners = dict(known), [], 0, []
        self.ages = ages or {}

    def verified_for(self, endpoint: str) -> float:
        return self.ages.get(endpoint, 0.0)

    def verdict(self, dkey: bytes, coord: int, endpoint: str) -> str:
        return self.known.get(endpoint, UNKNOWN)

    def due(self, endpoint: str) -> bool:
        return endpoint not in self.known

    def request(self, endpoint: str) -> bool:
        self.requested.append(endpoint)
        return True

    def answer(self, endpoint: str, verdict: str) -> None:
        self.known[endpoint] = verdict
        self.generation += 1
        for listener in self.listeners:
            listener(endpoint)


KEY = digest(prefix_key("ffn"))


def test_unverified_declarations_are_stored_but_served_only_once_verified():
    verifier = FakeVerifier({"10.0.0.1:80": VERIFIED, "10.0.0.3:80": FAILED})
    storage = SubkeyStorage(Counter(), verifier=verifier)
    far = time.time() + 60
    record = {"0@10.0.0.1:80": (None, far), "1@10.0.0.2:80": (None, far), "2@10.0.0.3:80": (None, far),
              "3@10.0.0.4:80": (None, far), "plain": ("value", far)}
    assert storage.merge(KEY, record, source="10.9.9.9:5000")
    assert storage.stats["unverified_entries_refused"] == 1  # the failed endpoint is not even stored
    assert verifier.requested == ["10.0.0.2:80"]  # one store, one check at most
    assert set(storage.get_record(KEY)) == {"0@10.0.0.1:80", "plain"}
    assert storage.get(KEY) is not None
    verifier.answer("10.0.0.2:80", VERIFIED)  # the cached encoding follows the verifier's generation
    assert set(storage.get_record(KEY)) == {"0@10.0.0.1:80", "1@10.0.0.2:80", "plain"}
    verifier.answer("10.0.0.4:80", FAILED)  # dropped as soon as its check fails
    assert storage.stats["unverified_entries_dropped"] == 1 and "3@10.0.0.4:80" not in storage._data[KEY]
    assert storage.merge(KEY, {"3@10.0.0.5:80": (None, far)})  # this node's own writes are trusted
    assert "3@10.0.0.5:80" in storage.get_record(KEY)


def test_a_full_record_evicts_unverified_entries_first_then_the_largest_network():
    verifier = FakeVerifier({"10.0.0.1:80": VERIFIED})
    storage = SubkeyStorage(Counter(), verifier=verifier)
    far = time.time() + 200
    honest = {f"{c}@10.0.0.1:80": (None, far - 100) for c in range(4)}  # larger and sooner-expiring than the fakes
    assert storage.merge(KEY, honest, source="10.0.0.1:5000")
    for i in range(400):  # 400 addresses, each its own short fake, none verified
        storage.merge(KEY, {f"{i % 4}@10.{1 + i // 250}.0.{i % 250}:1": (None, far)}, source=f"10.{1 + i // 250}.0.{i % 250}:1")
    assert storage.stats["entries_dropped_by_size_cap"] > 0
    assert set(honest) <= set(storage.get_record(KEY))
    # verified entries from many addresses of one /24 weigh as one network: it loses before a lone host does
    verifier.known.update({f"10.7.7.{i}:1": VERIFIED for i in range(250)})
    for i in range(250):
        storage.merge(KEY, {f"{i % 4}@10.7.7.{i}:1": (None, far)}, source=f"10.7.7.{i}:1")
    kept = storage.get_record(KEY)
    assert set(honest) <= set(kept)
    assert 0 < sum("@10.7.7." in sk for sk in kept) < 250


def test_a_full_record_keeps_long_lived_endpoints_over_ones_verified_lately():
    """Real hosts that strangers start on many networks, verified lately, cannot push out a host verified long ago,
    even when its network holds the most bytes of the record."""
    verifier = FakeVerifier({"10.0.0.1:80": VERIFIED}, ages={"10.0.0.1:80": 3600.0})
    storage = SubkeyStorage(Counter(), verifier=verifier)
    far = time.time() + 200
    honest = {f"{c}@10.0.0.1:80": (None, far - 100) for c in range(16)}
    assert storage.merge(KEY, honest, source="10.0.0.1:5000")
    newcomers = [f"10.{1 + i // 200}.{i % 200}.1" for i in range(300)]  # each alone in its /24
    verifier.known.update({f"{ip}:1": VERIFIED for ip in newcomers})
    for i, ip in enumerate(newcomers):
        storage.merge(KEY, {f"{i % 16}@{ip}:1": (None, far)}, source=f"{ip}:1")
    assert storage.stats["entries_dropped_by_size_cap"] > 0
    assert set(honest) <= set(storage.get_record(KEY))


def test_netgroup_is_the_24_or_the_48():
    assert netgroup("127.0.0.2") == netgroup("127.0.0.241") == "127.0.0.0/24"
    assert netgroup("10.1.2.3") != netgroup("10.1.3.3")
    assert netgroup("2001:db8:1:2::1") == netgroup("2001:db8:1:ffff::9") == "2001:db8:1::/48"
    assert netgroup("example.org") == "example.org"


# ----------------------------------------------------------------------------- the checks
def _backend(uid: str):
    return dht_sybil.make_backend(uid)


def test_endpoint_checks_read_the_hosts_experts_and_a_private_swarms_proof():
    secret = auth.resolve_secret("sybil test secret")
    with ExpertHost([_backend("ffn.1.2"), _backend("ffn.3.0")], secret=secret) as host:
        listing = fetch_listing(host.endpoint, "ab" * 16, secret, 2.0)
        assert listing.ok and listing.host_id == host.host_id, listing.reason
        assert (digest(prefix_key("ffn")), 1) in listing.pairs and (digest(prefix_key("ffn.1")), 2) in listing.pairs
        assert (digest(prefix_key("ffn.1")), 0) not in listing.pairs
        wrong = fetch_listing(host.endpoint, "ab" * 16, auth.resolve_secret("another secret"), 2.0)
        assert not wrong.ok and "401" in wrong.reason, wrong.reason
    refused = fetch_listing(f"127.0.0.1:{closed_port()}", "ab" * 16, None, 2.0)
    assert not refused.ok and refused.reason.endswith("refused the connection"), refused.reason


def test_endpoint_checks_are_bounded_and_remembered():
    calls = Counter()

    def fetch(endpoint, nonce, secret, timeout, handle):
        calls[endpoint] += 1
        time.sleep(0.05)
        return Listing(True, frozenset({(KEY, 1)}), host_id="h") if endpoint.startswith("10.0.0.") else failed("dead")

    async def scenario():
        stats = Counter()
        verifier = EndpointVerifier(stats, checks_per_s=5.0, max_pending=3, max_pending_per_network=2, fetch=fetch)
        started = [verifier.request(e) for e in ["10.0.0.1:80", "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80",
                                                 "10.1.0.1:80", "10.2.0.1:80"]]
        await verifier.wait_idle(5.0)
        verdicts = (verifier.verdict(KEY, 1, "10.0.0.1:80"), verifier.verdict(KEY, 2, "10.0.0.1:80"),
                    verifier.verdict(KEY, 1, "10.1.0.1:80"), verifier.verdict(KEY, 1, "10.0.0.3:80"))
        again = [verifier.request(e) for e in ["10.0.0.1:80", "10.1.0.1:80"]]  # answers are remembered
        for i in range(20):
            verifier.request(f"10.5.{i}.1:80")
        await verifier.wait_idle(5.0)
        verifier.close()
        return stats, started, verdicts, again

    stats, started, verdicts, again = asyncio.run(scenario())
    # a second request of one endpoint waits for the first; at most 2 per network and 3 in all at once
    assert started == [True, False, True, False, True, False], started
    assert verdicts == (VERIFIED, FAILED, FAILED, UNKNOWN)
    assert again == [False, False] and calls["10.0.0.1:80"] == 1
    assert stats["endpoint_checks_dropped"] == 2 and stats["endpoint_checks_rate_limited"] > 0, stats
    assert sum(calls.values()) <= 5 + 2, calls  # the bucket: 5 at once, 5 per second


def test_refused_fakes_are_excluded_with_a_truthful_reason():
    from lightning_moe.client.health import HealthRegistry
    from lightning_moe.client.parallel_call import record_outcome
    from lightning_moe.client.remote_expert import RemoteExpertError, call_expert

    health, endpoint = HealthRegistry(), f"127.0.0.1:{closed_port()}"
    with pytest.raises(RemoteExpertError) as error:
        call_expert("ffn.0.0", endpoint, "forward", [torch.zeros(1, 8)], timeout=2.0)
    record_outcome(health, "ffn.0.0", endpoint, error.value)
    exclusion = health.excluded("ffn.1.1", endpoint)  # the whole endpoint, at once
    assert exclusion is not None and f"endpoint {endpoint} refused the connection" in exclusion.describe()
