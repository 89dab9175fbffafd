"""One expert, many replicas (issue #20, part 3): the replicas of a cell average their parameters periodically.

Real hosts (HTTP servers on ports chosen by the OS), real DHT nodes where the DHT matters; every host is shut down
by its context manager. Tolerances: after an averaging with no training in between, the replicas' parameters match
within ``TOL`` relative L2 (float32 rounding of ``ours + (mean - ours)``)."""

from __future__ import annotations

import functools
import logging
import socket
import time

import pytest
import requests
import torch

from lightning_moe.averaging import state
from lightning_moe.client.remote_expert import call_expert
from lightning_moe.config import ConfigError, DHTConfig, HostConfig
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert
from lightning_moe.server.replica_sync import aggregate
from lightning_moe.swarm_view import format_survey, survey
from lightning_moe.volunteer import start_volunteer

HID = 8
TOL = 1e-6
WAIT = 20.0


def host_config(**kwargs) -> HostConfig:
    defaults = dict(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
                    in_features=HID, grid_size=[1, 2], cells=2, update_period=2.0, stats_every=0,
                    replica_average_period=3600.0)
    return HostConfig(**{**defaults, **kwargs})


def params(backend: ExpertBackend) -> list[torch.Tensor]:
    return state.snapshot(backend.expert, state.Layout.of(backend.expert))


def drift(a: ExpertBackend, b: ExpertBackend) -> float:
    """Relative L2 distance between two copies of a cell's parameters."""
    return state.relative_distance(params(a), params(b))


def train_over_http(endpoint: str, uid: str, seed: int, steps: int = 5) -> None:
    """A trainer's backward calls to one replica (each steps its Adam)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, grad = torch.randn(16, HID, generator=generator), torch.randn(16, HID, generator=generator)
        call_expert(uid, endpoint, "backward", [x, grad], timeout=WAIT)


def test_the_aggregate_is_the_mean_and_the_robust_ones_ignore_an_outlier():
    replicas = [[torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])]]
    assert torch.equal(aggregate(replicas)[0], torch.tensor([2.0, 3.0]))
    for method in ("median", "trimmed_mean"):  # with two replicas every rule is the mean
        assert torch.equal(aggregate(replicas, method)[0], torch.tensor([2.0, 3.0]))
    five = [[torch.tensor([1.0])], [torch.tensor([1.1])], [torch.tensor([0.9])], [torch.tensor([1.0])], [torch.tensor([1e6])]]
    assert aggregate(five)[0].item() > 1e5
    assert aggregate(five, "median")[0].item() == 1.0
    assert 0.9 <= aggregate(five, "trimmed_mean")[0].item() <= 1.1
    with pytest.raises(ConfigError, match="replica_aggregate"):
        host_config(replica_aggregate="mode")


def test_two_replicas_trained_apart_drift_and_match_after_one_averaging_round(caplog):
    caplog.set_level(logging.INFO, logger="lightning_moe")
    with start_volunteer(host_config(seed=0), DHTConfig()) as first, \
            start_volunteer(host_config(seed=1), DHTConfig(initial_peers=[first.dht.address])) as second:
        uids = sorted(first.host.backends)
        assert uids == sorted(second.host.backends) == ["ffn.0.0", "ffn.0.1"]
        for uid in uids:  # trainers whose calls land on different replicas
            train_over_http(first.endpoint, uid, seed=1)
            train_over_http(second.endpoint, uid, seed=2)
        before = {uid: drift(first.host.backends[uid], second.host.backends[uid]) for uid in uids}
        assert all(d > 1e-3 for d in before.values()), before
        moments = [second.host.backends[uid].optimizer.state_dict()["state"][0]["exp_avg"].clone() for uid in uids]

        assert second.host.replica_sync.sync_once() == {"ffn.0.0": 1, "ffn.0.1": 1}

        after = {uid: drift(first.host.backends[uid], second.host.backends[uid]) for uid in uids}
        assert all(d < TOL for d in after.values()), after
        for uid in uids:  # both moved to the pair's mean
            mean = aggregate([params(first.host.backends[uid]), params(second.host.backends[uid])])
            assert state.relative_distance(params(first.host.backends[uid]), mean) < TOL
        for uid, moment in zip(uids, moments):  # the optimizer's state stays local
            assert torch.equal(second.host.backends[uid].optimizer.state_dict()["state"][0]["exp_avg"], moment)
        report = second.host.load_report()["replica_sync"]
        assert report["initiated"] == 2 and report["bytes"] > 0
        assert report["cells"]["ffn.0.0"]["distance"] == pytest.approx(before["ffn.0.0"], rel=1e-6)
        assert first.host.load_report()["replica_sync"]["answered"] == 2
        assert first.host.server.requests["replica", "ffn.0.0"] == 1
        views, hosts = survey(second.dht, [("ffn", (1, 2))], timeout=10.0)  # `lightning-moe swarm`
        table = format_survey(views, hosts)
        assert "ffn.0.0:2" in table and table.count("replicas averaged") == 2, table


def test_a_joiner_adopts_the_cells_state_and_after_periodic_sync_matches_the_live_replica():
    with start_volunteer(host_config(seed=0, grid_size=[1, 1], cells=1), DHTConfig()) as live:
        (uid,) = live.host.backends
        train_over_http(live.endpoint, uid, seed=1)
        config = host_config(seed=1, grid_size=[1, 1], cells=1, replica_average_period=1.5)
        with start_volunteer(config, DHTConfig(initial_peers=[live.dht.address])) as joiner:
            assert list(joiner.host.backends) == [uid]
            assert drift(live.host.backends[uid], joiner.host.backends[uid]) == 0.0  # adopted by the handover
            train_over_http(live.endpoint, uid, seed=3)  # both replicas go on learning, apart
            train_over_http(joiner.endpoint, uid, seed=4)
            sync = joiner.host.replica_sync
            apart, rounds = drift(live.host.backends[uid], joiner.host.backends[uid]), sync.stats["rounds"]
            if rounds == 0:  # (a loaded machine may have averaged while the trainers still called)
                assert apart > 1e-3
            deadline = time.monotonic() + WAIT
            while sync.stats["rounds"] <= rounds and time.monotonic() < deadline:
                time.sleep(0.1)
            assert sync.stats["rounds"] > rounds, "no averaging round within the deadline"
            assert drift(live.host.backends[uid], joiner.host.backends[uid]) < TOL
            assert 0 <= joiner.host.load_report()["replica_sync"]["cells"][uid]["age"] < WAIT


class StubDHT:
    """The declarations of hosts that share it (no network): enough for ExpertHost and its replicas' averaging."""

    def __init__(self) -> None:
        self.endpoints: dict[str, list[str]] = {}

    def declare_experts(self, uids, endpoint, expiration_time, **kwargs) -> bool:
        for uid in uids:
            if endpoint not in self.endpoints.setdefault(uid, []):
                self.endpoints[uid].append(endpoint)
        return True

    def get_experts(self, uids, timeout=None, all_endpoints=False):
        return [list(self.endpoints.get(uid, [])) for uid in uids]


