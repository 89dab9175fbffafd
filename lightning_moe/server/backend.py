"""ExpertBackend: one expert, its optimizer, its schemas, and its forward and backward task pools."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Hashable, Protocol, Sequence

import torch
from torch import nn

from lightning_moe import wire
from lightning_moe.server.grad_bounds import GradientBounds
from lightning_moe.server.task_pool import TaskPool

logger = logging.getLogger(__name__)

Schema = list[tuple[tuple[int, ...], torch.dtype]]


class GraphKeeper(Protocol):
    """Where an expert's forward graphs go when requests ask to keep them for their backward
    (:class:`~lightning_moe.server.kept_forwards.KeptForwards`, which the host gives each backend)."""

    @property
    def enabled(self) -> bool:
        """Whether it keeps anything (a budget of 0 keeps nothing: the forward then builds no graph)."""

    def keep(self, spans: dict[str, tuple[int, int]], inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
             graph_nbytes: int) -> bool:
        """Keep a forward batch (its input leaves, its outputs with their graph); False if it cannot."""

    def backward(self, key: str, grads: Sequence[torch.Tensor], group: Hashable = None) -> Future | None:
        """A Future of the input gradients of the kept request ``key`` (``group``: the client's network); None if it
        is not kept."""


class AnswerFilter(Protocol):
    """What may alter an expert's answers before they leave (:class:`~lightning_moe.server.byzantine.Liar`, a lying
    volunteer for tests and demos, ``host.byzantine``)."""

    def forward(self, expert: nn.Module, inputs: Sequence[torch.Tensor],
                outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The answer to a forward batch."""

    def backward(self, expert: nn.Module, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
                 grad_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The answer to a backward batch."""

    def parameters(self, expert: nn.Module, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters sent to a replica for averaging (``flats``: ours, flat per dtype group)."""


def normalize_schema(schema: Sequence[Any]) -> Schema:
    """``[(shape, dtype), ...]`` with dtype a torch dtype or wire name, or ``{"shape", "dtype"}`` dicts."""
    out: Schema = []
    for entry in schema:
        if isinstance(entry, dict):
            shape, dtype = entry.get("shape"), entry.get("dtype")
        else:
            shape, dtype = entry
        if isinstance(shape, int):
            shape = (shape,)
        if not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"schema shapes must be tuples of non-negative ints, got {shape!r}")
        dtype = wire.parse_dtype(dtype) if isinstance(dtype, str) else dtype
        wire.dtype_name(dtype)  # only dtypes the wire carries
        out.append((tuple(shape), dtype))
    return out


