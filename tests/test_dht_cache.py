"""CachedExpertLookup's stale-while-revalidate: real DHT nodes on 127.0.0.1, a fake clock for ages, and DHT
wrappers that count calls and hold refreshes back, so that what is asserted is who waited, never how long."""

import concurrent.futures
import threading
import time

import pytest
import torch

from lightning_moe.client.beam_search import beam_search
from lightning_moe.client.dht_cache import CachedExpertLookup
from lightning_moe.client.health import HealthRegistry
from lightning_moe.dht import DHT

FAST = dict(rpc_timeout=0.3, wait_timeout=5.0)
TTL = 5.0
HOST_A, HOST_B = "127.0.0.1:7001", "127.0.0.1:7002"
GRID = (2, 2)


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LoopDHT:
    """Forwards to a real DHT (refreshes run on its event loop); counts calls; ``hold`` cleared holds refreshes back."""

    def __init__(self, dht: DHT):
        self.dht, self.wait_timeout = dht, dht.wait_timeout
        self.blocking_calls, self.future_calls = 0, 0
        self.hold = threading.Event()
        self.hold.set()
        self._waiters: list[threading.Thread] = []

    def get_active_children(self, prefixes, timeout=None, all_endpoints=False, return_future=False):
        if not return_future:
            self.blocking_calls += 1
            return self.dht.get_active_children(prefixes, timeout=timeout, all_endpoints=all_endpoints)
        self.future_calls += 1
        if self.hold.is_set():
            return self.dht.get_active_children(prefixes, timeout=timeout, all_endpoints=all_endpoints, return_future=True)
        held: concurrent.futures.Future = concurrent.futures.Future()

        def release() -> None:  # the answer is looked up only once the test lets go
            self.hold.wait(30)
            if held.set_running_or_notify_cancel():
                try:
                    held.set_result(self.dht.get_active_children(prefixes, timeout=timeout, all_endpoints=all_endpoints))
                except Exception as e:  # noqa: BLE001 - a shut-down DHT, say: the lookup must see it
                    held.set_exception(e)
        waiter = threading.Thread(target=release, daemon=True)
        self._waiters.append(waiter)
        waiter.start()
        return held

    def join(self) -> None:
        self.hold.set()
        for waiter in self._waiters:
            waiter.join(10)


class ThreadDHT:
    """A DHT without ``return_future`` (refreshes run on the lookup's worker threads); records which threads call
    it, and sleeps on ``hold`` while it is cleared when called from any thread but the test's."""

    def __init__(self, dht: DHT):
        self.dht, self.wait_timeout = dht, dht.wait_timeout
        self.callers: list[threading.Thread] = []
        self.hold = threading.Event()
        self.hold.set()

    def get_active_children(self, prefixes, timeout=None, all_endpoints=False):
        self.callers.append(threading.current_thread())
        if threading.current_thread() is not threading.main_thread():
            self.hold.wait(30)
        return self.dht.get_active_children(prefixes, timeout=timeout, all_endpoints=all_endpoints)

    @property
    def blocking_calls(self) -> int:
        return sum(caller is threading.main_thread() for caller in self.callers)

    def join(self) -> None:
        self.hold.set()


@pytest.fixture
def nodes():
    """A server node holding a 2x2 grid of experts on HOST_A but ffn.1.1, and a client node that reads it."""
    with DHT(**FAST) as server, DHT(initial_peers=[server.address], client_mode=True, **FAST) as client:
        assert server.declare_experts(["ffn.0.0", "ffn.0.1", "ffn.1.0"], HOST_A, time.time() + 120)
        yield server, client


@pytest.fixture(params=["loop", "thread"])
def wrapped(request, nodes):
    server, client = nodes
    dht = LoopDHT(client) if request.param == "loop" else ThreadDHT(client)
    yield server, dht
    dht.join()


def make_lookup(dht, clock: Clock, **kwargs) -> CachedExpertLookup:
    return CachedExpertLookup(dht, len(GRID), HealthRegistry(), ttl=TTL, clock=clock, **kwargs)


