"""TaskPool: collects tasks from many threads and forms batches of at most ``max_batch_size`` rows.

A task is a tuple of tensors that share their first (batch) dimension, plus a Future, and the
group it comes from (the client's network, :func:`lightning_moe.net.netgroup`; None for local
callers). Groups share the batches by deficit round robin over rows: each batch gives every group
with waiting work a share of about ``max_batch_size / groups`` rows, so a flood from one network
delays another's task by about one batch, not by the flood's length. A batch that several groups
share ends once it is half full and each had its turn (a group alone fills it): the flooder's next
turn would only make the others' batch slower. Within a group, the client addresses (``source``) take turns task by
task, and each address's tasks are served first come, first served; a task larger than
the room left in a batch is split, so no batch ever exceeds the limit. The Future of a split task gets the concatenated outputs of its
parts, in order. If processing a batch raises, every task in that batch gets the exception and
the remaining parts of those tasks are dropped; other tasks are not affected.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

logger = logging.getLogger(__name__)

ProcessFn = Callable[..., Sequence[torch.Tensor]]


class PoolClosedError(RuntimeError):
    """The pool (or the host that owns it) is shutting down and takes no more tasks."""


def settle(future: Future, result: object = None, error: BaseException | None = None) -> None:
    """Set a Future's result or exception unless it is already done (cancelled, failed by close())."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


class _Task:
    __slots__ = ("inputs", "future", "size", "offset", "parts", "submitted", "key", "group")

    def __init__(self, inputs: tuple[torch.Tensor, ...], future: Future, size: int, key: str | None = None,
                 group: Hashable = None):
        self.inputs, self.future, self.size, self.key, self.group = inputs, future, size, key, group
        self.offset = 0  # rows already put into batches
        self.parts: list[Sequence[torch.Tensor]] = []  # outputs of the parts processed so far
        self.submitted = time.monotonic()


class _Group:
    """The waiting tasks of one group: a queue per source address, the sources in round-robin order."""

    __slots__ = ("sources", "tasks")

    def __init__(self) -> None:
        self.sources: collections.OrderedDict[Hashable, collections.deque[_Task]] = collections.OrderedDict()
        self.tasks = 0

    def add(self, task: _Task, source: Hashable) -> None:
        queue = self.sources.get(source)
        if queue is None:
            queue = self.sources[source] = collections.deque()
        queue.append(task)
        self.tasks += 1

    def head(self) -> tuple[Hashable, _Task]:
        """The source whose turn it is and its oldest task, whose rows go next."""
        source, queue = next(iter(self.sources.items()))
        return source, queue[0]

    def oldest(self) -> float:
        """When its oldest waiting task was submitted."""
        return min(queue[0].submitted for queue in self.sources.values())

    def pop_head(self) -> _Task:
        source, queue = next(iter(self.sources.items()))
        self.tasks -= 1
        task = queue.popleft()
        if not queue:
            del self.sources[source]
        return task

    def turn_over(self, source: Hashable) -> None:
        """``source`` had its turn: the next source's (a task in progress goes on at its source's next turn)."""
        if len(self.sources) > 1 and source in self.sources:
            self.sources.move_to_end(source)

    def all_tasks(self) -> list[_Task]:
        return [task for queue in self.sources.values() for task in queue]


@dataclass
class Batch:
    """Rows taken from the queue: ``parts`` lists ``(task, start, stop)``; ``inputs`` is one tensor per arg."""

    parts: list[tuple[_Task, int, int]]
    inputs: list[torch.Tensor]
    size: int


