"""Trainers and replicas: a cell's load spreads over its replicas by speed, a sample's backward goes to the replica
that ran its forward (which keeps its graph), and a failing replica's rows go to another replica of the same expert
before they are re-routed to another expert."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from lightning_moe import DecentralizedMoE
from lightning_moe.client.speed import HostSpeeds
from lightning_moe.config import DHTConfig, HostConfig
from lightning_moe.server import make_expert
from lightning_moe.volunteer import start_volunteer

HID = 8
GRID = [2, 4]


def host_config(**kwargs) -> HostConfig:
    defaults = dict(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=1e-2),
                    in_features=HID, grid_size=GRID, cells=8, replicas=2, update_period=2.0, stats_every=0)
    return HostConfig(**{**defaults, **kwargs})


@pytest.fixture
def two_replicas(request):
    """Two volunteers serving every cell of the grid; the second's ``host.fault_rate`` is the test's parameter."""
    with start_volunteer(host_config(seed=0), DHTConfig()) as first:
        second_config = host_config(seed=1, fault_rate=getattr(request, "param", 0.0))
        with start_volunteer(second_config, DHTConfig(initial_peers=[first.dht.address])) as second:
            assert sorted(first.host.backends) == sorted(second.host.backends) and len(first.host.backends) == 8
            yield first, second


def test_pick_weighs_replicas_by_speed_and_tries_the_unmeasured():
    speeds, rng = HostSpeeds(), random.Random(0)
    for _ in range(5):
        speeds.answered("fast:1", 0.1, 10)
        speeds.answered("slow:1", 0.4, 10)
    picks = [speeds.pick(["fast:1", "slow:1"], rng) for _ in range(2000)]
    assert 0.7 < picks.count("fast:1") / len(picks) < 0.9  # 1/0.1 : 1/0.4 = 4 : 1, with their deviations
    picks = [speeds.pick(["fast:1", "new:1"], rng) for _ in range(2000)]
    assert 0.4 < picks.count("new:1") / len(picks) < 0.6  # unmeasured weighs as the fastest: it gets measured
    assert speeds.pick(["only:1"], rng) == "only:1"


def test_a_cells_load_spreads_over_its_replicas_and_each_backward_goes_to_its_forwards_replica(two_replicas):
    first, second = two_replicas
    torch.manual_seed(0)
    layer = DecentralizedMoE(HID, GRID, "ffn", k_best=2, initial_peers=[first.dht.address], cache_ttl=1.0)
    try:
        for _ in range(8):
            x = torch.randn(32, HID)
            layer(x).sum().backward()
            stats = layer.last_stats
            assert stats.failed == 0 and stats.backward_failed == 0, stats.errors
        kept = [host.host.kept.stats() for host in (first, second)]
        assert all(k["kept"] > 0 for k in kept), kept  # both replicas served forwards
        assert all(k["misses"] == 0 for k in kept), kept  # no backward came to a replica that had not kept its forward
        assert sum(k["hits"] for k in kept) == sum(k["kept"] for k in kept), kept
    finally:
        layer.close()


@pytest.mark.parametrize("two_replicas", [1.0], indirect=True)
def test_a_failing_replicas_rows_go_to_another_replica_of_the_same_expert(two_replicas):
    first, second = two_replicas
    torch.manual_seed(0)
    layer = DecentralizedMoE(HID, GRID, "ffn", k_best=2, k_min=2, initial_peers=[first.dht.address], cache_ttl=1.0)
    dispatcher = layer.dispatcher
    failed_over = 0
    try:
        for _ in range(4):
            x = torch.randn(16, HID)
            with torch.no_grad():
                scores = [logit.detach() for logit in layer.gate(x)]
            deadline = dispatcher.begin()
            chosen = dispatcher.choose(scores, 2, deadline)
            _, mask, coords, calls = dispatcher.forward(dispatcher.host_inputs(x, deadline), chosen, scores, deadline, keep=False)
            assert bool(mask.all())
            summed = scores[0][:, :, None] + scores[1][:, None, :]  # [batch, 2, 4]: every cell is alive
            best = summed.flatten(1).topk(2, dim=1).indices
            expected = torch.stack([best // GRID[1], best % GRID[1]], dim=-1)
            assert torch.equal(coords, expected)  # the chosen experts answered: no sample was re-routed to others
            assert {call.endpoint for call in calls} == {first.endpoint}
            failed_over += dispatcher.stats.failed
        assert failed_over > 0  # the failing replica was asked (a random pick by speed) and its rows went elsewhere
    finally:
        layer.close()


@pytest.mark.soak  # 12 s of the default run's budget; examples/churn_runs.py does this at scale
def test_a_local_swarm_places_replicas_and_a_host_replacing_a_killed_one_adopts_every_cells_state():
    from lightning_moe.swarm import LocalSwarm

    with LocalSwarm(host_config(seed=0), {"num_hosts": 3, "replicas": 2, "update_period": 2.0}) as swarm:
        cells = [swarm.host_cells(i) for i in range(3)]
        assert all(sum(uid in c for c in cells) == 2 for uid in cells[0] + cells[1] + cells[2])  # each cell twice
        swarm.kill(0)
        joiner = swarm.add_host(cells[0], seed=7)
        assert sorted(swarm.adopted[joiner]) == sorted(cells[0])  # from the replicas still alive
        assert swarm.endpoints[0] not in swarm.adopted[joiner].values()


def test_a_local_swarm_starts_each_cell_on_one_host_and_its_other_replicas_after_it():
    """Replicas that started from their own seeds would be about 1.4 apart (relative L2) and never average: the hosts
    start in waves, so a later replica adopts its cell's state from the first."""
    from lightning_moe.swarm import LocalSwarm

    for hosts, replicas in ((6, 2), (3, 2), (5, 2), (6, 3), (2, 1)):
        swarm = LocalSwarm(host_config(seed=0), {"num_hosts": hosts, "replicas": replicas})
        waves, live = swarm.start_waves(), set()
        assert sorted(i for wave in waves for i in wave) == list(range(hosts))
        for wave in waves:
            fresh = [uid for i in wave for uid in swarm.host_cells(i) if uid not in live]
            assert len(fresh) == len(set(fresh)), (hosts, replicas, waves)  # no cell starts twice
            live.update(fresh)
    assert waves == [[0, 1]]  # one replica: all at once, as before
