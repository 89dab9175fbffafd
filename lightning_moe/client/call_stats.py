"""CallStats: what happened to the expert calls of one DecentralizedMoE forward and its backward (``layer.stats``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class CallStats:
    """What happened to the calls of one forward (and its backward)."""

    asked: int = 0
    answered: int = 0
    failed: int = 0
    timed_out: int = 0
    given_up: int = 0  # stragglers not waited for (slow hosts; not failures)
    shed: int = 0  # calls a host refused because it was behind (503 with Retry-After; not failures)
    latency: float = 0.0
    backward_asked: int = 0
    backward_answered: int = 0
    backward_failed: int = 0
    backward_given_up: int = 0
    compressed: int = 0  # forward calls sent with a compact codec (compression="auto" chose it for a slow link)
    link_mbps: float = 0.0  # the median measured link rate of the forward's hosts (Mbit/s; 0: none measured yet)
    slow_hosts: int = 0  # hosts known to be slow when this forward chose its experts (routing leaned away)
    typical_latency: float = 0.0  # the median host's expected answer time (seconds; 0 before any was measured)
    errors: list[str] = field(default_factory=list)
    failed_endpoints: set[str] = field(default_factory=set)
    lookups: dict[str, int] = field(default_factory=dict)  # the forward's DHT reads (counts of CachedExpertLookup.stats)

    def figures(self) -> dict[str, float]:
        """The counts and the latency, and of the DHT reads: ``dht_blocking`` (0 in steady state), ``dht_refreshes``
        and ``dht_cached``."""
        figures = {f.name: float(getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), (int, float))}
        if self.lookups:
            figures.update(dht_blocking=float(self.lookups["blocking_lookups"]), dht_refreshes=float(self.lookups["refreshes"]),
                           dht_cached=float(self.lookups["fresh_hits"] + self.lookups["stale_hits"]))
        return figures
