"""Training through flaky volunteers: health per expert and per host, re-routing, truthful errors, models of
many DecentralizedMoE layers sharing one DHT node and one health registry."""

import copy
import functools

import pytest
import torch

from lightning_moe import DecentralizedMoE, shared
from lightning_moe.client.health import HealthConfig, HealthRegistry
from lightning_moe.client.parallel_call import NotEnoughExpertsError
from lightning_moe.config import DHTConfig, HostConfig, LocalSwarmConfig, layer_prefixes
from lightning_moe.server.experts import make_expert
from lightning_moe.swarm import LocalSwarm
from lightning_moe.volunteer import start_volunteer

HID = 16
GRID = [4, 4]


def host_config(**kwargs) -> HostConfig:
    defaults = dict(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=0.01),
                    in_features=HID, grid_size=GRID, update_period=2.0, stats_every=0, num_threads=1)
    return HostConfig(**{**defaults, **kwargs})


def layer(prefix="ffn", **kwargs) -> DecentralizedMoE:
    return DecentralizedMoE(HID, GRID, prefix, **{"k_best": 4, "k_min": 1, "cache_ttl": 1.0, **kwargs})


# ---- the health registry itself ----------------------------------------------------------------
def test_breakers_open_by_error_rate_back_off_and_probe(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("lightning_moe.client.health.time.monotonic", lambda: clock[0])
    health = HealthRegistry(HealthConfig(window=30, min_failures=3, failure_rate=0.5, ban_time=2, max_ban_time=8))
    for _ in range(9):  # 10% failures: never excluded
        health.success("ffn.0.0", "h:1")
    health.expert_failure("ffn.0.0", "h:1", "HTTP 500")
    assert health.excluded("ffn.0.0", "h:1") is None
    for _ in range(3):
        health.expert_failure("ffn.0.1", "h:1", "HTTP 500: boom")
    exclusion = health.excluded("ffn.0.1", "h:1")
    assert exclusion is not None and "boom" in exclusion.describe() and "3 failures" in exclusion.describe()
    assert health.excluded("ffn.0.0", "h:1") is None  # one expert's errors do not ban its host
    clock[0] += 2.1
    assert health.excluded("ffn.0.1", "h:1") is None  # ban over: a probe may go
    health.expert_failure("ffn.0.1", "h:1", "HTTP 500")  # the probe fails: twice as long
    clock[0] += 2.1
    assert health.excluded("ffn.0.1", "h:1") is not None
    clock[0] += 2.0
    assert health.excluded("ffn.0.1", "h:1") is None
    health.success("ffn.0.1", "h:1")  # the probe answers: closed, backoff reset
    assert health.excluded("ffn.0.1", "h:1") is None and health.badness("ffn.0.1", "h:1") == 0.0
    health.host_failure("h:2", "refused", refused=True)  # a refused connection excludes the host at once
    assert health.excluded("ffn.3.3", "h:2") is not None and health.excluded("ffn.3.3", "h:1") is None


# ---- against real hosts --------------------------------------------------------------------------
@pytest.mark.soak  # 17 s (10-minute budget of the default run); faults per expert and host: the unit tests above
def test_ten_percent_failures_on_every_host_for_40_steps_of_a_4_layer_model():
    swarm = LocalSwarm(host_config(num_layers=4, fault_rate=0.1), LocalSwarmConfig(num_hosts=2, update_period=2.0)).start()
    layers = [layer(prefix, initial_peers=swarm.initial_peers) for prefix in layer_prefixes("ffn", 4)]
    try:
        x = torch.randn(32, HID)
        failed = 0
        for _ in range(40):
            h = x
            for moe in layers:
                h = h + moe(h)
            h.pow(2).mean().backward()
            failed += sum(moe.stats["failed"] for moe in layers)
        assert failed > 0, "no call ever failed: the fault injection did not work"
        assert len({id(moe.dht) for moe in layers}) == 1  # one DHT client for the whole model
        assert len(shared.process_dht_nodes()) == 1
    finally:
        for moe in layers:
            moe.close()
        swarm.shutdown()


def test_sample_whose_experts_all_fail_is_rerouted_to_others():
    bad_cells = [f"ffn.{i}.{j}" for i in range(2) for j in range(4)]  # rows 0-1 always fail
    good_cells = [f"ffn.{i}.{j}" for i in range(2, 4) for j in range(4)]
    with start_volunteer(host_config(cells=bad_cells, fault_rate=1.0), DHTConfig()) as bad, \
            start_volunteer(host_config(cells=good_cells), DHTConfig(initial_peers=[bad.dht.address])) as good:
        moe = layer(k_best=4, k_min=4, initial_peers=[good.dht.address], health=HealthRegistry())
        with torch.no_grad():
            moe.proj.bias[:] = torch.tensor([5.0, 5.0, 0.0, 0.0, 0, 0, 0, 0])  # every sample prefers the failing rows
        y = moe(torch.randn(8, HID))
        assert y.shape == (8, HID)
        assert moe.stats["failed"] > 0 and moe.stats["answered"] >= 4
        moe.close()


def test_failing_host_is_excluded_truthfully_and_comes_back_after_it_recovers():
    health = HealthRegistry(HealthConfig(min_failures=1, failure_rate=0.5, ban_time=0.5, max_ban_time=1.0))
    with start_volunteer(host_config(cells=4, grid_size=[2, 2], fault_rate=1.0), DHTConfig()) as volunteer:
        moe = DecentralizedMoE(HID, [2, 2], "ffn", k_best=2, k_min=1, initial_peers=[volunteer.dht.address], health=health,
                               max_retries=4)
        with pytest.raises(NotEnoughExpertsError, match="injected fault"):
            moe(torch.randn(4, HID))
        with pytest.raises(NotEnoughExpertsError) as info:  # everything is excluded now: the least bad are tried
            moe(torch.randn(4, HID))
        assert "none found alive" not in str(info.value)
        for backend in volunteer.host.backends.values():  # the volunteer recovers
            backend.before_batch = None
        import time

        time.sleep(1.1)  # bans over: the next calls are probes
        assert moe(torch.randn(4, HID)).shape == (4, HID)
        assert health.exclusions() == []
        moe.close()


def test_schemas_are_read_from_any_live_expert_without_a_beam_search(monkeypatch):
    from lightning_moe.client import dispatch

    def no_beam_search(*args, **kwargs):
        raise AssertionError("reading the schemas ran a beam search")

    dead_cells, live_cells = ["ffn.0.0", "ffn.0.1"], ["ffn.1.0", "ffn.1.1"]
    with start_volunteer(host_config(cells=dead_cells, grid_size=[2, 2]), DHTConfig()) as dead, \
            start_volunteer(host_config(cells=live_cells, grid_size=[2, 2]), DHTConfig(initial_peers=[dead.dht.address])) as live:
        dead.host.shutdown()  # its DHT records stay: its experts are found first (grid order) and refuse
        health = HealthRegistry()
        moe = DecentralizedMoE(HID, [2, 2], "ffn", k_best=2, initial_peers=[live.dht.address], health=health)
        monkeypatch.setattr(dispatch, "beam_search", no_beam_search)
        info = moe.dispatcher.expert_info(deadline=None)
        assert info["args_schema"][0]["shape"] == [HID] and info["outputs_schema"][0]["shape"] == [HID]
        assert health.excluded("ffn.0.0", dead.endpoint) is not None  # asked first, refused, excluded at once
        monkeypatch.undo()
        assert moe(torch.randn(4, HID)).shape == (4, HID)
        moe.close()


def test_excluded_experts_are_named_when_nothing_is_tried():
    health = HealthRegistry(HealthConfig(ban_time=30, max_ban_time=30))
    with start_volunteer(host_config(cells=4, grid_size=[2, 2]), DHTConfig()) as volunteer:
        moe = DecentralizedMoE(HID, [2, 2], "ffn", k_best=2, k_min=1, initial_peers=[volunteer.dht.address], health=health)
        moe(torch.randn(2, HID))
        health.host_failure(volunteer.endpoint, "refused", refused=True)
        state_message = moe.lookup.excluded_experts("ffn")
        assert len(state_message) == 4 and all("excluded until" in line for line in state_message)
        moe.close()


def test_allow_zero_outputs_when_every_host_is_gone():
    volunteer = start_volunteer(host_config(cells=4, grid_size=[2, 2]), DHTConfig())
    moe = DecentralizedMoE(HID, [2, 2], "ffn", k_best=2, k_min=1, initial_peers=[volunteer.dht.address],
                           allow_zero_outputs=True, health=HealthRegistry(), forward_timeout=10)
    strict = DecentralizedMoE(HID, [2, 2], "ffn", k_best=2, k_min=1, initial_peers=[volunteer.dht.address],
                              health=HealthRegistry(), forward_timeout=10)
    try:
        x = torch.randn(3, HID, requires_grad=True)
        assert moe(x).abs().sum() > 0
        strict(x)  # reads the schemas while the host is up
        volunteer.host.shutdown()
        y = moe(x)
        assert torch.equal(y, torch.zeros_like(y)) and moe.stats["answered"] == 0
        y.sum().backward()  # no answer, no gradient from the experts, no error
        with pytest.raises(NotEnoughExpertsError):
            strict(x)
    finally:
        moe.close()
        strict.close()
        volunteer.stop()


def test_deepcopy_and_pickle_after_a_forward():
    with start_volunteer(host_config(cells=4, grid_size=[2, 2]), DHTConfig()) as volunteer:
        moe = DecentralizedMoE(HID, [2, 2], "ffn", k_best=2, initial_peers=[volunteer.dht.address])
        out = moe(torch.randn(4, HID, requires_grad=True))
        assert moe.aux_loss is not None and moe.aux_loss.requires_grad
        clone = copy.deepcopy(moe)  # what EMA / SWA callbacks do
        assert clone.aux_loss is None and torch.equal(clone.proj.weight, moe.proj.weight)
        assert clone(torch.randn(4, HID)).shape == (4, HID)
        out.sum().backward()
        moe.close()
        clone.close()


def test_client_mode_dht_passed_in_gives_its_initial_peers():
    from lightning_moe.dht import DHT

    with DHT() as boot, DHT(initial_peers=[boot.address], client_mode=True) as client:
        moe = DecentralizedMoE(HID, [2, 2], "ffn", dht=client)
        assert moe.initial_peers == [boot.address]
