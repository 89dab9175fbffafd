"""Averaging resists liars (issue #21, part 4): a replica or an averaging peer that sends sign-flipped, scaled,
random or stale parameters moves an honest peer at most centered clipping's bound, where the plain mean moves it far;
honest peers still agree.

Real volunteers (HTTP servers, DHT nodes) and real averaging peers (Averager servers). The gross lies would be refused
outright by ``replica_max_distance`` / ``max_distance`` (0.5); the tests raise it so that the lies reach the aggregate,
which is what a lie just within the distance check does. Bound: with no training since the last averaging, a peer's
pull is clipped to ``clip_min`` of our norm, and a pair's mean moves us half of it."""

from __future__ import annotations

import contextlib
import functools
import time

import pytest
import requests
import torch

from lightning_moe.averaging import Averager, Layout, state
from lightning_moe.averaging.robust import ClipRadius, centered_clip, norm
from lightning_moe.config import AveragingConfig, ConfigError, DHTConfig, HostConfig
from lightning_moe.dht import DHT
from lightning_moe.net.http_client import signed
from lightning_moe.server import make_expert
from lightning_moe.volunteer import start_volunteer

HID = 8
UID = "ffn.0.0"
CLIP_MIN = HostConfig.replica_clip_min
FAST_DHT = {"rpc_timeout": 0.5, "wait_timeout": 3.0}


def host_config(**kwargs) -> HostConfig:
    defaults = dict(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
                    in_features=HID, grid_size=[1, 1], cells=1, replicas=2, update_period=2.0, stats_every=0,
                    replica_average_period=3600.0, replica_max_distance=1e3)
    return HostConfig(**{**defaults, **kwargs})


def params(volunteer) -> list[torch.Tensor]:
    backend = volunteer.host.backends[UID]
    with backend.lock:
        return state.snapshot(backend.expert, Layout.of(backend.expert))


def distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return norm([x - y for x, y in zip(a, b)])


def train(volunteer, seed: int, steps: int = 2) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        volunteer.host.backends[UID].backward(torch.randn(16, HID, generator=generator), torch.randn(16, HID, generator=generator))


@contextlib.contextmanager
def honest_and_liar(mode: str, **kwargs):
    """Two volunteers serving one cell (the second adopts the first's state, then lies in ``mode``), trained apart."""
    with start_volunteer(host_config(seed=0, **kwargs), DHTConfig()) as honest, \
            start_volunteer(host_config(seed=1, byzantine=mode, **kwargs), DHTConfig(initial_peers=[honest.dht.address])) as liar:
        start = params(honest)
        train(honest, 1)
        train(liar, 2)
        yield honest, liar, start


def bound(ours: list[torch.Tensor], start: list[torch.Tensor], peers: int = 1) -> float:
    """How far centered clipping lets ``peers`` move ``ours`` (trained from ``start`` since the last averaging)."""
    return max(CLIP_MIN * norm(ours), 2.0 * distance(ours, start)) * peers / (peers + 1)


@pytest.mark.parametrize("mode", ["sign_flip", "scale", "noise", "stale"])
def test_a_lying_replica_moves_an_honest_one_at_most_the_bound_where_the_mean_moves_it_far(mode):
    moves = {}
    for aggregate in ("mean", "centered_clip"):
        with honest_and_liar(mode, replica_aggregate=aggregate) as (honest, liar, start):
            before = params(honest)
            assert honest.host.replica_sync.sync_once() == {UID: 1}  # the liar answered with its lie
            moves[aggregate] = distance(params(honest), before)
            limit = bound(before, start)
            report = honest.host.load_report()["replica_sync"]
    assert moves["centered_clip"] <= limit * (1 + 1e-5), (moves, limit)
    assert report["cells"][UID]["radius"] == pytest.approx(2 * limit / norm(before), rel=1e-5)
    if mode == "stale":  # the weights it started with: no farther than our own training moved us, as an idle replica
        assert moves["mean"] <= limit * (1 + 1e-5), (moves, limit)
    else:
        assert report["clipped"] == 1 and moves["mean"] > 4 * limit, (moves, limit)


def test_a_lying_replica_that_starts_the_exchange_is_clipped_too():
    with honest_and_liar("sign_flip") as (honest, liar, start):
        before = params(honest)
        assert liar.host.replica_sync.sync_once() == {UID: 1}  # the honest host answered and took the lie in
        assert distance(params(honest), before) <= bound(before, start) * (1 + 1e-5)
        assert honest.host.load_report()["replica_sync"]["clipped"] == 1


def test_by_default_gross_lies_are_refused_and_honest_replicas_land_on_their_mean():
    with honest_and_liar("scale", replica_max_distance=0.5) as (honest, liar, start):
        before = params(honest)
        assert honest.host.replica_sync.sync_once() == {UID: 0}  # 10x its parameters: refused by the distance check
        assert distance(params(honest), before) == 0.0
    with honest_and_liar("none", replica_max_distance=0.5) as (first, second, start):
        mean = [(a + b) / 2 for a, b in zip(params(first), params(second))]
        assert first.host.replica_sync.sync_once() == {UID: 1}
        assert distance(params(first), mean) <= 1e-6 * norm(mean) and distance(params(second), mean) <= 1e-6 * norm(mean)
        assert first.host.load_report()["replica_sync"]["clipped"] == 0  # honest peers: exactly the mean