def wait_idle(lookup: CachedExpertLookup) -> None:
    """Let the background refreshes in flight land (the trainer's own compute would be this pause)."""
    end = time.monotonic() + 20
    while lookup.stats["in_flight"] and time.monotonic() < end:
        time.sleep(0.005)
    assert lookup.stats["in_flight"] == 0


def search(lookup) -> list:
    scores = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    return beam_search(lookup, "ffn", scores, k_best=4, return_endpoints=True)[0]


def test_steady_state_never_blocks_after_warm_up(wrapped):
    _, dht = wrapped
    clock = Clock()
    lookup = make_lookup(dht, clock)
    try:
        expected = [("ffn.0.1", HOST_A), ("ffn.0.0", HOST_A), ("ffn.1.0", HOST_A)]
        assert search(lookup) == expected  # warm-up: one blocking lookup per grid dimension
        warm = lookup.stats
        assert warm["blocking_lookups"] == dht.blocking_calls == 2
        for _ in range(40):  # 40 steps 0.3 ttl apart: 12 ttls
            clock.now += 0.3 * TTL
            assert search(lookup) == expected
            wait_idle(lookup)
        stats = lookup.stats
        assert stats["blocking_lookups"] == dht.blocking_calls == 2, stats  # no caller ever waited on the DHT again
        assert stats["stale_hits"] == 0, stats  # refreshed ahead: nothing served was ever past its ttl
        assert stats["refreshes"] >= 10 and stats["refreshed_prefixes"] >= 10 and stats["refresh_failures"] == 0, stats
    finally:
        lookup.close()


def test_stale_answer_is_served_while_one_refresh_is_held_back_and_then_replaced(wrapped):
    server, dht = wrapped
    clock = Clock()
    lookup = make_lookup(dht, clock, refresh_ahead=1.0)
    try:
        assert lookup.get_active_children(["ffn", "ffn.1"]) == {"ffn": {0: HOST_A, 1: HOST_A}, "ffn.1": {0: HOST_A}}
        assert server.declare_experts(["ffn.1.1"], HOST_B, time.time() + 120)  # a host joins
        # ... and HOST_A re-announces (SubkeyStorage.get serves a cached encoding of a record until an entry of it
        # is replaced or removed: a sub-key that is only added stays unseen by readers until then)
        assert server.declare_experts(["ffn.1.0"], HOST_A, time.time() + 121)
        dht.hold.clear()  # every refresh from now on waits for the test
        clock.now += TTL + 1
        for _ in range(5):  # stale answers at once, one refresh in flight for the pair of prefixes
            assert lookup.get_active_children(["ffn", "ffn.1"]) == {"ffn": {0: HOST_A, 1: HOST_A}, "ffn.1": {0: HOST_A}}
        stats = lookup.stats
        assert stats["refreshes"] == 1 and stats["in_flight"] == 2 and stats["stale_hits"] == 10, stats
        assert stats["blocking_lookups"] == dht.blocking_calls == 1, stats
        lookup.get_active_children(["ffn.1", "ffn.0"])  # ffn.0 is new: it blocks; ffn.1 is not refreshed twice
        assert lookup.stats["refreshes"] == 1 and lookup.stats["blocking_lookups"] == 2
        dht.hold.set()
        wait_idle(lookup)
        assert lookup.get_active_children(["ffn.1"]) == {"ffn.1": {0: HOST_A, 1: HOST_B}}  # the refresh replaced it
        stats = lookup.stats
        assert stats["refreshed_prefixes"] == 2 and stats["blocking_lookups"] == 2 and stats["refreshes"] == 1, stats
    finally:
        lookup.close()


def test_an_answer_past_max_stale_blocks(wrapped):
    _, dht = wrapped
    clock = Clock()
    lookup = make_lookup(dht, clock, max_stale=30.0)
    try:
        lookup.get_active_children(["ffn"])
        clock.now += 31.0
        dht.hold.clear()  # a refresh would wait: the answer below comes from a lookup on this thread
        assert lookup.get_active_children(["ffn"]) == {"ffn": {0: HOST_A, 1: HOST_A}}
        stats = lookup.stats
        assert stats["blocking_lookups"] == dht.blocking_calls == 2 and stats["stale_hits"] == 0 and stats["refreshes"] == 0
    finally:
        lookup.close()


