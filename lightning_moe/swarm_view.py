"""What `lightning-moe swarm` shows: the live experts of each layer, their hosts and each host's load."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_moe.config import grid_uids
from lightning_moe.dht import is_valid_endpoint, prefix_key
from lightning_moe.net import http_client

MAX_STATS_BYTES = 1 << 20


@dataclass
class HostView:
    """One host as the DHT and its ``/stats`` show it."""

    endpoint: str
    uids: list[str] = field(default_factory=list)
    expires_in: float = 0.0  # seconds until its latest DHT declaration expires
    stats: dict[str, Any] | None = None
    error: str | None = None
    round_trip: float | None = None  # seconds its /stats took to answer us


@dataclass
class LayerView:
    """The cells of one grid that some host declares alive."""

    uid_prefix: str
    grid_size: tuple[int, ...]
    endpoints: dict[str, list[str]] = field(default_factory=dict)  # uid -> hosts declaring it

    @property
    def num_cells(self) -> int:
        return len(grid_uids(self.uid_prefix, self.grid_size))


def _leaf_prefixes(uid_prefix: str, grid_size: Sequence[int]) -> list[str]:
    return grid_uids(uid_prefix, grid_size[:-1]) if len(grid_size) > 1 else [uid_prefix]


def survey(dht: Any, layers: Sequence[tuple[str, Sequence[int]]], secret: bytes | None = None,
           timeout: float = 5.0) -> tuple[list[LayerView], dict[str, HostView]]:
    """Read each layer's records from the DHT, then ask every host found for its ``/stats``."""
    now = time.time()
    views, hosts = [], {}
    for uid_prefix, grid_size in layers:
        view = LayerView(uid_prefix, tuple(grid_size))
        prefixes = _leaf_prefixes(uid_prefix, grid_size)
        records = dht.get_many([prefix_key(p) for p in prefixes], timeout=timeout)
        for prefix in prefixes:
            for subkey, (_, expiration) in records.get(prefix_key(prefix), {}).items():
                coord, _, endpoint = str(subkey).partition("@")
                uid = f"{prefix}.{coord}"
                if not coord.isdigit() or int(coord) >= grid_size[-1] or not is_valid_endpoint(endpoint):
                    continue
                view.endpoints.setdefault(uid, []).append(endpoint)
                host = hosts.setdefault(endpoint, HostView(endpoint))
                host.uids.append(uid)
                host.expires_in = max(host.expires_in, float(expiration) - now)
        views.append(view)
    for host in hosts.values():
        begin = time.monotonic()
        host.stats, host.error = fetch_stats(host.endpoint, secret, timeout)
        host.round_trip = time.monotonic() - begin if host.error is None else None
    return views, hosts


def fetch_stats(endpoint: str, secret: bytes | None, timeout: float) -> tuple[dict | None, str | None]:
    """A host's ``GET /stats`` as JSON, or None and why not."""
    try:
        response = http_client.request(endpoint, "GET", "/stats", headers=http_client.signed(secret, "GET", "/stats"),
                                       timeout=timeout, max_answer_bytes=MAX_STATS_BYTES)
        if response.status != 200:
            return None, f"HTTP {response.status}: {bytes(response.body[:100]).decode(errors='replace')}"
        return json.loads(response.body), None
    except Exception as e:  # noqa: BLE001 - shown in the table: a host that does not answer is news
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def batch_time(stats: dict) -> float | None:
    """Seconds the host takes per forward batch (its compute time over its batches, every expert), or None before any."""
    experts = stats.get("experts") if isinstance(stats.get("experts"), dict) else {}
    forwards = [e.get("forward") for e in experts.values() if isinstance(e, dict) and isinstance(e.get("forward"), dict)]
    batches = sum(float(f.get("batches", 0) or 0) for f in forwards)
    busy = sum(float(f.get("busy_time", 0.0) or 0.0) for f in forwards)
    return busy / batches if batches > 0 else None


def _speed(host: HostView) -> str:
    """Round trip of /stats from here, and the host's own forward time per batch."""
    rtt = "-" if host.round_trip is None else f"{1000 * host.round_trip:.0f} ms"
    per_batch = None if host.stats is None else batch_time(host.stats)
    return f"{rtt:>8} {'-' if per_batch is None else f'{1000 * per_batch:.0f} ms':>9}"


def _load(stats: dict | None) -> str:
    if stats is None:
        return "-"
    shed = stats.get("shed_forwards", 0)
    return (f"{stats.get('requests', 0)} requests, {stats.get('samples_per_second', 0.0):.1f} samples/s, "
            f"{stats.get('queued_rows', 0)} rows queued, {stats.get('errors', 0)} errors"
            f"{f', {shed} forwards shed' if shed else ''}, up {stats.get('uptime', 0.0):.0f} s{_replica_sync(stats)}")


def _replica_sync(stats: dict) -> str:
    """``, replicas averaged 3 s ago`` (the oldest of the host's cells that were averaged), from ``/stats``."""
    sync = stats.get("replica_sync")
    cells = sync.get("cells") if isinstance(sync, dict) else None
    ages = [c.get("age") for c in cells.values() if isinstance(c, dict)] if isinstance(cells, dict) else []
    ages = [a for a in ages if isinstance(a, (int, float))]
    return f", replicas averaged {max(ages):.0f} s ago" if ages else ""


def format_survey(views: Sequence[LayerView], hosts: dict[str, HostView]) -> str:
    """The table `lightning-moe swarm` prints."""
    lines = []
    for view in views:
        alive = len(view.endpoints)
        lines.append(f"layer {view.uid_prefix} {list(view.grid_size)}: {alive} of {view.num_cells} cells alive on "
                     f"{len({e for es in view.endpoints.values() for e in es})} hosts")
        missing = [uid for uid in grid_uids(view.uid_prefix, view.grid_size) if uid not in view.endpoints]
        replicas = [f"{uid}:{len(set(view.endpoints[uid]))}" for uid in grid_uids(view.uid_prefix, view.grid_size)
                    if uid in view.endpoints]
        if replicas:
            lines.append(f"  replicas: {' '.join(replicas[:64])}{' ...' if len(replicas) > 64 else ''}")
        if missing:
            lines.append(f"  no host for: {', '.join(missing[:16])}{' ...' if len(missing) > 16 else ''}")
    lines.append("")
    lines.append(f"{'host':<24} {'experts':>7} {'record expires':>14} {'rtt':>8} {'per batch':>9}  load (/stats)")
    for endpoint in sorted(hosts):
        host = hosts[endpoint]
        load = _load(host.stats) if host.error is None else f"no answer: {host.error}"
        lines.append(f"{endpoint:<24} {len(host.uids):>7} {host.expires_in:>12.0f} s {_speed(host)}  {load}")
    return "\n".join(lines)
