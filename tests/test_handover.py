"""Replicas and state handover: a joiner takes the cells with the fewest live replicas and adopts a busy cell's state
(weights and optimizer state) from a live replica before it declares the cell; malformed or oversized states are
refused with the reason."""

from __future__ import annotations

import functools
import logging
import socket
import time

import pytest
import requests
import torch

from lightning_moe import wire
from lightning_moe.config import DHTConfig, HostConfig
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert
from lightning_moe.server.handover import HandoverError, decode_state, encode_state, fetch_state
from lightning_moe.swarm_view import format_survey, survey
from lightning_moe.volunteer import start_volunteer

HID = 8
WAIT = 30.0


def backend(hid: int = HID, seed: int = 0, uid: str = "ffn.0.0") -> ExpertBackend:
    torch.manual_seed(seed)
    expert = make_expert("ffn", hid)
    return ExpertBackend(uid, expert, torch.optim.Adam(expert.parameters(), lr=1e-2), args_schema=[((hid,), torch.float32)])


def trained(b: ExpertBackend, steps: int = 3) -> ExpertBackend:
    hid = b.args_schema[0][0][0]
    for _ in range(steps):
        b.backward(torch.randn(4, hid), torch.randn(4, hid))
    return b


def test_a_state_round_trips_and_a_malformed_one_is_refused_naming_why():
    source, target = trained(backend(seed=0)), backend(seed=1)
    state = decode_state(wire.deserialize(wire.serialize(encode_state(source.state_dict()))), target)
    target.load_state_dict(state)
    for (name, mine), theirs in zip(target.expert.state_dict().items(), source.expert.state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert target.counters()["update_count"] == source.counters()["update_count"] == 3
    moments = target.optimizer.state_dict()["state"]
    assert moments and all(torch.equal(v, source.optimizer.state_dict()["state"][i][k])
                           for i, values in moments.items() for k, v in values.items())
    assert target.optimizer.param_groups[0]["lr"] == 1e-2  # the receiver's hyperparameters

    tensors = encode_state(source.state_dict())
    with pytest.raises(ValueError, match=r"does not fit|where this host's expert has"):
        decode_state(tensors, backend(hid=2 * HID))  # another expert's shapes
    with pytest.raises(ValueError, match="manifest is not JSON"):
        decode_state([torch.frombuffer(bytearray(b"{not json"), dtype=torch.uint8), *tensors[1:]], target)
    with pytest.raises(ValueError, match="buffers do not match"):
        decode_state(tensors[:1], target)
    with pytest.raises(ValueError, match="outside its buffer"):
        decode_state([tensors[0], tensors[1][:3]], target)
    with pytest.raises(ValueError, match="no manifest"):
        decode_state([torch.zeros(3)], target)


def test_a_host_serves_its_state_and_a_smaller_expert_refuses_it_as_too_large():
    source, big = trained(backend()), trained(backend(hid=512, uid="ffn.0.1"), steps=1)  # 24 MB with Adam's moments
    with ExpertHost([source, big], HostConfig()) as host:
        missing = requests.get(f"http://{host.endpoint}/state/ffn.9.9", timeout=WAIT)
        assert missing.status_code == 404 and "no expert" in missing.json()["error"]
        state = fetch_state(host.endpoint, "ffn.0.0", backend(seed=3), None, WAIT)
        assert all(torch.equal(t, source.expert.state_dict()[name]) for name, t in state["expert"].items())
        with pytest.raises(HandoverError, match=r"ffn.0.0 at .*where this host's expert has"):
            fetch_state(host.endpoint, "ffn.0.0", backend(hid=2 * HID), None, WAIT)
        with pytest.raises(HandoverError, match=r"ffn.0.1 at .*exceeds the limit"):
            fetch_state(host.endpoint, "ffn.0.1", backend(uid="ffn.0.1"), None, WAIT)  # read no further than fits
        assert requests.get(f"http://{host.endpoint}/info", timeout=WAIT).status_code == 200  # still serving


def host_config(**kwargs) -> HostConfig:
    defaults = dict(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
                    in_features=HID, grid_size=[1, 2], cells=2, update_period=2.0, stats_every=0)
    return HostConfig(**{**defaults, **kwargs})


def test_a_joiner_adopts_the_replicas_state_before_declaring_and_the_swarm_shows_replicas(caplog):
    caplog.set_level(logging.INFO, logger="lightning_moe")
    with start_volunteer(host_config(seed=0), DHTConfig()) as first:
        for b in first.host.backends.values():
            trained(b)
        peers = [first.dht.address]
        with start_volunteer(host_config(seed=1, cells=1), DHTConfig(initial_peers=peers)) as second:
            (uid,) = second.host.backends
            theirs, mine = first.host.backends[uid], second.host.backends[uid]
            for name, tensor in mine.expert.state_dict().items():
                assert torch.equal(tensor, theirs.expert.state_dict()[name]), name
            assert mine.counters()["update_count"] == 3
            assert f"{uid}: adopted the state of its replica at {first.endpoint}" in caplog.text
            views, hosts = survey(second.dht, [("ffn", (1, 2))], timeout=10.0)
            table = format_survey(views, hosts)
            assert f"{uid}:2" in table and "replicas:" in table, table


def test_with_one_replica_wanted_a_busy_cell_starts_fresh(caplog):
    with start_volunteer(host_config(seed=0), DHTConfig()) as first:
        for b in first.host.backends.values():
            trained(b)
        with start_volunteer(host_config(seed=1, cells=1, replicas=1), DHTConfig(initial_peers=[first.dht.address])) as second:
            (uid,) = second.host.backends
            assert second.host.backends[uid].counters()["update_count"] == 0  # r=1: as before, no handover
            assert not any(torch.equal(t, first.host.backends[uid].expert.state_dict()[name])
                           for name, t in second.host.backends[uid].expert.state_dict().items() if t.dim() > 1)


def test_a_cell_whose_replicas_do_not_answer_starts_fresh_and_the_log_says_why(caplog):
    caplog.set_level(logging.INFO, logger="lightning_moe")
    with socket.socket() as closed:  # a port where nobody listens
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    with start_volunteer(host_config(cells=["ffn.0.1"]), DHTConfig()) as first:
        assert first.dht.declare_experts(["ffn.0.0"], dead, time.time() + 60)
        with start_volunteer(host_config(seed=2, cells=2), DHTConfig(initial_peers=[first.dht.address])) as joiner:
            assert sorted(joiner.host.backends) == ["ffn.0.0", "ffn.0.1"]
            assert f"ffn.0.1: adopted the state of its replica at {first.endpoint}" in caplog.text
    assert f"ffn.0.0: no replica handed over its state, starting from fresh weights: ffn.0.0 at {dead}: no state" in caplog.text


def test_in_a_private_swarm_only_a_signed_request_gets_the_state():
    source = trained(backend())
    with ExpertHost([source], HostConfig(), secret=b"swarm secret") as host:
        unsigned = requests.get(f"http://{host.endpoint}/state/ffn.0.0", timeout=WAIT)
        assert unsigned.status_code == 401, unsigned.text
        state = fetch_state(host.endpoint, "ffn.0.0", backend(seed=3), b"swarm secret", WAIT)
        assert all(torch.equal(t, source.expert.state_dict()[name]) for name, t in state["expert"].items())
        with pytest.raises(HandoverError, match="HTTP 401"):
            fetch_state(host.endpoint, "ffn.0.0", backend(seed=3), b"another secret", WAIT)
