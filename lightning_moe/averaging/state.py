"""A model's dense parameters as one message, and the checks a peer's parameters must pass.

A message is::

    b"LMAV" | uint32 little-endian meta length | meta (UTF-8 JSON) | a lightning_moe.wire message

The meta names every parameter with its shape and dtype, in the module's order, and carries the
sender's global step: ``{"names": [...], "shapes": [[...], ...], "dtypes": [...], "step": int}``.
The wire message holds one flat tensor per dtype (the parameters of that dtype concatenated in
order), so a model with hundreds of parameters is a message of a few tensors. No pickle: a peer
is a stranger, and :func:`decode` checks names, shapes, dtypes, sizes and finiteness against the
local layout before the values are used.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch
from torch import nn

from lightning_moe import wire

MAGIC = b"LMAV"
_PREFIX = struct.Struct("<4sI")
MAX_META_BYTES = 4 * 1024 * 1024
SLACK_BYTES = 64 * 1024  # room above the exact size for headers (the limit on a body)


class RefusedState(ValueError):
    """A peer's parameters that do not fit this model, are not finite, or are too far from ours."""


@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a module's parameters, and how they group into flat tensors by dtype."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @classmethod
    def of(cls, module: nn.Module) -> "Layout":
        named = list(module.named_parameters())
        for name, param in named:
            wire.dtype_name(param.dtype)  # raises for dtypes the wire does not carry
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named), tuple(p.dtype for _, p in named))

    @property
    def groups(self) -> list[tuple[torch.dtype, list[int]]]:
        """``(dtype, indices of the parameters of that dtype)`` in order of first appearance."""
        groups: dict[torch.dtype, list[int]] = {}
        for i, dtype in enumerate(self.dtypes):
            groups.setdefault(dtype, []).append(i)
        return list(groups.items())

    def numel(self, index: int) -> int:
        return math.prod(self.shapes[index])

    def meta(self, step: int) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes],
                "dtypes": [wire.dtype_name(d) for d in self.dtypes], "step": int(step)}

    def nbytes(self) -> int:
        """The parameters' bytes."""
        return sum(self.numel(i) * self.dtypes[i].itemsize for i in range(len(self.names)))

    def message_bytes(self) -> int:
        """An upper bound of the size of this layout's message (uncompressed), for body limits."""
        meta = len(json.dumps(self.meta(0))) + 32
        return meta + self.nbytes() + 8 * len(self.names) + SLACK_BYTES


def snapshot(module: nn.Module, layout: Layout) -> list[torch.Tensor]:
    """A CPU copy of the module's parameters: one flat tensor per dtype group (see :attr:`Layout.groups`)."""
    return snapshot_of([p for _, p in module.named_parameters()], layout)


def snapshot_of(params: list[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
    """A CPU copy of ``params`` (in the layout's order) as one flat tensor per dtype group."""
    with torch.no_grad():
        return [torch.cat([params[i].detach().reshape(-1).to("cpu") for i in indices]) if indices else torch.empty(0)
                for _, indices in layout.groups]


def apply_delta(module: nn.Module, layout: Layout, delta: list[torch.Tensor], scale: float = 1.0) -> None:
    """Add ``scale * delta`` (flat per dtype group) to the module's parameters, in place.

    In place keeps the Parameter objects, so the optimizer's state (momentum, Adam moments) stays
    attached to them; call it at a step boundary, never between a backward and its optimizer step.
    """
    params = [p for _, p in module.named_parameters()]
    with torch.no_grad():
        for (_, indices), flat in zip(layout.groups, delta):
            offset = 0
            for i in indices:
                n = layout.numel(i)
                piece = flat[offset : offset + n].view(layout.shapes[i])
                params[i].add_(piece.to(device=params[i].device, dtype=params[i].dtype), alpha=scale)
                offset += n


def load(module: nn.Module, layout: Layout, flats: list[torch.Tensor]) -> None:
    """Copy ``flats`` into the module's parameters, in place."""
    params = [p for _, p in module.named_parameters()]
    with torch.no_grad():
        for (_, indices), flat in zip(layout.groups, flats):
            offset = 0
            for i in indices:
                n = layout.numel(i)
                params[i].copy_(flat[offset : offset + n].view(layout.shapes[i]))
                offset += n


def encode(layout: Layout, flats: list[torch.Tensor], step: int, compression: str = "none") -> bytes:
    """One message with the parameters ``flats`` (from :func:`snapshot`) and the sender's ``step``."""
    meta = json.dumps(layout.meta(step), separators=(",", ":")).encode()
    meta += b" " * (-(_PREFIX.size + len(meta)) % wire.ALIGN)
    return _PREFIX.pack(MAGIC, len(meta)) + meta + wire.serialize(flats, compression)


def decode(data: bytes | bytearray, layout: Layout, max_bytes: int | None = None) -> tuple[list[torch.Tensor], int]:
    """The flat parameters and step of a peer's message; raises RefusedState unless it matches ``layout``
    (names, shapes and dtypes, in order), every value is finite, and it is at most ``max_bytes``."""
    limit = layout.message_bytes() if max_bytes is None else max_bytes
    if len(data) > limit:
        raise RefusedState(f"message of {len(data)} bytes exceeds the limit of {limit}")
    if len(data) < _PREFIX.size:
        raise RefusedState(f"message of {len(data)} bytes is too short")
    magic, meta_len = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise RefusedState(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if meta_len > MAX_META_BYTES or _PREFIX.size + meta_len > len(data):
        raise RefusedState(f"meta length {meta_len} does not fit the message")
    try:
        meta = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + meta_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RefusedState(f"meta is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise RefusedState("meta must be a JSON object")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**53:
        raise RefusedState(f"step must be a non-negative integer, got {step!r}")
    expected = layout.meta(step)
    for key in ("names", "shapes", "dtypes"):
        if meta.get(key) != expected[key]:
            raise RefusedState(f"the peer's parameter {key} differ from this model's: {_first_difference(meta.get(key), expected[key])}")
    try:
        flats = wire.deserialize(bytearray(data[_PREFIX.size + meta_len :]), max_bytes=limit)
    except wire.WireError as e:
        raise RefusedState(f"malformed parameters: {e}") from None
    groups = layout.groups
    if len(flats) != len(groups):
        raise RefusedState(f"{len(flats)} tensors for {len(groups)} dtype groups")
    for flat, (dtype, indices) in zip(flats, groups):
        numel = sum(layout.numel(i) for i in indices)
        if flat.dtype != dtype or tuple(flat.shape) != (numel,):
            raise RefusedState(f"tensor {wire.dtype_name(flat.dtype)}{list(flat.shape)} where {wire.dtype_name(dtype)}[{numel}] was expected")
        if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
            raise RefusedState("parameters hold NaN or Inf")
    return flats, step


def relative_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """``||a - b|| / ||b||`` over all parameters (float64 sums)."""
    diff = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    norm = sum(float(y.double().pow(2).sum()) for y in b)
    return math.sqrt(diff) / max(math.sqrt(norm), 1e-12)


def _first_difference(got: object, want: list) -> str:
    if not isinstance(got, list):
        return f"got {type(got).__name__}, expected a list"
    if len(got) != len(want):
        return f"{len(got)} entries, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"entry {i}: got {str(g)[:80]}, expected {str(w)[:80]}"
    return "?"
