"""Lightning and Hydra: config groups, examples/train.py, +volunteer=true, checkpoints, `lightning-moe host`."""

import functools
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lightning_moe import DecentralizedMoE, ExpertHostCallback
from lightning_moe.client.parallel_call import NotEnoughExpertsError
from lightning_moe.dht import DHT
from lightning_moe.lightning import train as train_module
from lightning_moe.shared import shutdown_process_dht
from lightning_moe.server.experts import make_expert
from lightning_moe.config import HostConfig, LocalSwarmConfig
from lightning_moe.swarm import LocalSwarm
from lightning_moe.volunteer import make_backends

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "lightning_moe" / "conf"
TRAIN = [sys.executable, str(ROOT / "examples" / "train.py")]
PEERS = ["127.0.0.1:9"]  # never contacted: nothing runs forward in these tests


def compose_config(*overrides: str):
    with initialize_config_module("lightning_moe.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[f"dht.initial_peers={PEERS}", *overrides])


def option_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("experiment", [None, *option_names("experiment")])
@pytest.mark.parametrize("moe", option_names("moe"))
def test_every_config_group_composes_and_instantiates(moe, experiment, tmp_path):
    overrides = [f"moe={moe}", f"paths.output_dir={tmp_path}", "+volunteer=true"]
    if experiment:
        overrides.append(f"experiment={experiment}")
    cfg = compose_config(*overrides)
    OmegaConf.resolve(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    assert isinstance(datamodule, pl.LightningDataModule)
    model = hydra.utils.instantiate(cfg.model, moe=hydra.utils.instantiate(cfg.moe, _partial_=True))
    assert len(model.moes) == cfg.model.moe_layers
    x = torch.zeros(2, cfg.data.seq_len, dtype=torch.long)
    if moe == "local":
        assert model(x).shape == (2, cfg.data.seq_len, 256)
    else:
        assert all(isinstance(layer, DecentralizedMoE) and layer.initial_peers == PEERS for layer in model.moes)
    trainer = hydra.utils.instantiate(cfg.trainer)
    assert isinstance(trainer, pl.Trainer)
    callback = hydra.utils.instantiate(cfg.volunteer_callback)
    assert isinstance(callback, ExpertHostCallback) and callback.config.in_features == cfg.model.hid_dim
    assert all(isinstance(c, pl.Callback) for c in train_module.instantiate_group(cfg, "callbacks"))
    assert all(isinstance(c, pl.loggers.Logger) for c in train_module.instantiate_group(cfg, "logger"))
    expert, optimizer = hydra.utils.instantiate(cfg.host.expert), hydra.utils.instantiate(cfg.host.optimizer)
    module = expert()
    optimizer(module.parameters())
    assert module(torch.zeros(3, cfg.model.hid_dim)).shape == (3, cfg.model.hid_dim)
    assert OmegaConf.to_container(cfg.dht)["initial_peers"] == PEERS


def test_misspelt_key_and_missing_plus_fail_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_config("trainer.max_stepz=3")
    with pytest.raises(ConfigCompositionException, match="volunteer"):
        compose_config("volunteer=true")  # a key config.yaml leaves out needs the +
    assert compose_config("+volunteer=true").volunteer is True
    with pytest.raises(ConfigCompositionException, match="nonexistent"):
        compose_config("moe=nonexistent")


@pytest.mark.slow
def test_train_py_command_line_names_a_misspelt_key(tmp_path):
    result = subprocess.run([*TRAIN, "moe.k_bets=2", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "k_bets" in result.stderr


@pytest.mark.slow
def test_train_py_fast_dev_run_on_the_embedded_swarm(tmp_path):
    result = subprocess.run(
        [*TRAIN, "trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path}", "local_swarm.num_hosts=2",
         "model.moe_layers=2", "model.micro_batches=2"],  # two layers, pipelined: training and validation steps
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final metrics:" in result.stdout and "train/bpc=" in result.stdout
    assert re.search(r"swarm: DHT 127\.0\.0\.1:\d+, hosts 127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+", result.stdout)


@pytest.mark.slow
def test_train_py_multirun_sweeps(tmp_path):
    result = subprocess.run(
        [*TRAIN, "-m", "experiment=baseline", "trainer.fast_dev_run=true", "model.hid_dim=32,64", f"hydra.sweep.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("final metrics:") == 2, result.stdout[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit()) == ["0", "1"]
    assert "model.hid_dim=64" in (tmp_path / "1" / ".hydra" / "overrides.yaml").read_text()


def wait_for_line(process: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    """Read the process's stdout until a line matches (bounded in time)."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} in {timeout} s; got:\n{''.join(lines)[-3000:]}")


@pytest.mark.slow
def test_volunteer_hosts_experts_that_another_process_uses(tmp_path):
    """train.py +volunteer=true joins a DHT; this process's DecentralizedMoE finds and uses its experts."""
    with DHT() as boot:
        volunteer = subprocess.Popen(
            [*TRAIN, "+volunteer=true", f"dht.initial_peers=[{boot.address}]", "host.cells=16", "host.update_period=2",
             "trainer.max_steps=100000", "trainer.limit_val_batches=0", f"hydra.run.dir={tmp_path}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        moe = DecentralizedMoE(64, (4, 4), "ffn", k_best=2, initial_peers=[boot.address], cache_ttl=0.5)
        try:
            endpoints = []
            for _ in range(120):  # up to ~2 minutes for the volunteer to start and declare
                if volunteer.poll() is not None:
                    raise AssertionError(f"volunteer exited early:\n{volunteer.stderr.read()[-3000:]}")
                endpoints = moe.dht.get_experts(["ffn.0.0", "ffn.3.3"])
                if all(endpoints):
                    break
                time.sleep(1.0)
            assert all(endpoints), "the volunteer never declared its experts"
            x = torch.randn(8, 64, requires_grad=True)
            try:
                moe(x).sum().backward()
            except NotEnoughExpertsError:
                if volunteer.poll() is not None:
                    raise AssertionError(f"volunteer exited early:\n{volunteer.stderr.read()[-3000:]}") from None
                raise
            assert moe.stats["answered"] > 0 and moe.stats["backward_answered"] > 0
            assert x.grad is not None
        finally:
            shutdown_process_dht()
            volunteer.send_signal(signal.SIGTERM)
            try:
                volunteer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                volunteer.kill()
                volunteer.wait(timeout=10)


class VolunteerModel(pl.LightningModule):
    """Trains through the volunteer's own experts, so they change, and checks them on resume."""

    def __init__(self, expected_state=None):
        super().__init__()
        self.moe = DecentralizedMoE(8, (2, 2), "tiny", k_best=2, initial_peers=["127.0.0.1:9"], cache_ttl=0.5)
        self.expected_state = expected_state
        self.restored_ok = None

    def on_fit_start(self):
        volunteer = next(c for c in self.trainer.callbacks if isinstance(c, ExpertHostCallback))
        self.moe.dht_config.initial_peers = [volunteer.volunteer.dht.address]
        assert self.moe.dht is volunteer.volunteer.dht  # the layer uses the volunteer's node, not one of its own

    def on_train_start(self):
        if self.expected_state is not None:
            volunteer = next(c for c in self.trainer.callbacks if isinstance(c, ExpertHostCallback))
            state = volunteer.expert_host.state_dict()
            self.restored_ok = set(state) == set(self.expected_state) and all(
                torch.equal(state[uid]["expert"][name], self.expected_state[uid]["expert"][name])
                for uid in state for name in state[uid]["expert"]
            )

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.moe(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def teardown(self, stage):
        self.moe._dht = self.moe._lookup = None


def volunteer_callback(seed: int) -> ExpertHostCallback:
    return ExpertHostCallback(HostConfig(
        expert=functools.partial(make_expert, "ffn", 8), optimizer=functools.partial(torch.optim.SGD, lr=0.5), in_features=8,
        uid_prefix="tiny", grid_size=[2, 2], cells=4, update_period=1.0, seed=seed, stats_every=0,
    ))


@pytest.mark.slow
def test_resume_from_checkpoint_restores_hosted_expert_weights(tmp_path):
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 8)), batch_size=8)
    trainer = pl.Trainer(max_steps=4, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[volunteer_callback(seed=0)])
    trainer.fit(VolunteerModel(), data)
    checkpoint_path = trainer.checkpoint_callback.best_model_path
    saved = torch.load(checkpoint_path, weights_only=False)  # our own local file
    experts = next(v for k, v in saved["callbacks"].items() if k.startswith("ExpertHostCallback"))["experts"]
    initial = volunteer_callback(seed=0)
    fresh = {uid: b.state_dict() for uid, b in
             make_backends(sorted(experts), initial.config.expert, initial.config.optimizer, 8, seed=0).items()}
    assert any(not torch.equal(experts[uid]["expert"][n], fresh[uid]["expert"][n]) for uid in experts for n in experts[uid]["expert"]), \
        "the hosted experts never trained, so the test would prove nothing"

    model = VolunteerModel(expected_state=experts)
    trainer = pl.Trainer(max_steps=6, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[volunteer_callback(seed=1)])
    trainer.fit(model, data, ckpt_path=checkpoint_path)
    assert model.restored_ok is True


class RecordingLogger(pl.loggers.Logger):
    """Keeps every ``(step, metrics)`` it is given."""

    name, version = "recording", 0

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class LossLoggingModel(VolunteerModel):
    """Logs its loss the ordinary way, as the yardstick of Lightning's own logging rule."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


def test_host_metrics_follow_lightnings_logging_rule_under_gradient_accumulation(tmp_path):
    recording = RecordingLogger()
    # fails unless the host's metrics are in trainer.callback_metrics when it saves (every 2 optimizer steps)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="volunteer/forward/samples", mode="max",
                                              every_n_train_steps=2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(96, 8)), batch_size=8)  # 12 batches
    trainer = pl.Trainer(max_steps=6, accumulate_grad_batches=2, log_every_n_steps=2, default_root_dir=tmp_path,
                         logger=[recording], enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[volunteer_callback(seed=0), checkpoint])
    try:
        trainer.fit(LossLoggingModel(), data)
    finally:
        shutdown_process_dht()
    host_steps = [step for step, metrics in recording.rows if "volunteer/forward/samples" in metrics]
    loss_steps = [step for step, metrics in recording.rows if "train/loss" in metrics]
    # 6 optimizer steps of 2 batches each, logged every 2 optimizer steps: 3 times, at the steps Lightning logs its own
    assert len(host_steps) == 3 and len(set(host_steps)) == 3 and host_steps == loss_steps, (host_steps, loss_steps)
    served = [metrics["volunteer/forward/samples"] for _, metrics in recording.rows if "volunteer/forward/samples" in metrics]
    assert served == sorted(served) and served[-1] > 0
    assert float(trainer.callback_metrics["volunteer/forward/samples"]) == served[-1]
    assert checkpoint.best_model_score is not None and float(checkpoint.best_model_score) == served[-1]


@pytest.mark.slow
def test_lightning_moe_host_starts_serves_and_stops_on_sigterm(tmp_path):
    process = subprocess.Popen(
        ["lightning-moe", "host", "model.hid_dim=16", "host.cells=3", f"hydra.run.dir={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    try:
        match = wait_for_line(process, r"serving 3 experts \((\S+),.*\) at (127\.0\.0\.1:\d+)", timeout=120)
        wait_for_line(process, r"DHT node at 127\.0\.0\.1:\d+; others join with dht\.initial_peers=", timeout=10)
        from lightning_moe import RemoteExpert

        expert = RemoteExpert(match.group(1), match.group(2))
        assert expert(torch.randn(4, 16)).shape == (4, 16)
        process.send_signal(signal.SIGTERM)
        wait_for_line(process, r"stopped; served 4 forward samples", timeout=60)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.slow
def test_readme_code_block_works_as_written(tmp_path):
    """The README's LightningModule, run as written against a local swarm of hid-64 experts."""
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    host = HostConfig(expert=functools.partial(make_expert, "ffn", 64), optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
                      in_features=64, uid_prefix="ffn", grid_size=[4, 4])
    swarm = LocalSwarm(host, LocalSwarmConfig(num_hosts=1, num_threads=1)).start()
    model = namespace["MyModel"](initial_peers=swarm.initial_peers)
    try:
        data = torch.utils.data.TensorDataset(torch.randn(32, 32), torch.randint(0, 10, (32,)))
        trainer = pl.Trainer(fast_dev_run=2, default_root_dir=tmp_path, enable_progress_bar=False, logger=False)
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
        assert model.moe.stats["answered"] > 0
    finally:
        shutdown_process_dht()
        swarm.shutdown()
