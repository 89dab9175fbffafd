"""Tests of lightning_moe.dht with real kademlia nodes on 127.0.0.1 (port 0 everywhere)."""
import asyncio
import contextlib
import inspect
import logging
import math
import multiprocessing as mp
import random
import socket
import threading
import time
from collections import Counter

import pytest
import umsgpack
from kademlia.utils import digest

from lightning_moe.dht import DHT, is_valid_endpoint, parse_endpoint, parse_uid, prefix_key
from lightning_moe.dht.protocol import pack_nodes
from lightning_moe.dht.records import (
    MAX_RECORD_BYTES,
    decode_record,
    encode_record,
    merge_records,
)
from lightning_moe.dht.storage import SubkeyStorage

FAST = dict(rpc_timeout=0.3, wait_timeout=5.0)


@contextlib.contextmanager
def swarm(n: int, **kwargs):
    """``n`` server nodes in this process, each bootstrapped to a random earlier one."""
    nodes = []
    try:
        for _ in range(n):
            initial = [random.choice(nodes).address] if nodes else []
            nodes.append(DHT(initial_peers=initial, **{**FAST, **kwargs}))
        yield nodes
    finally:
        for node in nodes:
            node.shutdown()


def on_loop(dht: DHT, fn):
    """Call ``fn()`` on a node's own loop thread and await its result if needed (test-only
    access to internals)."""
    async def run():
        result = fn()
        return (await result) if inspect.isawaitable(result) else result
    return asyncio.run_coroutine_threadsafe(run(), dht._loop).result(10)


# ----------------------------------------------------------------------------- pure functions
def test_parse_uid_and_endpoint():
    assert parse_uid("ffn.3.14") == ("ffn", (3, 14))
    assert parse_uid("my_expert-2.0") == ("my_expert-2", (0,))
    for bad in ["ffn", "ffn.", "ffn.a", "ffn.-1", "ffn.01", "3ffn.1", "ffn..1", "f n.1", "", None, 7, "ffn.1" + ".1" * 200]:
        with pytest.raises(ValueError):
            parse_uid(bad)
    assert parse_endpoint("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_endpoint("host-1.example.org:1") == ("host-1.example.org", 1)
    for bad in ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "999.1.1.1:80", "a b:80", ":80", "h:08",
                "[::1]:80", "h:80:1", "x" * 300 + ":80", None, 80]:
        assert not is_valid_endpoint(bad), bad


def test_decode_record_skips_and_counts_invalid_entries():
    now = time.time()
    stats = Counter()
    blob = umsgpack.packb({
        "ok": ["v", now + 60], "expired": ["v", now - 1], "nan": ["v", math.nan], "far": ["v", now + 1e9],
        "type": ["v", "tomorrow"], "short": ["v"], "obj": [{1: 2}, now + 60], 5: ["v", now + 60],
    })
    assert decode_record(blob, stats, now) == {"ok": ("v", now + 60)}
    assert stats["invalid_entries"] == 6 and stats["invalid_records"] == 0
    for garbage in [b"\xc1junk", umsgpack.packb([1, 2]), "not bytes", 5, b"\x91" * 3000 + b"\xc0",
                    umsgpack.packb({"k": ["x" * 7000, now + 60]})]:
        assert decode_record(garbage, stats, now) is None
    assert stats["invalid_records"] == 6


def test_storage_cap_evicts_from_the_address_holding_the_most():
    storage = SubkeyStorage()
    key, now = digest("prefix:ffn"), time.time()
    honest = {f"{c}@127.0.0.1:7000": (None, now + 5) for c in range(4)}
    storage.merge(key, honest, source="10.0.0.1:5000")
    storage.merge(key, {f"{c}@127.0.0.1:{1000 + c}": (None, now + 299) for c in range(300)}, source="10.0.0.2:6000")
    storage.merge(key, {f"{c}@127.0.0.1:{2000 + c}": (None, now + 299) for c in range(300)}, source="10.0.0.2:6001")
    kept = storage.get_record(key)
    assert len(storage.get(key)) <= MAX_RECORD_BYTES and set(honest) <= set(kept) and len(kept) > 50
    flood_a = sum(sk.endswith(f":{1000 + int(sk.split('@')[0])}") for sk in kept)
    assert abs(2 * flood_a - (len(kept) - 4)) <= 2  # the two ports of one address share its room evenly
    assert storage.stats["entries_dropped_by_size_cap"] == 604 - len(kept)


