"""Attackers with many addresses against a real host: slots and compute are fair per network, and the
memory of aborted requests is given back.

The host runs in a process of its own, each attacker in another (attack_tools.py); attackers use 64
addresses in one /24 (127.77.0.0/24) or 64 addresses each in a /16 of its own (127.100.0.1 ...), the
legitimate client 127.0.0.1, whose network takes no part. Counts, statuses and memory bounds only.
"""

from __future__ import annotations

import time

import pytest
import requests
from attack_tools import Attacker, HostProcess, LegitClient, huge_rows_request, sybil_addresses

SECRET = "sybil test secret"
PER_ADDRESS = 16
CONNECTIONS = 64 * PER_ADDRESS  # the host's whole limit: 64 addresses at their per-address limit take every slot
WIDE = huge_rows_request(128, width=(60 << 20) // (128 * 4))  # a 60 MiB forward of 128 rows: under the row limit
KEPT_BOUND = 100 * 10**6  # bytes of RSS a host may keep after the attacks (three bodies are 189 MB)


def served(client: LegitClient, calls: int) -> int:
    return sum(client.call()[0] for _ in range(calls))


def host_stats(host: HostProcess) -> dict:
    """The host's ``GET /stats``, from 127.0.0.1 (a network of its own), signed for a private host."""
    from lightning_moe.net.http_client import signed

    headers = signed(SECRET.encode(), "GET", "/stats", host_id=host.host_id) if host.secret else {}
    return requests.get(f"http://{host.endpoint}/stats", headers=headers, timeout=30).json()


def settled_rss(host: HostProcess, bound: int, tries: int = 40) -> int:
    """The host's RSS once it is under ``bound`` or after ``tries`` looks 0.25 s apart (it gives memory back every 2 s)."""
    rss = host.rss()
    for _ in range(tries):
        if rss <= bound:
            break
        time.sleep(0.25)
        rss = host.rss()
    return rss


def test_64_addresses_in_one_network_or_in_64_networks_cannot_take_the_slots_of_a_newcomer():
    limits = dict(max_connections=CONNECTIONS, max_connections_per_address=PER_ADDRESS,
                  max_connections_per_network=CONNECTIONS // 4)
    with HostProcess(**limits) as host:
        client = LegitClient(host.endpoint, fresh=True)  # a new connection for every call: a trainer arriving
        with Attacker("idle", host.port, CONNECTIONS, addresses=sybil_addresses(64, "one24"), seconds=30,
                      ready_open=CONNECTIONS // 4) as one24:
            assert one24.wait_ready(60)["open"] >= CONNECTIONS // 4
            assert served(client, 100) >= 99
            one24_counts = one24.stop()
        with Attacker("idle", host.port, CONNECTIONS, addresses=sybil_addresses(64, "own16"), seconds=30) as own16:
            assert own16.wait_ready(60)["open"] >= 0.9 * CONNECTIONS
            assert served(client, 100) >= 99
            own16.stop()
        stats = host.stop()
    assert one24_counts["closed_by_host"] >= CONNECTIONS // 2, one24_counts  # the /24 held no more than its share
    assert stats["connections_refused"] >= CONNECTIONS // 2, stats
    assert stats["connections_evicted"] >= 1, stats  # a full host made room for the newcomer's network


@pytest.fixture(scope="module")
def public_host():
    """One public host for the memory and compute tests (memory first: the flood's kept forwards hold memory).

    A forward is shed (503) once its own network's oldest queued work waited over ``max_queue_wait``."""
    with HostProcess(max_batch=4096, max_queue_wait=1.0) as host:
        yield host


def test_aborted_bodies_and_unread_answers_leave_memory_as_it_was(public_host):
    host = public_host
    client = LegitClient(host.endpoint)
    assert served(client, 10) == 10
    before = host.rss()
    with Attacker("truncated", host.port, 3, addresses=sybil_addresses(3, "own16"), seconds=30, **WIDE) as cut:
        cut.wait_ready(60)
        for _ in range(200):  # bounded (20 s): until the three bodies were sent but their last byte, and cut
            if host_stats(host)["errors_by_status"].get("400", 0) >= 3:
                break
            time.sleep(0.1)
        assert served(client, 20) == 20
        cut_counts = cut.stop()
    with Attacker("abort_answer", host.port, 4, addresses=sybil_addresses(4, "own16"), seconds=3,
                  **huge_rows_request(16384)) as unread:
        unread.wait_ready(60)
        assert served(client, 20) == 20
        unread_counts = unread.stop()
    assert served(client, 10) == 10
    after = settled_rss(host, before + KEPT_BOUND)
    stats = host_stats(host)
    assert cut_counts.get("truncated", 0) >= 3, cut_counts
    assert sum(v for k, v in unread_counts.items() if k.startswith("aborted_")) >= 4, unread_counts
    assert after <= before + KEPT_BOUND, (before, after)
    assert stats["errors_by_status"].get("400", 0) >= 3, stats  # the truncated bodies


def test_fake_signed_bodies_leave_memory_as_it_was():
    with HostProcess(secret=SECRET) as host:
        client = LegitClient(host.endpoint, secret=SECRET)
        assert served(client, 10) == 10
        before = host.rss()
        with Attacker("bigbody", host.port, 3, sources=3, seconds=30, fake_signature=True, host_id=host.host_id,
                      prefix=WIDE["wire_head"], length=WIDE["wire_total"]) as attacker:
            attacker.wait_ready(60)
            assert served(client, 20) == 20
            for _ in range(200):  # bounded (20 s): until three bodies were read to their end and refused
                if host_stats(host)["errors_by_status"].get("401", 0) >= 3:
                    break
                time.sleep(0.1)
            counts = attacker.stop()
        after = settled_rss(host, before + KEPT_BOUND)
        stats = host.stop()
    assert counts.get("401", 0) >= 3, counts  # read to the end, then refused for its signature
    assert after <= before + KEPT_BOUND, (before, after)
    assert stats["errors_by_status"]["401"] >= 3, stats


def test_a_compute_flood_from_one_network_sheds_its_own_forwards_not_a_newcomers(public_host):
    # Served first come, first served, the flood's queue would make every newcomer's forward wait past
    # max_queue_wait, and be shed too.
    host = public_host
    client = LegitClient(host.endpoint)
    assert served(client, 5) == 5
    with Attacker("compute", host.port, 32, addresses=["127.77.0.2"], seconds=60,
                  **huge_rows_request(16384)) as flood:
        flood.wait_ready(60)
        calls = ok = 0
        for _ in range(400):  # bounded: until the flood has been shed, while the newcomer calls
            calls, ok = calls + 1, ok + served(client, 1)
            if host_stats(host)["shed_forwards"] >= 10:
                break
        legit = served(client, 50)
        counts = flood.stop()
    stats = host_stats(host)
    assert stats["shed_forwards"] >= 10, stats
    assert legit == 50 and ok == calls, (legit, ok, calls)  # never shed: its network's own queue is short
    assert counts.get("answers_200", 0) >= 1, counts  # the flood is served too, in its share
