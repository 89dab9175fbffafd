"""The swarm across machines: real network stacks in Linux network namespaces (see tests/netns.py).

Loopback hides bind and announce bugs: a node bound to 127.0.0.1 cannot send to another machine,
and an address that works on one machine means nothing on the next. Here every machine has its own
stack and address, and processes start as a user would start them.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from netns import Internet, unavailable, wait_for_line

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

README = Path(__file__).resolve().parents[1] / "README.md"
CLI = [sys.executable, "-m", "lightning_moe.cli"]
# Short runs: the walkthrough's commands with these appended (a user's run is the same, longer).
FAST_TRAIN = ["trainer.max_steps=30", "trainer.val_check_interval=30", "trainer.limit_val_batches=2",
              "trainer.enable_progress_bar=false", "data.train_bytes=100000", "data.val_bytes=10000",
              "callbacks=none", "~logger"]


def walkthrough() -> list[list[list[str]]]:
    """The `lightning-moe` commands of the README's "Joining across machines", one list per machine (A, B, C)."""
    text = README.read_text()
    section = text[text.index("## Joining across machines"):]
    section = section[:section.index("\n## ", 1)]
    machines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        commands = []
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "lightning-moe":
                commands.append(argv[1:])
        machines.append(commands)
    return machines


def final_metrics(log: Path) -> dict[str, float]:
    line = next(line for line in log.read_text().splitlines() if line.startswith("final metrics: "))
    return {name: float(value) for name, value in (item.split("=") for item in line[len("final metrics: "):].split(", "))}


def test_the_readme_walkthrough_runs_across_three_machines(tmp_path):
    """README, "Joining across machines", literally: A hosts, B trains and lists the swarm, C volunteers and trains."""
    (a_commands,), (b_train, b_swarm), (c_train,) = walkthrough()
    with Internet() as internet:
        a = internet.machine("A", "203.0.113.5")  # the README's address for machine A
        b, c = internet.machine("B"), internet.machine("C")
        for machine in (a, b, c):
            (tmp_path / machine.name).mkdir()

        def start(machine, argv, name):
            log = tmp_path / f"{machine.name}-{name}.log"
            return machine.popen(CLI + argv, log, cwd=tmp_path / machine.name), log

        host_a, log_a = start(a, a_commands, "host")
        wait_for_line(log_a, "others join with", host_a, timeout=120)
        assert "serving 16 experts" in log_a.read_text() and "at 203.0.113.5:31338" in log_a.read_text()

        c_argv = [arg.replace("C_PUBLIC_IP", c.address) for arg in c_train]
        train_c, log_c = start(c, c_argv + FAST_TRAIN + ["trainer.max_steps=60"], "train")
        wait_for_line(log_c, "hosting 4 cells", train_c, timeout=120)
        train_b, log_b = start(b, b_train + FAST_TRAIN, "train")
        swarm_b, log_swarm = start(b, b_swarm, "swarm")
        assert swarm_b.wait(timeout=120) == 0, log_swarm.read_text()[-3000:]
        assert train_b.wait(timeout=300) == 0, log_b.read_text()[-3000:]
        assert train_c.wait(timeout=300) == 0, log_c.read_text()[-3000:]

        swarm = log_swarm.read_text()
        assert "16 of 16 cells alive on 2 hosts" in swarm, swarm
        assert "203.0.113.5:31338" in swarm and f"{c.address}:31338" in swarm, swarm
        for log in (log_b, log_c):
            metrics = final_metrics(log)
            assert metrics["moe/answered"] > 0 and metrics["moe/failed"] == 0, metrics
        assert "could not reach ANY" not in log_b.read_text() + log_c.read_text()
        host_a.terminate()
        assert host_a.wait(timeout=60) == 0
        served = int(re.search(r"served (\d+) forward samples", log_a.read_text()).group(1))
        assert served > 0


def test_a_layer_on_another_machine_trains_through_a_host_given_only_its_dht_address(tmp_path):
    """The Python API: DecentralizedMoE(initial_peers=[A]) on machine B binds so that it reaches A."""
    with Internet() as internet:
        a, b = internet.machine("A"), internet.machine("B")
        host, log = a.popen(CLI + ["host", "host.host=0.0.0.0", f"host.announce_host={a.address}", "dht.host=0.0.0.0",
                                   f"dht.announce_host={a.address}", "dht.port=31337", "host.cells=4", "model.hid_dim=16"],
                                  tmp_path / "host.log", cwd=tmp_path), tmp_path / "host.log"
        wait_for_line(log, "others join with", host, timeout=120)
        out = b.python(f"""
import torch
from lightning_moe import DecentralizedMoE
moe = DecentralizedMoE(16, (4, 4), "ffn", k_best=2, initial_peers=["{a.address}:31337"])
x = torch.randn(8, 16, requires_grad=True)
moe(x).sum().backward()
print("dht", moe.dht.host, moe.dht.address)
print("answered", int(moe.stats["answered"]), "grad", bool(x.grad.abs().sum() > 0))
moe.close()
""", timeout=120)
        assert f"dht 0.0.0.0 {b.address}:" in out, out
        assert "grad True" in out and "answered 0" not in out, out


@pytest.mark.skipif(unavailable(nat=True) is not None, reason=str(unavailable(nat=True)))
def test_a_trainer_behind_a_home_nat_trains_through_a_public_host_that_cannot_reach_it(tmp_path):
    """A home router masquerades the trainer and drops unsolicited inbound: the trainer's client-mode DHT node
    and its expert calls are outbound only, so they work; the host cannot open a connection back to the home."""
    with Internet() as internet:
        a, home = internet.machine("A"), internet.home("H")
        host = a.popen(CLI + ["host", "host.host=0.0.0.0", f"host.announce_host={a.address}", "dht.host=0.0.0.0",
                              f"dht.announce_host={a.address}", "dht.port=31337", "host.cells=4", "model.hid_dim=16"],
                       tmp_path / "host.log", cwd=tmp_path)
        listener = home.popen([sys.executable, "-c", "import socket, time; s = socket.create_server(('0.0.0.0', 4000)); "
                               "time.sleep(120)"], tmp_path / "listener.log")
        wait_for_line(tmp_path / "host.log", "others join with", host, timeout=120)
        out = home.python(f"""
import torch
from lightning_moe import DecentralizedMoE
moe = DecentralizedMoE(16, (4, 4), "ffn", k_best=2, initial_peers=["{a.address}:31337"])
for _ in range(3):
    x = torch.randn(8, 16, requires_grad=True)
    moe(x).sum().backward()
print("answered", int(moe.stats["answered"]), "failed", int(moe.stats["failed"]), "grad", bool(x.grad.abs().sum() > 0))
moe.close()
""", timeout=120)
        assert "failed 0 grad True" in out and "answered 0 " not in out, out
        probe = "import socket\nfor target in {targets!r}:\n    try:\n        socket.create_connection((target, 4000), timeout=1)\n" \
                "        print(target, 'reached')\n    except OSError as e:\n        print(target, 'unreachable', type(e).__name__)\n"
        seen = a.python(probe.format(targets=[home.public_address, home.address]))
        assert listener.poll() is None
        assert "reached" not in seen.replace("unreachable", ""), seen
