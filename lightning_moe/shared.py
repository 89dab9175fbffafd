"""Per process: one DHT node and one expert-health registry, shared by every DecentralizedMoE layer (and a volunteer)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from lightning_moe import auth
from lightning_moe.config import DHTConfig

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_nodes: dict[bytes | None, Any] = {}  # swarm secret -> this process's DHT node for that swarm
_owned: set[int] = set()  # ids of the nodes this module created (and so shuts down)
_users: dict[int, int] = {}  # id of a node -> layers using it


def usable(dht: Any) -> bool:
    """True if ``dht`` runs and belongs to this process (a node cannot cross a fork)."""
    alive = getattr(dht, "is_alive", True)
    return getattr(dht, "owner_pid", os.getpid()) == os.getpid() and bool(alive() if callable(alive) else alive)


def process_dht(config: DHTConfig) -> Any:
    """This process's DHT node for the swarm of ``config.secret``: a volunteer's node if one runs here, else a
    client-mode node made from ``config`` (the ``dht`` group), created on first use and reused by every layer."""
    key = auth.resolve_secret(config.secret)
    with _lock:
        dht = _nodes.get(key)
        if dht is None or not usable(dht):
            from lightning_moe.dht import DHT

            dht = DHT.from_config(config, client_mode=True)
            _nodes[key] = dht
            _owned.add(id(dht))
            logger.debug("process DHT client %s joined %s", dht.address, list(config.initial_peers))
        _users[id(dht)] = _users.get(id(dht), 0) + 1
        return dht


def release_process_dht(dht: Any) -> None:
    """A layer is done with ``dht`` (from :func:`process_dht`); the last user of a client node shuts it down."""
    with _lock:
        left = _users[id(dht)] = _users.get(id(dht), 1) - 1
        last = left <= 0 and id(dht) in _owned
        if last:
            _owned.discard(id(dht))
            _users.pop(id(dht), None)
            for key, node in list(_nodes.items()):
                if node is dht:
                    del _nodes[key]
    if last:
        dht.shutdown()


def register_process_dht(dht: Any) -> None:
    """Make ``dht`` (a volunteer's full node) the one the layers of this process use."""
    with _lock:
        _nodes[getattr(dht, "secret", None)] = dht


def unregister_process_dht(dht: Any) -> None:
    """Forget ``dht`` (its owner shuts it down); layers then create a client node if they need one."""
    with _lock:
        for key, node in list(_nodes.items()):
            if node is dht:
                del _nodes[key]


def shutdown_process_dht() -> None:
    """Shut down the client nodes that :func:`process_dht` created (a registered volunteer's node is its owner's)."""
    with _lock:
        nodes = [node for node in _nodes.values() if id(node) in _owned]
        for key, node in list(_nodes.items()):
            if id(node) in _owned:
                del _nodes[key]
                _owned.discard(id(node))
                _users.pop(id(node), None)
    for node in nodes:
        node.shutdown()


_health: dict[int, Any] = {}  # pid -> this process's HealthRegistry


def process_health(config: Any = None) -> Any:
    """This process's expert-health registry, shared by every layer (see :mod:`lightning_moe.client.health`).

    ``config`` (a HealthConfig) replaces the registry's settings; the last layer to pass one wins.
    """
    from lightning_moe.client.health import HealthRegistry

    with _lock:
        registry = _health.get(os.getpid())
        if registry is None:
            registry = _health[os.getpid()] = HealthRegistry(config)
        elif config is not None and config != registry.config:
            logger.info("expert health settings of this process: %s (were %s)", config, registry.config)
            registry.config = config
        return registry


def reset_process_health() -> None:
    """Forget every exclusion of this process (tests; a trainer that moves to another swarm)."""
    with _lock:
        _health.pop(os.getpid(), None)
