"""CallStats: what happened to the expert calls of one DecentralizedMoE forward and its backward (``layer.stats``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

#: Figures that describe the layer or its hosts rather than count calls: a merge takes the largest (latency too: the
#: parts of a pipelined forward call at the same time).
_LARGEST = ("latency", "link_mbps", "slow_links", "slow_hosts", "typical_latency", "odd_answers", "spot_check_mismatches",
            "liars_excluded")


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
    bytes_up: int = 0  # request bodies sent by the forward and its backward (all hosts)
    bytes_down: int = 0  # answer bodies received by them
    link_mbps: float = 0.0  # the median measured link rate of the forward's hosts (Mbit/s; 0: none measured yet)
    slow_links: int = 0  # the forward's hosts whose measured link is slow (client/links.py; never loopback)
    slow_hosts: int = 0  # hosts known to be slow when this forward chose its experts (routing leaned away)
    typical_latency: float = 0.0  # the median host's expected answer time (seconds; 0 before any was measured)
    spot_checks: int = 0  # answers of this forward whose rows were also sent to other replicas (client/spot_checks.py)
    odd_answers: int = 0  # the layer's answers dropped by the screen so far (scale far from the expert's history)
    spot_check_mismatches: int = 0  # the layer's spot checks so far in which replicas disagreed
    liars_excluded: int = 0  # hosts the layer excluded so far for what they answered
    errors: list[str] = field(default_factory=list)
    failed_endpoints: set[str] = field(default_factory=set)
    lookups: dict[str, int] = field(default_factory=dict)  # the forward's DHT reads (counts of CachedExpertLookup.stats)

    @classmethod
    def merged(cls, parts: Sequence[CallStats]) -> CallStats:
        """One forward's stats made of several (a pipelined layer's micro-batches): counts add up, errors and failed
        endpoints are joined; the latency, the layer's totals, the rates and the DHT reads (read from one cache at
        once) are the largest of the parts."""
        out = cls()
        for f in fields(cls):
            values = [getattr(part, f.name) for part in parts]
            if isinstance(getattr(out, f.name), list):
                setattr(out, f.name, [v for value in values for v in value])
            elif isinstance(getattr(out, f.name), set):
                setattr(out, f.name, set().union(*values))
            elif isinstance(getattr(out, f.name), dict):
                setattr(out, f.name, {k: max(value.get(k, 0) for value in values) for k in set().union(*values)})
            else:
                setattr(out, f.name, max(values, default=0) if f.name in _LARGEST else sum(values))
        return out

    def count_checks(self, counts: dict[str, int]) -> None:
        """Take the layer's totals of its answer checks (:meth:`AnswerChecks.figures`)."""
        self.odd_answers = counts.get("odd_answers", 0)
        self.spot_check_mismatches = counts.get("mismatches", 0)
        self.liars_excluded = counts.get("liars_excluded", 0)

    def figures(self) -> dict[str, float]:
        """The counts and the latency, and of the DHT reads: ``dht_blocking`` (0 in steady state), ``dht_refreshes``
        and ``dht_cached``."""
        figures = {f.name: float(getattr(self, f.name)) for f in fields(self) if isinstance(getattr(self, f.name), (int, float))}
        if self.lookups:
            figures.update(dht_blocking=float(self.lookups["blocking_lookups"]), dht_refreshes=float(self.lookups["refreshes"]),
                           dht_cached=float(self.lookups["fresh_hits"] + self.lookups["stale_hits"]))
        return figures