def schema_to_json(schema: Schema) -> list[dict]:
    """The schema as sent in ``GET /info``: ``[{"shape": [...], "dtype": "float32"}, ...]``."""
    return [{"shape": list(shape), "dtype": wire.dtype_name(dtype)} for shape, dtype in schema]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or Inf; ~10x faster than ``torch.isfinite(t).all()``."""
    if bool(torch.isfinite(tensor.sum())):  # any NaN or Inf reaches the sum; an overflowing sum gets the exact check
        return True
    return bool(torch.isfinite(tensor).all())


def _as_tuple(outputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(outputs, torch.Tensor):
        return (outputs,)
    if isinstance(outputs, (tuple, list)) and outputs and all(isinstance(o, torch.Tensor) for o in outputs):
        return tuple(outputs)
    raise TypeError(f"an expert must return a tensor or a tuple of tensors, got {type(outputs).__name__}")


class ExpertBackend:
    """An expert served by a host: forward, backward with optimizer steps, schemas, and state.

    Args:
        name: the expert's uid, e.g. ``"ffn.3.14"``.
        expert: the module; it stays in train mode.
        optimizer: steps the expert's parameters after backward; None keeps the expert frozen.
        args_schema: ``[(feature_shape, dtype), ...]`` per input, the batch dimension left out.
        max_batch_size: the most rows in one batch that the host runs.
        update_every: 0 steps after every backward batch; N accumulates gradients over at
            least N samples, then steps.
        reject_nonfinite: refuse NaN/Inf in inputs and output gradients (they would corrupt the weights).
        before_batch: called before every batch the expert computes (forward, backward, and backward through a
            kept graph; not the start-up check), in the runtime thread: an exception fails that batch's requests.
            A volunteer's ``host.delay`` and ``host.fault_rate`` are such a hook.

    ``answers`` (an :class:`AnswerFilter`, None: honest) may alter the answers (``host.byzantine``); ``grad_bounds``
    (a :class:`~lightning_moe.server.grad_bounds.GradientBounds`, None: unbounded) clips each backward request's output
    gradients before it is queued (:meth:`bound_gradients`; ``host.grad_clip``). ``kept`` (a :class:`GraphKeeper`, None until a host sets it) holds the forwards that requests asked to keep.
    """

    def __init__(
        self,
        name: str,
        expert: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        args_schema: Sequence[Any],
        max_batch_size: int = 1024,
        update_every: int = 0,
        reject_nonfinite: bool = True,
        before_batch: Callable[[], None] | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if update_every < 0:
            raise ValueError(f"update_every must be non-negative, got {update_every}")
        self.name, self.expert, self.optimizer = name, expert, optimizer
        self.args_schema = normalize_schema(args_schema)
        if not self.args_schema:
            raise ValueError("args_schema needs at least one input")
        self.max_batch_size, self.update_every = int(max_batch_size), int(update_every)
        self.reject_nonfinite, self.before_batch = reject_nonfinite, before_batch
        self._lock = threading.RLock()  # held while computing, and while reading or loading state
        self.forward_batches = self.backward_batches = 0
        self.forward_samples = self.backward_samples = 0
        self.update_count = 0
        self.samples_since_update = 0
        self.expert.train()
        self.outputs_schema = self._infer_outputs_schema()
        self.kept: GraphKeeper | None = None
        self.answers: AnswerFilter | None = None
        self.grad_bounds: GradientBounds | None = None
        self.forward_pool = TaskPool(f"{name}.forward", self.forward, self.max_batch_size, pass_keys=True)
        self.backward_pool = TaskPool(f"{name}.backward", self.backward, self.max_batch_size)

    @property
    def device(self) -> torch.device:
        """The device of the expert's first parameter or buffer (CPU if it has none)."""
        for tensor in self.expert.parameters():
            return tensor.device
        for tensor in self.expert.buffers():
            return tensor.device
        return torch.device("cpu")

    def _infer_outputs_schema(self) -> Schema:
        """Run the expert once on 2 dummy rows (no grad, RNG and buffers restored)."""
        device = self.device
        dummy = [
            torch.randn(2, *shape, device=device).to(dtype) if dtype.is_floating_point else torch.zeros(2, *shape, dtype=dtype, device=device)
            for shape, dtype in self.args_schema
        ]
        saved_buffers = [b.detach().clone() for b in self.expert.buffers()]
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]), torch.no_grad():
            outputs = _as_tuple(self.expert(*dummy))
        with torch.no_grad():
            for buffer, saved in zip(self.expert.buffers(), saved_buffers):
                buffer.copy_(saved)
        if any(out.dim() == 0 or out.shape[0] != 2 for out in outputs):
            raise ValueError(f"expert {self.name}: outputs {[tuple(o.shape) for o in outputs]} keep no batch dimension")
        return [(tuple(out.shape[1:]), out.dtype) for out in outputs]

    def to(self, device: torch.device | str) -> "ExpertBackend":
        """Move the expert and the optimizer's state to ``device``."""
        with self._lock:
            self.expert.to(device)
            if self.optimizer is not None:
                for state in self.optimizer.state.values():
                    for key, value in state.items():
                        if isinstance(value, torch.Tensor) and key != "step":
                            state[key] = value.to(device)
        return self

    # ---- validation (in the request thread, before anything is queued) ---------------------
    def _check(self, tensors: Sequence[torch.Tensor], schema: Schema, what: str, batch: int | None) -> int:
        for i, (tensor, (shape, dtype)) in enumerate(zip(tensors, schema)):
            if tensor.dtype != dtype:
                raise ValueError(f"{what} {i}: dtype {wire.dtype_name(tensor.dtype)}, expected {wire.dtype_name(dtype)}")
            if tensor.dim() != len(shape) + 1 or tuple(tensor.shape[1:]) != shape:
                raise ValueError(f"{what} {i}: shape {list(tensor.shape)}, expected [batch, {', '.join(map(str, shape))}]")
            if batch is None:
                batch = tensor.shape[0]
            elif tensor.shape[0] != batch:
                raise ValueError(f"{what} {i}: batch size {tensor.shape[0]}, expected {batch} like the other tensors")
        return batch if batch is not None else 0

    def _check_finite(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        for i, tensor in enumerate(tensors):
            if tensor.is_floating_point() and not all_finite(tensor):
                raise ValueError(f"{what} {i} holds non-finite values (NaN or Inf)")

    def validate_forward(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Check forward inputs against the args schema; raises ValueError with the reason."""
        if len(tensors) != len(self.args_schema):
            raise ValueError(f"forward takes {len(self.args_schema)} tensors, got {len(tensors)}")
        self._check(tensors, self.args_schema, "input", None)
        if self.reject_nonfinite:
            self._check_finite(tensors, "input")
        return tuple(tensors)

    def validate_backward(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Check ``[*inputs, *grad_outputs]`` against both schemas; raises ValueError with the reason."""
        num_args, num_outputs = len(self.args_schema), len(self.outputs_schema)
        if len(tensors) != num_args + num_outputs:
            raise ValueError(
                f"backward takes {num_args} inputs and {num_outputs} output gradients, got {len(tensors)} tensors"
            )
        batch = self._check(tensors[:num_args], self.args_schema, "input", None)
        self._check(tensors[num_args:], self.outputs_schema, "grad_output", batch)
        if self.reject_nonfinite:
            self._check_finite(tensors[:num_args], "input")
            self._check_finite(tensors[num_args:], "grad_output")
        return tuple(tensors)

    def validate_grads(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Check the output gradients of a backward whose forward was kept; raises ValueError with the reason."""
        if len(tensors) != len(self.outputs_schema):
            raise ValueError(f"a backward of a kept forward takes {len(self.outputs_schema)} output gradients, got {len(tensors)}")
        self._check(tensors, self.outputs_schema, "grad_output", None)
        if self.reject_nonfinite:
            self._check_finite(tensors, "grad_output")
        return tuple(tensors)

    def bound_gradients(self, tensors: Sequence[torch.Tensor], source: Hashable = None) -> tuple[torch.Tensor, ...]:
        """A validated backward request (``[*inputs, *grad_outputs]``, or only the output gradients of a kept forward)
        with its output-gradient rows clipped by ``grad_bounds`` (``source``: the trainer's address)."""
        tensors = tuple(tensors)
        if self.grad_bounds is None:
            return tensors
        split = len(tensors) - len(self.outputs_schema)
        return tensors[:split] + self.grad_bounds.bound(tensors[split:], source)

    def empty_outputs(self, direction: str) -> list[torch.Tensor]:
        """The answer to a request with zero rows, without running the expert."""
        schema = self.outputs_schema if direction == "forward" else self.args_schema
        return [torch.empty(0, *shape, dtype=dtype) for shape, dtype in schema]

    # ---- compute (in the runtime thread) ---------------------------------------------------
    def forward(self, *inputs: torch.Tensor, keys: dict[str, tuple[int, int]] | None = None) -> tuple[torch.Tensor, ...]:
        """Outputs of the expert (train mode); with ``keys`` (request id -> rows) the graph is kept for their backward."""
        self._before_batch()
        kept = self.kept if keys and self.kept is not None and self.kept.enabled else None
        if kept is None:
            with self._lock, torch.no_grad():
                outputs = _as_tuple(self.expert(*inputs))
                if self.answers is not None:
                    outputs = self.answers.forward(self.expert, inputs, outputs)
        else:
            leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
            saved = _SavedTensors()
            with self._lock, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                outputs = _as_tuple(self.expert(*leaves))
            if any(o.requires_grad for o in outputs):
                kept.keep(keys, leaves, outputs, saved.nbytes)
            outputs = tuple(o.detach() for o in outputs)
            if self.answers is not None:
                with self._lock:
                    outputs = self.answers.forward(self.expert, inputs, outputs)
        self.forward_batches += 1
        self.forward_samples += inputs[0].shape[0]
        return outputs

    def backward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Gradients of the inputs; recomputes forward, accumulates parameter gradients, steps the optimizer."""
        self._before_batch()
        num_args = len(self.args_schema)
        inputs = [x.detach().requires_grad_(x.is_floating_point()) for x in tensors[:num_args]]
        with self._lock:
            with torch.enable_grad():
                outputs = _as_tuple(self.expert(*inputs))
            return self._backward_through(inputs, outputs, tensors[num_args:])

    def graph_backward(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                       grad_outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Gradients of the inputs through a kept forward's graph; accumulates parameter gradients, steps the optimizer."""
        self._before_batch()
        with self._lock:
            return self._backward_through(inputs, outputs, grad_outputs)

    def _before_batch(self) -> None:
        if self.before_batch is not None:
            self.before_batch()

    def _backward_through(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                          grad_outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Backward from ``outputs`` to the leaves ``inputs`` (lock held), then count and maybe step."""
        batch = inputs[0].shape[0]
        with torch.enable_grad():
            pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
            if pairs:
                if self.optimizer is None:
                    wanted = [x for x in inputs if x.requires_grad]
                    grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                    for x, g in zip(wanted, grads):
                        x.grad = g
                else:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grad_inputs = tuple(x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs)
        if self.answers is not None:
            grad_inputs = self.answers.backward(self.expert, inputs, grad_outputs, grad_inputs)
        self.backward_batches += 1
        self.backward_samples += batch
        if self.optimizer is not None:
            self.samples_since_update += batch
            if self.samples_since_update >= self.update_every:
                self.optimizer.step()
                self.expert.zero_grad(set_to_none=True)
                self.update_count += 1
                self.samples_since_update = 0
        return grad_inputs

    # ---- description and state -------------------------------------------------------------
    def get_info(self) -> dict:
        """What ``GET /info`` says about this expert."""
        return {
            "args_schema": schema_to_json(self.args_schema),
            "outputs_schema": schema_to_json(self.outputs_schema),
            "max_batch_size": self.max_batch_size,
        }

    def counters(self) -> dict:
        """Batches and samples served, optimizer steps."""
        return {
            "forward_batches": self.forward_batches,
            "forward_samples": self.forward_samples,
            "backward_batches": self.backward_batches,
            "backward_samples": self.backward_samples,
            "update_count": self.update_count,
            "samples_since_update": self.samples_since_update,
        }

    @property
    def lock(self) -> threading.RLock:
        """Held while the expert computes and while its state is read or loaded: hold it to change the weights from
        another thread (replicas' averaging)."""
        return self._lock

    def state_dict(self) -> dict:
        """A copy of the expert's weights, the optimizer's state and the counters."""
        with self._lock:
            state = {
                "expert": {k: v.detach().clone() for k, v in self.expert.state_dict().items()},
                "optimizer": _clone(self.optimizer.state_dict()) if self.optimizer is not None else None,
                "counters": self.counters(),
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`state_dict` returned (accumulated gradients are dropped)."""
        with self._lock:
            self.expert.load_state_dict(state["expert"])
            if self.optimizer is not None and state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            self.expert.zero_grad(set_to_none=True)
            for key, value in (state.get("counters") or {}).items():
                if key in self.counters():
                    setattr(self, key, int(value))
            self.samples_since_update = 0

    def __repr__(self) -> str:
        return f"ExpertBackend({self.name!r}, {type(self.expert).__name__}, max_batch_size={self.max_batch_size})"


class _SavedTensors:
    """Saved-tensor hooks of a kept forward: count the bytes the graph holds, and let the optimizer step the
    parameters in place before the graph's backward runs (autograd would refuse a parameter modified since the
    forward; the backward then uses the current weights, as a recomputed forward would). Every other saved
    tensor keeps autograd's check against in-place changes."""

    def __init__(self) -> None:
        self.nbytes = 0
        self._seen: set[int] = set()

    def pack(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):  # a weight or a view of one
            return tensor
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.nbytes += storage.nbytes()
        return tensor, tensor._version

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        tensor, version = packed
        if tensor._version != version:
            raise RuntimeError("a tensor saved for backward was modified in place after the forward (the expert's "
                               "forward must not change its intermediate tensors in place)")
        return tensor


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    return value