def test_a_dead_host_is_excluded_at_once_from_cached_answers(nodes):
    _, client = nodes
    clock = Clock()
    dht = LoopDHT(client)
    lookup = make_lookup(dht, clock)
    try:
        assert lookup.get_active_children(["ffn.0"]) == {"ffn.0": {0: HOST_A, 1: HOST_A}}
        lookup.health.host_failure(HOST_A, "connection refused", refused=True)
        assert lookup.get_active_children(["ffn.0"]) == {"ffn.0": {}}
        assert lookup.least_bad_view().get_active_children(["ffn.0"]) == {"ffn.0": {0: HOST_A, 1: HOST_A}}
        assert dht.blocking_calls == 1 and dht.future_calls == 0 and lookup.stats["fresh_hits"] == 2
        assert any(HOST_A in reason for reason in lookup.excluded_experts("ffn"))
    finally:
        lookup.close()


class ScriptedDHT:
    """Answers from a list, one per call, recording whether the caller was the test's thread."""

    wait_timeout = 5.0

    def __init__(self, answers):
        self.answers, self.callers = list(answers), []

    def get_active_children(self, prefixes, timeout=None, all_endpoints=False):
        self.callers.append(threading.current_thread() is threading.main_thread())
        answer = self.answers.pop(0)
        return {p: answer.get(p, {}) for p in prefixes}


def test_empty_answers_are_not_cached_and_an_empty_refresh_keeps_the_stale_answer_within_the_bound():
    clock = Clock()
    full = {"ffn": {0: [HOST_A]}}
    dht = ScriptedDHT([{}, full, {}, full])
    lookup = CachedExpertLookup(dht, 2, HealthRegistry(), ttl=TTL, clock=clock, max_stale=20.0)
    assert lookup.get_active_children(["ffn"]) == {"ffn": {}}  # ran out of time, say
    assert lookup.get_active_children(["ffn"]) == {"ffn": {0: HOST_A}}  # asked again at once
    clock.now += TTL + 1
    assert lookup.get_active_children(["ffn"]) == {"ffn": {0: HOST_A}}  # stale; its refresh finds nothing
    lookup.close()  # joins the refresh
    stats = lookup.stats
    assert stats["refresh_empty"] == 1 and stats["refreshed_prefixes"] == 0 and stats["blocking_lookups"] == 2, stats
    assert lookup.get_active_children(["ffn"]) == {"ffn": {0: HOST_A}}  # the older answer was kept
    clock.now += 20.0
    assert lookup.get_active_children(["ffn"]) == {"ffn": {0: HOST_A}}  # past max_stale: asked on this thread
    assert dht.callers == [True, True, False, True] and lookup.stats["blocking_lookups"] == 3
    assert lookup.stats["refreshes"] == 1  # a closed lookup starts no refresh


def test_refreshes_in_flight_are_bounded_and_ttl_zero_caches_nothing(nodes):
    _, client = nodes
    clock = Clock()
    dht = LoopDHT(client)
    lookup = make_lookup(dht, clock, max_in_flight=1, refresh_ahead=1.0)
    try:
        lookup.get_active_children(["ffn", "ffn.0"])
        dht.hold.clear()
        clock.now += TTL
        lookup.get_active_children(["ffn", "ffn.0"])
        stats = lookup.stats
        assert stats["in_flight"] == 1 and stats["refreshes_skipped"] == 1 and stats["stale_hits"] == 2, stats
    finally:
        dht.join()
        lookup.close()
    uncached = CachedExpertLookup(LoopDHT(client), len(GRID), HealthRegistry(), ttl=0.0, clock=clock)
    for _ in range(3):
        uncached.get_active_children(["ffn"])
    assert uncached.stats["blocking_lookups"] == 3 and uncached.stats["refreshes"] == 0


