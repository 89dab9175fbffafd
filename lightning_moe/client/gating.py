"""Gating helpers shared by DecentralizedMoE and LocalMoE."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def load_balancing_loss(logits: Sequence[torch.Tensor], coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing, averaged over grid dimensions.

    For dimension d with size G: ``G * sum_c(fraction of choices routed to coordinate c * mean
    gate probability of c)``; 1.0 when routing is uniform. ``logits[d]`` is (batch, G),
    ``coords`` (batch, k, dims) the chosen grid cells, ``mask`` (batch, k) which choices count.
    """
    losses = []
    for d, logit in enumerate(logits):
        probs = torch.softmax(logit, dim=-1)
        used = mask.to(device=logit.device, dtype=probs.dtype)
        counts = torch.zeros_like(probs).scatter_add_(1, coords[..., d].to(logit.device), used)
        fraction = counts.sum(0) / counts.sum().clamp_min(1.0)
        losses.append(logit.shape[-1] * (fraction * probs.mean(0)).sum())
    return torch.stack(losses).mean()
