"""Beam search over an expert grid, keeping only what the DHT reports alive; any live experts of a grid."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch

from ..dht.records import parse_uid_prefix


def beam_search(dht: Any, uid_prefix: str, grid_scores: Sequence[torch.Tensor], k_best: int,
                beam_size: Optional[int] = None, timeout: Optional[float] = None,
                return_endpoints: bool = False) -> list[list[Any]]:
    """Find, for every sample, the ``k_best`` live experts with the highest summed score.

    The score of expert ``prefix.i.j`` for sample ``b`` is ``grid_scores[0][b, i] +
    grid_scores[1][b, j]`` (product-key gating). The search walks the grid one dimension at
    a time: it asks the DHT which children of the current prefixes are alive (one batched
    lookup per dimension, shared by the whole batch) and keeps the ``beam_size`` best live
    prefixes per sample. With ``beam_size`` at least the number of live prefixes of every
    dimension the answer is exact; with the default (``k_best``) it is exact when every
    live prefix has every child alive, and otherwise a close approximation.

    :param dht: a ``lightning_moe.dht.DHT`` (anything with ``get_active_children``).
    :param grid_scores: one ``[batch, grid_size_d]`` tensor per grid dimension (gradients are
        not tracked here; gather the chosen experts' scores from the tensors afterwards).
    :param timeout: bound of the whole search in seconds (default: the DHT's ``wait_timeout``);
        lookups still running at the deadline contribute what they found so far.
    :param return_endpoints: return ``(uid, endpoint)`` pairs instead of uids (the endpoints
        come from the last dimension's prefix records: no extra lookup needed).
    :returns: per sample, up to ``k_best`` uids (or pairs), best first; fewer when fewer are alive.
    """
    parse_uid_prefix(uid_prefix)
    if not grid_scores:
        raise ValueError("grid_scores must hold one tensor per grid dimension")
    if k_best < 1:
        raise ValueError("k_best must be positive")
    batch = grid_scores[0].shape[0]
    for scores in grid_scores:
        if scores.dim() != 2 or scores.shape[0] != batch:
            raise ValueError("every grid_scores tensor must be [batch, grid_size] with the same batch")
    beam_size = max(beam_size or k_best, k_best)
    timeout = float(getattr(dht, "wait_timeout", 5.0) if timeout is None else timeout)
    deadline = time.monotonic() + timeout

    prefixes: list[str] = [uid_prefix]  # unique prefixes on the beams
    beam_index = torch.zeros(batch, 1, dtype=torch.long)  # [batch, beam] -> index into prefixes
    beam_scores = torch.zeros(batch, 1, dtype=torch.float64)  # -inf marks an empty beam slot
    last_children: dict[str, dict[int, str]] = {}
    num_dims = len(grid_scores)
    for dim, raw_scores in enumerate(grid_scores):
        scores = torch.nan_to_num(raw_scores.detach().to("cpu", torch.float64), nan=-torch.inf)
        grid_size = scores.shape[1]
        children = dht.get_active_children(prefixes, timeout=max(0.0, deadline - time.monotonic()))
        alive = torch.zeros(len(prefixes), grid_size, dtype=torch.bool)
        for i, prefix in enumerate(prefixes):
            coords = [c for c in children.get(prefix, {}) if 0 <= c < grid_size]
            if coords:
                alive[i, coords] = True
        candidates = beam_scores[:, :, None] + scores[:, None, :]  # [batch, beam, grid]
        mask = alive[beam_index] & torch.isfinite(beam_scores)[:, :, None]
        candidates = candidates.masked_fill(~mask, -torch.inf).flatten(1)
        width = min(k_best if dim == num_dims - 1 else beam_size, candidates.shape[1])
        top_scores, top_flat = candidates.topk(width, dim=1)
        parents = torch.gather(beam_index, 1, top_flat // grid_size)
        # each live child prefix gets one code; the batch shares one name per code
        codes = (parents * grid_size + top_flat % grid_size).masked_fill(~torch.isfinite(top_scores), -1)
        unique_codes, new_index = torch.unique(codes, return_inverse=True)
        if len(unique_codes) and int(unique_codes[0]) == -1:
            unique_codes, new_index = unique_codes[1:], (new_index - 1).clamp_min(0)  # empty slots keep score -inf
        last_children = children
        prefixes = [f"{prefixes[code // grid_size]}.{code % grid_size}" for code in unique_codes.tolist()]
        beam_index, beam_scores = new_index, top_scores
        if not prefixes:
            return [[] for _ in range(batch)]

    if return_endpoints:
        names: list[Any] = []
        for uid in prefixes:
            parent, _, coord = uid.rpartition(".")
            names.append((uid, last_children[parent][int(coord)]))
    else:
        names = prefixes
    finite = torch.isfinite(beam_scores).tolist()
    return [[names[i] for i, ok in zip(row, ok_row) if ok] for row, ok_row in zip(beam_index.tolist(), finite)]


def live_experts(dht: Any, uid_prefix: str, grid_dims: int, timeout: Optional[float] = None,
                 max_prefixes: int = 64) -> list[tuple[str, str]]:
    """Some live experts under ``uid_prefix`` as ``(uid, endpoint)`` pairs, in grid order, with no scores to rank them:
    the grid walked down one dimension at a time through ``dht.get_active_children`` (a cache serves it from memory
    once warm), following at most ``max_prefixes`` live prefixes per dimension. For what every expert of a layer
    shares, such as its schemas.

    :param timeout: bound of the whole walk in seconds (default: the DHT's ``wait_timeout``).
    """
    parse_uid_prefix(uid_prefix)
    timeout = float(getattr(dht, "wait_timeout", 5.0) if timeout is None else timeout)
    deadline = time.monotonic() + timeout
    prefixes = [uid_prefix]
    for dim in range(grid_dims):
        children = dht.get_active_children(prefixes, timeout=max(0.0, deadline - time.monotonic()))
        if dim == grid_dims - 1:
            return [(f"{p}.{c}", endpoint) for p in prefixes for c, endpoint in sorted(children.get(p, {}).items())]
        prefixes = [f"{p}.{c}" for p in prefixes for c in sorted(children.get(p, {}))][:max_prefixes]
        if not prefixes:
            break
    return []
