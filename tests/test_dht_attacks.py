"""Strangers attack DHT nodes on 127.0.0.1 (port 0): amplification, eclipse, store flood, and a
private swarm's node with the wrong secret. Bounded loops; each test stops what it starts.
The measurements live in tests/dht_attacks.py (also printed by ``python tests/dht_attacks.py``)."""
import logging
import os
import time

import pytest
import torch
from kademlia.utils import digest

from lightning_moe import auth
from lightning_moe.client.beam_search import beam_search
from lightning_moe.dht import DHT
from lightning_moe.dht.records import encode_record
from lightning_moe.dht.server import WRONG_SECRET_WARNING

import dht_attacks
from dht_attacks import FAST, RawPeer, measure_amplification, measure_eclipse, measure_store_flood


@pytest.fixture(autouse=True)
def _no_secret_from_the_environment(monkeypatch):
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)


def test_amplification_to_unverified_addresses_is_at_most_2():
    figures = measure_amplification(requests=150, keys=100)
    assert figures["bytes_received_by_target"] > 0
    assert figures["ratio"] <= 2.0, figures  # measured at the socket the attacker controls
    assert figures["target_ratio"] <= 2.0, figures  # and by the target's own counters
    # a verified address that pings from fresh node ids gets at most one replication per address
    assert figures["verified_ratio"] < 20, figures


def test_unverified_address_gets_only_a_challenge_and_no_replication():
    with DHT(**FAST) as target, DHT(initial_peers=[target.address], **FAST) as writer:
        assert writer.store_many([(f"k{i}", "s", "v" * 1000, time.time() + 60) for i in range(20)])
        victim = RawPeer()
        try:
            address = dht_attacks._address(target)
            for _ in range(20):
                victim.send(address, "ping", [os.urandom(20)])
            replies = victim.drain()
            assert len(replies) == 20 and all(r[:1] == b"\x02" and len(r) == 25 for r in replies)
            assert target.routing_table() == [writer.address]  # the fresh ids were not added
            assert target.stats["replications_rate_limited"] == 0
            # once it answers the challenge its address is verified: it joins the routing table,
            # and gets the keys it is nearer to at most once however many ids it claims
            assert victim.call(address, "ping", [os.urandom(20)]) == target._server.node.id
            assert len(target.routing_table()) == 2
            for _ in range(10):
                assert victim.call(address, "ping", [os.urandom(20)]) is not None
            victim.drain()
            assert target.stats["replications_skipped"] >= 10
            assert len(target.routing_table()) == 2  # one id per address: the latest replaces the others
        finally:
            victim.close()


def test_eclipse_flood_does_not_hide_the_honest_host():
    figures = measure_eclipse(grid=(4, 4), fakes_per_cell=60, update_period=5.0)
    assert figures["found_by_get_experts"] == figures["experts"] == 16, figures
    assert figures["found_by_get_active_children"] == 16, figures
    assert figures["attacker_entries_evicted"] > 0, figures


def test_beam_search_of_a_new_trainer_finds_the_honest_host_after_a_flood():
    storage = dht_attacks._swarm(3)
    honest = DHT(initial_peers=[storage[0].address], **FAST)
    attacker = DHT(initial_peers=[storage[1].address], **FAST)
    try:
        endpoint = "127.0.0.1:7000"
        assert honest.declare_experts([f"ffn.{i}.{j}" for i in range(4) for j in range(4)], endpoint, time.time() + 10)
        far = time.time() + 299
        for prefix in ["ffn"] + [f"ffn.{i}" for i in range(4)]:
            attacker.store_many([(f"prefix:{prefix}", f"{c}@10.0.{c % 250}.1:{1000 + f}", None, far)
                                 for c in range(240) for f in range(2)])
        with DHT(initial_peers=[storage[2].address], client_mode=True, **FAST) as trainer:
            scores = [torch.zeros(2, 4), torch.zeros(2, 4)]
            found = beam_search(trainer, "ffn", scores, k_best=16, beam_size=4)
        assert all(sorted(row) == sorted(f"ffn.{i}.{j}" for i in range(4) for j in range(4)) for row in found), found
    finally:
        for node in [attacker, honest, *storage]:
            node.shutdown()


def test_store_flood_is_bounded_in_bytes():
    max_bytes = 4 * 1024 * 1024
    figures = measure_store_flood(keys=1500, sources=3, max_bytes=max_bytes, max_bytes_per_source=1024 * 1024)
    assert figures["bytes_sent"] > 1.5 * max_bytes, figures
    assert figures["bytes_held"] <= max_bytes, figures
    assert figures["keys_held"] < figures["records_sent"] / 2, figures
    assert figures["honest_found"] == 2, figures


def test_per_source_quota_and_expiry_cap():
    with DHT(max_bytes_per_source=256 * 1024, max_ttl=60.0, **FAST) as target:
        peer, other = RawPeer(), RawPeer()
        try:
            address = dht_attacks._address(target)
            far = time.time() + 59
            assert other.call(address, "store", [None, digest("mine"), encode_record({"s": ("v", far)})]) is True
            for i in range(200):
                assert peer.call(address, "store", [None, digest(f"k{i}"), encode_record({"s": ("x" * 4000, far)})])
            # beyond the node's max_ttl: invalid, refused
            assert peer.call(address, "store", [None, digest("late"), encode_record({"s": ("v", time.time() + 120)})]) is False
            stats = target.stats
            assert stats["entries_evicted_by_source_quota"] > 100 and stats["rejected_stores"] == 1, stats
            summary = target._call(dht_attacks._storage_summary(target), 10)
            assert summary["bytes_used"] <= 256 * 1024 + 2 * 4096 and target.get("mine")  # the other source keeps its entry
            with pytest.raises(ValueError):
                target.store("k", "s", 1, time.time() + 120)  # the writer's side checks the cap too
        finally:
            peer.close()
            other.close()


def test_wrong_secret_is_reported_once(caplog):
    with DHT(secret="swarm secret", **FAST) as node, DHT(initial_peers=[node.address], secret="other", **FAST) as other:
        with caplog.at_level(logging.WARNING, logger="lightning_moe.dht"):
            for i in range(5):
                other.store(f"k{i}", "s", i, time.time() + 60)
                assert node.get(f"k{i}") == {}
        warnings = [r for r in caplog.records if WRONG_SECRET_WARNING in r.getMessage()]
        assert "records signed with another secret were skipped: wrong dht.secret?" in WRONG_SECRET_WARNING
        assert len(warnings) == 1 and node.stats["foreign_tag_entries"] > 0
