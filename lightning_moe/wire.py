"""Tensors to bytes and back, without pickle: a JSON header and raw buffers.

A message is::

    b"LMW1" | uint32 little-endian header length | header (UTF-8 JSON) | buffers

The header is padded with spaces and each buffer with zeros to a multiple of 8 bytes, so
every buffer is aligned for any dtype and decodes without a copy.

Copies: :func:`serialize` copies each tensor once, into the one bytearray it returns;
:func:`serialize_parts` copies no large uncompressed tensor (a writer sends the parts in
order); :func:`deserialize` of a writable buffer (bytearray) copies nothing, of a read-only
one (bytes) each tensor's bytes once.

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
- ``int8``, ``int4``: blockwise 8- and 4-bit quantization of the flattened tensor, a bfloat16
  scale per block of 64 values (:mod:`lightning_moe.codecs`): 0.26 and 0.13 of float32's bytes.
  With ``stochastic`` they round at random, unbiased: for gradients. A tensor with non-finite
  values (or magnitudes near float32's largest) is sent uncompressed (its header entry says ``none``).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Sequence

import torch

from lightning_moe import codecs

MAGIC = b"LMW1"
COMPRESSIONS = ("none", "float16", "uint8", *codecs.CODECS)
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
    if compression in codecs.CODECS:
        return codecs.payload_nbytes(compression, numel)
    rows, _ = _rows_and_width(shape)
    return numel + 8 * rows


def _compress(tensor: torch.Tensor, compression: str, stochastic: bool = False) -> tuple[str, torch.Tensor]:
    """The compression used (``none`` for what cannot be compressed) and the buffer of one tensor as a flat uint8 tensor."""
    if compression != "none" and not tensor.is_floating_point():
        compression = "none"
    if compression in codecs.CODECS:
        buffer = codecs.encode(tensor, compression, stochastic)
        return ("none", tensor.reshape(-1).view(torch.uint8)) if buffer is None else (compression, buffer)
    if compression == "none":
        return compression, tensor.reshape(-1).view(torch.uint8)
    if compression == "float16":
        return compression, tensor.to(torch.float16).reshape(-1).view(torch.uint8)
    rows, width = _rows_and_width(tensor.shape)
    flat = tensor.reshape(rows, width).float()
    if flat.numel() == 0:
        return compression, torch.empty(8 * rows, dtype=torch.uint8)
    low = flat.amin(dim=1, keepdim=True)
    scale = (flat.amax(dim=1, keepdim=True) - low) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = ((flat - low) / scale).round_().clamp_(0, 255).to(torch.uint8)
    stats = torch.cat([scale, low], dim=1).contiguous()
    return compression, torch.cat([stats.reshape(-1).view(torch.uint8), quantized.reshape(-1)])


def _decompress(buffer: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    if spec.compression == "none":
        return buffer.view(spec.dtype).reshape(spec.shape)
    if spec.compression == "float16":
        return buffer.view(torch.float16).to(spec.dtype).reshape(spec.shape)
    if spec.compression in codecs.CODECS:
        try:
            return codecs.decode(buffer, spec.compression, math.prod(spec.shape), spec.dtype).reshape(spec.shape)
        except codecs.CodecError as e:
            raise WireError(str(e)) from None
    rows, width = _rows_and_width(spec.shape)
    stats = buffer[: 8 * rows].view(torch.float32).reshape(rows, 2)
    quantized = buffer[8 * rows :].reshape(rows, width)
    values = torch.addcmul(stats[:, 1:2], quantized.float(), stats[:, 0:1])
    return values.to(spec.dtype).reshape(spec.shape)


def _per_tensor(value: object, count: int, what: str) -> list:
    """One value per tensor, from one value or a sequence of them."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * count
    if len(values) != count:
        raise ValueError(f"got {len(values)} {what} for {count} tensors")
    return values


def _encode(tensors: Sequence[torch.Tensor], compression: str | Sequence[str],
            stochastic: bool | Sequence[bool] = False) -> tuple[bytes, list[torch.Tensor]]:
    """The message's prefix and padded header, and each tensor's buffer as a flat CPU uint8 tensor."""
    compressions = _per_tensor(compression, len(tensors), "compressions")
    stochastics = _per_tensor(stochastic, len(tensors), "stochastic flags")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"at most {MAX_TENSORS} tensors per message, got {len(tensors)}")
    specs, buffers = [], []
    for tensor, comp, rounding in zip(tensors, compressions, stochastics):
        if comp not in COMPRESSIONS:
            raise ValueError(f"unknown compression {comp!r}; choose one of {COMPRESSIONS}")
        tensor = tensor.detach().to("cpu").contiguous()
        name = dtype_name(tensor.dtype)
        comp, buffer = _compress(tensor, comp, bool(rounding))
        specs.append({"dtype": name, "shape": list(tensor.shape), "compression": comp, "nbytes": buffer.numel()})
        buffers.append(buffer)
    header = json.dumps({"tensors": specs}, separators=(",", ":")).encode()
    header += b" " * (_aligned(_PREFIX.size + len(header)) - _PREFIX.size - len(header))
    return _PREFIX.pack(MAGIC, len(header)) + header, buffers


