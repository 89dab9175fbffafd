"""Forwards kept for their backward: no second forward on the host, no inputs resent, bounded memory.

The store is driven directly (pools run in the test thread, so batching is deterministic) and
through a real host on 127.0.0.1 (RemoteExpert, the 409 fallback, bad keep ids).
"""

from __future__ import annotations

import copy

import pytest
import requests
import torch
from torch import nn

from lightning_moe import wire
from lightning_moe.client.remote_expert import RemoteExpert, call_backward, call_expert, new_keep_id
from lightning_moe.server import ExpertBackend, ExpertHost, make_expert
from lightning_moe.config import HostConfig, HostLimits
from lightning_moe.server.kept_forwards import KeptForwards, KeptStore

HID = 16
WAIT = 30.0


def make_backend(optimizer: bool = False, uid: str = "ffn.0", expert: nn.Module | None = None) -> ExpertBackend:
    torch.manual_seed(0)
    expert = expert if expert is not None else make_expert("ffn", HID)
    opt = torch.optim.SGD(expert.parameters(), lr=0.1) if optimizer else None
    return ExpertBackend(uid, expert, opt, args_schema=[((HID,), torch.float32)], max_batch_size=64)


def with_store(backend: ExpertBackend, budget: int = 2**30, ttl: float = 60.0) -> KeptForwards:
    backend.kept = KeptForwards(backend, KeptStore(budget, ttl=ttl))
    return backend.kept


