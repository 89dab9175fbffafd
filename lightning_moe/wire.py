"""Tensors to bytes and back, without pickle: a JSON header and raw buffers.

A message is::

    b"LMW1" | uint32 little-endian header length | header (UTF-8 JSON) | buffers

The header is padded with spaces and each buffer with zeros to a multiple of 8 bytes, so
every buffer is aligned for any dtype and decodes without a copy.

The header is ``{"tensors": [{"dtype", "shape", "compression", "nbytes"}, ...]}`` and the
buffers follow in the same order. Decoding checks the header against an allow-list and
the byte counts against the message before it allocates anything, so a stranger's bytes
can at worst raise :class:`WireError`.

Compression is per tensor:

- ``none``: the raw buffer.
- ``float16``: floats sent as float16 (half the bytes of float32).
- ``uint8``: 8-bit quantization, per row of the last dimension: ``x ~ offset + scale * q``
  with ``q`` in 0..255; a float32 scale and offset per row (a quarter of float32's bytes,
  plus 8 bytes a row).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Sequence

import torch

MAGIC = b"LMW1"
COMPRESSIONS = ("none", "float16", "uint8")
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 64
MAX_RANK = 8

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_PREFIX = struct.Struct("<4sI")
PREFIX_BYTES = _PREFIX.size
ALIGN = 8


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class WireError(ValueError):
    """A message that does not decode: wrong magic, header, dtype, shape or size."""


@dataclass(frozen=True)
class TensorSpec:
    """What the header says about one tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    compression: str
    nbytes: int


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a dtype; raises WireError for dtypes the wire does not carry."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise WireError(f"dtype {dtype} is not supported on the wire") from None


def parse_dtype(name: object) -> torch.dtype:
    """The torch dtype for a wire name; raises WireError for names not on the allow-list."""
    if not isinstance(name, str) or name not in DTYPES:
        raise WireError(f"dtype {name!r} is not allowed; allowed: {sorted(DTYPES)}")
    return DTYPES[name]


