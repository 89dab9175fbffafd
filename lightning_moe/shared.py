"""Per process: one DHT node per swarm and one expert-health registry, shared by every DecentralizedMoE layer
(and a volunteer). Both live in the process's context (``lightning_moe.process``), so a forked child starts
with neither."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from lightning_moe import auth
from lightning_moe.client.health import HealthRegistry
from lightning_moe.config import DHTConfig, HealthConfig
from lightning_moe.process import context

logger = logging.getLogger(__name__)


@dataclass
class _Nodes:
    by_secret: dict[bytes | None, Any] = field(default_factory=dict)  # swarm secret -> this process's node
    owned: set[int] = field(default_factory=set)  # ids of the nodes made here (and so shut down here)
    users: dict[int, int] = field(default_factory=dict)  # id of a node -> layers using it


def _nodes() -> _Nodes:
    return context().get("dht_nodes", _Nodes)


def usable(dht: Any) -> bool:
    """True if ``dht`` runs and belongs to this process (a node cannot cross a fork)."""
    alive = getattr(dht, "is_alive", True)
    return getattr(dht, "owner_pid", os.getpid()) == os.getpid() and bool(alive() if callable(alive) else alive)


def process_dht(config: DHTConfig) -> Any:
    """This process's DHT node for the swarm of ``config.secret``: a volunteer's node if one runs here, else a
    client-mode node made from ``config`` (the ``dht`` group), created on first use and reused by every layer."""
    key = auth.resolve_secret(config.secret)
    nodes = _nodes()
    with context().lock:
        dht = nodes.by_secret.get(key)
        if dht is None or not usable(dht):
            from lightning_moe.dht import DHT

            dht = DHT.from_config(config, client_mode=True)
            nodes.by_secret[key] = dht
            nodes.owned.add(id(dht))
            logger.debug("process DHT client %s joined %s", dht.address, list(config.initial_peers))
        nodes.users[id(dht)] = nodes.users.get(id(dht), 0) + 1
        return dht


def release_process_dht(dht: Any) -> None:
    """A layer is done with ``dht`` (from :func:`process_dht`); the last user of a client node shuts it down."""
    nodes = _nodes()
    with context().lock:
        left = nodes.users[id(dht)] = nodes.users.get(id(dht), 1) - 1
        last = left <= 0 and id(dht) in nodes.owned
        if last:
            nodes.owned.discard(id(dht))
            nodes.users.pop(id(dht), None)
            for key, node in list(nodes.by_secret.items()):
                if node is dht:
                    del nodes.by_secret[key]
    if last:
        dht.shutdown()


def process_dht_nodes() -> list[Any]:
    """The DHT nodes this process's layers use now (one per swarm)."""
    with context().lock:
        return list(_nodes().by_secret.values())


def register_process_dht(dht: Any) -> None:
    """Make ``dht`` (a volunteer's full node) the one the layers of this process use."""
    with context().lock:
        _nodes().by_secret[getattr(dht, "secret", None)] = dht


def unregister_process_dht(dht: Any) -> None:
    """Forget ``dht`` (its owner shuts it down); layers then create a client node if they need one."""
    nodes = _nodes()
    with context().lock:
        for key, node in list(nodes.by_secret.items()):
            if node is dht:
                del nodes.by_secret[key]


def shutdown_process_dht() -> None:
    """Shut down the client nodes that :func:`process_dht` created (a registered volunteer's node is its owner's)."""
    nodes = _nodes()
    with context().lock:
        mine = [node for node in nodes.by_secret.values() if id(node) in nodes.owned]
        for key, node in list(nodes.by_secret.items()):
            if id(node) in nodes.owned:
                del nodes.by_secret[key]
                nodes.owned.discard(id(node))
                nodes.users.pop(id(node), None)
    for node in mine:
        node.shutdown()


def process_health(config: HealthConfig | None = None) -> HealthRegistry:
    """This process's expert-health registry, shared by every layer (see :mod:`lightning_moe.client.health`).

    ``config`` replaces the registry's settings; the last layer to pass one wins.
    """
    with context().lock:
        registry = context().get("health", lambda: HealthRegistry(config))
        if config is not None and config != registry.config:
            logger.info("expert health settings of this process: %s (were %s)", config, registry.config)
            registry.config = config
        return registry


def reset_process_health() -> None:
    """Forget every exclusion of this process (tests; a trainer that moves to another swarm)."""
    context().pop("health")
