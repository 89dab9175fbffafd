"""What one trainer's gradients can do to an expert: each backward request's output-gradient rows are clipped to
``clip`` times the expert's typical row norm (``host.grad_clip``).

An expert's parameter gradient is linear in the output gradients it is sent, and the runtime sums the rows of all
the requests in a batch: bounding every row's norm bounds every request's share of the update, so a batch that mixes
several trainers' requests is a sum of bounded contributions and one trainer sending huge gradients moves the expert
at most ``clip`` times as far as a typical request of its size. This is clipping per request before aggregation,
what centered clipping does around a reference, with the reference a typical norm instead of the last update; it costs
one norm per row in the request thread and no second pass over the parameters.

The typical norm: each trainer address keeps a running mean of ``log`` of its requests' median (clipped) row norm;
the expert's reference is the lower median of those means over the addresses seen (at most ``max_trainers``, the
least recently seen forgotten first). A minority of trainers cannot move the median; a trainer alone moves its mean
by at most ``rate * log(clip)`` per request (``RATE`` 0.02, clip 4: under 3% per request), so a lone poisoner raises
its own bound slowly, and an honest change of scale is followed within tens of requests.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Hashable, Sequence

import torch

#: Weight of a new request in its trainer's running mean of log row norms.
RATE = 0.02
#: Trainer addresses remembered per expert (the least recently seen forgotten first).
MAX_TRAINERS = 1024


class GradientBounds:
    """Clips backward requests' output gradients of one expert (thread-safe); ``clip`` 0 turns it off."""

    def __init__(self, clip: float = 4.0, max_trainers: int = MAX_TRAINERS, rate: float = RATE):
        if clip < 0 or max_trainers < 1 or not 0 < rate <= 1:
            raise ValueError(f"need clip >= 0, max_trainers >= 1 and 0 < rate <= 1, got {clip}, {max_trainers}, {rate}")
        self.clip, self.max_trainers, self.rate = float(clip), int(max_trainers), float(rate)
        self._means: collections.OrderedDict[Hashable, float] = collections.OrderedDict()  # address -> mean log norm
        self._lock = threading.Lock()
        self.requests = self.rows = self.clipped_rows = self.clipped_requests = 0
        self.largest_ratio = 0.0  # the largest row norm seen over its bound (how far above the bound poison came)

    def reference(self) -> float | None:
        """The expert's typical row norm now (None before any request)."""
        with self._lock:
            return self._reference()

    def _reference(self) -> float | None:
        if not self._means:
            return None
        values = sorted(self._means.values())
        return math.exp(values[(len(values) - 1) // 2])  # the lower median: a pair cannot raise it

    def bound(self, grads: Sequence[torch.Tensor], source: Hashable = None) -> tuple[torch.Tensor, ...]:
        """``grads`` (a request's output gradients, rows first) with each row's norm (over all of them) at most
        ``clip`` x the reference; ``source``: the trainer's address."""
        grads = tuple(grads)
        if self.clip <= 0 or not grads or grads[0].dim() == 0 or len(grads[0]) == 0:
            return grads
        batch = len(grads[0])
        norms = torch.zeros(batch, dtype=torch.float64)
        for g in grads:
            if g.is_floating_point():
                norms += g.reshape(batch, -1).double().pow(2).sum(1)
        norms = norms.sqrt_()
        with self._lock:
            reference = self._reference()
        if reference is not None and reference > 0:
            limit = self.clip * reference
            over = norms > limit
            if bool(over.any()):
                factor = torch.where(over, limit / norms.clamp_min(1e-300), torch.ones_like(norms))
                grads = tuple(g * factor.to(g.dtype).reshape(batch, *[1] * (g.dim() - 1)) if g.is_floating_point() else g
                              for g in grads)
                self.largest_ratio = max(self.largest_ratio, float(norms.max()) / limit)
                norms = torch.minimum(norms, torch.full_like(norms, limit))
                clipped = int(over.sum())
            else:
                clipped = 0
        else:
            clipped = 0
        typical = float(norms.median())
        with self._lock:
            self.requests += 1
            self.rows += batch
            self.clipped_rows += clipped
            self.clipped_requests += clipped > 0
            if typical > 0:
                value = math.log(typical)
                mean = self._means.pop(source, None)
                self._means[source] = value if mean is None else mean + self.rate * (value - mean)
                while len(self._means) > self.max_trainers:
                    self._means.popitem(last=False)
        return grads

    def stats(self) -> dict:
        """Requests and rows seen and clipped, the reference, the trainers remembered."""
        with self._lock:
            return {"requests": self.requests, "rows": self.rows, "clipped_rows": self.clipped_rows,
                    "clipped_requests": self.clipped_requests, "reference": self._reference() or 0.0,
                    "trainers": len(self._means), "largest_ratio": self.largest_ratio}