def test_storage_merges_subkeys_with_per_entry_expiry():
    storage = SubkeyStorage()
    key = digest("k")
    now = time.time()
    storage.merge(key, {"a": ("old", now + 10), "b": ("b", now + 0.2)})
    assert set(decode_record(storage.get(key))) == {"a", "b"}  # encoded and cached
    storage.merge(key, {"a": ("stale", now + 5), "c": ("c", now + 10)})  # older "a" loses; a new sub-key reaches peers
    assert set(decode_record(storage.get(key))) == {"a", "b", "c"}
    storage.merge(key, {"a": ("new", now + 20)})
    assert storage.get_record(key) == {"a": ("new", now + 20), "b": ("b", now + 0.2), "c": ("c", now + 10)}
    assert decode_record(storage.get(key)) == storage.get_record(key)
    time.sleep(0.3)
    assert set(storage.get_record(key)) == {"a", "c"}
    assert set(decode_record(dict(iter(storage))[key])) == {"a", "c"}
    assert set(decode_record(dict(storage.iter_older_than(0))[key])) == {"a", "c"}
    assert not storage.store_blob(key, b"\xc1garbage")
    many = {f"s{i}": ("y" * 200, now + 100 + i) for i in range(100)}
    storage.merge(key, many)
    assert len(storage.get(key)) <= MAX_RECORD_BYTES and "s99" in storage.get_record(key)
    assert merge_records([{"x": (1, now + 5)}, {"x": (2, now + 9)}, {"y": (3, now - 1)}]) == {"x": (2, now + 9)}


# ----------------------------------------------------------------------------- nodes
def test_store_get_and_input_validation():
    with swarm(3) as (a, b, c):
        expiration = time.time() + 60
        assert b.store("key", "one", {"x": [1, 2.5, None]}, expiration)
        assert c.store("key", "two", b"\x00bytes", expiration)
        assert a.store_many([("key", "three", "s", expiration), ("other", "z", 1, expiration)]) == \
            {"key": True, "other": True}
        got = a.get("key")
        assert got == {"one": ({"x": [1, 2.5, None]}, expiration), "two": (b"\x00bytes", expiration),
                       "three": ("s", expiration)}
        assert c.get_many(["key", "other", "missing"])["missing"] == {}
        assert b.get("key", return_future=True).result(10) == got
        for bad in [("k", "", 1, expiration), ("k", "s", 1, math.inf), ("k", "s", 1, time.time() + 1e9),
                    ("k", "s", object(), expiration), ("k", "s", "x" * 5000, expiration), ("", "s", 1, expiration)]:
            with pytest.raises(ValueError):
                a.store(*bad)
        with pytest.raises(ValueError):
            a.declare_experts(["bad uid"], "127.0.0.1:80", expiration)
        with pytest.raises(ValueError):
            a.declare_experts(["ffn.1"], "nohost", expiration)


def _child_node(index: int, initial_peer: str, results: "mp.Queue", go, stop) -> None:
    with DHT(initial_peers=[initial_peer], **FAST) as dht:
        ok = dht.declare_experts([f"proc.{index}.{index}"], f"127.0.0.1:{9000 + index}", time.time() + 60)
        results.put(("declared", index, dht.address, ok))
        go.wait(60)
        found = dht.get_experts([f"proc.{j}.{j}" for j in range(3)] + ["main.0"])
        results.put(("found", index, found, dht.get_active_children(["proc"])["proc"]))
        stop.wait(60)


@pytest.mark.slow
def test_nodes_in_separate_processes_find_each_other_through_bootstrap():
    ctx = mp.get_context("spawn")
    results, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()
    processes = []
    with DHT(**FAST) as main:
        main.declare_experts(["main.0"], "127.0.0.1:8999", time.time() + 60)
        try:
            peer = main.address
            for index in range(3):  # a chain: each child only knows the previous one
                process = ctx.Process(target=_child_node, args=(index, peer, results, go, stop), daemon=True)
                process.start()
                processes.append(process)
                tag, got_index, peer, ok = results.get(timeout=60)
                assert (tag, got_index, ok) == ("declared", index, True)
            go.set()
            expected = [f"127.0.0.1:{9000 + j}" for j in range(3)] + ["127.0.0.1:8999"]
            for _ in range(3):
                tag, index, found, children = results.get(timeout=60)
                assert found == expected, index
                assert children == {j: f"127.0.0.1:{9000 + j}" for j in range(3)}
            assert main.get_experts([f"proc.{j}.{j}" for j in range(3)]) == expected[:3]
        finally:
            stop.set()
            for process in processes:
                process.join(15)
                if process.is_alive():
                    process.kill()
                    process.join(5)
    assert all(p.exitcode == 0 for p in processes)


