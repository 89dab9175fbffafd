"""Beam search against brute force over the live experts, with a fake and with a real DHT."""
import itertools
import random
import time

import pytest
import torch

from lightning_moe.client.beam_search import beam_search, live_experts
from lightning_moe.dht import DHT, parse_uid


class FakeDHT:
    """Answers ``get_active_children`` from a set of live uids, like the real records do."""

    wait_timeout = 5.0

    def __init__(self, live_uids):
        self.live = {uid: f"127.0.0.1:{7000 + i}" for i, uid in enumerate(sorted(live_uids))}
        self.calls = []

    def get_active_children(self, prefixes, timeout=None):
        self.calls.append(list(prefixes))
        assert timeout is not None and timeout >= 0
        children = {p: {} for p in prefixes}
        for uid, endpoint in self.live.items():
            name, coords = parse_uid(uid)
            for depth, coord in enumerate(coords):
                parent = ".".join([name, *map(str, coords[:depth])])
                if parent in children:
                    children[parent].setdefault(coord, endpoint if depth == len(coords) - 1 else "127.0.0.1:1")
        return children


def brute_force(live_uids, grid_scores, k_best):
    results = []
    for b in range(grid_scores[0].shape[0]):
        scored = []
        for uid in live_uids:
            _, coords = parse_uid(uid)
            score = sum(float(s[b, c].detach().double()) for s, c in zip(grid_scores, coords))
            scored.append((score, uid))
        results.append([uid for _, uid in sorted(scored, reverse=True)[:k_best]])
    return results


def make_grid(sizes, dead_fraction, rng):
    uids = ["ffn." + ".".join(map(str, c)) for c in itertools.product(*map(range, sizes))]
    return [u for u in uids if rng.random() >= dead_fraction]


@pytest.mark.parametrize("sizes", [(8,), (6, 5), (4, 3, 5)])
def test_exact_with_a_wide_beam_and_dead_cells(sizes):
    rng = random.Random(sum(sizes))
    live = make_grid(sizes, 0.4, rng)
    scores = [torch.randn(16, n, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(sizes)]
    dht = FakeDHT(live)
    got = beam_search(dht, "ffn", scores, k_best=4, beam_size=max(len(live), 1))
    assert got == brute_force(live, scores, 4)
    assert len(dht.calls) == len(sizes)  # one batched lookup per grid dimension


def test_default_beam_is_exact_on_a_full_grid_and_sound_with_dead_cells():
    rng = random.Random(0)
    scores = [torch.randn(32, 8), torch.randn(32, 8)]
    full = make_grid((8, 8), 0.0, rng)
    assert beam_search(FakeDHT(full), "ffn", scores, k_best=4) == brute_force(full, scores, 4)

    live = make_grid((8, 8), 0.5, rng)
    got = beam_search(FakeDHT(live), "ffn", scores, k_best=4)
    for b, row in enumerate(got):  # approximate, but only live experts, best first, no repeats
        assert len(row) == 4 and len(set(row)) == 4 and set(row) <= set(live)
        row_scores = [sum(float(s[b, c]) for s, c in zip(scores, parse_uid(u)[1])) for u in row]
        assert row_scores == sorted(row_scores, reverse=True)


def test_fewer_live_experts_than_k_and_empty_grid():
    scores = [torch.randn(3, 4), torch.randn(3, 4)]
    live = ["ffn.1.2", "ffn.3.0"]
    got = beam_search(FakeDHT(live), "ffn", scores, k_best=4)
    assert got == brute_force(live, scores, 4) and all(len(row) == 2 for row in got)
    assert beam_search(FakeDHT([]), "ffn", scores, k_best=2) == [[], [], []]


def test_returns_endpoints_and_ignores_out_of_grid_children():
    live = ["ffn.0.0", "ffn.1.1", "ffn.9.9", "ffn.1.7"]  # 9 and 7 lie outside a 4x4 grid
    dht = FakeDHT(live)
    scores = [torch.randn(2, 4), torch.randn(2, 4)]
    got = beam_search(dht, "ffn", scores, k_best=3, return_endpoints=True)
    for row in got:
        assert sorted(uid for uid, _ in row) == ["ffn.0.0", "ffn.1.1"]
        assert all(endpoint == dht.live[uid] for uid, endpoint in row)


def test_bad_arguments():
    dht = FakeDHT(["ffn.0.0"])
    with pytest.raises(ValueError):
        beam_search(dht, "bad prefix", [torch.randn(2, 2)], k_best=1)
    with pytest.raises(ValueError):
        beam_search(dht, "ffn", [torch.randn(2, 2), torch.randn(3, 2)], k_best=1)
    with pytest.raises(ValueError):
        beam_search(dht, "ffn", [], k_best=1)


def test_with_real_dht_nodes():
    rng = random.Random(5)
    live = [u for u in make_grid((5, 6), 0.3, rng) if u != "ffn.0.0"]
    with DHT(rpc_timeout=0.3) as host, DHT(initial_peers=[host.address], client_mode=True, rpc_timeout=0.3) as trainer:
        assert host.declare_experts(live, "127.0.0.1:7000", time.time() + 60)
        assert host.declare_experts(["ffn.0.0"], "127.0.0.1:7001", time.time() + 1.0)  # expires during the test
        scores = [torch.randn(64, 5, requires_grad=True), torch.randn(64, 6)]
        time.sleep(1.1)
        got = beam_search(trainer, "ffn", scores, k_best=4, beam_size=30, timeout=10)
        assert got == brute_force(live, scores, 4)
        got_default = beam_search(trainer, "ffn", scores, k_best=4, return_endpoints=True)
        assert all(set(uid for uid, _ in row) <= set(live) and len(row) == 4 for row in got_default)
        assert all(endpoint == "127.0.0.1:7000" for row in got_default for _, endpoint in row)


@pytest.mark.parametrize("sizes", [(8,), (6, 5), (4, 3, 5)])
def test_live_experts_walks_the_grid_without_scores(sizes):
    live = make_grid(sizes, 0.4, random.Random(sum(sizes) + 1))
    dht = FakeDHT(live)
    found = live_experts(dht, "ffn", len(sizes))
    assert [uid for uid, _ in found] == live  # every live expert, in grid order (the FakeDHT's uids are sorted)
    assert all(endpoint == dht.live[uid] for uid, endpoint in found)
    assert len(dht.calls) == len(sizes)  # one batched lookup per grid dimension
    assert live_experts(FakeDHT([]), "ffn", len(sizes)) == []


def test_live_experts_follows_at_most_max_prefixes_per_dimension():
    live = make_grid((4, 3, 5), 0.0, random.Random(0))
    dht = FakeDHT(live)
    found = live_experts(dht, "ffn", 3, max_prefixes=2)
    assert dht.calls == [["ffn"], ["ffn.0", "ffn.1"], ["ffn.0.0", "ffn.0.1"]]
    assert [uid for uid, _ in found] == [f"ffn.0.{i}.{j}" for i in range(2) for j in range(5)]
    with pytest.raises(ValueError):
        live_experts(dht, "bad prefix", 2)