def test_close_cancels_refreshes_on_the_loop_and_joins_worker_threads(nodes):
    _, client = nodes
    clock = Clock()
    loop_dht, thread_dht = LoopDHT(client), ThreadDHT(client)
    on_loop, on_threads = make_lookup(loop_dht, clock), make_lookup(thread_dht, clock)
    for lookup, dht in ((on_loop, loop_dht), (on_threads, thread_dht)):
        lookup.get_active_children(["ffn"])
        dht.hold.clear()
    clock.now += TTL + 1
    for lookup in (on_loop, on_threads):
        lookup.get_active_children(["ffn"])
        assert lookup.stats["in_flight"] == 1
    on_loop.close()  # cancelled at once, though its answer is held back
    assert on_loop.stats["in_flight"] == 0 and on_loop.stats["refresh_failures"] == 1
    threading.Timer(0.05, thread_dht.hold.set).start()
    on_threads.close()  # joined
    assert on_threads.stats["in_flight"] == 0 and on_threads.stats["refreshed_prefixes"] == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("lightning_moe.dht_cache")]
    clock.now += TTL + 1
    for lookup in (on_loop, on_threads):
        lookup.get_active_children(["ffn"])  # still answers, refreshes nothing
        assert lookup.stats["refreshes"] == 1
    loop_dht.join()


def test_a_refresh_cut_off_by_the_dht_shutting_down_is_counted_and_leaves_no_thread():
    with DHT(**FAST) as server:
        server.declare_experts(["ffn.0.0"], HOST_A, time.time() + 120)
        client = DHT(initial_peers=[server.address], client_mode=True, **FAST)
        dht = LoopDHT(client)
        clock = Clock()
        lookup = make_lookup(dht, clock)
        lookup.get_active_children(["ffn"])
        dht.hold.clear()
        clock.now += TTL + 1
        lookup.get_active_children(["ffn"])
        client.shutdown()
        dht.join()  # the held refresh now meets a shut-down DHT
        assert lookup.stats["in_flight"] == 0 and lookup.stats["refresh_failures"] == 1
        clock.now += TTL
        assert lookup.get_active_children(["ffn"]) == {"ffn": {0: HOST_A}}  # stale, a refresh that fails at once
        assert lookup.stats["refresh_failures"] == 2 and lookup.stats["in_flight"] == 0
        lookup.close()
    assert not client._thread.is_alive() and not server._thread.is_alive()
    assert not [t for t in threading.enumerate() if t.name.startswith("lightning_moe.dht_cache")]


def test_decentralized_moe_steps_wait_on_the_dht_only_while_warming_up():
    import functools

    from lightning_moe.client.moe import DecentralizedMoE
    from lightning_moe.config import HostConfig, LocalSwarmConfig
    from lightning_moe.server.experts import make_expert
    from lightning_moe.swarm import LocalSwarm

    host = HostConfig(expert=functools.partial(make_expert, "ffn", 8), in_features=8, grid_size=[2, 2], optimizer=None,
                      stats_every=0)
    swarm = LocalSwarm(host, LocalSwarmConfig(num_hosts=1, num_threads=1, update_period=2.0)).start()
    moe = DecentralizedMoE(8, (2, 2), "ffn", k_best=2, initial_peers=swarm.initial_peers, cache_ttl=0.3)
    try:
        x = torch.randn(4, 8)
        moe(x)
        assert moe.stats["dht_blocking"] >= 1
        blocking = refreshes = 0
        for _ in range(12):  # 12 steps over several ttls: time passes, the answers age and are refreshed
            time.sleep(0.1)
            moe(x)
            blocking += moe.stats["dht_blocking"]
            refreshes += moe.stats["dht_refreshes"]
            assert moe.stats["answered"] == moe.stats["asked"] > 0
        assert blocking == 0 and refreshes > 0, moe.lookup.stats
        lookup = moe.lookup
    finally:
        moe.close()
        swarm.shutdown()
    assert lookup._closed and lookup.stats["in_flight"] == 0 and moe.dispatcher._lookup is None
