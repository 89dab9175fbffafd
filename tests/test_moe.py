"""DecentralizedMoE against a real swarm: a DHT node here, hosts in subprocesses, 16 experts in a 4x4 grid."""

import copy
import functools
import json
import pickle
import time

import pytest
import pytorch_lightning as pl
import torch

from lightning_moe.client.local_moe import LocalMoE
from lightning_moe.client.moe import DecentralizedMoE
from lightning_moe.client.parallel_call import NotEnoughExpertsError
from lightning_moe.server.experts import make_expert
from lightning_moe.config import HostConfig, LocalSwarmConfig
from lightning_moe.swarm import LocalSwarm, grid_uids
from lightning_moe.volunteer import make_backends

HID = 16
GRID = (4, 4)
LR = 0.1


def start_swarm(optimizer=True, dtype=torch.float32, **swarm) -> LocalSwarm:
    """2 hosts (``swarm``: other LocalSwarmConfig keys) declaring every 2 s."""
    host = HostConfig(expert=functools.partial(make_expert, "ffn", HID), in_features=HID, grid_size=list(GRID),
                      optimizer=functools.partial(torch.optim.SGD, lr=LR) if optimizer else None,
                      dtype=str(dtype).removeprefix("torch."), stats_every=0)
    return LocalSwarm(host, LocalSwarmConfig(**{"num_hosts": 2, "update_period": 2.0, "num_threads": 1, **swarm})).start()


def local_experts(swarm: LocalSwarm, optimizer=True, dtype=torch.float32) -> dict:
    """Copies of the swarm's experts: each host built its share of the grid from seed = its index."""
    uids = grid_uids("ffn", GRID)
    experts = {}
    num_hosts = swarm.config.num_hosts
    for i in range(num_hosts):
        opt = functools.partial(torch.optim.SGD, lr=LR) if optimizer else None
        experts.update(make_backends(uids[i :: num_hosts], swarm.host_config.expert, opt, HID, dtype=dtype, seed=i))
    return experts


def local_mixture(moe: DecentralizedMoE, experts: dict) -> LocalMoE:
    """The same mixture computed here, every expert alive, with moe's gating weights."""
    local = LocalMoE(HID, GRID, {uid: backend.expert for uid, backend in experts.items()}, k_best=moe.k_best)
    local.proj.load_state_dict(moe.proj.state_dict())
    return local


@pytest.fixture
def swarm():
    swarm = start_swarm()
    yield swarm
    swarm.shutdown()


def make_moe(swarm: LocalSwarm, **kwargs) -> DecentralizedMoE:
    kwargs.setdefault("k_best", 4)
    return DecentralizedMoE(HID, GRID, "ffn", initial_peers=swarm.initial_peers, cache_ttl=1.0, **kwargs)


@pytest.mark.slow
def test_outputs_and_gradients_equal_local_computation_and_hosts_learn(swarm):
    torch.manual_seed(0)
    moe = make_moe(swarm)
    experts = local_experts(swarm)
    x = torch.randn(24, HID, requires_grad=True)
    grad = torch.randn(24, HID)
    try:
        y = moe(x)
        x_local = x.detach().clone().requires_grad_(True)
        local = local_mixture(moe, experts)
        y_local = local(x_local)
        torch.testing.assert_close(y, y_local, atol=1e-5, rtol=1e-4)
        assert moe.stats["answered"] == moe.stats["asked"] > 0

        y.backward(grad)
        y_local.backward(grad)
        torch.testing.assert_close(x.grad, x_local.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(moe.proj.weight.grad, local.proj.weight.grad, atol=1e-5, rtol=1e-4)
        assert moe.proj.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
        assert moe.stats["backward_answered"] == moe.stats["answered"]

        # The hosts stepped SGD on the experts that got gradients; stepping the local copies the same way agrees.
        for backend in experts.values():
            if any(p.grad is not None for p in backend.expert.parameters()):
                backend.optimizer.step()
        with torch.no_grad():
            y2 = moe(x)
            y2_local = local(x)
        assert not torch.allclose(y2, y.detach(), atol=1e-4), "the hosts' experts did not learn"
        torch.testing.assert_close(y2, y2_local, atol=1e-5, rtol=1e-4)
    finally:
        moe.close()


@pytest.mark.slow
def test_training_continues_when_a_host_dies(swarm):
    torch.manual_seed(1)
    moe = make_moe(swarm, k_min=1, forward_timeout=20.0)
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.01)
    x = torch.randn(64, HID)
    failed, killed_at, settled_steps = 0, None, 0
    # the dead host's records live 2 update periods; the cache may serve an answer read one step before
    # (stale-while-revalidate) up to a ttl and a step old: past that, no more calls to it, not even a probe after its ban
    settle = 2 * swarm.config.update_period + 2 * moe.cache_ttl + 2.0
    try:
        for step in range(200):
            if step == 3:
                swarm.kill(0)
                killed_at = time.monotonic()
            settled = killed_at is not None and time.monotonic() - killed_at > settle
            loss = moe(x).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            failed += moe.stats["failed"]
            assert moe.stats["backward_answered"] > 0, "x needs no grad, yet the hosts' experts must get gradients"
            if settled:
                assert moe.stats["failed"] == 0 and moe.stats["answered"] > 0
                settled_steps += 1
                if settled_steps == 3:
                    break
            elif killed_at is not None:
                time.sleep(0.1)
        assert settled_steps == 3
        assert failed > 0, "no call ever failed: the host was not really killed"
        assert torch.isfinite(loss)
    finally:
        moe.close()


