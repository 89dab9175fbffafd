"""MoEStack: micro-batches pipelined through DecentralizedMoE layers compute what the unpipelined stack computes,
against a real swarm (a DHT node here, 2 hosts in subprocesses, 16 experts in a 4x4 grid)."""

import pytest
import torch
from torch import nn

from lightning_moe.client import links
from lightning_moe.client.call_stats import CallStats
from lightning_moe.client.local_moe import LocalMoE
from lightning_moe.client.parallel_call import NotEnoughExpertsError
from lightning_moe.client.pipeline import MoEStack, in_threads
from lightning_moe.config import CharLMConfig, ConfigError
from test_moe import GRID, HID, make_moe, start_swarm


def make_stack(swarm, layers: int = 2, **kwargs) -> MoEStack:
    """``layers`` layers on the swarm's one grid (each its own gating), a local Linear + LayerNorm before each; every
    answer waited for (no straggler cut-off) and routing blind to host speed, so that both ways choose and mix the same
    experts on a loaded machine."""
    kwargs = dict(timeout_after_k_min=None, backward_timeout_after_k_min=None, spot_check_rate=0.0, latency_margin=0.0,
                  **kwargs)
    pre = [nn.Sequential(nn.Linear(HID, HID), nn.LayerNorm(HID)) for _ in range(layers)]
    return MoEStack([make_moe(swarm, **kwargs) for _ in range(layers)], micro_batches=1, pre=pre)


def step(stack: MoEStack, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, list, dict]:
    """One step's output, aux losses and gradients (of x and every parameter)."""
    x = x.detach().clone().requires_grad_(True)
    stack.zero_grad(set_to_none=True)
    y = stack(x)
    aux = [layer.aux_loss for layer in stack.layers]
    ((y * grad).sum() + 0.1 * sum(aux)).backward()
    grads = {name: p.grad.clone() for name, p in stack.named_parameters()}
    grads["x"] = x.grad.clone()
    return y.detach(), [a.detach() for a in aux], grads


