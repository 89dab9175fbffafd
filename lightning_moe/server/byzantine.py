"""Lying volunteers, for tests and demos (``host.byzantine``): an :class:`~lightning_moe.server.backend.ExpertBackend`
hook that alters a fraction of an expert's answers, forward outputs and backward input gradients alike, and the
parameters it sends its replicas for averaging (:mod:`lightning_moe.server.replica_sync`). The host still learns
honestly from the gradients it gets and averages its own parameters; only what it sends is false.

Modes (:data:`MODES`):

- ``sign_flip``: answers ``-y`` instead of ``y``;
- ``scale``: answers ``SCALE_FACTOR * y``;
- ``noise``: answers ``y + e``, ``e`` Gaussian with the answer's own RMS per row (a relative error of about 1);
- ``stale``: answers with a snapshot of the expert's weights taken when the host started, refreshed every
  ``STALE_REFRESH`` seconds (a volunteer that skips its updates, or serves an old checkpoint).

Trainers catch them (:mod:`lightning_moe.client.spot_checks`); the README's *Volunteers that lie* says how.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Sequence

import torch
from torch import nn

from lightning_moe.averaging import state

logger = logging.getLogger(__name__)

MODES = ("none", "sign_flip", "scale", "noise", "stale")  # lightning_moe.config.BYZANTINE_MODES
SCALE_FACTOR = 10.0
STALE_REFRESH = 600.0


class Liar:
    """Alters ``rate`` of an expert's answers (each batch's answer at random) in ``mode``.

    The backend calls :meth:`forward` and :meth:`backward` with its lock held (a stale answer runs the expert's module
    with the snapshot's tensors in place of its own, :func:`torch.func.functional_call`)."""

    def __init__(self, mode: str, rate: float = 1.0, seed: int | str | None = None, refresh: float = STALE_REFRESH):
        if mode not in MODES or mode == "none":
            raise ValueError(f"byzantine mode must be one of {list(MODES[1:])}, got {mode!r}")
        if not 0 <= rate <= 1:
            raise ValueError(f"byzantine rate must be in [0, 1], got {rate!r}")
        self.mode, self.rate, self.refresh = mode, float(rate), float(refresh)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(self.rng.randrange(2**62))
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.snapshot_at = 0.0
        self.lies = self.answers = 0

    def _lies_now(self) -> bool:
        self.answers += 1
        lie = self.rate >= 1 or self.rng.random() < self.rate
        self.lies += lie
        return lie

    def _stale_state(self, expert: nn.Module) -> dict[str, torch.Tensor]:
        now = time.monotonic()
        if self.snapshot is None or now - self.snapshot_at > self.refresh:
            self.snapshot = {k: v.detach().clone() for k, v in expert.state_dict().items()}
            self.snapshot_at = now
        return self.snapshot

    def take_snapshot(self, expert: nn.Module) -> None:
        """Keep the expert's weights now for stale answers (the host calls this when it starts serving)."""
        if self.mode == "stale":
            self._stale_state(expert)

    def _alter(self, answers: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = []
        for y in answers:
            if not y.is_floating_point():
                out.append(y)
            elif self.mode == "sign_flip":
                out.append(-y)
            elif self.mode == "scale":
                out.append(y * SCALE_FACTOR)
            else:  # noise
                rows = y.reshape(len(y), -1) if y.dim() > 0 and len(y) else y.reshape(1, -1)
                rms = rows.float().pow(2).mean(1, keepdim=True).sqrt() if rows.numel() else rows
                noise = torch.randn(rows.shape, generator=self.generator).to(rows.device) * rms
                out.append((rows + noise.to(rows.dtype)).reshape(y.shape))
        return tuple(out)

    def forward(self, expert: nn.Module, inputs: Sequence[torch.Tensor],
                outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The answer to a forward batch: ``outputs``, or a lie."""
        if not self._lies_now():
            return outputs
        if self.mode != "stale":
            return self._alter(outputs)
        with torch.no_grad():
            stale = torch.func.functional_call(expert, self._stale_state(expert), tuple(inputs))
        return (stale,) if isinstance(stale, torch.Tensor) else tuple(stale)

    def backward(self, expert: nn.Module, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor],
                 grad_inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The answer to a backward batch: ``grad_inputs``, or a lie."""
        if not self._lies_now():
            return grad_inputs
        if self.mode != "stale":
            return self._alter(grad_inputs)
        leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        with torch.enable_grad():
            stale = torch.func.functional_call(expert, self._stale_state(expert), tuple(leaves))
            stale = (stale,) if isinstance(stale, torch.Tensor) else tuple(stale)
            pairs = [(o, g) for o, g in zip(stale, grad_outputs) if o.requires_grad]
            wanted = [x for x in leaves if x.requires_grad]
            grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) \
                if pairs and wanted else [None] * len(wanted)
        found = dict(zip(map(id, wanted), grads))
        return tuple(g if (g := found.get(id(x))) is not None else torch.zeros_like(x) for x in leaves)

    def parameters(self, expert: nn.Module, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters sent to a replica: ``flats`` (ours, flat per dtype group), or a lie: the same alteration
        as an answer's over each group (noise: of the parameters' own RMS), or the stale snapshot's parameters."""
        if self.rate < 1 and self.rng.random() >= self.rate:
            return flats
        if self.mode != "stale":
            return [self._alter((f.reshape(1, -1),))[0].reshape(f.shape) for f in flats]
        snapshot = self._stale_state(expert)
        layout = state.Layout.of(expert)
        return state.snapshot_of([snapshot[name] for name in layout.names], layout)

    def counters(self) -> dict:
        """Answers seen and lies told."""
        return {"mode": self.mode, "rate": self.rate, "answers": self.answers, "lies": self.lies}
