"""Each test starts with a fresh per-process DHT client and expert-health registry."""

import pytest

from lightning_moe import shared


@pytest.fixture(autouse=True)
def fresh_process_state():
    shared.reset_process_health()
    yield
    shared.shutdown_process_dht()
    shared.reset_process_health()
