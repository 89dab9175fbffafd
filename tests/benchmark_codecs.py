"""The evidence behind lightning_moe.codecs: error and bytes per block size and scale format, the bias of rounding,
and the speed of every wire compression against the link time it saves.

Tensors (256 x 512, seeded): ``mlp out`` (Linear-GELU-Linear of N(0, 1) inputs, an expert's output),
``gelu hidden`` (non-negative; never on the wire, shows where affine blocks win), ``outliers``
(LayerNorm output with 6 channels x20, as in language models), ``ce grad`` (gradient of a
cross-entropy loss with respect to an MLP's output, through a ReLU: many exact zeros) and
``t grad`` (Student-t(2.5) values at 1e-6: heavy tails, and too small for float16 scales).

1. relative RMS error ``|x - decoded| / |x|`` and bytes per float32 byte, for int8 and int4 at block
   sizes 32, 64, 128 and 256, with the factor by which halving the block cut the error (worth
   ``2 ** (16 / block)`` if the scale's extra bits were spent on precision instead);
2. other designs: float32 or float16 scales, affine (min/max) blocks with float32 or bfloat16 statistics;
3. rounding to nearest against stochastic rounding on the gradients: error, and the bias left in
   the mean of 64 encodings of the same tensor (nearest keeps all of it, stochastic averages out);
4. for each wire compression: bytes, encode and decode time per MiB of float32, and the seconds a
   20 Mbit/s link takes for the message, against the uncompressed one.

    python tests/benchmark_codecs.py            # under 10 s, one thread
    python tests/benchmark_codecs.py --threads 4
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch import nn

from lightning_moe import codecs, wire

logger = logging.getLogger("benchmark_codecs")
BLOCKS = (32, 64, 128, 256)
LINK_BITS_PER_S = 20e6


def tensors() -> dict[str, torch.Tensor]:
    """The realistic tensors named in the module docstring."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
    x = torch.randn(256, 512)
    with torch.no_grad():
        out, hidden = mlp(x), mlp[1](mlp[0](x))[:, :512].contiguous()
    outliers = nn.functional.layer_norm(torch.randn(256, 512), (512,))
    outliers[:, torch.randperm(512)[:6]] *= 20
    features = mlp(torch.randn(256, 512))
    features.retain_grad()
    loss = nn.functional.cross_entropy(nn.Linear(512, 1000)(torch.relu(features)), torch.randint(0, 1000, (256,)))
    loss.backward()
    t_grad = torch.distributions.StudentT(2.5).sample((256, 512)) * 1e-6
    return {"mlp out": out, "gelu hidden": hidden, "outliers": outliers, "ce grad": features.grad.clone(), "t grad": t_grad}


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((y.double() - x.double()).norm() / x.double().norm()).item()


def round_trip(x: torch.Tensor, codec: str, block: int, stochastic: bool = False) -> torch.Tensor:
    buffer = codecs.encode(x, codec, stochastic, block)
    return codecs.decode(buffer, codec, x.numel(), x.dtype, block).view_as(x)


def _bfloat16(x: torch.Tensor, toward: float) -> torch.Tensor:
    """float32 values rounded to bfloat16 toward -inf or +inf (as float32)."""
    rounded = x.to(torch.bfloat16)
    wrong = rounded.float() > x if toward < 0 else rounded.float() < x
    return torch.where(wrong, torch.nextafter(rounded, torch.full_like(rounded, toward)), rounded).float()


def variant(x: torch.Tensor, bits: int, block: int, scheme: str) -> tuple[torch.Tensor, int]:
    """Reference versions of designs not taken (decoded tensor, bytes): symmetric blocks with float32 or float16
    scales; affine blocks with float32, or bfloat16 (offset rounded down, scale up) offsets and scales."""
    grid = nn.functional.pad(x.reshape(-1).float(), (0, -x.numel() % block)).view(-1, block)
    if scheme.startswith("affine"):
        levels = 2**bits - 1
        low = grid.amin(1, keepdim=True)
        if scheme == "affine bf16":
            low = _bfloat16(low, -float("inf"))
        scale = (grid.amax(1, keepdim=True) - low) / levels
        if scheme == "affine bf16":
            scale = _bfloat16(scale, float("inf"))
        q = ((grid - low) / torch.where(scale > 0, scale, 1.0)).round().clamp(0, levels)
        decoded, stat_bytes = q * scale + low, 8 if scheme == "affine fp32" else 4
    else:
        levels = 2 ** (bits - 1) - 1
        scale = grid.abs().amax(1, keepdim=True) / levels
        if scheme == "sym fp16":
            scale = scale.half().float()
        q = (grid / torch.where(scale > 0, scale, 1.0)).round().clamp(-levels, levels)
        decoded, stat_bytes = q * scale, 4 if scheme == "sym fp32" else 2
    return decoded.reshape(-1)[: x.numel()].view_as(x), x.numel() * bits // 8 + grid.shape[0] * stat_bytes


