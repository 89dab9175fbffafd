"""TaskPool batching (limits, splits, order, errors) and the Runtime thread that drives the pools."""

from __future__ import annotations

import random
import threading
from concurrent.futures import CancelledError, Future, wait

import pytest
import torch

from lightning_moe.server import HostShutdownError, PoolClosedError, Runtime, TaskPool

WAIT = 30.0  # generous bound for every wait: a stuck test fails instead of hanging


class Recorder:
    """process_fn that records batch sizes; returns (2x + 1, row sums)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lock:
            self.sizes.append(x.shape[0])
        return 2 * x + 1, x.sum(dim=1) + y


def drain(pool: TaskPool, max_batches: int = 10_000) -> int:
    """Run batches until the queue is empty; returns the number of batches."""
    for n in range(max_batches):
        if pool.run_batch() == 0:
            return n
    raise AssertionError("the pool never emptied")


def check_result(future: Future, x: torch.Tensor, y: torch.Tensor) -> None:
    out, sums = future.result(timeout=WAIT)
    assert torch.equal(out, 2 * x + 1)
    assert torch.allclose(sums, x.sum(dim=1) + y)


def test_single_task_passes_through():
    recorder = Recorder()
    pool = TaskPool("p", recorder, max_batch_size=16)
    x, y = torch.randn(5, 3), torch.randn(5)
    future = pool.submit(x, y)
    assert pool.queued_rows == 5 and pool.queued_tasks == 1 and pool.oldest_task_age >= 0
    assert drain(pool) == 1
    check_result(future, x, y)
    assert recorder.sizes == [5]
    stats = pool.stats()
    assert stats["tasks"] == 1 and stats["rows"] == 5 and stats["batches"] == 1 and stats["tasks_done"] == 1
    assert stats["mean_batch_size"] == 5 and stats["queued_rows"] == 0 and pool.oldest_submit_time is None


def test_small_tasks_share_a_batch_and_large_ones_split_in_order():
    recorder = Recorder()
    pool = TaskPool("p", recorder, max_batch_size=8)
    sizes = [3, 20, 5, 1, 8, 9]
    tasks = [(torch.randn(n, 4), torch.randn(n)) for n in sizes]
    futures = [pool.submit(x, y) for x, y in tasks]
    drain(pool)
    for future, (x, y) in zip(futures, tasks):
        check_result(future, x, y)
    assert max(recorder.sizes) <= 8
    assert sum(recorder.sizes) == sum(sizes)
    # first come, first served, every batch filled to the limit except the last
    assert recorder.sizes == [8, 8, 8, 8, 8, 6]
    assert pool.stats()["split_tasks"] >= 2


def test_batch_limit_holds_under_concurrent_submitters_with_oversized_tasks():
    max_batch_size = 16
    recorder = Recorder()
    pool = TaskPool("p", recorder, max_batch_size)
    runtime = Runtime([pool]).start()
    results: list[tuple[Future, torch.Tensor, torch.Tensor]] = []
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(25):
            n = rng.randint(1, 3 * max_batch_size + 5)  # often larger than a whole batch
            x = torch.randn(n, 6)
            y = torch.full((n,), float(seed))
            future = pool.submit(x, y)
            with lock:
                results.append((future, x, y))

    try:
        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert not any(thread.is_alive() for thread in threads)
        done, not_done = wait([f for f, _, _ in results], timeout=WAIT)
        assert not not_done
        for future, x, y in results:
            check_result(future, x, y)
    finally:
        runtime.shutdown(WAIT)
    assert len(results) == 200
    assert recorder.sizes and max(recorder.sizes) <= max_batch_size
    assert sum(recorder.sizes) == sum(x.shape[0] for _, x, _ in results)
    assert pool.stats()["max_batch_size_seen"] <= max_batch_size
    assert pool.queued_rows == 0


def test_a_failing_batch_fails_only_its_tasks():
    def process(x: torch.Tensor) -> tuple[torch.Tensor]:
        if (x < 0).any():
            raise RuntimeError("negative rows are poison")
        return (x * 3,)

    pool = TaskPool("p", process, max_batch_size=4)
    good_before = pool.submit(torch.ones(4, 2))  # batch 1
    poisoned = pool.submit(-torch.ones(2, 2))  # batch 2, with the first half of `split`
    split = pool.submit(torch.ones(6, 2))  # rows 0-1 in batch 2 (fails), rows 2-5 dropped
    good_after = pool.submit(torch.full((3, 2), 2.0))  # batch 3
    drain(pool)
    assert torch.equal(good_before.result(timeout=WAIT)[0], torch.full((4, 2), 3.0))
    for future in (poisoned, split):
        with pytest.raises(RuntimeError, match="poison"):
            future.result(timeout=WAIT)
    assert torch.equal(good_after.result(timeout=WAIT)[0], torch.full((3, 2), 6.0))
    stats = pool.stats()
    assert stats["batch_errors"] == 1 and stats["tasks_failed"] == 2 and stats["queued_rows"] == 0


def test_the_second_part_of_a_split_task_failing_fails_the_task():
    calls = []

    def process(x: torch.Tensor) -> tuple[torch.Tensor]:
        calls.append(x.shape[0])
        if len(calls) == 2:
            raise ValueError("second batch breaks")
        return (x,)

    pool = TaskPool("p", process, max_batch_size=4)
    big = pool.submit(torch.randn(10, 1))
    later = pool.submit(torch.randn(1, 1))
    drain(pool)
    with pytest.raises(ValueError, match="second batch"):
        big.result(timeout=WAIT)
    assert later.result(timeout=WAIT)[0].shape == (1, 1)
    assert calls == [4, 4, 1]  # the third part of `big` (2 rows) was dropped; `later` ran alone


def test_outputs_with_the_wrong_batch_size_fail_the_tasks():
    pool = TaskPool("p", lambda x: (x[:1],), max_batch_size=8)
    future = pool.submit(torch.randn(3, 2))
    drain(pool)
    with pytest.raises(RuntimeError, match="rows"):
        future.result(timeout=WAIT)


def test_cancelled_tasks_are_skipped():
    recorder = Recorder()
    pool = TaskPool("p", recorder, max_batch_size=8)
    cancelled = pool.submit(torch.randn(5, 2), torch.randn(5))
    kept_x, kept_y = torch.randn(2, 2), torch.randn(2)
    kept = pool.submit(kept_x, kept_y)
    assert cancelled.cancel()
    drain(pool)
    with pytest.raises(CancelledError):
        cancelled.result(timeout=WAIT)
    check_result(kept, kept_x, kept_y)
    assert recorder.sizes == [2]


def test_submit_checks_the_batch_dimension():
    pool = TaskPool("p", lambda x, y: (x,), max_batch_size=8)
    with pytest.raises(ValueError, match="batch dimension"):
        pool.submit(torch.randn(3, 2), torch.randn(4))
    with pytest.raises(ValueError):
        pool.submit(torch.randn(0, 2), torch.randn(0))
    with pytest.raises(ValueError):
        pool.submit(torch.tensor(1.0))
    with pytest.raises(ValueError):
        TaskPool("p", lambda x: (x,), max_batch_size=0)


def test_runtime_runs_the_pool_that_waited_longest_first():
    order: list[str] = []
    pools = [TaskPool(name, lambda x, name=name: (order.append(name) or x,), 8) for name in ("a", "b", "c")]
    futures = [pools[i].submit(torch.randn(2, 2)) for i in (1, 2, 0, 1)]
    runtime = Runtime(pools).start()
    try:
        wait(futures, timeout=WAIT)
        assert all(f.done() for f in futures)
    finally:
        runtime.shutdown(WAIT)
    assert order == ["b", "c", "a"]  # b's two tasks share one batch
    assert not runtime.is_alive


def test_runtime_shutdown_fails_waiting_tasks_and_joins():
    started, release = threading.Event(), threading.Event()

    def slow(x: torch.Tensor) -> tuple[torch.Tensor]:
        started.set()
        release.wait(WAIT)
        return (x + 1,)

    pool = TaskPool("slow", slow, max_batch_size=4)
    runtime = Runtime([pool]).start()
    running = pool.submit(torch.zeros(4, 1))
    assert started.wait(WAIT)
    waiting = pool.submit(torch.zeros(2, 1))
    stopper = threading.Thread(target=runtime.shutdown, args=(WAIT,))
    stopper.start()
    release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive() and not runtime.is_alive
    assert torch.equal(running.result(timeout=WAIT)[0], torch.ones(4, 1))  # the batch in progress finished
    with pytest.raises(HostShutdownError):
        waiting.result(timeout=WAIT)
    late = pool.submit(torch.zeros(1, 1))
    with pytest.raises(PoolClosedError):
        late.result(timeout=WAIT)


def test_runtime_sleeps_while_idle_and_wakes_on_submit():
    pool = TaskPool("p", lambda x: (x * 2,), 8)
    runtime = Runtime([pool]).start()
    try:
        assert runtime.batches_run == 0
        for i in range(5):
            assert torch.equal(pool.submit(torch.full((1, 1), float(i))).result(timeout=WAIT)[0], torch.full((1, 1), 2.0 * i))
        assert pool.stats()["batches"] == 5
    finally:
        runtime.shutdown(WAIT)
    assert runtime.batches_run == 5


def test_tasks_that_cannot_be_batched_together_fail_without_hanging():
    pool = TaskPool("p", lambda x: (x,), max_batch_size=8)
    first = pool.submit(torch.zeros(2, 3))
    second = pool.submit(torch.zeros(2, 4))  # torch.cat fails on the feature size
    assert pool.run_batch() == 4
    for future in (first, second):
        with pytest.raises(RuntimeError):
            future.result(timeout=WAIT)
    assert pool.stats()["batch_errors"] == 1 and pool.queued_rows == 0


def test_groups_share_each_batch_so_a_flood_delays_another_group_by_about_one_batch():
    sizes = Recorder()
    pool = TaskPool("fair", sizes, max_batch_size=64)
    flood = [(torch.randn(256, 3), torch.randn(256)) for _ in range(8)]  # 2,048 rows: 32 batches, first come
    flood_futures = [pool.submit(x, y, group="10.0.0.0/24") for x, y in flood]
    pool.run_batch()  # the flood's first batch
    x, y = torch.randn(5, 3), torch.randn(5)
    mine = pool.submit(x, y, group="192.0.2.0/24")
    local = pool.submit(x, y)  # a local caller: a group of its own
    pool.run_batch()
    assert mine.done() and local.done()  # in the very next batch, not after 31 more
    check_result(mine, x, y)
    check_result(local, x, y)
    assert sizes.sizes == [64, 21 + 5 + 5 + 21]  # turns of a third each, until half full and each had one
    drain(pool)
    assert set(sizes.sizes[2:-1]) == {64}  # alone, the flood fills its batches
    for future, (fx, fy) in zip(flood_futures, flood):
        check_result(future, fx, fy)  # split across many batches, reassembled in order
    assert max(sizes.sizes) == 64 and sum(sizes.sizes) == 2048 + 10


def test_each_group_gets_an_equal_share_of_rows_while_all_wait():
    taken: list[int] = []
    pool = TaskPool("share", lambda x: (taken.extend(x[:, 0].long().tolist()) or x,), max_batch_size=30)
    for group in range(3):
        for _ in range(10):
            pool.submit(torch.full((10, 1), float(group)), group=f"net{group}")
    for _ in range(5):  # 150 of the 300 rows
        pool.run_batch()
    counts = [taken.count(group) for group in range(3)]
    assert counts == [50, 50, 50], counts
    assert pool.stats()["queued_groups"] == 3 and pool.queued_rows == 150
    drain(pool)
    assert pool.stats()["queued_groups"] == 0 and pool.queued_tasks == 0


def test_runtime_serves_a_new_group_on_another_expert_before_an_older_flood():
    order: list[str] = []
    gate = threading.Event()

    def flooded(x: torch.Tensor) -> tuple[torch.Tensor]:
        order.append("flooded")
        gate.wait(WAIT)
        return (x,)

    pools = [TaskPool("flooded", flooded, 8), TaskPool("other", lambda x: (order.append("other") or x,), 8)]
    flood = [pools[0].submit(torch.randn(8, 2), group="10.0.0.0/24") for _ in range(20)]
    runtime = Runtime(pools).start()
    try:
        for _ in range(3000):  # bounded: until the flood's first batch runs (and waits for the gate)
            if order:
                break
            threading.Event().wait(0.01)
        mine = pools[1].submit(torch.randn(2, 2), group="192.0.2.0/24")
        gate.set()
        assert mine.result(timeout=WAIT) is not None
        wait(flood, timeout=WAIT)
    finally:
        runtime.shutdown(WAIT)
    assert order.index("other") <= 2, order  # after the batch in progress (and at most one more), not after 19
    assert order.count("flooded") == 20


def test_runtime_queue_age_per_group():
    pool = TaskPool("ages", lambda x: (x,), 8)
    runtime = Runtime([pool])  # not started: the queue only ages
    pool.submit(torch.randn(2, 2), group="10.0.0.0/24")
    threading.Event().wait(0.05)
    assert runtime.queue_age("10.0.0.0/24") >= 0.05 and runtime.queue_age() >= 0.05
    assert runtime.queue_age("192.0.2.0/24") == 0.0  # another network waits behind nothing of its own


def test_a_batch_that_groups_share_ends_after_one_turn_each_and_the_next_task_waits_intact():
    sizes = Recorder()
    pool = TaskPool("turns", sizes, max_batch_size=30)
    tasks = [(torch.randn(15, 3), torch.randn(15), "a") for _ in range(3)] + [(torch.randn(5, 3), torch.randn(5), "b")]
    futures = [pool.submit(x, y, group=group) for x, y, group in tasks]
    assert pool.run_batch() == 20  # a's 15 (its share), b's 5; a's next task is not started
    assert pool.run_batch() == 30  # a alone fills the batch
    assert pool.run_batch() == 0 and sizes.sizes == [20, 30]
    for future, (x, y, _) in zip(futures, tasks):
        check_result(future, x, y)


def test_the_addresses_of_one_group_take_turns_task_by_task():
    order: list[int] = []
    pool = TaskPool("sources", lambda x: (order.extend(x[:, 0].long().tolist()) or x,), max_batch_size=4)
    flood = [pool.submit(torch.full((4, 1), 1.0), group="net", source="10.0.0.1") for _ in range(5)]
    mine = pool.submit(torch.full((2, 1), 2.0), group="net", source="10.0.0.2")
    pool.run_batch()
    pool.run_batch()
    assert mine.done() and order[4:6] == [2, 2]  # second, not after the other address's five tasks
    drain(pool)
    assert all(f.done() for f in flood) and order.count(1) == 20


def test_an_address_whose_last_task_is_done_does_not_cost_the_next_address_its_turn():
    order: list[int] = []
    pool = TaskPool("turns", lambda x: (order.extend(x[:, 0].long().tolist()) or x,), max_batch_size=1)
    for source, count in ((1, 1), (2, 2), (3, 2)):
        for _ in range(count):
            pool.submit(torch.full((1, 1), float(source)), group="net", source=f"10.0.0.{source}")
    drain(pool)
    assert order == [1, 2, 3, 2, 3]