@pytest.mark.slow
def test_all_hosts_dead_raises_error_naming_experts_and_endpoints(swarm):
    moe = make_moe(swarm, k_min=1, forward_timeout=10.0)
    x = torch.randn(8, HID)
    try:
        moe(x)
        swarm.kill(0)
        swarm.kill(1)
        with pytest.raises(NotEnoughExpertsError) as info:
            moe(x)
        message = str(info.value)
        assert "k_min=1" in message and "ffn." in message
        assert any(endpoint in message for endpoint in swarm.endpoints)
    finally:
        moe.close()


@pytest.mark.slow
def test_slow_host_does_not_stall_steps():
    swarm = start_swarm(host_delays=[3.0])
    moe = make_moe(swarm, k_min=1, timeout_after_k_min=0.2, forward_timeout=20.0)
    x = torch.randn(32, HID)
    try:
        y = moe(x)
        y.sum().backward()
        stats = moe.stats
        assert stats["given_up"] > 0 and stats["answered"] > 0 and stats["failed"] == 0
        assert torch.isfinite(y).all()
    finally:
        moe.close()
        swarm.shutdown()


@pytest.mark.slow
def test_float64_gradcheck_and_bfloat16_paths():
    swarm = start_swarm(optimizer=False, dtype=torch.float64)
    try:
        # gradcheck runs the layer many times and needs the same function each time: every answer waited for and
        # routing blind to host speed (on a loaded machine a host may look slow and lose its samples)
        moe = make_moe(swarm, timeout_after_k_min=None, backward_timeout_after_k_min=None, latency_margin=0.0).double()
        x = torch.randn(3, HID, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(moe, (x,), eps=1e-6, atol=1e-4)

        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xb = torch.randn(6, HID, dtype=dtype, requires_grad=True)
            yb = moe(xb)
            assert yb.dtype == dtype
            yb.float().sum().backward()
            assert xb.grad.dtype == dtype and torch.isfinite(xb.grad.float()).all()

        moe = moe.float()
        x32 = torch.randn(6, HID, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(x32)
        y.float().pow(2).sum().backward()
        assert torch.isfinite(x32.grad).all() and moe.proj.weight.grad is not None
    finally:
        moe.close()
        swarm.shutdown()


@pytest.mark.slow
def test_module_pickles_keeps_only_gating_state_and_accepts_any_leading_shape(swarm):
    moe = make_moe(swarm)
    try:
        assert set(moe.state_dict()) == {"proj.weight", "proj.bias"}
        clone = pickle.loads(pickle.dumps(moe))
        copied = copy.deepcopy(moe)
        x = torch.randn(2, 3, HID)
        y = clone(x)  # the unpickled copy creates its own DHT client
        assert y.shape == (2, 3, HID)
        torch.testing.assert_close(y, moe(x), atol=1e-5, rtol=1e-4)
        loss = moe.aux_loss
        assert loss is not None and loss.requires_grad and torch.isfinite(loss)
        assert copied.dispatcher._dht is None or copied.dispatcher._dht is moe.dispatcher._dht
    finally:
        moe.close()
        clone.close()


class MoEClassifier(pl.LightningModule):
    def __init__(self, initial_peers):
        super().__init__()
        self.inp = torch.nn.Linear(8, HID)
        self.moe = DecentralizedMoE(HID, GRID, "ffn", k_best=2, initial_peers=initial_peers)
        self.out = torch.nn.Linear(HID, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.out(self.moe(torch.relu(self.inp(x))))
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.01 * self.moe.aux_loss
        self.log_dict({f"moe/{k}": v for k, v in self.moe.stats.items()})
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_module_with_the_layer_runs_fast_dev_run(swarm, tmp_path, precision):
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    model = MoEClassifier(swarm.initial_peers)
    trainer = pl.Trainer(fast_dev_run=2, default_root_dir=tmp_path, accelerator="cpu", precision=precision, enable_progress_bar=False,
                         enable_model_summary=False, logger=False)
    try:
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
        assert trainer.state.finished
        assert model.moe.stats["answered"] > 0
    finally:
        model.moe.close()


class RankReport(pl.Callback):
    """Each DDP rank writes what its own layer saw: its DHT client's address and the experts that answered."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def on_train_end(self, trainer, pl_module):
        moe = pl_module.moe
        report = {"rank": trainer.global_rank, "dht": moe.dht.address, "answered": moe.stats["answered"],
                  "backward_answered": moe.stats["backward_answered"]}
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(report, f)
        moe.close()


@pytest.mark.slow
def test_ddp_ranks_each_create_their_own_dht_client(swarm, tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    model = MoEClassifier(swarm.initial_peers)
    trainer = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, fast_dev_run=2, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, logger=False, callbacks=[RankReport(tmp_path)])
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports[0]["dht"] != reports[1]["dht"], reports  # one client per rank, made in the rank's own process
    assert all(r["answered"] > 0 and r["backward_answered"] > 0 for r in reports), reports
    assert model.moe.dispatcher._dht is None  # the launching process never needed one