def block_sizes(data: dict[str, torch.Tensor]) -> None:
    names = list(data)
    logger.info("1. relative RMS error by block size (bfloat16 scales, absmax); gain: error(2 x block) / error(block)")
    logger.info("%-12s %5s %6s  %s", "codec", "block", "bytes", "  ".join(f"{n:>18}" for n in names))
    for codec in codecs.CODECS:
        errors = {block: [relative_error(x, round_trip(x, codec, block)) for x in data.values()] for block in BLOCKS}
        for block in BLOCKS:
            ratio = codecs.payload_nbytes(codec, 256 * 512, block) / (256 * 512 * 4)
            cells = []
            for i, error in enumerate(errors[block]):
                gain = f"x{errors[2 * block][i] / error:.2f}" if 2 * block in errors else ""
                cells.append(f"{error:.4f} {gain:>6}")
            worth = f"(worth x{2 ** (16 / block - 16 / (2 * block)):.2f})" if 2 * block in errors else ""
            logger.info("%-12s %5d %6.3f  %s %s", codec, block, ratio, "  ".join(f"{c:>18}" for c in cells), worth)


def designs(data: dict[str, torch.Tensor]) -> None:
    logger.info("2. other designs: relative RMS error; bytes per float32 byte (affine bf16 at 64 costs what ours at 32 does)")
    for codec, bits in (("int8", 8), ("int4", 4)):
        for scheme, block in (("sym bf16 (ours)", 64), ("sym bf16 (ours)", 32), ("sym fp32", 64), ("sym fp16", 64),
                              ("affine fp32", 64), ("affine bf16", 64)):
            cells = []
            for x in data.values():
                if scheme.startswith("sym bf16"):
                    decoded, nbytes = round_trip(x, codec, block), codecs.payload_nbytes(codec, x.numel(), block)
                else:
                    decoded, nbytes = variant(x, bits, block, scheme)
                cells.append(f"{relative_error(x, decoded):.4f}")
            logger.info("%-5s %-16s %3d %.3f  %s", codec, scheme, block, nbytes / (4 * x.numel()),
                        "  ".join(f"{c:>11}" for c in cells))


def rounding(data: dict[str, torch.Tensor], draws: int = 64) -> None:
    logger.info("3. gradients: rounding to nearest against stochastic; error of one encoding, and of the mean of %d", draws)
    for name in ("ce grad", "t grad"):
        x = data[name]
        for codec in codecs.CODECS:
            figures = []
            for stochastic in (False, True):
                decoded = [round_trip(x, codec, codecs.BLOCK, stochastic) for _ in range(draws)]
                mean = torch.stack(decoded).double().mean(0)
                figures.append(f"{'stochastic' if stochastic else 'nearest'} {relative_error(x, decoded[0]):.4f} / "
                               f"{relative_error(x, mean):.4f}")
            logger.info("%-8s %s: %s", name, codec, "; ".join(figures))


def seconds_per_call(fn, repeats: int) -> float:
    fn()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats


def speed(repeats: int) -> None:
    x = torch.randn(1024, 1024)  # 4 MiB of float32
    raw = x.numel() * 4
    link = 8 * len(wire.serialize([x])) / LINK_BITS_PER_S
    logger.info("4. speed on a (1024, 1024) float32 tensor, %d torch threads; link: %.0f Mbit/s (%.2f s uncompressed)",
                torch.get_num_threads(), LINK_BITS_PER_S / 1e6, link)
    logger.info("%-18s %8s %11s %11s %10s %10s", "compression", "bytes", "encode/MiB", "decode/MiB", "link", "saved")
    for compression in wire.COMPRESSIONS:
        for stochastic in (False, True) if compression in codecs.CODECS else (False,):
            message = bytes(wire.serialize([x], compression, stochastic))
            encode = seconds_per_call(lambda: wire.serialize([x], compression, stochastic), repeats)
            decode = seconds_per_call(lambda: wire.deserialize(message), repeats)
            seconds = 8 * len(message) / LINK_BITS_PER_S
            name = compression + (" stochastic" if stochastic else "")
            logger.info("%-18s %8.3f %8.2f ms %8.2f ms %8.3f s %8.3f s", name, len(message) / raw, encode * 1e3 * 2**20 / raw,
                        decode * 1e3 * 2**20 / raw, seconds, link - seconds - encode - decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    data = tensors()
    block_sizes(data)
    designs(data)
    rounding(data)
    speed(args.repeats)


if __name__ == "__main__":
    main()