def _rows_and_width(shape: Sequence[int]) -> tuple[int, int]:
    width = shape[-1] if len(shape) > 0 else 1
    numel = math.prod(shape)
    return (numel // width if width else 0), width


def payload_nbytes(dtype: torch.dtype, shape: Sequence[int], compression: str) -> int:
    """How many bytes the buffer of a tensor with this dtype, shape and compression holds."""
    numel = math.prod(shape)
    if compression == "none":
        return numel * dtype.itemsize
    if compression == "float16":
        return numel * 2
    rows, _ = _rows_and_width(shape)
    return numel + 8 * rows


def _compress(tensor: torch.Tensor, compression: str) -> torch.Tensor:
    """The buffer of one tensor as a flat uint8 tensor."""
    if compression != "none" and not tensor.is_floating_point():
        compression = "none"
    if compression == "none":
        return tensor.reshape(-1).view(torch.uint8)
    if compression == "float16":
        return tensor.to(torch.float16).reshape(-1).view(torch.uint8)
    rows, width = _rows_and_width(tensor.shape)
    flat = tensor.reshape(rows, width).float()
    if flat.numel() == 0:
        return torch.empty(8 * rows, dtype=torch.uint8)
    low = flat.amin(dim=1, keepdim=True)
    scale = (flat.amax(dim=1, keepdim=True) - low) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = ((flat - low) / scale).round_().clamp_(0, 255).to(torch.uint8)
    stats = torch.cat([scale, low], dim=1).contiguous()
    return torch.cat([stats.reshape(-1).view(torch.uint8), quantized.reshape(-1)])


def _decompress(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    if spec.compression == "none":
        return buffer.view(spec.dtype).reshape(spec.shape)
    if spec.compression == "float16":
        return buffer.view(torch.float16).to(spec.dtype).reshape(spec.shape)
    rows, width = _rows_and_width(spec.shape)
    stats = buffer[: 8 * rows].view(torch.float32).reshape(rows, 2)
    quantized = buffer[8 * rows :].reshape(rows, width)
    values = torch.addcmul(stats[:, 1:2], quantized.float(), stats[:, 0:1])
    return values.to(spec.dtype).reshape(spec.shape)


def serialize(tensors: Sequence[torch.Tensor], compression: str | Sequence[str] = "none") -> bytes:
    """Encode tensors (any device) as one message; compression is one name or one per tensor."""
    compressions = [compression] * len(tensors) if isinstance(compression, str) else list(compression)
    if len(compressions) != len(tensors):
        raise ValueError(f"got {len(compressions)} compressions for {len(tensors)} tensors")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} tensors per message, got {len(tensors)}")
    specs, buffers = [], []
    for tensor, comp in zip(tensors, compressions):
        if comp not in COMPRESSIONS:
            raise ValueError(f"unknown compression {comp!r}; choose one of {COMPRESSIONS}")
        tensor = tensor.detach().to("cpu").contiguous()
        if not tensor.is_floating_point():
            comp = "none"
        name = dtype_name(tensor.dtype)
        buffer = _compress(tensor, comp)
        specs.append({"dtype": name, "shape": list(tensor.shape), "compression": comp, "nbytes": buffer.numel()})
        buffers.append(buffer)
    header = json.dumps({"tensors": specs}, separators=(",", ":")).encode()
    header += b" " * (_aligned(_PREFIX.size + len(header)) - _PREFIX.size - len(header))
    offset = _PREFIX.size + len(header)
    message = bytearray(offset + sum(_aligned(b.numel()) for b in buffers))
    message[:offset] = _PREFIX.pack(MAGIC, len(header)) + header
    whole = torch.frombuffer(message, dtype=torch.uint8)
    for buffer in buffers:
        whole[offset : offset + buffer.numel()].copy_(buffer)
        offset += _aligned(buffer.numel())
    return bytes(message)


def _parse_spec(raw: object) -> TensorSpec:
    if not isinstance(raw, dict):
        raise WireError("each tensor entry in the header must be an object")
    dtype = parse_dtype(raw.get("dtype"))
    shape = raw.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise WireError(f"shape must be a list of at most {MAX_RANK} sizes, got {shape!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in shape):
        raise WireError(f"shape sizes must be non-negative integers, got {shape!r}")
    compression = raw.get("compression")
    if compression not in COMPRESSIONS:
        raise WireError(f"compression {compression!r} is not one of {COMPRESSIONS}")
    if compression != "none" and not dtype.is_floating_point:
        raise WireError(f"compression {compression!r} applies to floating dtypes only, not {raw['dtype']}")
    nbytes = raw.get("nbytes")
    expected = payload_nbytes(dtype, shape, compression)
    if nbytes != expected:
        raise WireError(f"header says {nbytes!r} bytes for {raw['dtype']}{shape} ({compression}), expected {expected}")
    return TensorSpec(dtype, tuple(shape), compression, expected)


def header_length(prefix: bytes | bytearray | memoryview) -> int:
    """The header length from a message's first :data:`PREFIX_BYTES` bytes; raises WireError if they are wrong."""
    if len(prefix) < _PREFIX.size:
        raise WireError(f"message of {len(prefix)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, header_len = _PREFIX.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise WireError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES}")
    return header_len


def parse_header(data: bytes | bytearray | memoryview) -> tuple[list[TensorSpec], int, int]:
    """Parse the header from the start of a message (the buffers need not be there yet).

    Returns the tensor specs, the offset of the first buffer and the size of the whole message,
    so a receiver can check sizes and row counts before it reads or decodes the buffers.
    """
    header_len = header_length(data)
    if _PREFIX.size + header_len > len(data):
        raise WireError(f"header length {header_len} does not fit the message")
    try:
        header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list):
        raise WireError("header must be an object with a 'tensors' list")
    if len(header["tensors"]) > MAX_TENSORS:
        raise WireError(f"at most {MAX_TENSORS} tensors per message, header lists {len(header['tensors'])}")
    specs = [_parse_spec(raw) for raw in header["tensors"]]
    offset = _PREFIX.size + header_len
    if offset % ALIGN:
        raise WireError(f"header length {header_len} leaves the buffers unaligned to {ALIGN} bytes")
    return specs, offset, offset + sum(_aligned(spec.nbytes) for spec in specs)


def batch_rows(specs: Sequence[TensorSpec]) -> int:
    """The largest first dimension among the tensors (0 for scalars or no tensors): rows a host would compute."""
    return max((spec.shape[0] for spec in specs if spec.shape), default=0)


def read_header(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[list[TensorSpec], int]:
    """Parse and check the header; returns the tensor specs and the offset of the first buffer."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    specs, offset, total = parse_header(data)
    if total != len(data):
        raise WireError(f"header describes {total} bytes but the message has {len(data)}")
    return specs, offset


def deserialize(data: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> list[torch.Tensor]:
    """Decode a message from :func:`serialize`; raises WireError on anything malformed.

    Uncompressed tensors share memory with ``data`` when it is writable (a bytearray).
    """
    specs, offset = read_header(data, max_bytes)
    if not isinstance(data, bytearray):
        data = bytearray(data)
    whole = torch.frombuffer(data, dtype=torch.uint8)
    tensors = []
    for spec in specs:
        tensors.append(_decompress(whole[offset : offset + spec.nbytes], spec))
        offset += _aligned(spec.nbytes)
    return tensors