@pytest.mark.slow
def test_pipelined_step_equals_unpipelined_step():
    swarm = start_swarm(optimizer=False)  # the experts do not change between the two steps
    torch.manual_seed(0)
    stack = make_stack(swarm)
    x, grad = torch.randn(3, 10, HID), torch.randn(3, 10, HID)
    try:
        y, aux, grads = step(stack, x, grad)
        stack.micro_batches = 3
        y_p, aux_p, grads_p = step(stack, x, grad)
        torch.testing.assert_close(y_p, y, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(aux_p, aux, atol=1e-6, rtol=1e-5)
        assert grads_p.keys() == grads.keys() and len(grads) == 2 * 2 + 2 * 4 + 1  # gating, local modules, x
        for name in grads:
            torch.testing.assert_close(grads_p[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
            assert grads[name].abs().sum() > 0, name
        for layer in stack.layers:  # the stats add up the micro-batches' calls, backward included
            assert layer.stats["answered"] == layer.stats["backward_answered"] == layer.stats["asked"] > 0
        with torch.no_grad():  # validation: the forward alone, pipelined
            torch.testing.assert_close(stack(x), y, atol=1e-5, rtol=1e-4)
    finally:
        for layer in stack.layers:
            layer.close()
        swarm.shutdown()


@pytest.mark.slow
def test_host_failure_inside_a_micro_batch_is_rerouted_then_named():
    swarm = start_swarm(optimizer=False)
    torch.manual_seed(1)
    stack = make_stack(swarm, k_min=1, forward_timeout=20.0)
    stack.micro_batches = 2
    x = torch.randn(16, HID)
    try:
        stack(x).sum().backward()
        swarm.kill(0)
        y = stack(x)  # the dead host's rows go to the other host's experts
        y.sum().backward()
        assert torch.isfinite(y).all()
        assert sum(layer.stats["failed"] for layer in stack.layers) > 0, "no call failed: the host was not killed"
        assert all(layer.stats["backward_answered"] > 0 for layer in stack.layers)
        swarm.kill(1)
        with pytest.raises(NotEnoughExpertsError) as info:
            stack(x)
        assert "k_min=1" in str(info.value) and any(endpoint in str(info.value) for endpoint in swarm.endpoints)
    finally:
        for layer in stack.layers:
            layer.close()
        swarm.shutdown()


@pytest.mark.slow
def test_auto_pipelines_only_while_a_layer_calls_a_host_over_a_slow_link(monkeypatch):
    """micro_batches="auto": one micro-batch to loopback hosts (never slow), two once the links measured from the
    layers' own calls are slow, one again once they are fast."""
    swarm = start_swarm(optimizer=False)
    torch.manual_seed(3)
    stack = make_stack(swarm)
    stack.micro_batches = "auto"
    x, grad = torch.randn(32, HID), torch.randn(32, HID)

    def chosen(steps: int) -> list[int]:
        out = []
        for _ in range(steps):
            step(stack, x, grad)
            out.append(stack.last_micro_batches)
        return out

    try:
        monkeypatch.setattr(links, "MIN_SAMPLE_BYTES", 0)  # every call measured, however small
        assert chosen(3) == [1, 1, 1]  # loopback: exact, never slow
        assert all(layer.stats["slow_links"] == 0 for layer in stack.layers)
        monkeypatch.setattr(links, "LOOPBACK_IS_EXACT", False)  # judge the hosts by their measured links, and
        monkeypatch.setattr(links, "EXACT_ABOVE", float("inf"))  # take every measured link as slow
        assert chosen(3)[-2:] == [2, 2]  # from the step after the first slow-judged forward on
        assert all(layer.stats["slow_links"] == 2 for layer in stack.layers)  # both hosts, a merged stat
        monkeypatch.setattr(links, "EXACT_ABOVE", 0.0)  # every link fast again
        assert chosen(2)[-1] == 1
    finally:
        for layer in stack.layers:
            layer.close()
        swarm.shutdown()


def test_local_layers_run_unpipelined_and_stats_merge():
    torch.manual_seed(2)
    layers = [LocalMoE(HID, GRID, lambda: nn.Linear(HID, HID), k_best=2) for _ in range(2)]
    stack = MoEStack(layers, micro_batches=4)
    assert not stack.pipelined
    x = torch.randn(8, HID)
    expected = x + layers[0](x)
    torch.testing.assert_close(stack(x), expected + layers[1](expected))
    for wrong in (0, "fast", 2.0):
        with pytest.raises(ValueError, match="micro_batches must be 'auto' or an integer"):
            MoEStack(layers, micro_batches=wrong)
    assert not MoEStack(layers, micro_batches="auto").pipelined  # local layers: never pipelined
    merged = CallStats.merged([CallStats(asked=2, latency=0.5, errors=["a"]), CallStats(asked=3, latency=0.2, errors=["b"])])
    assert (merged.asked, merged.latency, merged.errors) == (5, 0.5, ["a", "b"])


def test_in_threads_waits_for_all_and_raises_the_first_error():
    done = []

    def work(m: int) -> int:
        done.append(m)
        if m in (1, 2):
            raise RuntimeError(f"part {m}")
        return m

    assert in_threads(lambda m: m * m, 3) == [0, 1, 4]
    with pytest.raises(RuntimeError, match="part 1"):
        in_threads(work, 4)
    assert sorted(done) == [0, 1, 2, 3]


def test_the_micro_batches_key_fails_by_name():
    for wrong in (0, "fast", 17, 2.5):
        with pytest.raises(ConfigError, match="model.micro_batches must be auto or an integer in 1..16"):
            CharLMConfig(micro_batches=wrong).check()
    for right in ("auto", 1, 16):
        CharLMConfig(micro_batches=right).check()
