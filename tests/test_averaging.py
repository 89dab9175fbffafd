"""Swarm averaging of dense parameters: real trainer processes converge, a joiner starts from the
swarm's model, a resumed trainer continues its outer step, DDP ranks average as one trainer,
hostile peers are refused, and a peer killed mid-exchange costs one exchange."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import pytorch_lightning as pl
import requests
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_moe.averaging import Averager, Layout, run_key
from lightning_moe.averaging import state
from lightning_moe.net.http_client import signed
from lightning_moe.dht import DHT

FAST_DHT = {"rpc_timeout": 0.5, "wait_timeout": 3.0}


def tiny_module(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def regression_data(index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed task; shard ``index`` of 3 (None: the validation set)."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(8, 1, generator=generator)
    x = torch.randn(900, 8, generator=generator)
    y = 0.5 * (x @ w) + 0.05 * torch.randn(900, 1, generator=generator)
    if index is None:
        return x[600:], y[600:]
    return x[:600][index::3], y[:600][index::3]


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class Regressor(pl.LightningModule):
    """``tiny_module(seed)`` fit to the regression task; each step sleeps like a real model's (exchanges overlap it)."""

    def __init__(self, seed: int, sleep: float = 0.02):
        super().__init__()
        self.net, self.sleep = tiny_module(seed), sleep

    def training_step(self, batch, batch_idx):
        x, y = batch
        time.sleep(self.sleep)
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _trainer(index: int, peers: list[str], seed: int, max_steps: int, joiner: bool, go, results, hold) -> None:
    """One Lightning trainer with SwarmAveraging on a shard of the regression task."""
    from lightning_moe.averaging import SwarmAveraging

    torch.set_num_threads(1)

    val_x, val_y = regression_data(None)

    def val_loss(module) -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(module.net(val_x), val_y))

    class Report(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # after SwarmAveraging's (callbacks run in order)
            results.put(("start", index, val_loss(pl_module), averaging.run_step(trainer), _flat(pl_module)))

        def on_train_end(self, trainer, pl_module):  # after SwarmAveraging published its final parameters
            print(f"trainer {index}: {averaging.averager.metrics()}", flush=True)
            results.put(("keys", index, 0.0, 0, sorted(keys_logger.keys)))
            results.put(("callback_metrics", index, 0.0, 0, sorted(trainer.callback_metrics)))
            results.put(("end", index, val_loss(pl_module), trainer.global_step, _flat(pl_module)))
            hold.wait(120)  # keep answering (joiners) until the test is done

    class KeysLogger(pl.loggers.logger.Logger):
        """Remembers the metric names it was given (SwarmAveraging logs to every logger of the trainer)."""
        name, version, keys = "keys", 0, set()

        def log_metrics(self, metrics, step=None):
            self.keys.update(metrics)

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    keys_logger = KeysLogger()
    model = Regressor(seed)
    x, y = regression_data(index % 3)
    data = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True)
    # the trainers start from their own seeds, 0.7 apart: beyond the default max_distance, and centered clipping (the
    # default aggregate) would merge them by at most their own training's moves per exchange; plain averaging here
    averaging = SwarmAveraging({"run_id": "test-run", "every_n_steps": 2, "max_distance": 10.0, "timeout": 5.0,
                                "declare_ttl": 10.0, "load_state_from_peers": joiner, "adopt_step": joiner,
                                "aggregate": "mean"},
                               dht={"initial_peers": peers})
    trainer = pl.Trainer(max_steps=max_steps, callbacks=[averaging, Report()], logger=[keys_logger], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", max_epochs=-1,
                         log_every_n_steps=10)
    results.put(("fresh", index, val_loss(model), 0, _flat(model)))
    go.wait(120)
    trainer.fit(model, data)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _join(processes) -> None:
    for process in processes:
        process.join(20)
        if process.is_alive():
            process.kill()
            process.join(5)


