"""LocalMoE: the same mixture as DecentralizedMoE, every expert in this process (a baseline and a reference)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from lightning_moe.client.gating import load_balancing_loss


class LocalMoE(nn.Module):
    """Product-key gating over a grid of local experts, top ``k_best`` per sample, softmax-weighted sum.

    Computes what :class:`~lightning_moe.client.moe.DecentralizedMoE` computes when every expert
    is alive, so it serves as the baseline of benchmarks and quality comparisons.

    Args:
        in_features: size of the last input dimension.
        grid_size: experts per grid dimension.
        experts: ``{uid: module}`` for every grid cell (uids ``prefix.i.j``), or a factory called once per cell.
        uid_prefix: the uid prefix, used to name experts built by a factory.
        k_best: experts mixed per sample.
    """

    def __init__(
        self,
        in_features: int,
        grid_size: Sequence[int],
        experts: Mapping[str, nn.Module] | Callable[[], nn.Module],
        uid_prefix: str = "ffn",
        k_best: int = 4,
    ):
        super().__init__()
        self.grid_size, self.k_best = tuple(grid_size), k_best
        cells = list(itertools.product(*(range(g) for g in self.grid_size)))
        uids = [".".join([uid_prefix, *map(str, cell)]) for cell in cells]
        if callable(experts) and not isinstance(experts, Mapping):
            experts = {uid: experts() for uid in uids}
        missing = [uid for uid in uids if uid not in experts]
        if missing:
            raise ValueError(f"no expert for grid cells {missing[:4]}{'...' if len(missing) > 4 else ''}")
        self.proj = nn.Linear(in_features, sum(self.grid_size))
        self.experts = nn.ModuleList(experts[uid] for uid in uids)  # flat index = row-major grid cell
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        logits = self.proj(flat).split(self.grid_size, dim=-1)
        scores = logits[0]
        for logit in logits[1:]:
            scores = (scores[..., None] + logit[:, None, :]).flatten(1)
        top_scores, top_index = scores.topk(self.k_best, dim=1)
        weights = torch.softmax(top_scores.float(), dim=1).to(flat.dtype)
        coords = torch.stack(torch.unravel_index(top_index, self.grid_size), dim=-1)
        self.aux_loss = load_balancing_loss(logits, coords, torch.ones_like(top_index, dtype=torch.bool))
        out = None
        for expert_index in top_index.unique().tolist():
            rows, slots = (top_index == expert_index).nonzero(as_tuple=True)
            contribution = self.experts[expert_index](flat[rows]) * weights[rows, slots, None]
            if out is None:
                out = contribution.new_zeros(len(flat), *contribution.shape[1:])
            out = out.index_add(0, rows, contribution)
        return out.reshape(*leading, *out.shape[1:])
