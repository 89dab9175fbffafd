"""The package as a user installs it: a wheel that hosts and trains, configs checked before anything
starts, errors that name their key, host checkpoints, the `swarm` command, metrics to every logger."""

import dataclasses
import functools
import importlib.util
import multiprocessing
import re
import socket
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

from lightning_moe import ExpertHostCallback, RemoteExpert
from lightning_moe.config import ConfigError, DHTConfig, HostConfig, HostLimits, LocalSwarmConfig
from lightning_moe.lightning.train import check_config, instantiate_group, train
from lightning_moe.server.experts import make_expert
from lightning_moe.shared import shutdown_process_dht
from lightning_moe.swarm import LocalSwarm
from lightning_moe.volunteer import start_volunteer

ROOT = Path(__file__).resolve().parents[1]
HID = 8


def compose_config(*overrides: str):
    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def host_config(**kwargs) -> HostConfig:
    defaults = dict(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=0.5),
                    in_features=HID, uid_prefix="ffn", grid_size=[2, 2], cells=2, update_period=2.0, stats_every=0)
    return HostConfig(**{**defaults, **kwargs})


# ---- errors before anything starts, each naming its key ----------------------------------------
def test_wrong_types_fail_at_composition_naming_the_key():
    for override, key in [("moe.k_best=abc", "moe.k_best"), ("host.port=abc", "host.port"),
                          ("local_swarm.num_hosts=x", "local_swarm.num_hosts"), ("host.prot=1", "host.prot"),
                          ("host.limits.max_body_m=1", "host.limits.max_body_m"),
                          ("host.limits.max_body_mb=lots", "host.limits.max_body_mb"),
                          ("host.max_body_mb=1", "host.max_body_mb")]:  # a limit lives under host.limits
        with pytest.raises(ConfigCompositionException) as info:
            compose_config(override)
        assert key in str(info.value) + str(info.value.__cause__), override


@pytest.mark.parametrize("override, key", [
    ("moe.k_min=9", "moe.k_min"), ("moe.compression=zip", "moe.compression"), ("host.cells=99", "host.cells"),
    ("host.cells=[ffn.9.9]", "host.cells"), ("host.port=70000", "host.port"), ("local_swarm.num_hosts=0", "local_swarm.num_hosts"),
    ("local_swarm.host_delays=[1.0,1.0,1.0]", "local_swarm.host_delays"), ("local_swarm.update_period=0", "local_swarm.update_period"),
    ("dht.initial_peers=[nowhere]", "dht.initial_peers"), ("host.compression=zip", "host.compression"),
    ("host.dtype=int8", "host.dtype"), ("+volunteer=maybe", "volunteer"),
    ("host.limits.max_body_mb=0", "host.limits.max_body_mb"), ("host.limits.request_timeout=-1", "host.limits.request_timeout"),
    ("host.replica_clip_min=0", "host.replica_clip_min"), ("host.replica_clip_factor=-1", "host.replica_clip_factor"),
    ("host.replica_aggregate=mode", "host.replica_aggregate"),
])
def test_wrong_ranges_fail_before_anything_starts_naming_the_key(override, key):
    cfg = compose_config(override, "paths.output_dir=.")
    with pytest.raises(ConfigError, match=re.escape(key)):
        train(cfg)
    assert multiprocessing.active_children() == []  # no host process was started


def test_port_in_use_names_host_port_and_dht_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"host.port={port}"):
            start_volunteer(host_config(port=port), DHTConfig())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"dht.port={port}"):
            start_volunteer(host_config(), DHTConfig(port=port))


def test_local_swarm_refuses_zero_hosts():
    with pytest.raises(ConfigError, match="local_swarm.num_hosts"):
        LocalSwarm(host_config(), {"num_hosts": 0})
    with pytest.raises(ConfigError, match="local_swarm.num_hosts"):
        LocalSwarmConfig(num_hosts=0)