def make_backend(seed: int = 0, hid: int = HID) -> ExpertBackend:
    torch.manual_seed(seed)
    expert = make_expert("ffn", hid)
    return ExpertBackend("ffn.0.0", expert, torch.optim.Adam(expert.parameters(), lr=1e-2), args_schema=[((hid,), torch.float32)])


def message(flats: list[torch.Tensor], layout: state.Layout | None = None, b: ExpertBackend | None = None) -> bytes:
    return state.encode(layout or state.Layout.of(b.expert), flats, 0)


def test_a_malformed_oversized_or_wrong_shaped_payload_is_refused_saying_why_and_the_host_keeps_serving(caplog):
    caplog.set_level(logging.INFO, logger="lightning_moe")
    backend = make_backend()
    with ExpertHost([backend], HostConfig(replica_average_period=3600.0), dht=StubDHT()) as host:
        url = f"http://{host.endpoint}/replica/ffn.0.0"
        ours, layout = params(backend), state.Layout.of(backend.expert)
        limit = host.replica_sync.limits["ffn.0.0"]
        big = make_backend(hid=2 * HID)
        cases = [
            (b"garbage" * 10, 400, "bad magic"),
            (b"\0" * (limit + 1), 413, f"exceeds the limit of {limit}"),
            (message(params(big), b=big), 400, "differ from this model's"),
            (message([torch.full_like(f, float("nan")) for f in ours], layout), 400, "NaN or Inf"),
            (message([f * 100 for f in ours], layout), 400, "relative distance"),
        ]
        for body, status, why in cases:
            answer = requests.post(url, data=body, timeout=WAIT)
            assert answer.status_code == status and why in answer.json()["error"], (status, answer.text[:300])
        assert requests.get(url, timeout=WAIT).status_code == 405
        missing = requests.post(f"http://{host.endpoint}/replica/ffn.9.9", data=b"x", timeout=WAIT)
        assert missing.status_code == 404 and "no expert" in missing.json()["error"]
        assert all(torch.equal(a, b) for a, b in zip(params(backend), ours))  # nothing was averaged in
        assert host.replica_sync.stats["refused"] == 4  # the 413 was refused from its headers, before any decoding
        assert "refused a replica's parameters" in caplog.text
        assert requests.get(f"http://{host.endpoint}/info", timeout=WAIT).status_code == 200  # still serving
        (out,) = call_expert("ffn.0.0", host.endpoint, "forward", [torch.randn(3, HID)], timeout=WAIT)
        assert out.shape == (3, HID)