@pytest.mark.soak  # 25 s; averaging is also tested by the DDP and killed-peer tests (10-minute budget of the default run)
def test_three_trainers_converge_and_a_joiner_starts_from_the_swarm():
    ctx = mp.get_context("spawn")
    go, hold, results = ctx.Event(), ctx.Event(), ctx.Queue()
    steps = 60
    with DHT(**FAST_DHT) as dht:
        processes = [ctx.Process(target=_trainer, args=(i, [dht.address], i, steps, False, go, results, hold), daemon=True)
                     for i in range(3)]
        try:
            for process in processes:
                process.start()
            fresh = {}
            for _ in range(3):
                _, index, _, _, params = results.get(timeout=120)
                fresh[index] = params
            go.set()
            ends, keys, callback_metrics = {}, {}, {}
            while len(ends) < 3:
                kind, index, loss, step, params = results.get(timeout=120)
                if kind == "end":
                    ends[index] = (loss, step, params)
                elif kind == "keys":
                    keys[index] = params
                elif kind == "callback_metrics":
                    callback_metrics[index] = params
            for index in range(3):  # every logger of the trainer got the averaging metrics, and so did callback_metrics
                assert {"averaging/bytes", "averaging/seconds", "averaging/rounds", "averaging/refused"} <= set(keys[index])
                assert {"averaging/rounds", "averaging/run_step"} <= set(callback_metrics[index])
            before = max(_relative(fresh[i], fresh[j]) for i in range(3) for j in range(3) if i != j)
            after = max(_relative(ends[i][2], ends[j][2]) for i in range(3) for j in range(3) if i != j)
            print(f"relative distance between trainers: {before:.3f} at the start, {after:.4f} at the end")
            assert before > 0.5  # different seeds: three different models
            assert after < 0.05 * before, (before, after)

            # a joiner with a fresh model of its own downloads the swarm's before its first step (max_steps: its own)
            joiner = ctx.Process(target=_trainer, args=(3, [dht.address], 99, 2, True, go, results, hold), daemon=True)
            processes.append(joiner)
            joiner.start()
            got = {}
            while "end" not in got:
                kind, index, loss, step, params = results.get(timeout=120)
                if index == 3:
                    got[kind] = (loss, step, params)
            swarm_loss = sum(end[0] for end in ends.values()) / 3
            fresh_loss, start = got["fresh"][0], got["start"]
            assert abs(start[0] - swarm_loss) < 0.1 * abs(fresh_loss - swarm_loss), (fresh_loss, start[0], swarm_loss)
            assert start[1] == steps  # adopt_step: its run step continues from the swarm's global step
            assert got["end"][1] == 2  # Lightning's own counters untouched: max_steps counted this trainer's steps
            assert min(_relative(start[2], end[2]) for end in ends.values()) < 1e-6  # exactly one trainer's parameters
        finally:
            hold.set()
            _join(processes)


# ---- resuming, and DDP ranks as one trainer ---------------------------------------------------------
@contextlib.contextmanager
def stepping_peer(dht: DHT, run_id: str, seed: int):
    """A peer that answers exchanges: an Averager of a Regressor whose training thread reaches a step boundary every 20 ms."""
    averager = Averager(Regressor(seed), run_id, dht, max_distance=10.0, timeout=5.0, declare_ttl=10.0)
    averager.publish(0)
    stop = threading.Event()

    def boundaries() -> None:
        for step in range(1, 6000):  # bounded: two minutes at most
            if stop.wait(0.02):
                return
            averager.step_boundary(step)

    thread = threading.Thread(target=boundaries, daemon=True)
    thread.start()
    try:
        yield averager
    finally:
        stop.set()
        thread.join(10)
        averager.shutdown()


