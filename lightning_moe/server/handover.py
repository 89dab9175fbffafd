"""State handover: a host that takes a cell which another host already serves (a replica) first downloads that
replica's state, weights and optimizer state, and only then declares the cell.

On the wire (``GET /state/<uid>``) a state is a wire message (:mod:`lightning_moe.wire`, no pickle): a JSON manifest
as a uint8 tensor, then one flat buffer per dtype. The manifest lists each tensor's place in the state (``expert``
and a parameter name, or ``optimizer``, a parameter index and a key), dtype, shape and offset in its buffer, the
optimizer's non-tensor values and the expert's counters. The receiver checks everything against its own expert
before it loads anything (:func:`decode_state`): the same parameter names, shapes and dtypes; optimizer tensors
shaped as their parameter or scalar; no more keys per parameter than ``MAX_OPTIMIZER_KEYS``; and the answer no
larger than its own state could be (``max_state_bytes``). The optimizer's hyperparameters (learning rate, ...)
are the receiver's own: a replica hands over what was learned, not how to learn. In a private swarm the request
is signed for the replica's host id, as expert calls are.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_moe import wire
from lightning_moe.client.remote_expert import host_id
from lightning_moe.net import http_client
from lightning_moe.server.backend import ExpertBackend

logger = logging.getLogger(__name__)

FORMAT = 1
#: Optimizer state entries per parameter (Adam keeps 3: step, exp_avg, exp_avg_sq).
MAX_OPTIMIZER_KEYS = 8
#: An optimizer keeps at most this many tensors of its parameter's size per parameter (Adam: 2).
OPTIMIZER_COPIES = 4
MAX_MANIFEST_BYTES = 4 << 20
#: Replicas asked, one after another, before a cell starts from fresh weights.
MAX_REPLICAS_TRIED = 3
SCALAR_TYPES = (bool, int, float)


class HandoverError(RuntimeError):
    """A replica's state could not be fetched or does not fit this host's expert; says which, where and why."""


def encode_state(state: Mapping[str, Any]) -> list[torch.Tensor]:
    """A backend's :meth:`~ExpertBackend.state_dict` as wire tensors: the manifest, then one flat buffer per dtype."""
    entries: list[dict] = []
    buffers: dict[str, list[torch.Tensor]] = {}
    sizes: dict[str, int] = {}

    def add(path: list, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        name = wire.dtype_name(tensor.dtype)
        entries.append({"path": path, "dtype": name, "shape": list(tensor.shape), "offset": sizes.get(name, 0)})
        buffers.setdefault(name, []).append(tensor.reshape(-1))
        sizes[name] = sizes.get(name, 0) + tensor.numel()

    for name, tensor in state["expert"].items():
        add(["expert", name], tensor)
    scalars = []
    optimizer = state.get("optimizer") or {"state": {}}
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                add(["optimizer", int(index), str(key)], value)
            elif isinstance(value, SCALAR_TYPES):
                scalars.append([int(index), str(key), value])
    manifest = {"format": FORMAT, "buffers": list(buffers), "tensors": entries, "optimizer_scalars": scalars,
                "counters": {k: int(v) for k, v in (state.get("counters") or {}).items()}}
    head = torch.frombuffer(bytearray(json.dumps(manifest).encode()), dtype=torch.uint8)
    return [head, *(torch.cat(parts) for parts in buffers.values())]


def max_state_bytes(backend: ExpertBackend) -> int:
    """The most bytes a valid state of ``backend``'s expert can take on the wire."""
    weights = sum(t.numel() * t.element_size() for t in backend.expert.state_dict().values())
    params = sum(p.numel() for p in backend.expert.parameters())
    return weights + OPTIMIZER_COPIES * 8 * params + MAX_MANIFEST_BYTES + (1 << 20)


def _fail(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def decode_state(tensors: Sequence[torch.Tensor], backend: ExpertBackend) -> dict:
    """The state the wire ``tensors`` hold, checked against ``backend``'s expert (raises ValueError naming what does
    not fit); the optimizer's hyperparameters are ``backend``'s own."""
    _fail(len(tensors) >= 1 and tensors[0].dtype == torch.uint8 and tensors[0].dim() == 1
          and tensors[0].numel() <= MAX_MANIFEST_BYTES, "no manifest (a uint8 JSON tensor first)")
    try:
        manifest = json.loads(tensors[0].numpy().tobytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"the manifest is not JSON: {e}") from None
    _fail(isinstance(manifest, dict) and manifest.get("format") == FORMAT, f"not a state of format {FORMAT}")
    names, entries = manifest.get("buffers"), manifest.get("tensors")
    _fail(isinstance(names, list) and len(names) == len(tensors) - 1, "the buffers do not match the manifest")
    buffers = {}
    for name, buffer in zip(names, tensors[1:]):
        _fail(isinstance(name, str) and name in wire.DTYPES and buffer.dtype == wire.DTYPES[name] and buffer.dim() == 1,
              f"buffer {str(name)[:20]!r} is not a flat {str(name)[:20]} tensor")
        buffers[name] = buffer
    own = {"expert": backend.expert.state_dict(), "counters": backend.counters()}  # names and shapes: no copies
    params = [p for group in backend.optimizer.param_groups for p in group["params"]] if backend.optimizer else []
    expert: dict[str, torch.Tensor] = {}
    moments: dict[int, dict[str, Any]] = {}
    _fail(isinstance(entries, list) and len(entries) <= len(own["expert"]) + MAX_OPTIMIZER_KEYS * len(params),
          "too many tensors")
    for entry in entries:
        path, tensor = _slice(entry, buffers)
        if path[0] == "expert" and len(path) == 2:
            mine = own["expert"].get(path[1])
            _fail(mine is not None and path[1] not in expert, f"unexpected or repeated parameter {str(path[1])[:80]!r}")
            _fail(tensor.shape == mine.shape and tensor.dtype == mine.dtype,
                  f"{path[1]}: {tensor.dtype} {list(tensor.shape)} where this host's expert has {mine.dtype} {list(mine.shape)}")
            expert[path[1]] = tensor
        elif path[0] == "optimizer" and len(path) == 3:
            index, key = path[1], path[2]
            _fail(isinstance(index, int) and 0 <= index < len(params) and isinstance(key, str) and len(key) <= 64,
                  f"optimizer state of unknown parameter {str(index)[:20]}")
            _fail(tensor.shape in (params[index].shape, torch.Size([])) and (tensor.is_floating_point() or tensor.dtype == torch.int64),
                  f"optimizer state {key!r} of parameter {index}: {tensor.dtype} {list(tensor.shape)} does not fit "
                  f"{list(params[index].shape)}")
            slot = moments.setdefault(index, {})
            _fail(key not in slot and len(slot) < MAX_OPTIMIZER_KEYS, f"too many or repeated optimizer keys of parameter {index}")
            slot[key] = tensor
        else:
            raise ValueError(f"unknown place {str(path)[:80]}")
    _fail(set(expert) == set(own["expert"]), f"parameters missing: {sorted(set(own['expert']) - set(expert))[:8]}")
    for item in manifest.get("optimizer_scalars") or []:
        _fail(isinstance(item, list) and len(item) == 3 and item[0] in moments and isinstance(item[1], str)
              and isinstance(item[2], SCALAR_TYPES) and math.isfinite(float(item[2])) and item[1] not in moments[item[0]],
              f"bad optimizer value {str(item)[:80]}")
        moments[item[0]][item[1]] = item[2]
    counters = manifest.get("counters")
    _fail(isinstance(counters, dict) and all(k in own["counters"] and isinstance(v, int) and v >= 0
                                             for k, v in counters.items()), "bad counters")
    optimizer = None
    if backend.optimizer is not None:
        optimizer = {"state": moments, "param_groups": backend.optimizer.state_dict()["param_groups"]}
    return {"expert": expert, "optimizer": optimizer, "counters": counters}


def _slice(entry: Any, buffers: Mapping[str, torch.Tensor]) -> tuple[list, torch.Tensor]:
    """One manifest entry's place and its tensor (a copy out of its buffer)."""
    _fail(isinstance(entry, dict) and isinstance(entry.get("path"), list) and len(entry["path"]) in (2, 3),
          "a manifest entry without a place")
    name, shape, offset = entry.get("dtype"), entry.get("shape"), entry.get("offset")
    _fail(name in buffers and isinstance(shape, list) and len(shape) <= wire.MAX_RANK
          and all(isinstance(n, int) and n >= 0 for n in shape) and isinstance(offset, int) and offset >= 0,
          f"bad manifest entry for {str(entry['path'])[:80]}")
    count = math.prod(shape)
    buffer = buffers[name]
    _fail(offset + count <= buffer.numel(), f"{str(entry['path'])[:80]} lies outside its buffer")
    return entry["path"], buffer[offset:offset + count].reshape(shape).clone()


def fetch_state(endpoint: str, uid: str, backend: ExpertBackend, secret: bytes | None, timeout: float) -> dict:
    """The state of ``uid`` at the replica ``endpoint``, checked against ``backend`` (raises HandoverError)."""
    path = f"/state/{uid}"
    limit = max_state_bytes(backend)
    try:
        headers = http_client.signed(secret, "GET", path, b"", "none", host_id(endpoint, secret, timeout))
        answer = http_client.request(endpoint, "GET", path, None, headers, timeout, max_answer_bytes=limit)
    except Exception as e:  # noqa: BLE001 - transport errors and a failed /info alike: this replica did not answer
        raise HandoverError(f"{uid} at {endpoint}: no state: {e}") from e
    if answer.status != 200:
        raise HandoverError(f"{uid} at {endpoint}: HTTP {answer.status}: {bytes(answer.body[:300]).decode(errors='replace')}")
    try:
        return decode_state(wire.deserialize(answer.body, limit), backend)
    except ValueError as e:  # WireError is a ValueError
        raise HandoverError(f"{uid} at {endpoint}: refused its state: {e}") from None


def adopt_states(backends: Mapping[str, ExpertBackend], replicas: Mapping[str, Sequence[str]], secret: bytes | None,
                 timeout: float = 30.0) -> dict[str, str]:
    """Load into each backend the state of one of its cell's live ``replicas`` (endpoints, tried in order, at most
    ``MAX_REPLICAS_TRIED``); returns ``{uid: endpoint}`` of the states adopted. A cell none of whose replicas answers
    keeps fresh weights, and the log says so."""
    adopted = {}
    for uid, backend in backends.items():
        endpoints, reasons = list(replicas.get(uid) or ())[:MAX_REPLICAS_TRIED], []
        for endpoint in endpoints:
            try:
                state = fetch_state(endpoint, uid, backend, secret, timeout)
            except HandoverError as e:
                reasons.append(str(e))
                continue
            backend.load_state_dict(state)
            adopted[uid] = endpoint
            logger.info("%s: adopted the state of its replica at %s (%d updates)", uid, endpoint,
                        state["counters"].get("update_count", 0))
            break
        if endpoints and uid not in adopted:
            logger.warning("%s: no replica handed over its state, starting from fresh weights: %s", uid, "; ".join(reasons))
    return adopted