def test_asking_again_and_again_moves_a_cell_at_most_once_per_half_period():
    backend = make_backend()
    with ExpertHost([backend], HostConfig(replica_average_period=3600.0), dht=StubDHT()) as host:
        url = f"http://{host.endpoint}/replica/ffn.0.0"
        ours, layout = params(backend), state.Layout.of(backend.expert)
        pull = message([f * 1.2 for f in ours], layout)  # within replica_max_distance
        first = requests.post(url, data=pull, timeout=WAIT)
        assert first.status_code == 200
        moved = params(backend)
        for _ in range(3):
            again = requests.post(url, data=pull, timeout=WAIT)
            assert again.status_code == 503 and "at most once per 1800 s" in again.json()["error"], again.text[:300]
        assert all(torch.equal(a, b) for a, b in zip(params(backend), moved))  # one exchange moved it, no more


def test_in_a_private_swarm_replicas_average_signed_and_a_silent_replica_is_skipped_with_a_log_line(caplog):
    caplog.set_level(logging.INFO, logger="lightning_moe")
    dht = StubDHT()
    config = HostConfig(replica_average_period=3600.0, replica_average_timeout=2.0)
    with socket.socket() as closed:  # a port where nobody listens
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    with ExpertHost([make_backend(0)], config, dht=dht, secret=b"swarm") as a, \
            ExpertHost([make_backend(0)], config, dht=dht, secret=b"swarm") as b:
        unsigned = requests.post(f"http://{a.endpoint}/replica/ffn.0.0", data=b"x" * 64, timeout=WAIT)
        assert unsigned.status_code == 401, unsigned.text
        torch.manual_seed(5)
        for _ in range(3):  # both learn (an idle replica follows a busy one only as far as centered_clip lets it)
            b.backends["ffn.0.0"].backward(torch.randn(4, HID), torch.randn(4, HID))
            a.backends["ffn.0.0"].backward(torch.randn(4, HID), torch.randn(4, HID))
        assert drift(a.backends["ffn.0.0"], b.backends["ffn.0.0"]) > 1e-3
        dht.declare_experts(["ffn.0.0"], dead, 0)
        assert a.replica_sync.sync_once() == {"ffn.0.0": 1}  # b answered, the dead replica did not
        assert drift(a.backends["ffn.0.0"], b.backends["ffn.0.0"]) < TOL
        assert f"ffn.0.0: replica averaging skipped 1 of 2 replicas: {dead}: no answer" in caplog.text
        with ExpertHost([make_backend(0)], config, dht=dht, secret=b"another swarm") as stranger:
            assert stranger.replica_sync.sync_once() == {"ffn.0.0": 0}  # refused: 401 from both members
            assert "HTTP 401" in caplog.text


def test_with_one_replica_nothing_runs_and_no_averaging_traffic_flows():
    config = host_config(replicas=1, replica_average_period=0.2)
    with start_volunteer(config, DHTConfig()) as first, \
            start_volunteer(host_config(seed=1, replicas=1, replica_average_period=0.2),
                            DHTConfig(initial_peers=[first.dht.address])) as second:
        assert sorted(second.host.backends) == sorted(first.host.backends)  # the same cells, two hosts
        before = {uid: drift(first.host.backends[uid], second.host.backends[uid]) for uid in first.host.backends}
        time.sleep(1.0)  # five periods
        for volunteer in (first, second):
            assert volunteer.host.replica_sync is None
            assert "replica_sync" not in volunteer.host.load_report()
            assert not any(direction == "replica" for direction, _ in volunteer.host.server.requests)
        answer = requests.post(f"http://{first.endpoint}/replica/ffn.0.0", data=b"x", timeout=WAIT)
        assert answer.status_code == 404  # as before replicas averaged: no such path
        after = {uid: drift(first.host.backends[uid], second.host.backends[uid]) for uid in first.host.backends}
        assert after == before and all(d > 0.1 for d in after.values())  # fresh weights each, never averaged