@pytest.mark.parametrize("keys, key", [
    ({"num_threads": 0}, "local_swarm.num_threads"), ({"update_period": 0}, "local_swarm.update_period"),
    ({"update_period": 1000.0}, "local_swarm.update_period"), ({"start_timeout": 0}, "local_swarm.start_timeout"),
    ({"host_delays": [-1.0]}, "local_swarm.host_delays"), ({"num_hosts": 1, "host_delays": [1.0, 1.0]}, "local_swarm.host_delays"),
    ({"num_host": 2}, "num_host"), ({"host_byzantine": ["lie"]}, "local_swarm.host_byzantine"),
    ({"num_hosts": 1, "host_byzantine": ["none", "scale"]}, "local_swarm.host_byzantine"),
])
def test_local_swarm_config_names_the_wrong_key(keys, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        LocalSwarm(host_config(), keys)


def test_local_swarm_hosts_take_the_swarm_threads_and_update_period():
    swarm = LocalSwarm(host_config(num_threads=4, update_period=9.0), {"num_hosts": 1, "num_threads": 1, "update_period": 3.0})
    assert (swarm.host_config.num_threads, swarm.host_config.update_period) == (1, 3.0)
    assert swarm.config == LocalSwarmConfig(num_hosts=1, num_threads=1, update_period=3.0) and swarm.dht is None


def test_objective_metric_is_named_in_config():
    cfg = compose_config("objective=train/bpc", "objective_mode=max", "paths.output_dir=.")
    checkpoint = next(c for c in instantiate_group(cfg, "callbacks") if isinstance(c, pl.callbacks.ModelCheckpoint))
    assert checkpoint.monitor == "train/bpc" and checkpoint.mode == "max"
    check_config(cfg)


def test_logger_presets_instantiate_or_name_the_missing_package(tmp_path):
    cfg = compose_config("logger=[csv,tensorboard]", f"paths.output_dir={tmp_path}")
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        with pytest.raises(ConfigError, match="logger.tensorboard.*pip install"):
            instantiate_group(cfg, "logger")
    else:
        assert len(instantiate_group(cfg, "logger")) == 2
    cfg = compose_config(f"paths.output_dir={tmp_path}")
    (csv,) = instantiate_group(cfg, "logger")
    assert isinstance(csv, pl.loggers.CSVLogger) and Path(csv.save_dir) == tmp_path


# ---- host checkpoints ---------------------------------------------------------------------------
def test_host_checkpoint_dir_saves_and_restores_the_experts(tmp_path, caplog):
    config = host_config(checkpoint_dir=str(tmp_path), cells=["ffn.0.1", "ffn.1.0"])
    with start_volunteer(config, DHTConfig()) as volunteer:
        expert = RemoteExpert("ffn.0.1", volunteer.endpoint)
        x = torch.randn(4, HID, requires_grad=True)
        expert(x).sum().backward()  # one SGD step on the host
        trained = {uid: volunteer.host.state_dict()[uid]["expert"] for uid in volunteer.hosted_uids}
    assert (tmp_path / "experts.pt").exists()
    caplog.set_level("INFO", logger="lightning_moe.volunteer")
    with start_volunteer(host_config(checkpoint_dir=str(tmp_path), seed=123), DHTConfig()) as volunteer:
        assert volunteer.restored == 2 and volunteer.hosted_uids == ["ffn.0.1", "ffn.1.0"]
        state = volunteer.host.state_dict()
        assert all(torch.equal(state[uid]["expert"][k], trained[uid][k]) for uid in trained for k in trained[uid])
    assert "restored 2 experts from checkpoint" in caplog.text


def test_volunteer_logs_cells_and_stats_line(caplog):
    caplog.set_level("INFO", logger="lightning_moe.volunteer")
    with start_volunteer(host_config(cells=["ffn.0.0"]), DHTConfig()) as volunteer:
        RemoteExpert("ffn.0.0", volunteer.endpoint)(torch.randn(3, HID))
        line = volunteer.report()
    assert re.search(r"hosting 1 cells of ffn\[2, 2\] at 127\.0\.0\.1:\d+: ffn\.0\.0", caplog.text)
    assert re.search(r"host 127\.0\.0\.1:\d+: 1 requests, [\d.]+ samples/s, 0 errors in the last \d+ s", line)


# ---- ExpertHostCallback: metrics to every logger, the layers use its DHT node -------------------
class RecordingLogger(pl.loggers.Logger):
    """Keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []

    name, version = "recording", 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class TinyModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        from lightning_moe import DecentralizedMoE

        self.moe = DecentralizedMoE(HID, (2, 2), "ffn", k_best=2, initial_peers=["127.0.0.1:9"], cache_ttl=0.5)

    def on_fit_start(self):
        callback = next(c for c in self.trainer.callbacks if isinstance(c, ExpertHostCallback))
        assert self.moe.dht is callback.volunteer.dht  # the layer reuses the volunteer's DHT node

    def training_step(self, batch, batch_idx):
        return self.moe(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_logs_host_metrics_to_every_logger_and_shares_its_dht(tmp_path):
    loggers = [RecordingLogger(), RecordingLogger()]
    callback = ExpertHostCallback(host_config(cells=4))
    assert callback.state_key == "ExpertHostCallback{'uid_prefix': 'ffn', 'grid_size': [2, 2]}"
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, HID)), batch_size=4)
    trainer = pl.Trainer(max_steps=3, default_root_dir=tmp_path, logger=loggers, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[callback], log_every_n_steps=1)
    try:
        trainer.fit(TinyModel(), data)
    finally:
        shutdown_process_dht()
    for recording in loggers:
        served = [m["volunteer/forward/samples"] for m in recording.metrics if "volunteer/forward/samples" in m]
        assert served and served[-1] > 0
    assert callback.volunteer is None and callback.final_metrics["volunteer/forward/samples"] > 0


# ---- `lightning-moe swarm` against a real local swarm --------------------------------------------
@pytest.mark.slow
def test_swarm_command_lists_live_experts_and_hosts(tmp_path):
    swarm = LocalSwarm(host_config(), LocalSwarmConfig(num_hosts=2, num_threads=1, update_period=2.0)).start()
    try:
        result = subprocess.run(
            ["lightning-moe", "swarm", f"dht.initial_peers=[{swarm.initial_peers[0]}]", "moe.grid_size=[2,2]"],
            capture_output=True, text=True, timeout=120, cwd=tmp_path,
        )
    finally:
        swarm.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "layer ffn [2, 2]: 4 of 4 cells alive on 2 hosts" in result.stdout, result.stdout
    for endpoint in swarm.endpoints:
        assert re.search(rf"{re.escape(endpoint)}\s+2\s+\d+ s", result.stdout), result.stdout


def test_swarm_command_without_peers_names_the_key(tmp_path):
    result = subprocess.run(["lightning-moe", "swarm"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "dht.initial_peers" in result.stderr


def test_host_help_explains_host_keys(tmp_path):
    result = subprocess.run(["lightning-moe", "host", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0
    for key in ("host.cells", "host.port", "host.checkpoint_dir", "dht.initial_peers", "dht.port", "host.num_threads",
                *(f"host.limits.{f.name}" for f in dataclasses.fields(HostLimits))):
        assert key in result.stdout
    assert "max_steps" not in result.stdout  # not the training config


# ---- the wheel, installed in a fresh venv, run from outside the checkout -------------------------
def wait_for(process: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if match := re.search(pattern, line):
            return match
    raise AssertionError(f"no line matching {pattern!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
def test_wheel_installs_hosts_and_trains_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("lightning_moe-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}  # torch etc., already installed here
    (Path(purelib) / "_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import lightning_moe; print(lightning_moe.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout
    assert str(env_dir) in where, f"the test would run the checkout, not the wheel: {where}"
    cli = str(env_dir / "bin" / "lightning-moe")

    host = subprocess.Popen([cli, "host", "model.hid_dim=16", "host.cells=2", "hydra.run.dir=host_run"], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(host, r"serving 2 experts .* at 127\.0\.0\.1:\d+", timeout=120)
        host.terminate()
        assert host.wait(timeout=60) == 0
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(timeout=10)

    result = subprocess.run(
        [cli, "train", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "model.hid_dim=16",
         "local_swarm.num_hosts=1", "+volunteer=true", "host.cells=1", "hydra.run.dir=train_run"],
        cwd=work, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final metrics:" in result.stdout and "val/bpc=" in result.stdout
    assert (work / "train_run" / "checkpoints" / "last.ckpt").exists()


def test_host_behind_a_proxy_announces_the_proxy_port():
    """host.announce_port: trainers find the proxy (a port forward, a WAN emulator) in the DHT, not the bound port."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from netem import DelayProxy, Link

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with DelayProxy(f"127.0.0.1:{port}", Link(delay=0.02)) as proxy, \
            start_volunteer(host_config(port=port, announce_port=proxy.port, cells=["ffn.0.0"]), DHTConfig()) as volunteer:
        assert volunteer.endpoint == f"127.0.0.1:{proxy.port}"
        assert volunteer.dht.get_experts(["ffn.0.0"]) == [f"127.0.0.1:{proxy.port}"]
        begin = time.monotonic()
        assert RemoteExpert("ffn.0.0", volunteer.endpoint)(torch.randn(2, HID)).shape == (2, HID)
        assert time.monotonic() - begin >= 0.04  # went through the proxy: at least one round trip of 2 x 20 ms
