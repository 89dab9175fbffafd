"""Blockwise quantization of floating tensors for the wire: ``int8`` and ``int4`` (see :mod:`lightning_moe.wire`).

The tensor is flattened and cut into blocks of :data:`BLOCK` values (the last block may be
shorter). Each block has one scale ``s = absmax / L`` (``L`` = 127 for int8, 7 for int4) and its
values are sent as integers ``q`` in ``-L..L``: ``x ~ q * s``. The buffer of a tensor of ``n``
values in ``k = ceil(n / BLOCK)`` blocks is::

    k scales (bfloat16, 2 bytes each) | n int8 values (int8) or ceil(n / 2) bytes of two 4-bit values (int4)

An int4 byte holds value ``2i`` in its low and ``2i + 1`` in its high nibble, each as ``q + 8``.
Error: ``|x - decoded| <= s / 2`` in every block (``s`` as sent; ``< s`` with stochastic rounding),
plus the float arithmetic's and the target dtype's own rounding. Zero is exact.

Choices, measured with ``python tests/benchmark_codecs.py`` (relative RMS error on 256 x 512
tensors: an MLP's output, LayerNorm output with 6 outlier channels x20, a cross-entropy gradient
through a ReLU, Student-t(2.5) values at 1e-6):

- ``BLOCK = 64``. The scales cost 16 / BLOCK bits a value. Halving the block from 128 to 64 costs
  0.125 bit a value (worth a factor 2 ** 0.125 = 1.09 in error if spent on precision) and cut the
  error by 1.08x-1.09x on the MLP output, 1.25x-1.33x on the outlier and heavy-tailed tensors,
  1.01x-1.03x on the gradient: it pays. Halving it again, to 32 (0.25 bit, worth 1.19x), cut it by
  1.10x-1.11x, 1.29x-1.41x and 1.03x-1.05x: it pays on heavy tails only. Error at 64, int8 / int4:
  MLP output 0.0060 / 0.107, outliers 0.016 / 0.22, gradient 0.0039 / 0.069, Student-t 0.014 / 0.18;
  bytes 0.258 / 0.133 of float32 (block 128: 0.254 / 0.129, errors 1.08x-1.34x larger).
- bfloat16 scales, rounded up (so ``|x| / s <= L``): float32's range for 2 bytes, for 1 %-2.3 %
  more error than float32 scales at int8 and under 0.4 % at int4. Float16 scales underflow on the
  Student-t values at 1e-6 (int8 error 0.14 instead of 0.014).
- Symmetric (absmax) rather than affine (min/max) blocks. At equal bytes (affine with two bfloat16
  statistics at block 64 against symmetric at 32) affine was as good on the MLP output (int8; 1.08x
  better at int4), 1.2x better on outliers and Student-t at int8 (equal at int4), 1.4x worse on the
  gradient (its zeros are not exact). Symmetric keeps zero exact (padded rows, masked tokens), has
  one statistic and one error bound, and costs less at equal block size.

Gradients use stochastic rounding (``stochastic=True``: ``q = floor(x / s + u)``, ``u ~ U[0, 1)``),
which makes the quantizer unbiased, ``E[decoded] = x``: the bias of rounding to nearest (small
values of a block with a large absmax always become 0) would otherwise add up over steps. One
encoding's error is 1.4x-1.6x larger, but the mean of 64 encodings of the cross-entropy gradient is
off by 0.0007 (int8) and 0.012 (int4) where rounding to nearest stays off by 0.0039 and 0.069. Error
feedback (EF-SGD: keep ``true - decoded`` and add it to the next message) is not done on the
trainer's ``grad_outputs``: a residual is a per-sample quantity (one row per sample routed to the
expert), and the next step routes other samples, so adding it to their rows would push an error
through another sample's Jacobian and into the input gradients sent back, not compensate the
expert's parameter gradient. Error feedback needs a persistent quantity on the wire, such as
parameters or parameter gradients; activation gradients are not one.

Decoding trusts nothing: sizes are checked by the wire header, scales here (not negative, at most
:data:`MAX_SCALE`); every other byte decodes to some value in ``-L - 1 .. L`` times such a scale,
finite in float32. A tensor the encoder cannot send so (non-finite values, magnitudes near float32's
largest) goes uncompressed.
"""

from __future__ import annotations

import os
import threading

import torch

BLOCK = 64
LEVELS = {"int8": 127, "int4": 7}  # largest |q|
CODECS = tuple(LEVELS)
SCALE_BYTES = 2
#: The largest scale of each codec: any value a byte decodes to (``-L - 1 .. L`` times it) is finite in float32.
MAX_SCALE = {codec: torch.finfo(torch.float32).max / (levels + 1) for codec, levels in LEVELS.items()}