class WaitForExchange(pl.Callback):
    """Holds rank 0 at step ``step`` until its averager finished an exchange (bounded), so a later boundary applies one."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lightning_moe.averaging import SwarmAveraging

        averager = next(c for c in trainer.callbacks if isinstance(c, SwarmAveraging)).averager
        if trainer.global_step != self.step or averager is None:
            return
        for _ in range(1200):  # at most a minute
            if averager.stats["rounds"]:
                return
            time.sleep(0.05)


def _shard_loader() -> DataLoader:
    return DataLoader(TensorDataset(*regression_data(0)), batch_size=20)


def _quiet_trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_resume_restores_the_outer_steps_state(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_moe.averaging import SwarmAveraging

    # no download from the peer: whether its declaration is found before the first step is a race
    config = {"run_id": "resume-run", "every_n_steps": 2, "outer_lr": 0.7, "outer_momentum": 0.9, "max_distance": 10.0,
              "timeout": 5.0, "declare_ttl": 10.0, "load_state_from_peers": False}
    with DHT(**FAST_DHT) as dht, stepping_peer(dht, "resume-run", seed=1):
        for _ in range(200):  # at most 10 s: the peer is declared before the trainer looks for peers at step 2
            if dht.get(run_key("resume-run")):
                break
            time.sleep(0.05)
        averaging = SwarmAveraging(config, dht={"initial_peers": [dht.address]})
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_last=True)
        trainer = _quiet_trainer(max_steps=8, default_root_dir=tmp_path, callbacks=[averaging, WaitForExchange(4), checkpoint])
        trainer.fit(Regressor(0, sleep=0.0), _shard_loader())
        saved = torch.load(checkpoint.last_model_path, weights_only=False)["callbacks"][averaging.state_key]  # our own file
        assert saved["anchor"] is not None and saved["momentum_buffer"] is not None, "no outer step before the checkpoint"
        assert saved["stats"]["rounds"] >= 1 and saved["step_offset"] == 0

        # the resumed trainer keeps its own parameters (no download): its outer step continues where it stopped
        resumed = SwarmAveraging(config, dht={"initial_peers": [dht.address]})
        restored: dict = {}

        class Probe(pl.Callback):
            def on_train_start(self, trainer, pl_module):  # after SwarmAveraging's: its averager runs
                restored.update(resumed.averager.state_dict())

        trainer = _quiet_trainer(max_steps=10, default_root_dir=tmp_path, callbacks=[resumed, Probe()])
        trainer.fit(Regressor(2, sleep=0.0), _shard_loader(), ckpt_path=checkpoint.last_model_path)
    for key in ("anchor", "momentum_buffer"):
        assert len(restored[key]) == len(saved[key]) and all(torch.equal(a, b) for a, b in zip(restored[key], saved[key]))
    assert restored["stats"] == saved["stats"]
    assert resumed.final_metrics["averaging/rounds"] >= saved["stats"]["rounds"]  # the counters went on


class ParametersAtEnd(pl.Callback):
    """Saves each rank's parameters (and its averaging counters, if it averages) after SwarmAveraging's on_train_end."""

    def __init__(self, directory: str):
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        from lightning_moe.averaging import SwarmAveraging

        averaging = next(c for c in trainer.callbacks if isinstance(c, SwarmAveraging))
        metrics = averaging.averager.metrics() if averaging.averager is not None else None
        torch.save({"params": _flat(pl_module), "metrics": metrics, "world_size": trainer.world_size},
                   os.path.join(self.directory, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
def test_ddp_ranks_average_as_one_trainer(tmp_path):
    from lightning_moe.averaging import SwarmAveraging

    config = {"run_id": "ddp-run", "every_n_steps": 2, "max_distance": 10.0, "timeout": 5.0, "declare_ttl": 10.0}
    with DHT(**FAST_DHT) as dht, stepping_peer(dht, "ddp-run", seed=1) as peer:
        averaging = SwarmAveraging(config, dht={"initial_peers": [dht.address]})
        trainer = _quiet_trainer(strategy="ddp_spawn", devices=2, max_steps=8, enable_checkpointing=False,
                                 default_root_dir=tmp_path, callbacks=[averaging, WaitForExchange(4), ParametersAtEnd(str(tmp_path))])
        trainer.fit(Regressor(0, sleep=0.0), _shard_loader())
        peer_rounds = peer.stats["rounds"]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]  # our own files
    assert ranks[0]["world_size"] == 2
    assert ranks[0]["metrics"]["averaging/rounds"] >= 1 and peer_rounds >= 1  # rank 0 exchanged with the peer
    assert ranks[1]["metrics"] is None  # rank 1 runs no averager of its own
    # DDP all-reduces gradients but never parameters: only the broadcast makes rank 1 take rank 0's exchanges
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


# ---- hostile peers, against a real averaging server -------------------------------------------------
def _post(endpoint: str, body: bytes, secret: bytes | None = None, path: str = "/average") -> requests.Response:
    headers = signed(secret, "POST", path, body)
    return requests.post(f"http://{endpoint}{path}", data=body, headers=headers, timeout=10)


def _message(module: torch.nn.Module, transform=lambda t: t) -> bytes:
    layout = Layout.of(module)
    return state.encode(layout, [transform(t) for t in state.snapshot(module, layout)], step=1)


def test_hostile_parameters_are_refused_and_leave_the_model_unchanged():
    module = tiny_module(0)
    honest = Averager(module, "hostile-run", dht=None, max_distance=0.5, snapshot_wait=0.1)
    try:
        honest.publish(0)
        before = _flat(module).clone()
        near = _message(tiny_module(0), lambda t: t + 0.001)
        nan = _message(tiny_module(0), lambda t: torch.where(torch.arange(t.numel()) == 3, torch.nan, t))
        inf = _message(tiny_module(0), lambda t: t * torch.inf)
        far = _message(tiny_module(0), lambda t: t * 100)
        other_model = state.encode(Layout.of(torch.nn.Linear(8, 2)), state.snapshot(torch.nn.Linear(8, 2), Layout.of(torch.nn.Linear(8, 2))), 1)
        renamed = near.replace(b'"0.weight"', b'"9.weight"')
        truncated = near[:-16]
        for body, expected in [(nan, "NaN or Inf"), (inf, "NaN or Inf"), (far, "relative distance"),
                               (other_model, "names differ"), (renamed, "names differ"), (truncated, "malformed"),
                               (b"\x00" * 100, "bad magic")]:
            response = _post(honest.endpoint, body)
            assert response.status_code == 400, response.text
            assert expected in response.json()["error"]
        response = _post(honest.endpoint, b"x" * (honest.max_body + 1024))
        assert response.status_code == 413
        assert honest.stats["refused"] == 8 and honest.stats["rounds"] == 0
        honest.step_boundary(1)
        assert torch.equal(_flat(module), before)
        # an honest peer still gets through
        response = _post(honest.endpoint, near)
        assert response.status_code == 200 and honest.stats["rounds"] == 1
        honest.step_boundary(2)
        assert torch.allclose(_flat(module), before + 0.0005, atol=1e-6)
    finally:
        honest.shutdown()


def test_a_far_away_peer_is_refused_and_left_out():
    with DHT(**FAST_DHT) as dht:
        ours, theirs = tiny_module(0), tiny_module(0)
        with torch.no_grad():
            for p in theirs.parameters():
                p.mul_(50)
        honest = Averager(ours, "far-run", dht, client_mode=True, max_distance=0.5, timeout=5)
        hostile = Averager(theirs, "far-run", dht, max_distance=1e9, timeout=5)
        try:
            hostile.publish(0)
            for _ in range(100):  # bounded: until the hostile peer's declaration is visible
                if honest._peers():
                    break
                time.sleep(0.1)
            before = _flat(ours).clone()
            honest.step_boundary(1, start_round=True)
            for _ in range(400):  # bounded: the round ends in refusal
                if honest.stats["refused"]:
                    break
                time.sleep(0.05)
            assert honest.stats["refused"] == 1 and hostile.endpoint in honest.banned
            honest.step_boundary(2)
            assert torch.equal(_flat(ours), before)
            assert hostile.endpoint not in honest._peers()
        finally:
            honest.shutdown()
            hostile.shutdown()


def test_garbage_and_dead_entries_under_the_run_key_cost_one_exchange_each():
    with DHT(**FAST_DHT) as dht:
        expiry = time.time() + 30
        for subkey, value in [("not an endpoint", 1), ("127.0.0.1:1", "x"), ("999.1.1.1:80", 5)]:
            dht.store("averaging:garbage-run", subkey, value, expiry)
        module = tiny_module(0)
        initiator = Averager(module, "garbage-run", dht, client_mode=True, timeout=5)
        try:
            assert initiator._peers() == ["127.0.0.1:1"]  # only a well-formed endpoint survives
            assert initiator.load_from_peers() is None  # nobody to load from: a joiner keeps its own model
            before = _flat(module).clone()
            initiator.step_boundary(1, start_round=True)
            for _ in range(200):  # bounded: the exchange with the closed port fails
                if initiator.stats["failed"]:
                    break
                time.sleep(0.05)
            assert initiator.stats["failed"] == 1 and "127.0.0.1:1" in initiator.banned
            assert initiator._peers() == []
            initiator.step_boundary(2)
            assert torch.equal(_flat(module), before)
        finally:
            initiator.shutdown()

def test_private_swarm_refuses_unsigned_wrong_and_replayed_requests_and_unsigned_answers():
    secret = b"the swarm's secret"
    module = tiny_module(0)
    private = Averager(module, "private-run", dht=None, secret=secret, snapshot_wait=0.1)
    public = Averager(tiny_module(0), "private-run", dht=None, snapshot_wait=0.1)
    try:
        private.publish(0)
        public.publish(0)
        body = _message(tiny_module(0), lambda t: t + 0.001)
        assert _post(private.endpoint, body).status_code == 401
        assert _post(private.endpoint, body, secret=b"another secret").status_code == 401
        headers = signed(secret, "POST", "/average", body)
        first = requests.post(f"http://{private.endpoint}/average", data=body, headers=headers, timeout=10)
        assert first.status_code == 200
        private.step_boundary(1)
        replay = requests.post(f"http://{private.endpoint}/average", data=body, headers=headers, timeout=10)
        assert replay.status_code == 401 and "replayed" in replay.json()["error"]
        assert private.stats["refused"] == 3 and private.stats["rounds"] == 1
        # a joiner with the secret may download; an answer without the swarm's signature is refused
        initiator = Averager(tiny_module(1), "private-run", dht=None, client_mode=True, secret=secret)
        try:
            flats, step, _ = initiator._request(private.endpoint, "GET", "/state", b"")
            assert step == 1 and torch.equal(torch.cat(flats), _flat(module))
            with pytest.raises(state.RefusedState, match="not signed"):
                initiator._request(public.endpoint, "GET", "/state", b"")
        finally:
            initiator.shutdown()
    finally:
        private.shutdown()
        public.shutdown()


# ---- a peer killed in the middle of an exchange --------------------------------------------------
def _stalling_peer(peers: list[str], events) -> None:
    """An answering peer whose trainer never reaches a step boundary: it stalls inside the exchange."""
    torch.set_num_threads(1)
    dht = DHT(initial_peers=peers, client_mode=True, **FAST_DHT)
    averager = Averager(tiny_module(0), "kill-run", dht, snapshot_wait=120, declare_ttl=30)
    averager.publish(0)
    original = averager._fresh_snapshot

    def stall():
        events.put("answering")
        return original()

    averager._fresh_snapshot = stall
    events.put(averager.endpoint)
    time.sleep(300)


def test_a_peer_killed_mid_exchange_costs_one_exchange_not_the_step():
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    with DHT(**FAST_DHT) as dht:
        peer = ctx.Process(target=_stalling_peer, args=([dht.address], events), daemon=True)
        peer.start()
        module = tiny_module(1)
        initiator = Averager(module, "kill-run", dht, client_mode=True, timeout=60, max_distance=10)
        healthy = None
        try:
            dead_endpoint = events.get(timeout=60)
            for _ in range(100):  # bounded: wait until the peer's declaration is visible
                if initiator._peers():
                    break
                time.sleep(0.1)
            before = _flat(module).clone()
            initiator.step_boundary(1, start_round=True)
            assert events.get(timeout=60) == "answering"
            os.kill(peer.pid, signal.SIGKILL)
            peer.join(10)
            step = 1
            while initiator.stats["failed"] == 0 and step < 2000:  # training goes on meanwhile
                step += 1
                assert not initiator.step_boundary(step)
                time.sleep(0.01)
            assert initiator.stats["failed"] == 1 and initiator.stats["rounds"] == 0
            assert torch.equal(_flat(module), before)
            assert dead_endpoint in initiator.banned  # left out until its DHT entry expires
            # the next round reaches a live peer (the dead one's entry may still be in the DHT)
            healthy = Averager(tiny_module(2), "kill-run", dht, max_distance=10)
            healthy.publish(0)
            for _ in range(200):
                if healthy.endpoint in initiator._peers():
                    break
                time.sleep(0.1)
            while initiator.stats["rounds"] == 0 and step < 4000:
                step += 1
                initiator.step_boundary(step, start_round=step % 20 == 0)
                time.sleep(0.01)
            assert initiator.stats["rounds"] == 1
            assert dead_endpoint != healthy.endpoint
        finally:
            if peer.is_alive():
                peer.kill()
            peer.join(5)
            initiator.shutdown()
            if healthy is not None:
                healthy.shutdown()


# ---- configuration ----------------------------------------------------------------------------------
def test_volunteers_joining_a_swarm_average_by_default_and_bad_values_name_their_key():
    import hydra
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    from lightning_moe.averaging import SwarmAveraging
    from lightning_moe.config import AveragingConfig, ConfigError
    from lightning_moe.lightning.train import averaging_callback, check_config

    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+volunteer=true", "dht.initial_peers=[127.0.0.1:31337]", "+run_id=my-run"])
        preset = compose("config", overrides=["callbacks=swarm_averaging", "dht.initial_peers=[127.0.0.1:31337]",
                                              "callbacks.swarm_averaging.config.every_n_steps=3"])
        with pytest.raises(ConfigCompositionException, match="every_n_stepz"):  # the preset extends the schema
            compose("config", overrides=["callbacks=swarm_averaging", "callbacks.swarm_averaging.config.every_n_stepz=3"])
        out_of_range = compose("config", overrides=["callbacks=[default,swarm_averaging]",
                                                    "callbacks.swarm_averaging.config.outer_momentum=1.5"])
    callback = averaging_callback(cfg)
    assert isinstance(callback, SwarmAveraging) and callback.config.run_id == "my-run"
    assert callback.config == AveragingConfig(run_id="my-run")  # the defaults live in the dataclass
    assert callback.dht_config.initial_peers == ["127.0.0.1:31337"]
    from_preset = hydra.utils.instantiate(preset.callbacks.swarm_averaging)
    assert from_preset.config == AveragingConfig(every_n_steps=3)  # run_id: "default" without +run_id
    assert from_preset.dht_config.initial_peers == ["127.0.0.1:31337"]
    with pytest.raises(ConfigError, match="swarm_averaging.outer_momentum"):  # before anything starts
        check_config(out_of_range)
    with pytest.raises(ConfigError, match="swarm_averaging.every_n_steps"):
        SwarmAveraging({"every_n_steps": 0})
    with pytest.raises(ConfigError, match="swarm_averaging.max_distance"):
        SwarmAveraging({"max_distance": -1})
    with pytest.raises(ConfigError, match="every_n_stepz"):
        SwarmAveraging({"every_n_stepz": 3})


def test_outer_step_plain_is_the_pair_mean_and_diloco_style_follows_nesterov():
    module = tiny_module(0)
    plain = Averager(module, "outer-run", dht=None, client_mode=True)
    outer = Averager(tiny_module(0), "outer-run", dht=None, client_mode=True, outer_lr=0.5, outer_momentum=0.9)
    try:
        ours = [torch.zeros(3)]
        mean = [torch.ones(3)]
        assert torch.equal(plain._outer_step(mean, ours)[0], torch.ones(3))
        outer._anchor = [torch.zeros(3)]
        # gradient g = anchor - mean = -1; buffer b = g; step = g + 0.9 b = -1.9; new = anchor - 0.5 * step = 0.95
        assert torch.allclose(outer._outer_step(mean, ours)[0], torch.full((3,), 0.95))
        assert torch.allclose(outer._anchor[0], torch.full((3,), 0.95))
        # local progress since the snapshot is kept: the delta is relative to the snapshot ours
        delta = outer._outer_step([torch.full((3,), 0.95)], [torch.full((3,), 0.95)])[0]
        # g = 0; b = 0.9 * -1 = -0.9; step = 0 + 0.9 * -0.9 = -0.81; new = 0.95 + 0.405 = 1.355
        assert torch.allclose(delta, torch.full((3,), 1.355 - 0.95))
    finally:
        plain.shutdown()
        outer.shutdown()