def _shared(buffer: torch.Tensor) -> memoryview | None:
    """A 1-D unsigned-byte memoryview of a flat CPU uint8 tensor's own memory (keeps it alive); None without numpy."""
    try:
        return memoryview(buffer.numpy()).cast("B")
    except (RuntimeError, TypeError, ImportError):  # torch built or run without numpy
        return None


def _copy_into(target: bytearray, offset: int, buffer: torch.Tensor) -> None:
    """Copy a flat CPU uint8 tensor into ``target`` at ``offset`` with one memcpy in this thread.

    Not ``Tensor.copy_``: for more than 32 KiB it fans out to torch's thread pool, and on a loaded
    machine waiting for a descheduled worker made a 4 MiB copy take 16 ms instead of 0.2 ms.
    """
    if buffer.numel() == 0:
        return
    view = _shared(buffer)
    if view is not None:
        target[offset : offset + len(view)] = view
    else:
        torch.frombuffer(target, dtype=torch.uint8, offset=offset, count=buffer.numel()).copy_(buffer)


def serialize(tensors: Sequence[torch.Tensor], compression: str | Sequence[str] = "none",
              stochastic: bool | Sequence[bool] = False) -> bytearray:
    """Encode tensors (any device) as one message; compression is one name or one per tensor.

    ``stochastic`` (one flag or one per tensor) rounds int8 and int4 values at random, unbiased:
    for gradients (see :mod:`lightning_moe.codecs`); other compressions ignore it.

    The message is built in one buffer: each tensor's bytes are copied once, into it, and the
    buffer itself is returned (a bytearray, usable wherever bytes are: ``len``, slicing, HTTP
    bodies, HMAC; call ``bytes()`` on it only if an immutable copy is really needed). To send
    without even that copy, write the parts of :func:`serialize_parts` one after another.
    """
    head, buffers = _encode(tensors, compression, stochastic)
    offset = len(head)
    message = bytearray(offset + sum(_aligned(b.numel()) for b in buffers))
    message[:offset] = head
    for buffer in buffers:
        _copy_into(message, offset, buffer)
        offset += _aligned(buffer.numel())
    return message


SMALL_PART = 64 * 1024  # serialize_parts joins runs of parts smaller than this (fewer writes; copying them is cheap)


def serialize_parts(tensors: Sequence[torch.Tensor], compression: str | Sequence[str] = "none",
                    stochastic: bool | Sequence[bool] = False) -> list[bytes | memoryview]:
    """The message of :func:`serialize` as a list of buffers whose concatenation is the message, not joined.

    A large tensor's part is a memoryview of its own memory when no compression applies (no copy
    at all), else of its compressed buffer; runs of small parts (the header, padding, tensors under
    :data:`SMALL_PART` bytes) are joined into one bytes object (fewer writes, cheap copies). For a
    writer that takes buffers one by one (aiohttp's StreamResponse.write, ``socket.sendmsg``). The
    parts share memory with the tensors: write them before the tensors change. The message's size
    is ``sum(len(part) for part in parts)``.
    """
    head, buffers = _encode(tensors, compression, stochastic)
    parts: list[bytes | memoryview] = []
    small: list[bytes | bytearray] = [head]
    for buffer in buffers:
        pad = bytes(_aligned(buffer.numel()) - buffer.numel())
        view = _shared(buffer) if buffer.numel() >= SMALL_PART else None
        if view is None:  # small (or no numpy): copied into the run of small parts
            copy = bytearray(buffer.numel())
            _copy_into(copy, 0, buffer)
            small += [copy, pad]
            continue
        joined = b"".join(small)
        parts += [joined, view] if joined else [view]
        small = [pad]
    tail = b"".join(small)
    if tail:
        parts.append(tail)
    return parts


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

    ``data`` is any C-contiguous buffer: bytes, bytearray, memoryview (of any format or shape),
    mmap. Nothing is copied before the header has passed its checks. Then:

    - writable buffer (bytearray, a memoryview of one): no copy. Uncompressed tensors are views of
      ``data`` (they keep it alive; do not change or reuse it while they are in use); compressed
      ones are decoded into new memory. This is the zero-copy way: read a body into a bytearray.
    - read-only buffer (bytes, a memoryview of bytes): torch cannot view memory it must not write
      (``torch.frombuffer`` warns), so each uncompressed tensor's bytes are copied once into memory
      of its own, and a compressed tensor's bytes are copied before decoding; the header and padding
      are never copied. Costs about what ``deserialize(bytearray(data))`` does; emits no warning.
    """
    view = memoryview(data)
    if not view.c_contiguous:
        raise WireError("the message buffer is not C-contiguous")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    specs, offset = read_header(view, max_bytes)
    whole = None if view.readonly else torch.frombuffer(view, dtype=torch.uint8)  # the prefix: never empty
    tensors = []
    for spec in specs:
        if whole is not None:
            buffer = whole[offset : offset + spec.nbytes]
        else:
            buffer = torch.frombuffer(bytearray(view[offset : offset + spec.nbytes]), dtype=torch.uint8) if spec.nbytes \
                else torch.empty(0, dtype=torch.uint8)
        tensors.append(_decompress(buffer, spec))
        offset += _aligned(spec.nbytes)
    return tensors