class CodecError(ValueError):
    """A quantized buffer that does not decode (lightning_moe.wire raises it as WireError)."""


def blocks(numel: int, block: int = BLOCK) -> int:
    """How many blocks hold ``numel`` values."""
    return -(-numel // block)


def payload_nbytes(codec: str, numel: int, block: int = BLOCK) -> int:
    """The bytes of a buffer of ``numel`` values quantized by ``codec``: scales, then values."""
    values = numel if codec == "int8" else -(-numel // 2)
    return SCALE_BYTES * blocks(numel, block) + values


class _Generators(threading.local):
    """A private random generator per thread (and process), so stochastic rounding leaves torch's global one alone."""

    def get(self) -> torch.Generator:
        if getattr(self, "pid", None) != os.getpid():
            self.generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
            self.pid = os.getpid()
        return self.generator


_GENERATORS = _Generators()


def _ceil_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 values rounded up to bfloat16 (inf and nan stay so)."""
    bits = x.view(torch.int32)
    return ((bits + 0xFFFF) & -65536).view(torch.float32).to(torch.bfloat16)


def _padded_blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """``flat`` (float32) as ``[blocks, block]``, zero-padded at the end (copied only if ``block`` does not divide it)."""
    n = flat.numel()
    count = blocks(n, block)
    if count * block == n:
        return flat.view(count, block)
    padded = torch.zeros(count * block, dtype=torch.float32)
    padded[:n] = flat
    return padded.view(count, block)


def encode(tensor: torch.Tensor, codec: str, stochastic: bool = False, block: int = BLOCK,
           generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The buffer of a floating CPU tensor as flat uint8; None if it holds values that are not finite or too large
    for the codec (magnitudes near float32's largest): send it uncompressed.

    ``stochastic`` rounds up or down at random, unbiased (for gradients); ``generator`` defaults to a
    private one of this thread.
    """
    levels = LEVELS[codec]
    n = tensor.numel()
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)
    grid = _padded_blocks(tensor.detach().reshape(-1).float(), block)
    low, high = torch.aminmax(grid, dim=1)
    scales = _ceil_bfloat16(torch.maximum(high, low.neg()) / levels)
    if not bool((scales.float() <= MAX_SCALE[codec]).all()):  # also false for inf and nan
        return None
    divisor = scales.float().unsqueeze(1)
    divisor = torch.where(divisor > 0, divisor, torch.ones_like(divisor))
    q = grid / divisor
    if stochastic:
        q.add_(torch.rand(q.shape, generator=generator or _GENERATORS.get())).floor_()
    else:
        q.round_()
    q = q.clamp_(-levels, levels).to(torch.int8).reshape(-1)
    if codec == "int8":
        values = q[:n].view(torch.uint8)
    else:
        pairs = (q + 8).view(torch.uint8).view(-1, 2)  # padded blocks have an even length
        values = (pairs[:, 0] | (pairs[:, 1] << 4))[: -(-n // 2)]
    return torch.cat([scales.view(torch.uint8), values])


def decode(buffer: torch.Tensor, codec: str, numel: int, dtype: torch.dtype, block: int = BLOCK) -> torch.Tensor:
    """Flat values of ``dtype`` from a buffer of :func:`encode` whose size the caller checked
    (:func:`payload_nbytes`); raises CodecError for a scale that is negative, too large or not a number."""
    count = blocks(numel, block)
    if buffer.numel() != payload_nbytes(codec, numel, block):
        raise CodecError(f"{codec} buffer of {buffer.numel()} bytes for {numel} values, expected "
                         f"{payload_nbytes(codec, numel, block)}")
    scales = buffer[: SCALE_BYTES * count].view(torch.bfloat16).float()
    bad = ~((scales >= 0) & (scales <= MAX_SCALE[codec]))  # also true for nan
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise CodecError(f"{codec} block {index} of {count} has scale {scales[index].item()}: scales must be finite, "
                         f"not negative and at most {MAX_SCALE[codec]:.4g}")
    packed = buffer[SCALE_BYTES * count :]
    out = torch.zeros(count * block, dtype=torch.float32)
    if codec == "int8":
        out[:numel] = packed.view(torch.int8)
    else:
        nibbles = torch.stack([packed & 15, packed >> 4], dim=1).view(-1)[:numel]
        out[:numel] = nibbles.view(torch.int8) - 8
    out.view(count, block).mul_(scales.unsqueeze(1))
    return out[:numel].to(dtype)
