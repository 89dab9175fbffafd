"""Smoke test of tests/benchmark_wan.py: every part at one small RTT, a few steps (no timing asserted)."""

import math

import pytest

import benchmark_wan


@pytest.mark.soak  # about a minute: a run of the benchmark itself
def test_benchmark_wan_runs_every_part_and_gives_sane_figures(capsys):
    args = benchmark_wan.parse_args(["--rtts", "20", "--bandwidths", "inf", "--steps", "2", "--trainers", "2",
                                     "--swarm-seconds", "3", "--repeats", "1", "--dht-nodes", "6", "--dht-rounds", "2"])
    out = benchmark_wan.run(args)
    (single,) = out["single"]
    assert single["rtt"] == 0.02 and len(single["step"]) == 2
    assert all(0 < t < 60 for t in single["step"]) and single["up"] > 0 and single["down"] > 0
    assert all(f + b > 0 for f, b in zip(single["fwd"], single["bwd"]))
    (swarm,) = out["swarm"]
    assert swarm["trainers"] == 2 and swarm["steps"] >= 1 and swarm["windows"][0] > 0 and math.isfinite(swarm["step_time"])
    check, dht = out["dht"]
    assert check["leaked"] == 0 and check["received"] == check["relayed"]
    assert dht["ok_get"] == 2 and dht["ok_beam"] == 2
    (layers4,) = out["layers4"]
    assert len(layers4["base"]) == len(layers4["piped"]) == len(layers4["auto"]) == 2 and layers4["failed"] == 0
    assert all(0 < t < 120 for t in layers4["base"] + layers4["piped"] + layers4["auto"]) and layers4["up"] > 0
    assert len(layers4["chosen"]) == 2 and set(layers4["chosen"]) <= {1, 2}
    benchmark_wan.print_single(out["single"], args.batch_size)
    benchmark_wan.print_swarm(out["swarm"], args.trainers, args.batch_size, args.swarm_seconds)
    benchmark_wan.print_dht(out["dht"])
    print(benchmark_wan.ratio_line(out["swarm"]))
    benchmark_wan.print_layers4(out["layers4"], args.batch_size, args.micro_batches, args.layers)
    print(benchmark_wan.layers4_line(out["layers4"], args.micro_batches))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "4-layer example, round trips per step at 100 ms: n/a"  # no 0 ms row to compare with
    assert "swarm throughput at 100 ms / 0 ms: n/a" in lines
