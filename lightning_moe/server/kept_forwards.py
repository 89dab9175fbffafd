"""KeptForwards: the autograd graphs of recent forward batches, kept within a memory budget.

Without them a host's backward runs the forward again from inputs that the trainer sends back
(one forward more per sample than local training, and the inputs cross the network twice). A
trainer that will call backward asks the host to keep its forward (``?keep=<request id>``);
its backward then sends only the output gradients under the same id.

A batch's graph spans every request in it, and one backward through it costs the whole batch,
so a kept batch runs its backward once, when every kept request of it has its gradients. The
Runtime runs a batch that is still missing some of them only when it has nothing else to do, or
once it has waited ``max_wait`` seconds: then the graph is used if most rows are there (missing
rows get zero gradients, which add nothing), else the rows that arrived are recomputed from
their kept inputs. Requests that arrive after their batch's graph was used are recomputed from
their kept inputs too. A request whose batch was evicted (budget, ``ttl``) is answered None:
the HTTP layer asks the trainer to send its inputs (409), as without keeping.

Each expert has a :class:`KeptForwards`, a Runtime pool of its graph backwards; the host's experts
share one :class:`KeptStore`, the memory budget, from which the oldest batch of any expert goes first.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Hashable, Sequence

import torch

from lightning_moe.server.backend import ExpertBackend
from lightning_moe.server.task_pool import PoolClosedError, settle

logger = logging.getLogger(__name__)

MAX_KEPT_BATCHES = 4096  # a bound on bookkeeping too, whatever the bytes (a stranger may send 1-row forwards)
GRAPH_WORTH = 2 / 3  # use the graph when this share of its rows arrived: backward ~2 forwards, recompute ~3 per row


class KeptBatch:
    """One forward batch of one expert: its input leaves, its outputs (with the graph) and who waits."""

    __slots__ = ("pool", "inputs", "outputs", "spans", "arrived", "created", "first_arrival", "nbytes", "inputs_nbytes")

    def __init__(self, pool: "KeptForwards", inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                 spans: dict[str, tuple[int, int]], graph_nbytes: int):
        self.pool, self.inputs, self.outputs, self.spans = pool, list(inputs), tuple(outputs), spans
        self.arrived: dict[str, tuple[tuple[torch.Tensor, ...], Future]] = {}
        self.created, self.first_arrival = time.monotonic(), None
        self.inputs_nbytes = sum(x.numel() * x.element_size() for x in self.inputs)
        self.nbytes = graph_nbytes + self.inputs_nbytes

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def complete(self) -> bool:
        return self.outputs is not None and len(self.arrived) == len(self.spans)

    def inputs_of(self, key: str) -> list[torch.Tensor]:
        start, stop = self.spans[key]
        return [x.detach()[start:stop] for x in self.inputs]


class KeptStore:
    """The kept forward batches of every expert of a host, at most ``budget_bytes`` of saved tensors.

    Its lock guards every :class:`KeptForwards` that keeps batches here.

    Args:
        budget_bytes: saved activations and inputs kept at most; the oldest batches go first.
        ttl: seconds a batch is kept for backwards that have not come.
    """

    def __init__(self, budget_bytes: int, ttl: float = 60.0):
        self.budget_bytes, self.ttl = int(budget_bytes), float(ttl)
        self._lock = threading.Lock()
        self._batches: collections.OrderedDict[int, KeptBatch] = collections.OrderedDict()  # oldest first
        self._next_id = 0
        self._used = 0
        self.counters = dict.fromkeys(("kept", "not_kept", "hits", "misses", "graph_backwards", "recomputed",
                                       "evicted", "expired"), 0)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def stats(self) -> dict:
        """Counters, batches kept and bytes used."""
        with self._lock:
            return {**self.counters, "batches": len(self._batches), "used_bytes": self._used, "budget_bytes": self.budget_bytes}

    # ---- bookkeeping (lock held) -----------------------------------------------------------
    def _add(self, batch: KeptBatch) -> int | None:
        """Keep ``batch``, evicting the oldest batches past the budget; its id, or None if it cannot fit."""
        self._expire(time.monotonic())
        if batch.nbytes > self.budget_bytes:
            self.counters["not_kept"] += 1
            return None
        while (self._used + batch.nbytes > self.budget_bytes or len(self._batches) >= MAX_KEPT_BATCHES) \
                and self._evict_one():
            pass
        batch_id, self._next_id = self._next_id, self._next_id + 1
        self._batches[batch_id] = batch
        self._used += batch.nbytes
        self.counters["kept"] += 1
        return batch_id

    def _release_graph(self, batch: KeptBatch) -> None:
        """A batch's graph was used: only its inputs stay (for its stragglers)."""
        self._used -= batch.nbytes - batch.inputs_nbytes
        batch.nbytes = batch.inputs_nbytes

    def _drop(self, batch_id: int) -> None:
        """Forget a batch that has no gradients waiting."""
        batch = self._batches.pop(batch_id)
        self._used -= batch.nbytes
        batch.pool._unindex(batch_id, batch)

    def _evict_one(self) -> bool:
        """Evict the oldest batch without waiting gradients (those still run); False if none can go."""
        for batch_id, batch in self._batches.items():
            if not batch.arrived:
                self._drop(batch_id)
                self.counters["evicted"] += 1
                return True
        return False

    def _expire(self, now: float) -> None:
        expired = []
        for batch_id, batch in self._batches.items():  # oldest first: stop at the first one still young
            if now - batch.created <= self.ttl:
                break
            if not batch.arrived:
                expired.append(batch_id)
        for batch_id in expired:
            self._drop(batch_id)
            self.counters["expired"] += 1


