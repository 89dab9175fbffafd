"""Traffic, error and speed of each wire compression on one activation.

Default: a (128, 1024) float32 activation drawn from N(0, 1). For each compression it prints the
message size, its ratio to the raw float32 bytes, the largest absolute and the mean relative
error after a round trip, and serialize + deserialize time; the local baseline is a plain
``tensor.clone()`` of the same tensor, measured in the same run.

    python tests/benchmark_wire.py
    python tests/benchmark_wire.py --rows 256 --cols 4096
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_moe import wire


def per_call_seconds(fn, repeats: int) -> float:
    fn()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.cols)
    raw = x.numel() * x.element_size()
    copy_s = per_call_seconds(x.clone, args.repeats)
    print(f"activation ({args.rows}, {args.cols}) float32: {raw:,} raw bytes; local baseline clone(): {copy_s * 1e3:.3f} ms")
    print(f"{'compression':<12}{'bytes':>12}{'ratio':>8}{'max abs err':>14}{'mean rel err':>14}{'round trip':>13}")
    for compression in wire.COMPRESSIONS:
        message = wire.serialize([x], compression)
        (y,) = wire.deserialize(bytearray(message))
        error = (y - x).abs()
        rel = (error.sum() / x.abs().sum()).item()
        seconds = per_call_seconds(lambda: wire.deserialize(bytearray(wire.serialize([x], compression))), args.repeats)
        print(f"{compression:<12}{len(message):>12,}{len(message) / raw:>8.2f}{error.max().item():>14.2e}{rel:>14.2e}"
              f"{seconds * 1e3:>10.2f} ms")


if __name__ == "__main__":
    main()
