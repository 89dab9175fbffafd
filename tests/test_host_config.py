"""One HostConfig, taken whole: its nested limits from yaml and Python, and every key reaching the host whichever
way it starts (`lightning-moe host`, LocalSwarm, ExpertHostCallback, start_volunteer)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import requests
import torch
from hydra import compose, initialize_config_module

from lightning_moe import ExpertHostCallback
from lightning_moe.config import ConfigError, DHTConfig, HostConfig, HostLimits, LocalSwarmConfig, to_dataclass
from lightning_moe.server.experts import make_expert
from lightning_moe.shared import shutdown_process_dht
from lightning_moe.swarm import LocalSwarm
from lightning_moe.volunteer import start_volunteer

HID = 8
WAIT = 30.0
LIMITS = HostLimits(max_connections=100, max_body_mb=1.0, max_rows_factor=2, request_timeout=7.0, body_timeout=5.0,
                    idle_timeout=4.0, max_header_bytes=4096, max_inflight_mb=3.0, max_connections_per_address=9)


def host_config(**kwargs) -> HostConfig:
    defaults = dict(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                    in_features=HID, grid_size=[2, 2], cells=2, update_period=2.0, stats_every=0, limits=LIMITS)
    return HostConfig(**{**defaults, **kwargs})


def other_thread_count() -> int:
    """A torch thread count that differs from this process's now."""
    return 1 if torch.get_num_threads() != 1 else 2


def assert_serves_with_limits(endpoint: str) -> None:
    """What /info shows of LIMITS: the body limit and the rows per request."""
    info = requests.get(f"http://{endpoint}/info", timeout=WAIT).json()
    assert info["max_body_bytes"] == 2**20
    assert info["experts"] and all(e["max_rows_per_request"] == 2 * e["max_batch_size"] for e in info["experts"].values())


def test_limits_compose_from_yaml_with_nested_overrides():
    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        cfg = compose("config", overrides=["host.limits.max_body_mb=16", "host.limits.request_timeout=null"])
    limits = to_dataclass(cfg.host, HostConfig).limits
    assert isinstance(limits, HostLimits) and limits.max_body_mb == 16.0 and limits.request_timeout is None
    assert limits.max_body_bytes == 16 * 2**20 and limits.max_inflight_bytes == 4 * 16 * 2**20  # null: 4 x the body
    assert limits.max_connections == HostLimits().max_connections  # the yaml's defaults are the dataclass's
    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        defaults = compose("config").host.limits
    assert to_dataclass(defaults, HostLimits) == HostLimits()


def test_limits_from_python_mappings_are_checked_by_name():
    assert host_config(limits={"max_body_mb": 2.0}).limits == HostLimits(max_body_mb=2.0)
    with pytest.raises(ConfigError, match="max_body_m'"):
        host_config(limits={"max_body_m": 2.0})
    for key, value in [("max_connections", 0), ("idle_timeout", 0.0), ("request_timeout", -1.0), ("max_inflight_mb", 0.0),
                       ("max_header_bytes", 0), ("body_timeout", 0.0)]:
        with pytest.raises(ConfigError, match=re.escape(f"host.limits.{key}")):
            HostLimits(**{key: value})


def test_start_volunteer_gives_the_host_every_serving_key_and_the_process_its_threads():
    before, wanted = torch.get_num_threads(), other_thread_count()
    config = host_config(num_threads=wanted, compression="float16", kept_forwards_mb=1.0, update_period=3.0)
    with start_volunteer(config, DHTConfig()) as volunteer:
        host = volunteer.host
        assert torch.get_num_threads() == wanted
        assert host.server.limits == LIMITS and host.server.compression == "float16"
        assert host.kept.budget_bytes == 2**20 and host.config.update_period == 3.0
        assert host.host == "127.0.0.1" and host.config.host == "127.0.0.1"  # null resolved for loopback peers
        assert_serves_with_limits(volunteer.endpoint)
    assert torch.get_num_threads() == before


class RecordingModel(pl.LightningModule):
    """Records its process's torch threads while training; checks its volunteer's /info at the first step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(HID, 1)
        self.threads: list[int] = []

    def training_step(self, batch, batch_idx):
        self.threads.append(torch.get_num_threads())
        if batch_idx == 0:
            callback = next(c for c in self.trainer.callbacks if isinstance(c, ExpertHostCallback))
            assert_serves_with_limits(callback.volunteer.endpoint)
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_sets_the_trainer_threads_and_serves_with_the_limits(tmp_path):
    before, wanted = torch.get_num_threads(), other_thread_count()
    model = RecordingModel()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, HID)), batch_size=4)
    trainer = pl.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[ExpertHostCallback(host_config(num_threads=wanted))])
    try:
        trainer.fit(model, data)
    finally:
        shutdown_process_dht()
    assert model.threads == [wanted, wanted]  # the process's torch threads while it hosts
    assert torch.get_num_threads() == before  # given back at teardown


@pytest.mark.slow
def test_local_swarm_hosts_serve_with_the_limits():
    swarm = LocalSwarm(host_config(), LocalSwarmConfig(num_hosts=1, num_threads=1, update_period=2.0)).start()
    try:
        assert_serves_with_limits(swarm.endpoints[0])
    finally:
        swarm.shutdown()


@pytest.mark.slow
def test_cli_host_serves_with_nested_limit_overrides(tmp_path):
    command = [sys.executable, "-m", "lightning_moe.cli", "host", "model.hid_dim=16", "host.cells=1", "host.num_threads=1",
               "host.limits.max_body_mb=1", "host.limits.max_rows_factor=2", "hydra.run.dir=run"]
    host = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, seen, endpoint = time.monotonic() + 120, [], None
        while endpoint is None and time.monotonic() < deadline:
            line = host.stdout.readline()
            if not line and host.poll() is not None:
                break
            seen.append(line)
            if match := re.search(r"serving 1 experts \(.*\) at (\S+)", line):
                endpoint = match.group(1)
        assert endpoint is not None, "".join(seen)[-3000:]
        assert_serves_with_limits(endpoint)
        host.terminate()
        assert host.wait(timeout=60) == 0
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(timeout=10)
