"""Centered clipping: how far one averaging may pull our parameters toward peers that may lie.

Both kinds of averaging (a cell's replicas, :mod:`lightning_moe.server.replica_sync`; trainers' dense parameters,
:mod:`lightning_moe.averaging.averager`) combine through :func:`centered_clip`: each peer's difference from our
parameters is clipped to a radius before the mean, ``ours + sum(clip(peer - ours, radius)) / n`` (``n``: the peers and
us; centered clipping, Karimireddy et al. 2021, as BTARD uses it, with our own parameters as the center). Within the
radius it is exactly the mean; beyond it a peer pulls at most ``radius / n``, whatever it sends. Unlike a median it
works for a pair, where a gossip exchange or a cell's two replicas cannot outvote a liar.

The radius (:class:`ClipRadius`) comes from what this side measured itself, which no peer controls: the larger of
``min_relative`` times our parameters' norm and ``factor`` times how far our own training moved them since our last
averaging. Two honest copies that started equal at the last averaging differ by at most the sum of both copies'
training moves, so ``factor`` 2 leaves honest peers that train as fast as we do unclipped; a liar moves us by at most
what our own training moved us (and less with more peers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

METHOD = "centered_clip"


def norm(flats: Sequence[torch.Tensor]) -> float:
    """The L2 norm over all flat tensors (float64 sums)."""
    return math.sqrt(sum(float(f.double().pow(2).sum()) for f in flats))


def centered_clip(ours: Sequence[torch.Tensor], theirs: Sequence[Sequence[torch.Tensor]],
                  radius: float) -> tuple[list[torch.Tensor], int]:
    """``ours + sum(clip(t - ours, radius)) / (len(theirs) + 1)`` per flat tensor group (in float64, back to each
    group's dtype), with every peer's difference clipped as a whole (over all groups); returns the result and how many
    peers were clipped. ``radius`` is absolute (L2)."""
    total = [torch.zeros_like(o, dtype=torch.float64) for o in ours]
    clipped = 0
    for peer in theirs:
        diff = [t.double() - o.double() for t, o in zip(peer, ours)]
        distance = norm(diff)
        scale = 1.0
        if distance > radius:
            scale, clipped = radius / distance, clipped + 1
        for acc, d in zip(total, diff):
            acc.add_(d, alpha=scale)
    n = len(theirs) + 1
    return [(o.double() + acc / n).to(o.dtype) for o, acc in zip(ours, total)], clipped


class ClipRadius:
    """The clipping radius of one model's averaging (see the module's doc).

    Args:
        min_relative: the least radius, relative to our parameters' norm.
        factor: the radius is at least this many times our own move since our last averaging.
    """

    def __init__(self, min_relative: float, factor: float):
        if min_relative <= 0 or factor < 0:
            raise ValueError(f"need min_relative > 0 and factor >= 0, got {min_relative}, {factor}")
        self.min_relative, self.factor = float(min_relative), float(factor)
        self.anchor: list[torch.Tensor] | None = None  # our parameters right after our last averaging

    def radius(self, ours: Sequence[torch.Tensor]) -> float:
        """The radius for an averaging of ``ours`` now (absolute L2)."""
        floor = self.min_relative * norm(ours)
        if self.anchor is None or [a.shape for a in self.anchor] != [o.shape for o in ours]:
            return floor
        return max(floor, self.factor * norm([o.double() - a.double() for o, a in zip(ours, self.anchor)]))

    def averaged(self, result: Sequence[torch.Tensor]) -> None:
        """Our parameters right after an averaging (own moves are measured from here)."""
        self.anchor = [r.detach().clone() for r in result]

    def combine(self, ours: Sequence[torch.Tensor], theirs: Sequence[Sequence[torch.Tensor]]) -> tuple[list[torch.Tensor], int]:
        """:func:`centered_clip` at this radius, remembered as our last averaging; returns it and the peers clipped."""
        result, clipped = centered_clip(ours, theirs, self.radius(ours))
        self.averaged(result)
        return result, clipped