def local_grads(expert: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_()
    expert(x).backward(grad)
    return x.grad


def test_a_batch_of_two_kept_requests_runs_one_backward_through_its_graph():
    backend = make_backend()
    kept = with_store(backend)
    reference = copy.deepcopy(backend.expert)
    xs, grads = [torch.randn(3, HID), torch.randn(5, HID)], [torch.randn(3, HID), torch.randn(5, HID)]
    keys = [new_keep_id(), new_keep_id()]
    futures = [backend.forward_pool.submit(x, key=k) for x, k in zip(xs, keys)]
    assert backend.forward_pool.run_batch() == 8  # one batch of both requests
    for future, x in zip(futures, xs):
        torch.testing.assert_close(future.result(0)[0], reference(x))
    assert kept.store.stats()["kept"] == 1 and kept.store.used_bytes > 0
    backward_futures = [kept.backward(k, [g]) for k, g in zip(keys, grads)]
    assert kept.deferred_submit_time is not None and kept.oldest_submit_time is not None  # complete: runs now
    assert kept.run_batch() == 8
    for future, x, g in zip(backward_futures, xs, grads):
        torch.testing.assert_close(future.result(0)[0], local_grads(reference, x, g))
    stats = kept.store.stats()
    assert stats["graph_backwards"] == 1 and stats["hits"] == 2 and stats["batches"] == 0 and stats["used_bytes"] == 0
    assert backend.backward_batches == 1 and backend.forward_batches == 1  # no second forward


def test_a_partial_batch_recomputes_what_arrived_and_stragglers_use_the_kept_inputs():
    backend = make_backend()
    kept = with_store(backend)
    reference = copy.deepcopy(backend.expert)
    xs = [torch.randn(4, HID), torch.randn(6, HID)]
    keys = [new_keep_id(), new_keep_id()]
    for x, k in zip(xs, keys):
        backend.forward_pool.submit(x, key=k)
    backend.forward_pool.run_batch()
    grad0 = torch.randn(4, HID)
    first = kept.backward(keys[0], [grad0])
    assert kept.oldest_submit_time is None and kept.deferred_submit_time is not None  # waits while the host is busy
    kept.run_batch()  # the host is idle: 4 of 10 rows is too few for the graph, so they are recomputed
    assert backend.backward_pool.run_batch() == 4
    torch.testing.assert_close(first.result(0)[0], local_grads(reference, xs[0], grad0))
    grad1 = torch.randn(6, HID)
    second = kept.backward(keys[1], [grad1])  # after its batch ran: recomputed from the kept inputs
    assert backend.backward_pool.run_batch() == 6
    torch.testing.assert_close(second.result(0)[0], local_grads(reference, xs[1], grad1))
    assert kept.store.stats()["batches"] == 0 and kept.store.used_bytes == 0
    assert kept.backward(keys[1], [grad1]) is None  # used once: a replay is not kept


def test_a_complete_batch_runs_before_an_older_partial_one():
    backend = make_backend()
    kept = with_store(backend)
    keys = [[new_keep_id(), new_keep_id()] for _ in range(2)]
    for batch_keys in keys:  # two batches of two requests each
        for k in batch_keys:
            backend.forward_pool.submit(torch.randn(2, HID), key=k)
        backend.forward_pool.run_batch()
    partial = kept.backward(keys[0][0], [torch.randn(2, HID)])  # older, half of its batch
    complete = [kept.backward(k, [torch.randn(2, HID)]) for k in keys[1]]
    assert kept.run_batch() == 4  # the complete batch, through its graph
    assert all(f.result(0)[0].shape == (2, HID) for f in complete) and not partial.done()
    assert kept.store.stats()["graph_backwards"] == 1 and kept.oldest_submit_time is None  # the partial one still waits
    assert kept.deferred_submit_time is not None


def test_the_optimizer_may_step_between_a_kept_forward_and_its_backward():
    backend = make_backend(optimizer=True)
    kept = with_store(backend)
    x1, x2 = torch.randn(4, HID), torch.randn(4, HID)
    k1, k2 = new_keep_id(), new_keep_id()
    backend.forward_pool.submit(x1, key=k1)
    backend.forward_pool.run_batch()
    backend.forward_pool.submit(x2, key=k2)
    backend.forward_pool.run_batch()
    before = [p.detach().clone() for p in backend.expert.parameters()]
    first = kept.backward(k1, [torch.randn(4, HID)])
    kept.run_batch()
    assert first.result(0)[0].shape == (4, HID)
    assert backend.update_count == 1 and any(not torch.equal(a, p) for a, p in zip(before, backend.expert.parameters()))
    second = kept.backward(k2, [torch.randn(4, HID)])  # its graph saw the weights before that step
    kept.run_batch()
    assert torch.isfinite(second.result(0)[0]).all() and backend.update_count == 2


class InPlaceAfterSave(nn.Module):
    """A buggy expert: changes a tensor that autograd saved for backward."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(HID, HID)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.sigmoid(self.linear(x))  # sigmoid saves its output
        return hidden.mul_(2)


def test_an_expert_that_changes_saved_tensors_in_place_gets_a_clear_error():
    backend = make_backend(expert=InPlaceAfterSave())
    kept = with_store(backend)
    key = new_keep_id()
    backend.forward_pool.submit(torch.randn(2, HID), key=key)
    backend.forward_pool.run_batch()
    future = kept.backward(key, [torch.randn(2, HID)])
    kept.run_batch()
    with pytest.raises(RuntimeError, match="modified in place"):
        future.result(0)


def test_memory_stays_within_the_budget_and_old_batches_go_first():
    backend = make_backend()
    budget = 64 * 1024
    kept = with_store(backend, budget)
    keys = []
    for _ in range(40):
        keys.append(new_keep_id())
        backend.forward_pool.submit(torch.randn(32, HID), key=keys[-1])
        backend.forward_pool.run_batch()
        assert kept.store.used_bytes <= budget
    stats = kept.store.stats()
    assert stats["evicted"] > 0 and 0 < stats["batches"] < 40
    assert kept.backward(keys[0], [torch.randn(32, HID)]) is None  # evicted: the trainer must send inputs
    assert kept.backward(keys[-1], [torch.randn(32, HID)]) is not None


def test_the_experts_of_a_host_share_one_budget_and_the_oldest_batch_of_any_goes_first():
    store = KeptStore(2**30)
    first, second = make_backend(uid="ffn.0"), make_backend(uid="ffn.1")
    for backend in (first, second):
        backend.kept = KeptForwards(backend, store)
    keys = []
    for backend in (first, second, second):
        keys.append(new_keep_id())
        backend.forward_pool.submit(torch.randn(8, HID), key=keys[-1])
        backend.forward_pool.run_batch()
        if len(keys) == 1:
            store.budget_bytes = 2 * store.used_bytes + store.used_bytes // 2  # room for two such batches
    assert store.stats()["evicted"] == 1 and store.stats()["batches"] == 2 and store.used_bytes <= store.budget_bytes
    assert first.kept.backward(keys[0], [torch.randn(8, HID)]) is None  # the oldest, though another expert's
    assert second.kept.backward(keys[1], [torch.randn(8, HID)]) is not None
    assert second.kept.backward(keys[0], [torch.randn(8, HID)]) is None  # a request id is looked up per expert


def test_the_number_of_kept_batches_is_bounded_too(monkeypatch):
    from lightning_moe.server import kept_forwards

    monkeypatch.setattr(kept_forwards, "MAX_KEPT_BATCHES", 5)
    backend = make_backend()
    kept = with_store(backend)
    for _ in range(12):  # tiny batches, far under the byte budget
        backend.forward_pool.submit(torch.randn(1, HID), key=new_keep_id())
        backend.forward_pool.run_batch()
    assert kept.store.stats()["batches"] == 5 and kept.store.stats()["evicted"] == 7


def test_a_batch_larger_than_the_budget_is_not_kept_and_expired_batches_go():
    backend = make_backend()
    kept = with_store(backend, budget=1)
    backend.forward_pool.submit(torch.randn(4, HID), key=new_keep_id())
    backend.forward_pool.run_batch()
    assert kept.store.stats()["not_kept"] == 1 and kept.store.used_bytes == 0
    kept = with_store(backend, ttl=0.0)
    backend.forward_pool.submit(torch.randn(4, HID), key=new_keep_id())
    backend.forward_pool.run_batch()
    backend.forward_pool.submit(torch.randn(4, HID), key=new_keep_id())  # keeping the next one expires the first
    backend.forward_pool.run_batch()
    assert kept.store.stats()["expired"] == 1 and kept.store.stats()["batches"] == 1


def test_closing_fails_waiting_backwards():
    backend = make_backend()
    kept = with_store(backend)
    keys = [new_keep_id(), new_keep_id()]
    for k in keys:
        backend.forward_pool.submit(torch.randn(2, HID), key=k)
    backend.forward_pool.run_batch()
    future = kept.backward(keys[0], [torch.randn(2, HID)])
    kept.close()
    with pytest.raises(RuntimeError, match="closed"):
        future.result(0)


# ---- through a real host -----------------------------------------------------------------------
@pytest.fixture
def host():
    with ExpertHost([make_backend(optimizer=True)], HostConfig(limits=HostLimits(request_timeout=WAIT))) as h:
        yield h


def test_remote_expert_backward_sends_only_gradients_and_matches_local(host):
    reference = copy.deepcopy(host.backends["ffn.0"].expert)
    expert = RemoteExpert("ffn.0", host.endpoint)
    x = torch.randn(5, HID, requires_grad=True)
    out = expert(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(out, reference(x))
    torch.testing.assert_close(x.grad, local_grads(reference, x.detach(), grad))
    stats = host.load_report()["kept_forwards"]
    assert stats["hits"] == 1 and stats["graph_backwards"] == 1 and stats["misses"] == 0
    assert host.backends["ffn.0"].forward_batches == 1 and host.backends["ffn.0"].update_count == 1
    with torch.no_grad():  # no backward will come: nothing is kept
        expert(torch.randn(2, HID))
    assert host.load_report()["kept_forwards"]["kept"] == 1


def test_a_forward_the_host_no_longer_keeps_is_resent_with_its_inputs(host):
    host.kept.budget_bytes = 0  # keeps nothing
    reference = copy.deepcopy(host.backends["ffn.0"].expert)
    x, grad = torch.randn(3, HID), torch.randn(3, HID)
    key = new_keep_id()
    call_expert("ffn.0", host.endpoint, "forward", [x], keep=key)
    with pytest.raises(Exception) as info:
        call_expert("ffn.0", host.endpoint, "backward", [grad], keep=key)
    assert getattr(info.value, "status", None) == 409 and "send the inputs" in str(info.value)
    (grad_x,) = call_backward("ffn.0", host.endpoint, key, [x], [grad])  # 409, then with the inputs
    torch.testing.assert_close(grad_x, local_grads(reference, x, grad))
    assert host.load_report()["kept_forwards"]["misses"] == 2


@pytest.mark.parametrize("keep, fragment", [("xyz", "hex digits"), ("A" * 32, "hex digits"), ("0" * 65, "hex digits")])
def test_a_malformed_keep_id_gets_400_and_the_host_keeps_serving(host, keep, fragment):
    body = wire.serialize([torch.randn(2, HID)])
    response = requests.post(f"http://{host.endpoint}/forward/ffn.0?keep={keep}", data=body, timeout=WAIT)
    assert response.status_code == 400 and fragment in response.json()["error"]
    (out,) = call_expert("ffn.0", host.endpoint, "forward", [torch.randn(2, HID)])
    assert out.shape == (2, HID)


def test_kept_backward_with_the_wrong_rows_gets_400(host):
    key = new_keep_id()
    call_expert("ffn.0", host.endpoint, "forward", [torch.randn(3, HID)], keep=key)
    body = wire.serialize([torch.randn(4, HID)])
    response = requests.post(f"http://{host.endpoint}/backward/ffn.0?keep={key}", data=body, timeout=WAIT)
    assert response.status_code == 400 and "the kept forward had 3" in response.json()["error"]
    (grad_x,) = call_expert("ffn.0", host.endpoint, "backward", [torch.randn(3, HID)], keep=key)  # still kept
    assert grad_x.shape == (3, HID)


def test_a_decentralized_moe_training_step_uses_kept_forwards_and_eval_keeps_none():
    import functools

    from lightning_moe import DecentralizedMoE
    from lightning_moe.config import DHTConfig, HostConfig
    from lightning_moe.volunteer import start_volunteer

    config = HostConfig(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=0.01),
                        in_features=HID, grid_size=[2, 2], cells=4, stats_every=0, num_threads=1)
    with start_volunteer(config, DHTConfig()) as volunteer:
        moe = DecentralizedMoE(HID, [2, 2], "ffn", k_best=2, initial_peers=[volunteer.dht.address])
        x = torch.randn(6, HID, requires_grad=True)
        moe(x).pow(2).sum().backward()
        stats = volunteer.host.kept.stats()
        assert stats["hits"] == moe.last_stats.backward_asked > 0 and stats["misses"] == 0
        assert x.grad is not None and torch.isfinite(x.grad).all()
        kept_before = stats["kept"]
        with torch.no_grad():
            moe(torch.randn(6, HID))
        assert volunteer.host.kept.stats()["kept"] == kept_before
        moe.close()


def test_large_calls_are_split_into_parallel_requests_with_the_same_result():
    import functools

    from lightning_moe import DecentralizedMoE
    from lightning_moe.config import DHTConfig, HostConfig
    from lightning_moe.volunteer import start_volunteer

    config = HostConfig(expert=functools.partial(make_expert, "ffn", HID), optimizer=functools.partial(torch.optim.SGD, lr=0.01),
                        in_features=HID, grid_size=[2, 2], cells=4, stats_every=0, num_threads=1)
    with start_volunteer(config, DHTConfig()) as volunteer:
        moe = DecentralizedMoE(HID, [2, 2], "ffn", k_best=2, initial_peers=[volunteer.dht.address])
        x = torch.randn(24, HID)
        with torch.no_grad():
            whole = moe(x)
            asked_whole = moe.last_stats.asked
            moe.max_call_bytes = 3 * HID * 4  # 3 rows per request
            split = moe(x)
        torch.testing.assert_close(split, whole)
        assert moe.last_stats.asked > asked_whole and moe.last_stats.asked >= 24 * 2 // 3
        y = moe(x.requires_grad_())
        y.pow(2).sum().backward()
        assert volunteer.host.kept.stats()["hits"] == moe.last_stats.backward_answered == moe.last_stats.backward_asked
        moe.close()
