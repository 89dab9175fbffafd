"""lightning_moe: decentralized mixture-of-experts training for PyTorch Lightning."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DecentralizedMoE": "lightning_moe.client.moe",
    "LocalMoE": "lightning_moe.client.local_moe",
    "MoEStack": "lightning_moe.client.pipeline",
    "RemoteExpert": "lightning_moe.client.remote_expert",
    "RemoteExpertError": "lightning_moe.client.remote_expert",
    "NotEnoughExpertsError": "lightning_moe.client.parallel_call",
    "DHT": "lightning_moe.dht",
    "ExpertBackend": "lightning_moe.server",
    "ExpertHost": "lightning_moe.server",
    "ExpertHostCallback": "lightning_moe.lightning.callback",
    "LocalSwarm": "lightning_moe.swarm",
    "SwarmAveraging": "lightning_moe.averaging",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import on first use, so a host does not import Lightning and a trainer not the server."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_moe' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