class TaskPool:
    """Collects tasks and forms batches of at most ``max_batch_size`` rows for ``process_fn``.

    ``process_fn(*batch_inputs)`` returns a tuple of outputs whose first dimension is the batch.
    With ``pass_keys`` it also gets ``keys=`` if a task of the batch has a key: the ``key`` each
    task was submitted with -> its rows in the batch (tasks split over several batches are left out).
    Thread-safe: any thread may :meth:`submit`; one thread (the Runtime) calls :meth:`run_batch`.
    """

    def __init__(self, name: str, process_fn: ProcessFn, max_batch_size: int, history: int = 1024, pass_keys: bool = False):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.name, self.process_fn, self.max_batch_size = name, process_fn, int(max_batch_size)
        self.pass_keys = pass_keys
        # waiting tasks per group, groups in round-robin order; a group leaves when it has no task left
        self._groups: collections.OrderedDict[Hashable, _Group] = collections.OrderedDict()
        self._deficit: dict[Hashable, int] = {}  # rows a group may still take in its current turn
        self._served_at: dict[Hashable, float] = {}  # when a remote group with waiting tasks last got rows
        self._lock = threading.Lock()
        self._rows = 0
        self._closed: BaseException | None = None
        self.wakeup: threading.Event | None = None  # set by the Runtime: signalled on every submit
        self.recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=history)
        self._counters = dict.fromkeys(
            ("tasks", "rows", "batches", "rows_processed", "tasks_done", "tasks_failed", "batch_errors", "split_tasks"), 0
        )
        self._max_batch_seen = 0
        self._wait_total = 0.0
        self._wait_count = 0
        self._wait_max = 0.0
        self._busy_time = 0.0

    # ---- producers -------------------------------------------------------------------------
    def submit(self, *inputs: torch.Tensor, key: str | None = None, group: Hashable = None,
               source: Hashable = None) -> Future:
        """Queue one task (``key``: what ``process_fn`` is told the task's rows belong to; ``group``: whose share it
        takes, the client's network or None; ``source``: the client's address, which takes turns with the group's
        other addresses); returns a Future of its outputs (a tuple of tensors)."""
        if not inputs:
            raise ValueError("a task needs at least one tensor")
        size = inputs[0].shape[0] if inputs[0].dim() > 0 else -1
        if size < 0 or any(x.dim() == 0 or x.shape[0] != size for x in inputs):
            raise ValueError(f"all tensors of a task need the same batch dimension, got {[tuple(x.shape) for x in inputs]}")
        if size == 0:
            raise ValueError("a task needs at least one row")
        future: Future = Future()
        task = _Task(inputs, future, size, key, group)
        with self._lock:
            if self._closed is not None:
                future.set_exception(self._closed)
                return future
            waiting = self._groups.get(group)
            if waiting is None:
                waiting = self._groups[group] = _Group()
            waiting.add(task, source)
            self._rows += size
            self._counters["tasks"] += 1
            self._counters["rows"] += size
        wakeup = self.wakeup
        if wakeup is not None:
            wakeup.set()
        return future

    # ---- state ---------------------------------------------------------------------------
    @property
    def oldest_submit_time(self) -> float | None:
        """``time.monotonic()`` at which the oldest waiting task was submitted; None if the queue is empty."""
        with self._lock:
            return min((waiting.oldest() for waiting in self._groups.values()), default=None)

    def group_submit_time(self, group: Hashable) -> float | None:
        """When the oldest waiting task of ``group`` was submitted; None if it has none."""
        with self._lock:
            waiting = self._groups.get(group)
            return waiting.oldest() if waiting is not None else None

    @property
    def turn_time(self) -> float | None:
        """When the work the Runtime owes this pool became due: the earliest over its groups of the later of the
        group's oldest task and the last time the group got rows here (a remote group just served is not owed
        its age again, so a flood on one expert cannot hold the Runtime from another's newer work); None if empty."""
        with self._lock:
            served = self._served_at
            return min((max(waiting.oldest(), served.get(group, 0.0)) for group, waiting in self._groups.items()),
                       default=None)

    @property
    def deferred_submit_time(self) -> float | None:
        """None: a TaskPool defers no work (every waiting task counts in :attr:`oldest_submit_time`)."""
        return None

    @property
    def oldest_task_age(self) -> float:
        """Seconds the oldest waiting task has waited (0.0 if none waits)."""
        submitted = self.oldest_submit_time
        return 0.0 if submitted is None else time.monotonic() - submitted

    @property
    def queued_rows(self) -> int:
        """Rows waiting to be put into a batch."""
        return self._rows

    @property
    def queued_tasks(self) -> int:
        """Tasks with rows waiting (a split task counts while its last part waits)."""
        return sum(waiting.tasks for waiting in self._groups.values())

    def stats(self) -> dict:
        """Counters: tasks, rows, batches, batch sizes, queue wait (seconds), errors, busy time."""
        with self._lock:
            out: dict = dict(self._counters)
            batches = out["batches"]
            out.update(
                queued_rows=self._rows,
                queued_tasks=sum(waiting.tasks for waiting in self._groups.values()),
                queued_groups=len(self._groups),
                mean_batch_size=out["rows_processed"] / batches if batches else 0.0,
                max_batch_size_seen=self._max_batch_seen,
                mean_queue_wait=self._wait_total / self._wait_count if self._wait_count else 0.0,
                max_queue_wait=self._wait_max,
                busy_time=self._busy_time,
            )
        return out

    # ---- the consumer (one thread) ---------------------------------------------------------
    def _take(self) -> Batch | None:
        """Rows for one batch, by deficit round robin over the groups with waiting tasks (their sources in turn)."""
        parts: list[tuple[_Task, int, int]] = []
        room = self.max_batch_size
        now = time.monotonic()
        with self._lock:
            groups, deficit = self._groups, self._deficit
            quantum = max(1, self.max_batch_size // max(1, len(groups)))  # a turn's share of rows
            served: set[Hashable] = set()  # groups with rows in this batch
            while groups and room > 0:
                group, waiting = next(iter(groups.items()))
                credit = deficit.get(group, 0)
                if credit <= 0 and group in served and len(served) > 1 and 2 * room <= self.max_batch_size:
                    break  # half full, and every waiting group had its share: a shorter batch answers the others sooner
                source, task = waiting.head()
                if task.offset == 0:
                    if not task.future.set_running_or_notify_cancel():  # cancelled while it waited
                        self._drop_head(group, waiting)
                        continue
                    wait = now - task.submitted
                    self._wait_total += wait
                    self._wait_count += 1
                    self._wait_max = max(self._wait_max, wait)
                elif task.future.done():  # an earlier part failed
                    self._drop_head(group, waiting)
                    continue
                if credit <= 0:  # a new turn
                    credit += quantum
                served.add(group)
                take = min(room, credit, task.size - task.offset)
                parts.append((task, task.offset, task.offset + take))
                if take < task.size and task.offset == 0:
                    self._counters["split_tasks"] += 1
                task.offset += take
                room -= take
                self._rows -= take
                deficit[group] = credit - take
                if group is not None:
                    self._served_at[group] = now
                if task.offset == task.size:
                    waiting.pop_head()
                if not waiting.tasks:
                    self._forget(group)
                    continue
                waiting.turn_over(source)
                if deficit[group] <= 0:
                    groups.move_to_end(group)  # its turn is over
        return Batch(parts, [], self.max_batch_size - room) if parts else None

    def _gather(self, batch: Batch) -> list[torch.Tensor]:
        """One input tensor per arg: the task's own tensors (or views) if it is alone, else a concatenation."""
        parts = batch.parts
        if len(parts) == 1:
            task, start, stop = parts[0]
            return list(task.inputs) if stop - start == task.size else [x[start:stop] for x in task.inputs]
        num_args = len(parts[0][0].inputs)
        if any(len(task.inputs) != num_args for task, _, _ in parts):
            raise ValueError(f"pool {self.name}: tasks in one batch have different numbers of tensors")
        return [torch.cat([task.inputs[i][start:stop] for task, start, stop in parts]) for i in range(num_args)]

    @staticmethod
    def _keys(batch: Batch) -> dict[str, tuple[int, int]]:
        """Each whole task's key -> its rows in the batch."""
        keys, offset = {}, 0
        for task, start, stop in batch.parts:
            if task.key is not None and start == 0 and stop == task.size:
                keys[task.key] = (offset, offset + stop - start)
            offset += stop - start
        return keys

    def _drop_head(self, group: Hashable, waiting: _Group) -> None:
        task = waiting.pop_head()
        self._rows -= task.size - task.offset
        if not waiting.tasks:
            self._forget(group)

    def _forget(self, group: Hashable) -> None:
        """A group whose queue emptied leaves the round (lock held): its unused share and its turn time go."""
        del self._groups[group]
        self._deficit.pop(group, None)
        self._served_at.pop(group, None)

    def deliver(self, batch: Batch, outputs: Sequence[torch.Tensor]) -> None:
        """Hand each task its rows of ``outputs``; a task's Future is set when its last part is done."""
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        ok = [isinstance(o, torch.Tensor) and o.dim() > 0 and o.shape[0] == batch.size for o in outputs]
        if not outputs or not all(ok):
            shapes = [tuple(o.shape) if isinstance(o, torch.Tensor) else type(o).__name__ for o in outputs]
            self.fail(batch, RuntimeError(f"pool {self.name}: outputs {shapes} do not all have {batch.size} rows"))
            return
        finished: list[tuple[_Task, tuple[torch.Tensor, ...]]] = []
        offset = 0
        for task, start, stop in batch.parts:
            rows = stop - start
            mine = [out[offset : offset + rows] for out in outputs]
            offset += rows
            if task.future.done():
                continue
            if start == 0 and stop == task.size:
                finished.append((task, tuple(mine)))
            else:
                task.parts.append(mine)
                if stop == task.size:
                    finished.append((task, tuple(torch.cat(pieces) for pieces in zip(*task.parts))))
                    task.parts = []
        with self._lock:  # count first: whoever sees a result also sees its batch in stats()
            self._count_batch(batch.size)
            self._counters["tasks_done"] += len(finished)
        for task, result in finished:
            settle(task.future, result)

    def fail(self, batch: Batch, error: BaseException) -> None:
        """Give ``error`` to every task in the batch (their other parts are dropped later)."""
        failing = [task for task, _, _ in batch.parts if not task.future.done()]
        with self._lock:
            self._count_batch(batch.size)
            self._counters["batch_errors"] += 1
            self._counters["tasks_failed"] += len(failing)
        for task in failing:
            task.parts = []
            settle(task.future, error=error)

    def _count_batch(self, size: int) -> None:
        self._counters["batches"] += 1
        self._counters["rows_processed"] += size
        self._max_batch_seen = max(self._max_batch_seen, size)
        self.recent_batch_sizes.append(size)

    def run_batch(self, device: torch.device | str | None = None) -> int:
        """Process one batch: move its inputs to ``device``, run ``process_fn``, outputs back to CPU.

        Returns the number of rows processed (0 if the queue was empty). Exceptions of
        ``process_fn`` (or of gathering mismatched tasks) go to the tasks' Futures, never to the caller.
        """
        batch = self._take()
        if batch is None:
            return 0
        begin = time.perf_counter()
        try:
            inputs = batch.inputs = self._gather(batch)
            if device is not None:
                inputs = [x.to(device, non_blocking=True) for x in inputs]
            keys = self._keys(batch) if self.pass_keys else None
            outputs = self.process_fn(*inputs, keys=keys) if keys else self.process_fn(*inputs)
            if isinstance(outputs, torch.Tensor):
                outputs = (outputs,)
            outputs = [out.detach().to("cpu") for out in outputs]
        except Exception as e:  # noqa: BLE001 - the error belongs to the tasks, not to the runtime
            logger.debug("pool %s: batch of %d rows failed: %r", self.name, batch.size, e)
            self.fail(batch, e)
        else:
            self.deliver(batch, outputs)
        with self._lock:
            self._busy_time += time.perf_counter() - begin
        return batch.size

    def close(self, error: BaseException | None = None) -> None:
        """Refuse new tasks and give every waiting task ``error`` (a PoolClosedError by default)."""
        error = error if error is not None else PoolClosedError(f"pool {self.name} is closed")
        with self._lock:
            self._closed = error
            waiting = [task for group in self._groups.values() for task in group.all_tasks()]
            self._groups.clear()
            self._deficit.clear()
            self._served_at.clear()
            self._rows = 0
        for task in waiting:
            task.parts = []
            settle(task.future, error=error)

    def reopen(self) -> None:
        """Take tasks again after :meth:`close`."""
        with self._lock:
            self._closed = None

    def __repr__(self) -> str:
        return f"TaskPool({self.name!r}, max_batch_size={self.max_batch_size}, queued_rows={self._rows})"
