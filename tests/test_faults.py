"""Learning under faults: short runs of examples/fault_runs.py (local mixture, healthy swarm, churn, slow host)."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import fault_runs  # noqa: E402

SHORT = [
    "trainer.max_steps=80", "trainer.val_check_interval=80", "trainer.limit_val_batches=20",
    "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false", "~logger", "callbacks=none",
    "data.train_bytes=200000",
]
_reports: dict[str, fault_runs.RunReport] = {}


def report(name: str, tmp_path_factory: pytest.TempPathFactory) -> fault_runs.RunReport:
    """Each run once per session, whichever test asks first."""
    if name not in _reports:
        root = tmp_path_factory.mktemp(name)
        _reports[name] = fault_runs.run(name, [*SHORT, f"paths.output_dir={root}"])
    return _reports[name]


@pytest.mark.soak  # 40 s (10-minute budget of the default run); measured at length by examples/fault_runs.py
def test_decentralized_layer_learns_as_well_as_the_local_mixture(tmp_path_factory):
    local, healthy = report("local", tmp_path_factory), report("healthy", tmp_path_factory)
    assert math.isfinite(healthy.val_bpc) and healthy.val_bpc < 4.0  # learnt something (uniform is 8 bits)
    assert healthy.val_bpc <= local.val_bpc + 0.05, (healthy, local)  # no worse (it has ended lower: README)
    assert healthy.failed == 0 and healthy.timed_out == 0


@pytest.mark.soak  # two more runs of about 50 s each; a host's death is also tested in test_moe.py
def test_churn_killed_host_and_late_joiner(tmp_path_factory):
    churn, healthy = report("churn", tmp_path_factory), report("healthy", tmp_path_factory)
    assert churn.failed > 0, "the kill went unnoticed: no call ever failed"
    assert churn.joiner_samples is not None and churn.joiner_samples > 0, "the new volunteer got no traffic"
    assert abs(churn.val_bpc - healthy.val_bpc) <= 0.075, (churn, healthy)


@pytest.mark.soak  # slow hosts are also tested with real hosts in test_slow_hosts.py
def test_slow_host_is_given_up_on_and_training_goes_on(tmp_path_factory):
    slow, healthy = report("slow", tmp_path_factory), report("healthy", tmp_path_factory)
    assert slow.given_up + slow.shed > 0, "the slow host was never given up on or shed: the test proves nothing"
    assert slow.failed == 0
    assert abs(slow.val_bpc - healthy.val_bpc) <= 0.075, (slow, healthy)