def test_expiry_also_after_republish():
    with swarm(3) as (a, b, c):
        now = time.time()
        assert a.store("key", "short", "s", now + 1.0) and a.store("key", "long", "l", now + 60)
        assert a.declare_experts(["tmp.0.0"], "127.0.0.1:7000", now + 1.0)
        assert set(c.get("key")) == {"short", "long"}
        assert c.get_experts(["tmp.0.0"]) == ["127.0.0.1:7000"]
        time.sleep(max(0.0, now + 1.2 - time.time()))
        for node in (a, b, c):
            node.republish(older_than=0)
        for node in (a, b, c):
            assert set(node.get("key")) == {"long"}
            assert node.get_experts(["tmp.0.0"]) == [None]
            assert node.get_active_children(["tmp", "tmp.0"]) == {"tmp": {}, "tmp.0": {}}
            record = on_loop(node, lambda: node._server.storage.get_record(digest("key")))
            assert record is None or set(record) == {"long"}


def test_concurrent_declares_under_one_prefix_lose_nothing():
    with swarm(11) as nodes:
        hosts, reader = nodes[:10], nodes[10]
        barrier = threading.Barrier(len(hosts))
        expiration = time.time() + 60
        outcomes = {}

        def declare(i: int) -> None:
            barrier.wait(10)
            outcomes[i] = hosts[i].declare_experts([f"ffn.{i}.0", f"ffn.{i}.1"], f"127.0.0.1:{7000 + i}", expiration)
            outcomes[i, "store"] = hosts[i].store("shared", f"host{i}", i, expiration)

        threads = [threading.Thread(target=declare, args=(i,)) for i in range(len(hosts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert all(outcomes.values()) and len(outcomes) == 20
        for node in (reader, hosts[0], hosts[7]):
            children = node.get_active_children(["ffn"] + [f"ffn.{i}" for i in range(10)])
            assert sorted(children["ffn"]) == list(range(10))
            for i in range(10):
                assert children[f"ffn.{i}"] == {0: f"127.0.0.1:{7000 + i}", 1: f"127.0.0.1:{7000 + i}"}
            assert {k: v for k, (v, _) in node.get("shared").items()} == {f"host{i}": i for i in range(10)}


@pytest.mark.slow
def test_records_survive_a_quarter_of_nodes_stopped():
    with swarm(20) as nodes:
        expiration = time.time() + 60
        for i, node in enumerate(nodes):
            assert node.store(f"record{i}", "sub", f"value{i}", expiration)
            assert node.declare_experts([f"grid.{i}.0"], f"127.0.0.1:{7000 + i}", expiration)
        victims = random.sample(nodes, 5)
        for victim in victims:
            victim.shutdown()
        survivors = [n for n in nodes if n not in victims]
        for reader in random.sample(survivors, 3):
            records = reader.get_many([f"record{i}" for i in range(20)])
            assert {k: r.get("sub", (None,))[0] for k, r in records.items()} == {f"record{i}": f"value{i}" for i in range(20)}
            assert reader.get_experts([f"grid.{i}.0" for i in range(20)]) == [f"127.0.0.1:{7000 + i}" for i in range(20)]
            assert sorted(reader.get_active_children(["grid"])["grid"]) == list(range(20))


def test_hostile_records_are_skipped_and_counted():
    with swarm(2) as (honest, other), DHT(initial_peers=[honest.address], **FAST) as hostile, \
            DHT(initial_peers=[other.address], client_mode=True, **FAST) as reader:
        uids = [f"ffn.{i}.{j}" for i in range(2) for j in range(4)] + ["gg.0", "hh.0"]
        assert honest.declare_experts(uids, "127.0.0.1:7000", time.time() + 60)
        now = time.time()
        garbage = {
            prefix_key("ffn.0"): umsgpack.packb({"x": [None, now + 60], "0@127.0.0.1:0": [None, now + 60],
                                                 "1@999.1.1.1:80": [None, now + 60], "2@a b:1": [None, now + 60]}),
            prefix_key("ffn.1"): umsgpack.packb({"0@127.0.0.1:9": [None, 1e30], "1@127.0.0.1:9": [None, math.nan],
                                                 "2@127.0.0.1:9": [None, -5.0], "3@127.0.0.1:9": [None, "soon"]}),
            prefix_key("ffn"): umsgpack.packb({"abc": [None, now + 60], "-1@127.0.0.1:9": [None, now + 60],
                                               "99999999@127.0.0.1:9": [None, now + 60], "7@bad host:1": [None, now + 60]}),
            prefix_key("gg"): umsgpack.packb({f"0@127.0.0.1:{i + 1}": [None, now + 60] for i in range(300)}),  # > 6 KB
            prefix_key("hh"): b"\x91" * 3000 + b"\xc0",  # nesting bomb
            prefix_key("ii"): b"\xc1\xc1 not msgpack",
            prefix_key("jj"): umsgpack.packb([1, 2, 3]),
            prefix_key("kk"): 12345,
        }
        by_digest = {digest(k): v for k, v in garbage.items()}
        broken_answer = digest(prefix_key("ll"))
        server = hostile._server

        def evil_lookup(address, key, want_value, value):
            nodes = pack_nodes(server.routing_table_nodes())
            if key == broken_answer:
                return "not a lookup answer"
            return [True, by_digest.get(key), nodes]

        server.rpc_lookup = evil_lookup

        assert reader.get_experts(uids) == ["127.0.0.1:7000"] * len(uids)
        children = reader.get_active_children(["ffn", "ffn.0", "ffn.1", "ii", "jj", "kk", "ll"])
        assert children == {"ffn": {0: "127.0.0.1:7000", 1: "127.0.0.1:7000"},
                            "ffn.0": dict.fromkeys(range(4), "127.0.0.1:7000"),
                            "ffn.1": dict.fromkeys(range(4), "127.0.0.1:7000"), "ii": {}, "jj": {}, "kk": {}, "ll": {}}
        stats = reader.stats
        assert stats["invalid_records"] >= 5, stats
        assert stats["invalid_entries"] >= 4, stats
        assert stats["invalid_prefix_entries"] >= 8 and stats["bad_responses"] >= 1, stats

        # the hostile node also writes garbage onto honest nodes, and throws junk datagrams at them
        honest_address = tuple(parse_endpoint(honest.address))

        def write(key: str, value) -> bool:
            answered, stored = on_loop(hostile, lambda: server.protocol.request(
                honest_address, "store", [server.node.id, digest(key), value]))
            assert answered
            return stored

        for key, value in [*garbage.items(), (prefix_key("ffn.0"), b"x" * 7000)]:
            # the storage accepts only well-formed generic records (valid entries, bounded
            # size and expiry); records that are well-formed but not valid expert records are
            # kept, and readers drop their entries
            expected = key in (prefix_key("ffn.0"), prefix_key("ffn")) and value != b"x" * 7000
            assert write(key, value) is expected, key
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for junk in [b"", b"\x00" * 30, b"\x00" + b"m" * 24 + b"\xc1", b"\x00" + b"m" * 24 + umsgpack.packb(["nope", []]),
                         b"\x00" + b"m" * 24 + umsgpack.packb("not a list"), b"\x07" * 40,
                         b"\x01" + b"m" * 24, b"\x00" + b"m" * 24 + b"x" * 9000]:
                raw.sendto(junk, honest_address)
        deadline = time.time() + 5
        while honest.stats.get("bad_requests", 0) + honest.stats.get("bad_datagrams", 0) < 6 and time.time() < deadline:
            time.sleep(0.05)
        assert honest.stats["rejected_stores"] >= 6, honest.stats
        assert honest.stats["bad_requests"] + honest.stats["bad_datagrams"] >= 6, honest.stats
        # from the verified hostile node, the same junk requests count as bad requests too
        for junk in [["nope", []], ["store", []], ["ping", [b"short id"]], ["lookup", [None, b"k" * 20, "yes", None]]]:
            answered, _ = on_loop(hostile, lambda: server.protocol.request(honest_address, junk[0], junk[1], timeout=0.3))
            assert not answered
        assert reader.get_experts(uids) == ["127.0.0.1:7000"] * len(uids)
        assert reader.get_active_children(["ffn"]) == {"ffn": {0: "127.0.0.1:7000", 1: "127.0.0.1:7000"}}

def test_client_mode_node_stays_out_of_routing_tables():
    with swarm(3) as servers, DHT(initial_peers=[servers[0].address], client_mode=True, **FAST) as client:
        expiration = time.time() + 60
        assert client.store("from-client", "s", 1, expiration)
        assert client.declare_experts(["cli.0.0"], "127.0.0.1:7000", expiration)
        assert servers[2].get("from-client") == {"s": (1, expiration)}
        assert client.get_experts(["cli.0.0"]) == ["127.0.0.1:7000"]
        for server in servers:
            server.republish(older_than=0)
            table = server.routing_table()
            assert client.address not in table
            assert set(table) == {s.address for s in servers if s is not server}
        assert set(client.routing_table()) == {s.address for s in servers}
        # a client answers nobody: a ping to it goes unanswered and is counted
        assert on_loop(servers[0], lambda: servers[0]._server.ping_address(parse_endpoint(client.address))) is None
        assert client.stats["requests_ignored_in_client_mode"] >= 1


def test_shutdown_leaves_no_thread_and_frees_the_port():
    before = set(threading.enumerate())
    with DHT(**FAST) as first, DHT(initial_peers=[], **FAST) as second:
        port = first.port
        assert first.store("k", "s", 1, time.time() + 60)
        assert len(set(threading.enumerate()) - before) == 2
        assert second.get("k") == {}  # not connected: only its own (empty) view
    assert set(threading.enumerate()) == before
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", port))
    with pytest.raises(RuntimeError):
        first.get("k")
    first.shutdown()  # idempotent


def test_warns_when_no_initial_peer_answers(caplog):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    with caplog.at_level(logging.WARNING, logger="lightning_moe.dht"):
        with DHT(initial_peers=[f"127.0.0.1:{dead_port}"], rpc_timeout=0.2) as lonely:
            assert lonely.get("anything") == {}
    assert any("could not reach ANY" in r.getMessage() for r in caplog.records)


def test_announce_address_and_bad_arguments():
    with DHT(announce_host="10.1.2.3", announce_port=4000, **FAST) as node:
        assert node.address == "10.1.2.3:4000" and node.port != 4000
    with pytest.raises(ValueError):
        DHT(initial_peers=["not an address"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        before = set(threading.enumerate())
        with pytest.raises(OSError):
            DHT(port=taken.getsockname()[1])
        assert set(threading.enumerate()) == before


def test_get_is_bounded_by_its_timeout_with_dead_peers():
    with swarm(4) as nodes:
        expiration = time.time() + 60
        assert nodes[0].store("k", "s", "v", expiration)
        for node in nodes[1:3]:
            node.shutdown()
        result = nodes[3].get("k", timeout=3.0)
        assert result == {"s": ("v", expiration)}
        assert nodes[3].get_many([f"missing{i}" for i in range(20)], timeout=3.0) == {f"missing{i}": {} for i in range(20)}


def test_identically_seeded_processes_get_distinct_node_ids():
    # DDP ranks often call seed_everything(same seed) before creating their DHT
    random.seed(1234)
    first = DHT(**FAST)
    random.seed(1234)
    second = DHT(initial_peers=[first.address], **FAST)
    try:
        assert first._server.node.id != second._server.node.id
        assert second.store("k", "s", 1, time.time() + 60) and first.get("k")["s"][0] == 1
        assert first.routing_table() == [second.address]
    finally:
        first.shutdown()
        second.shutdown()


# ----------------------------------------------------------------------------- private swarms
from lightning_moe import auth  # noqa: E402
from lightning_moe.dht.records import entry_size, entry_tag, sign_record, strip_tags  # noqa: E402


@pytest.fixture(autouse=True)
def _no_secret_from_the_environment(monkeypatch):
    """Tests here choose their secrets themselves."""
    monkeypatch.delenv(auth.SECRET_ENV, raising=False)


def test_entry_tags_cover_key_subkey_value_and_expiration():
    secret, key = b"s3cret", digest("expert:ffn.0.0")
    now = time.time()
    signed = sign_record(secret, key, {"a": ("v", now + 60), "b": ([1, 2], now + 60)})
    blob = encode_record(signed)
    stats = Counter()
    assert decode_record(blob, stats, secret=secret, dkey=key) == signed
    assert decode_record(blob) == signed  # a node without the secret keeps the tags unchecked
    tag = signed["a"][2]
    forged = {
        "value": {"a": ["w", now + 60, tag]},
        "expiration": {"a": ["v", now + 250, tag]},
        "subkey": {"c": ["v", now + 60, tag]},
        "untagged": {"a": ["v", now + 60]},
        "other secret": {"a": ["v", now + 60, entry_tag(b"other", key, "a", "v", now + 60)]},
    }
    for name, raw in forged.items():
        stats = Counter()
        assert decode_record(umsgpack.packb(raw), stats, secret=secret, dkey=key) == {}, name
        assert stats["unauthenticated_entries"] == 1 and stats["foreign_tag_entries"] == int(name != "untagged"), name
    stats = Counter()
    assert decode_record(blob, stats, secret=secret, dkey=digest("expert:ffn.0.1")) == {}  # moved to another key
    assert stats["unauthenticated_entries"] == 2 and stats["foreign_tag_entries"] == 2
    stats = Counter()  # malformed tags are invalid for everyone
    bad_tags = {"a": ["v", now + 60, "zz" * 32], "b": ["v", now + 60, tag[:10]], "c": ["v", now + 60, 7]}
    assert decode_record(umsgpack.packb(bad_tags), stats) == {} and stats["invalid_entries"] == 3

    # the tag counts in every size limit: a full record of tagged entries still fits
    assert entry_size("a", "v", now, tag) - entry_size("a", "v", now) == 66
    many = sign_record(secret, key, {f"127.0.0.1:{1000 + i}": (f"127.0.0.1:{1000 + i}", now + 60 + i) for i in range(200)})
    storage = SubkeyStorage(secret=secret)
    storage.merge(key, many)
    assert len(storage.get(key)) <= MAX_RECORD_BYTES and storage.stats["entries_dropped_by_size_cap"] > 0
    assert decode_record(storage.get(key), secret=secret, dkey=key) == storage.get_record(key)
    # a storage with the secret refuses untagged or forged entries, and counts them
    assert not storage.store_blob(digest("k"), encode_record({"x": (1, now + 60)}))
    assert storage.stats["unauthenticated_entries"] == 1 and storage.stats["rejected_stores"] == 1
    assert storage.store_blob(digest("k"), encode_record(sign_record(secret, digest("k"), {"x": (1, now + 60)})))
    assert strip_tags(storage.get_record(digest("k"))) == {"x": (1, now + 60)}


def test_private_swarm_sees_its_experts_and_ignores_strangers():
    with swarm(2, secret="swarm secret") as (a, b), \
            DHT(initial_peers=[a.address], **FAST) as stranger, \
            DHT(initial_peers=[b.address], secret="another secret", **FAST) as impostor, \
            DHT(initial_peers=[a.address], client_mode=True, secret=b"swarm secret", **FAST) as trainer:
        assert a.is_private and trainer.is_private and not stranger.is_private
        now = time.time()
        assert a.declare_experts(["ffn.0.0", "ffn.0.1"], "127.0.0.1:7000", now + 60)
        assert b.declare_experts(["ffn.1.0"], "127.0.0.1:7001", now + 60)
        assert b.store("plain", "mine", 1, now + 60)
        # the stranger and the impostor write under the same keys, with later expirations
        stranger.declare_experts(["ffn.0.0", "ffn.2.0"], "127.0.0.1:6666", now + 250)
        impostor.declare_experts(["ffn.0.1", "ffn.3.3"], "127.0.0.1:6667", now + 250)
        stranger.store("plain", "mine", 2, now + 250)
        stranger.store("plain", "theirs", 3, now + 250)
        for reader in (a, b, trainer):
            assert reader.get_experts(["ffn.0.0", "ffn.0.1", "ffn.1.0", "ffn.2.0", "ffn.3.3"]) == \
                ["127.0.0.1:7000", "127.0.0.1:7000", "127.0.0.1:7001", None, None]
            assert reader.get_active_children(["ffn", "ffn.0", "ffn.2", "ffn.3"], all_endpoints=True) == {
                "ffn": {0: ["127.0.0.1:7000"], 1: ["127.0.0.1:7001"]},
                "ffn.0": {0: ["127.0.0.1:7000"], 1: ["127.0.0.1:7000"]}, "ffn.2": {}, "ffn.3": {}}
            assert reader.get("plain") == {"mine": (1, now + 60)}
        # storage nodes with the secret refused the strangers' entries; the stranger's own storage
        # kept them, and the trainer, reading it, skipped them: both counted
        assert a.stats["unauthenticated_entries"] > 0 and b.stats["unauthenticated_entries"] > 0
        assert trainer.stats["unauthenticated_entries"] > 0
        # the stranger ignores tags: it sees everyone (one format for all)
        assert stranger.get_experts(["ffn.0.0"], all_endpoints=True) == [["127.0.0.1:6666", "127.0.0.1:7000"]]


def test_secret_from_the_environment_variable(monkeypatch):
    monkeypatch.setenv(auth.SECRET_ENV, "from the environment")
    with DHT(**FAST) as a, DHT(initial_peers=[a.address], client_mode=True, **FAST) as reader, \
            DHT(initial_peers=[a.address], secret="from the environment", **FAST) as explicit:
        assert a.is_private and reader.is_private
        now = time.time()
        assert a.declare_experts(["ffn.0"], "127.0.0.1:7000", now + 60)
        assert explicit.declare_experts(["ffn.1"], "127.0.0.1:7001", now + 60)
        monkeypatch.delenv(auth.SECRET_ENV)
        with DHT(initial_peers=[a.address], **FAST) as outsider:
            assert not outsider.is_private
            outsider.declare_experts(["ffn.0", "ffn.2"], "127.0.0.1:6666", now + 250)
            assert reader.get_active_children(["ffn"], all_endpoints=True) == \
                {"ffn": {0: ["127.0.0.1:7000"], 1: ["127.0.0.1:7001"]}}
            assert reader.get_experts(["ffn.0", "ffn.2"]) == ["127.0.0.1:7000", None]
            assert reader.stats["unauthenticated_entries"] + a.stats["unauthenticated_entries"] > 0
    monkeypatch.setenv(auth.SECRET_ENV, "")  # set but empty: a public node
    with DHT(**FAST) as public:
        assert not public.is_private
    with pytest.raises(ValueError):
        DHT(secret="", **FAST)


def test_a_stranger_cannot_hide_or_redirect_a_hosts_declarations():
    with swarm(2) as (honest, other), DHT(initial_peers=[honest.address], **FAST) as stranger, \
            DHT(initial_peers=[other.address], client_mode=True, **FAST) as reader:
        now, far = time.time(), time.time() + 250  # as far ahead as MAX_TTL allows
        host = "127.0.0.1:7000"
        assert honest.declare_experts([f"ffn.0.{j}" for j in range(4)], host, now + 60)
        # same sub-keys as the host's, other values, later expirations; and a flood of one child
        stranger.store_many([(prefix_key("ffn"), f"0@{host}", 12345, far), (prefix_key("ffn"), "0", "127.0.0.1:6666", far),
                             (prefix_key("ffn.0"), f"1@{host}", "127.0.0.1:6666", far)])
        stranger.store_many([(prefix_key("ffn.0"), f"3@127.0.0.1:{1000 + i}", None, far) for i in range(300)])
        stranger.declare_experts(["ffn.0.2"], "127.0.0.1:6666", far)
        assert reader.get_experts(["ffn.0.0", "ffn.0.1", "ffn.0.2"], all_endpoints=True) == \
            [[host], [host], ["127.0.0.1:6666", host]]
        children = reader.get_active_children(["ffn", "ffn.0"], all_endpoints=True)
        assert list(children["ffn"]) == [0] and sorted(children["ffn"][0]) == ["127.0.0.1:6666", host]
        assert [children["ffn.0"][c] for c in range(3)] == [[host], [host], ["127.0.0.1:6666", host]]
        # the flood fills child 3 up to the record's size cap, but the cap evicts from the address
        # holding the most bytes: the stranger's own entries go, the host's stays
        assert len(children["ffn.0"][3]) > 10 and host in children["ffn.0"][3]
        assert reader.get_active_children(["ffn.0"])["ffn.0"][1] == host
        assert reader.stats["invalid_prefix_entries"] > 0