def test_two_honest_replicas_agree_while_a_third_lies_and_each_exchange_moves_them_a_bounded_amount():
    config = dict(replicas=3, replica_average_period=0.3)
    with start_volunteer(host_config(seed=0, **config), DHTConfig()) as first:
        peers = DHTConfig(initial_peers=[first.dht.address])
        with start_volunteer(host_config(seed=1, **config), peers) as second, \
                start_volunteer(host_config(seed=2, byzantine="sign_flip", **config), peers):
            honest = (first, second)
            origin = params(first)  # (the second adopted the first's state as it joined)
            train(first, 1, steps=4)
            train(second, 2, steps=4)
            starts = [params(v) for v in honest]
            apart = distance(starts[0], starts[1]) / norm(starts[0])
            deadline = time.monotonic() + 60
            while min(v.host.replica_sync.stats["rounds"] for v in honest) < 24 and time.monotonic() < deadline:
                time.sleep(0.1)
            rounds = [v.host.replica_sync.stats["rounds"] for v in honest]
            ends = [params(v) for v in honest]
    assert min(rounds) >= 24, rounds
    agree = distance(ends[0], ends[1]) / norm(ends[0])
    assert agree <= min(apart, CLIP_MIN), (apart, agree)
    for start, end, n in zip(starts, ends, rounds):
        # after its first averaging (whose radius is twice the training's move from origin) each averaging moves a cell
        # at most CLIP_MIN of its norm: the pulls of the liar and of the honest replica, each clipped, over 3 or 2
        first_round = 2 * distance(start, origin)
        assert distance(end, start) <= first_round + n * CLIP_MIN * max(norm(start), norm(end)) * 1.001


def test_centered_clip_is_the_mean_within_the_radius_and_bounds_each_peer_beyond_it():
    ours = [torch.zeros(4)]
    near, far = [torch.tensor([0.1, 0.0, 0.0, 0.0])], [torch.tensor([0.0, 100.0, 0.0, 0.0])]
    result, clipped = centered_clip(ours, [near], radius=1.0)
    assert clipped == 0 and torch.allclose(result[0], near[0] / 2)
    result, clipped = centered_clip(ours, [near, far], radius=1.0)
    assert clipped == 1 and torch.allclose(result[0], torch.tensor([0.1, 1.0, 0.0, 0.0]) / 3)
    radius = ClipRadius(0.1, 2.0)
    assert radius.radius([torch.ones(4)]) == pytest.approx(0.2)  # no averaging yet: the floor (0.1 x norm 2)
    radius.averaged([torch.ones(4)])
    assert radius.radius([torch.ones(4) * 2]) == pytest.approx(4.0)  # 2 x its own move since then
    with pytest.raises(ConfigError, match="host.replica_clip_min"):
        host_config(replica_clip_min=0.0)
    with pytest.raises(ConfigError, match="host.replica_aggregate"):
        host_config(replica_aggregate="clip")
    with pytest.raises(ConfigError, match="swarm_averaging.clip_factor"):
        AveragingConfig(clip_factor=-1.0)
    with pytest.raises(ConfigError, match="swarm_averaging.aggregate"):
        AveragingConfig(aggregate="median")


# ---- trainers' averaging ------------------------------------------------------------------------------------------
def tiny_module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def flat(module: torch.nn.Module) -> list[torch.Tensor]:
    return state.snapshot(module, Layout.of(module))


LIES = {"scale": lambda t: 10 * t, "noise": lambda t: t + torch.randn(t.shape) * t.pow(2).mean().sqrt(),
        "sign_flip": lambda t: -t}  # (the plain mean of a sign flip is zero: last)


@pytest.mark.parametrize("aggregate", ["mean", "centered_clip"])
def test_a_lying_averaging_peer_that_starts_exchanges_moves_a_trainer_at_most_the_bound(aggregate):
    module = tiny_module(0)
    honest = Averager(module, "liars-run", dht=None, max_distance=1e3, snapshot_wait=0.1, aggregate=aggregate)
    try:
        honest.publish(0)
        torch.manual_seed(1)
        for step, (name, lie) in enumerate(LIES.items(), start=1):
            before = flat(module)
            body = state.encode(Layout.of(module), [lie(t) for t in before], step=1)
            answer = requests.post(f"http://{honest.endpoint}/average", data=body,
                                   headers=signed(None, "POST", "/average", body), timeout=10)
            assert answer.status_code == 200, answer.text
            honest.step_boundary(step)
            moved, limit = distance(flat(module), before), bound(before, before)
            if aggregate == "centered_clip":
                assert moved <= limit * (1 + 1e-5), (name, moved, limit)
            else:
                assert moved > 4 * limit, (name, moved, limit)
        assert honest.stats["clipped"] == (len(LIES) if aggregate == "centered_clip" else 0)
    finally:
        honest.shutdown()


def test_a_trainer_that_starts_an_exchange_with_a_lying_peer_moves_at_most_the_bound():
    with DHT(**FAST_DHT) as dht:
        ours, theirs = tiny_module(0), tiny_module(0)
        with torch.no_grad():
            for p in theirs.parameters():
                p.neg_()  # a peer that answers sign-flipped parameters
        honest = Averager(ours, "flip-run", dht, client_mode=True, max_distance=1e3, timeout=5)
        liar = Averager(theirs, "flip-run", dht, max_distance=1e3, timeout=5, aggregate="mean")
        try:
            liar.publish(0)
            for _ in range(100):  # bounded: until the liar's declaration is visible
                if honest._peers():
                    break
                time.sleep(0.1)
            honest.publish(0)
            before = flat(ours)
            honest.step_boundary(1, start_round=True)
            for _ in range(400):  # bounded: until the exchange is done
                if honest.stats["rounds"]:
                    break
                time.sleep(0.05)
            assert honest.stats["rounds"] == 1 and honest.stats["clipped"] == 1
            honest.step_boundary(2)
            assert distance(flat(ours), before) <= bound(before, before) * (1 + 1e-5)
            assert distance(flat(ours), before) < 0.05 * norm(before) / 2 * 1.0001  # the plain mean: norm(before)
        finally:
            honest.shutdown()
            liar.shutdown()
