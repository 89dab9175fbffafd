"""Traffic, error and speed of each wire compression on one activation; optionally this wire against an older one.

Default: a (128, 1024) float32 activation drawn from N(0, 1). For each compression it prints the
message size, its ratio to the raw float32 bytes, the largest absolute and the mean relative
error after a round trip, and serialize + deserialize time; the local baseline is a plain
``tensor.clone()`` of the same tensor, measured in the same run.

``--against REV`` loads ``lightning_moe/wire.py`` as it was at git revision REV and times each
path of both versions interleaved (old, new, new, old, ... over ``--rounds`` rounds; each figure
is the median of ``--repeats`` calls), then prints every path's median and spread (min, max) over
the rounds, for old and new and their ratio. The paths:

- ``answer``: what a host does to an answer before its socket writes: encode, then the joins
  aiohttp makes (old: ``web.Response(body=bytes)``, which joins the HTTP head and the whole body
  on Python before 3.12.9; new: ``serialize_parts``, whose small first part is joined with the head).
- ``request``: a client's ``serialize`` (old: bytes, new: bytearray).
- ``decode bytes``: decoding a body that arrived as bytes (old: ``deserialize(bytearray(body))``
  as the client did, new: ``deserialize(body)``).
- ``decode bytearray``: the host's path, a body read into a bytearray.

    python tests/benchmark_wire.py
    python tests/benchmark_wire.py --rows 256 --cols 4096
    python tests/benchmark_wire.py --against HEAD~1 --rounds 7
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from lightning_moe import wire

HTTP_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 524304\r\n"
             b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.14\r\n\r\n")


def per_call_seconds(fn, repeats: int) -> float:
    fn()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - begin) / repeats


def median_call_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def load_wire(rev: str) -> ModuleType:
    """``lightning_moe/wire.py`` as it was at git revision ``rev``, as a module of its own."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:lightning_moe/wire.py"], cwd=root, check=True,
                            capture_output=True).stdout
    path = Path(tempfile.mkdtemp()) / "wire_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("wire_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["wire_old"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def paths(old: ModuleType, x: torch.Tensor, compression: str) -> dict[str, tuple]:
    """name -> (old callable, new callable) for one activation."""
    as_bytes = bytes(wire.serialize([x], compression))
    as_bytearray = bytearray(as_bytes)

    def old_answer():
        return b"".join((HTTP_HEAD, old.serialize([x], compression)))

    def new_answer():
        parts = wire.serialize_parts([x], compression)
        return [b"".join((HTTP_HEAD, parts[0])), *parts[1:]]

    return {
        "answer": (old_answer, new_answer),
        "request": (lambda: old.serialize([x], compression), lambda: wire.serialize([x], compression)),
        "decode bytes": (lambda: old.deserialize(bytearray(as_bytes)), lambda: wire.deserialize(as_bytes)),
        "decode bytearray": (lambda: old.deserialize(as_bytearray), lambda: wire.deserialize(as_bytearray)),
    }


def compare(args: argparse.Namespace, x: torch.Tensor) -> None:
    old = load_wire(args.against)
    for compression in args.compressions:
        cases = paths(old, x, compression)
        times: dict[str, dict[str, list[float]]] = {name: {"old": [], "new": []} for name in cases}
        print(f"\ncompression={compression}: old = wire.py at {args.against}, new = working tree; "
              f"per-call median of {args.repeats} calls, ms")
        for round_ in range(args.rounds):
            figures = []
            for name, (old_fn, new_fn) in cases.items():
                order = (("old", old_fn), ("new", new_fn)) if round_ % 2 == 0 else (("new", new_fn), ("old", old_fn))
                for version, fn in order:
                    times[name][version].append(median_call_seconds(fn, args.repeats))
                figures.append(f"{name} {times[name]['old'][-1] * 1e3:.3f} -> {times[name]['new'][-1] * 1e3:.3f}")
            print(f"round {round_}: " + "; ".join(figures), flush=True)
        for name, both in times.items():
            ratios = [n / o for o, n in zip(both["old"], both["new"])]
            line = [f"{version} median {statistics.median(v) * 1e3:.3f} ms (min {min(v) * 1e3:.3f}, max {max(v) * 1e3:.3f})"
                    for version, v in both.items()]
            print(f"{name:<17} " + "; ".join(line) + f"; new/old median {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--against", metavar="REV", help="git revision of an older wire.py to time against, interleaved")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the comparison (with --against)")
    parser.add_argument("--compressions", nargs="+", default=["none"], choices=list(wire.COMPRESSIONS),
                        help="compressions to compare (with --against)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.cols)
    raw = x.numel() * x.element_size()
    copy_s = per_call_seconds(x.clone, args.repeats)
    print(f"activation ({args.rows}, {args.cols}) float32: {raw:,} raw bytes; local baseline clone(): {copy_s * 1e3:.3f} ms")
    print(f"{'compression':<12}{'bytes':>12}{'ratio':>8}{'max abs err':>14}{'mean rel err':>14}{'round trip':>13}")
    for compression in wire.COMPRESSIONS:
        message = wire.serialize([x], compression)
        (y,) = wire.deserialize(message)
        error = (y - x).abs()
        rel = (error.sum() / x.abs().sum()).item()
        seconds = per_call_seconds(lambda: wire.deserialize(wire.serialize([x], compression)), args.repeats)
        print(f"{compression:<12}{len(message):>12,}{len(message) / raw:>8.2f}{error.max().item():>14.2e}{rel:>14.2e}"
              f"{seconds * 1e3:>10.2f} ms")
    if args.against:
        compare(args, x)


if __name__ == "__main__":
    main()