class KeptForwards:
    """The forwards of one expert kept for their backward, and the Runtime's pool of their graph backwards.

    ``oldest_submit_time`` is the oldest batch that is complete (or waited ``max_wait``),
    ``deferred_submit_time`` one that merely has arrivals.

    Args:
        backend: the expert (the host makes this its ``backend.kept``); it runs the backwards.
        store: the host's memory budget, shared by the KeptForwards of all its experts.
        max_wait: seconds a batch with some of its gradients waits for the others while the host is busy.
    """

    def __init__(self, backend: ExpertBackend, store: KeptStore, max_wait: float = 0.5):
        self.backend, self.store, self.max_wait = backend, store, float(max_wait)
        self.name = f"{backend.name}.kept"
        self._by_key: dict[str, int] = {}  # request id -> batch id
        self._ready: dict[int, KeptBatch] = {}  # batches with gradients waiting and their graph unused: the Runtime's work
        self._closed: BaseException | None = None
        self.wakeup: threading.Event | None = None  # set by the Runtime

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    # ---- the forward side (runtime thread) ------------------------------------------------
    def keep(self, spans: dict[str, tuple[int, int]], inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
             graph_nbytes: int) -> bool:
        """Keep a forward batch whose requests ``spans`` (request id -> rows) asked for it; False if it cannot fit."""
        batch = KeptBatch(self, inputs, outputs, spans, graph_nbytes)
        store = self.store
        with store._lock:
            if self._closed is not None:
                store.counters["not_kept"] += 1
                return False
            batch_id = store._add(batch)
            if batch_id is None:
                return False
            for key in spans:
                self._by_key[key] = batch_id
        return True

    # ---- the backward side (HTTP threads) --------------------------------------------------
    def backward(self, key: str, grads: Sequence[torch.Tensor], group: Hashable = None) -> Future | None:
        """A Future of the input gradients of the kept request ``key``; None if it is not kept (any more).

        Raises ValueError if ``grads`` do not have the request's rows. ``group``: the client's network, whose share
        a recomputed backward takes in the backward pool.
        """
        store = self.store
        with store._lock:
            if self._closed is not None:
                future: Future = Future()
                future.set_exception(self._closed)
                return future
            batch_id = self._by_key.get(key)
            batch = store._batches.get(batch_id) if batch_id is not None else None
            if batch is None or key in batch.arrived:
                store.counters["misses"] += 1
                return None
            start, stop = batch.spans[key]
            if any(g.shape[0] != stop - start for g in grads):
                raise ValueError(f"grad_output: {[g.shape[0] for g in grads]} rows, the kept forward had {stop - start}")
            store.counters["hits"] += 1
            if batch.outputs is None:  # its graph was used: recompute this request from its kept inputs
                del self._by_key[key]
                inputs = batch.inputs_of(key)
                self._forget_if_done(batch_id, batch)
                store.counters["recomputed"] += 1
                return self.backend.backward_pool.submit(*inputs, *grads, group=group)
            future = Future()
            batch.arrived[key] = (tuple(grads), future)
            if batch.first_arrival is None:
                batch.first_arrival = time.monotonic()
                self._ready[batch_id] = batch
        if self.wakeup is not None:
            self.wakeup.set()
        return future

    # ---- the Runtime's view ----------------------------------------------------------------
    def _due(self) -> list[int]:
        """Batches that should run now (lock held): complete, or waited ``max_wait`` for the rest."""
        now = time.monotonic()
        return [i for i, b in self._ready.items() if b.complete or now - b.first_arrival >= self.max_wait]

    @property
    def oldest_submit_time(self) -> float | None:
        """When the oldest batch that should run now got its first gradients."""
        if not self._ready:  # read without the lock: a batch that just arrived also sets the wakeup
            return None
        with self.store._lock:
            return min((self._ready[i].first_arrival for i in self._due()), default=None)

    @property
    def turn_time(self) -> float | None:
        """As :attr:`oldest_submit_time`: a kept batch's backward serves all its requests at once, whoever sent them."""
        return self.oldest_submit_time

    def group_submit_time(self, group: Hashable) -> float | None:
        """As :attr:`oldest_submit_time`, for every group: all wait behind the kept batches that are due."""
        return self.oldest_submit_time

    @property
    def deferred_submit_time(self) -> float | None:
        """When the oldest batch with some (not all) of its gradients got its first: run it if nothing else waits."""
        if not self._ready:
            return None
        with self.store._lock:
            times = [b.first_arrival for b in self._ready.values()]
        return min(times, default=None)

    def run_batch(self, device: torch.device | str | None = None) -> int:
        """Run the backward of the oldest batch that should run now, else (the host is idle) of the oldest batch with
        gradients; returns its rows (0 if none)."""
        store = self.store
        with store._lock:
            if not self._ready:
                return 0
            batch_id = min(self._due() or self._ready, key=lambda i: self._ready[i].first_arrival)
            batch = self._ready.pop(batch_id)
            arrived, batch.arrived = batch.arrived, {}
            outputs, batch.outputs = batch.outputs, None  # a graph runs backward once
            for key in arrived:
                del self._by_key[key]
            arrived_rows = sum(stop - start for start, stop in (batch.spans[k] for k in arrived))
            use_graph = arrived_rows >= GRAPH_WORTH * batch.rows
            store._release_graph(batch)
            self._forget_if_done(batch_id, batch)
            store.counters["graph_backwards" if use_graph else "recomputed"] += 1 if use_graph else len(arrived)
        if use_graph:
            self._run_graph(batch, outputs, arrived)
        else:
            for key, (grads, future) in arrived.items():
                _chain(self.backend.backward_pool.submit(*batch.inputs_of(key), *grads), future)
        return arrived_rows

    def _run_graph(self, batch: KeptBatch, outputs: tuple[torch.Tensor, ...], arrived: dict) -> None:
        try:
            grad_outputs = [torch.zeros_like(o) for o in outputs]
            for key, (grads, _) in arrived.items():
                start, stop = batch.spans[key]
                for full, g in zip(grad_outputs, grads):
                    full[start:stop] = g.to(full.device)
            grad_inputs = self.backend.graph_backward(batch.inputs, outputs, grad_outputs)
        except Exception as e:  # noqa: BLE001 - the error belongs to the requests, not to the runtime
            for _, future in arrived.values():
                settle(future, error=e)
            return
        for key, (_, future) in arrived.items():
            start, stop = batch.spans[key]
            settle(future, tuple(g[start:stop].detach().to("cpu") for g in grad_inputs))

    # ---- bookkeeping (store lock held) -----------------------------------------------------
    def _forget_if_done(self, batch_id: int, batch: KeptBatch) -> None:
        """Drop a batch whose graph was used once none of its requests can come any more."""
        if batch.outputs is None and not any(self._by_key.get(k) == batch_id for k in batch.spans):
            self.store._drop(batch_id)

    def _unindex(self, batch_id: int, batch: KeptBatch) -> None:
        """The store dropped ``batch``: its requests are no longer kept."""
        for key in batch.spans:
            if self._by_key.get(key) == batch_id:
                del self._by_key[key]

    # ---- lifecycle -------------------------------------------------------------------------
    def close(self, error: BaseException | None = None) -> None:
        """Refuse new batches, forget this expert's kept batches and fail every waiting backward."""
        error = error if error is not None else PoolClosedError(f"{self.name} is closed")
        store = self.store
        with store._lock:
            self._closed = error
            waiting = [future for b in self._ready.values() for _, future in b.arrived.values()]
            for batch in self._ready.values():
                batch.arrived = {}
            self._ready.clear()
            for batch_id in [i for i, b in store._batches.items() if b.pool is self]:
                store._drop(batch_id)
        for future in waiting:
            settle(future, error=error)

    def reopen(self) -> None:
        with self.store._lock:
            self._closed = None

    def __repr__(self) -> str:
        return f"KeptForwards({self.backend.name!r}, ready={len(self._ready)})"


def _chain(source: Future, target: Future) -> None:
    """Settle ``target`` with ``source``'s outcome when it has one."""

    def copy(done: Future) -> None:
        error = done.exception() if not done.cancelled() else PoolClosedError("cancelled")
        settle(target, None if error is not None else done.result(), error)

    source.add_done_callback(copy)
