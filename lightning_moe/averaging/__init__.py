"""Gossip averaging of the dense (non-expert) parameters of the trainers of one run.

``SwarmAveraging`` is the Lightning callback; ``Averager`` the machinery (DHT declarations, the
exchanges, the server that answers peers and joiners); ``state`` the message and its checks. The
exports are imported on first use, so that a host that reuses ``state`` and ``server`` (the averaging of
a cell's replicas, :mod:`lightning_moe.server.replica_sync`) does not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Averager": ".averager",
    "run_key": ".averager",
    "SwarmAveraging": ".callback",
    "Layout": ".state",
    "RefusedState": ".state",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
