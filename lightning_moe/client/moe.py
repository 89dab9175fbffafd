"""DecentralizedMoE: a mixture-of-experts layer whose experts live on volunteer hosts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from lightning_moe import auth, wire
from lightning_moe.client.beam_search import beam_search
from lightning_moe.client.dht_cache import CachedExpertLookup
from lightning_moe.client.gating import load_balancing_loss
from lightning_moe.client.parallel_call import (
    CallSettings,
    CallStats,
    ExpertCall,
    NotEnoughExpertsError,
    RemoteMixtureCall,
    call_forward,
    check_k_min,
    tried_by,
)
from lightning_moe.client.remote_expert import RemoteExpert, RemoteExpertError
from lightning_moe.shared import process_dht, usable

logger = logging.getLogger(__name__)


class DecentralizedMoE(nn.Module):
    """A mixture of experts served by hosts found through the DHT (Learning@home's DMoE layer).

    Gating projects each input to one logit vector per grid dimension; an expert's score is the
    sum of its coordinates' logits. Beam search through the DHT picks the ``k_best`` live experts
    per sample, all chosen experts are called in parallel, and the output is the softmax-weighted
    sum over the experts that answered. Only the gating projection is a parameter of this module.

    Args:
        in_features: size of the last input dimension.
        grid_size: experts per grid dimension, e.g. ``(16, 16)`` for uids ``ffn.0.0 .. ffn.15.15``.
        uid_prefix: the layer's uid prefix in the DHT.
        k_best: experts asked per sample.
        k_min: answers a sample needs; fewer raises :class:`NotEnoughExpertsError`.
        forward_timeout: seconds for the whole forward, DHT lookups and beam search included.
        timeout_after_k_min: once the first expert answered, wait at most this long for the others;
            samples they leave short of ``k_min`` are re-routed once to other live experts, and the
            stragglers' hosts are left out of routing for a while (so a slow host cannot stall steps).
        backward_k_min: expert gradients a sample should get; fewer is logged as a warning and counted.
        backward_timeout: seconds for all backward calls; experts that do not answer are dropped and counted.
        dht: a :class:`lightning_moe.dht.DHT` to use; if None, the process's node is used (a volunteer's
            in the same process, else a client-mode node joined to ``initial_peers`` and shared by every
            layer), looked up in the process that first runs forward (safe for DDP and pickling).
        initial_peers: ``"host:port"`` of DHT nodes, used when ``dht`` is None.
        compression: wire compression of activations and gradients: none, float16 or uint8.
        cache_ttl: seconds that DHT answers are reused, so a step rarely waits on the DHT.
        jitter: multiplicative noise ``U(1 - jitter, 1 + jitter)`` on the gating input during training.
        expert_info_timeout: seconds to wait for a host's ``/info`` (schemas), fetched once.
        secret: a private swarm's shared secret for requests and DHT records (default: the
            LIGHTNING_MOE_SECRET environment variable; none: a public swarm).
    """

    def __init__(
        self,
        in_features: int,
        grid_size: Sequence[int],
        uid_prefix: str = "ffn",
        k_best: int = 4,
        k_min: int = 1,
        forward_timeout: float | None = 30.0,
        timeout_after_k_min: float | None = 1.0,
        backward_k_min: int = 1,
        backward_timeout: float | None = 30.0,
        dht: Any = None,
        initial_peers: Sequence[str] = (),
        compression: str = "none",
        cache_ttl: float = 5.0,
        jitter: float = 0.0,
        expert_info_timeout: float = 10.0,
        secret: str | bytes | None = None,
    ):
        super().__init__()
        if compression not in wire.COMPRESSIONS:
            raise ValueError(f"compression must be one of {wire.COMPRESSIONS}, got {compression!r}")
        if not 1 <= k_min <= k_best:
            raise ValueError(f"need 1 <= k_min <= k_best, got k_min={k_min}, k_best={k_best}")
        if dht is None and not initial_peers:
            raise ValueError("DecentralizedMoE needs a dht or initial_peers to find experts")
        self.in_features, self.grid_size, self.uid_prefix = in_features, tuple(int(g) for g in grid_size), uid_prefix
        self.k_best, self.k_min, self.backward_k_min = k_best, k_min, backward_k_min
        self.forward_timeout, self.timeout_after_k_min, self.backward_timeout = forward_timeout, timeout_after_k_min, backward_timeout
        self.compression, self.cache_ttl, self.jitter = compression, cache_ttl, jitter
        self.expert_info_timeout = expert_info_timeout
        self.secret = auth.resolve_secret(secret)
        self.initial_peers = list(initial_peers) if initial_peers else [dht.address]
        self.proj = nn.Linear(in_features, sum(self.grid_size))
        self._dht, self._lookup, self._expert_info = dht, None, None
        self._lock = threading.Lock()
        self.last_stats = CallStats()
        self.aux_loss: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_dht"], state["_lookup"], state["_lock"] = None, None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def dht(self) -> Any:
        """The DHT node; created lazily (client mode) in the process that uses it."""
        with self._lock:
            if self._dht is None or not usable(self._dht):

                self._dht = process_dht(self.initial_peers, self.secret)
            return self._dht

    @property
    def lookup(self) -> CachedExpertLookup:
        if self._lookup is None:
            self._lookup = CachedExpertLookup(self.dht, len(self.grid_size), ttl=self.cache_ttl)
            self._log_swarm()
        return self._lookup

    def _log_swarm(self) -> None:
        """Say once what this layer finds in the swarm: experts of its grid and the hosts serving them."""
        from lightning_moe.config import grid_uids

        uids = grid_uids(self.uid_prefix, self.grid_size)
        try:
            endpoints = self.dht.get_experts(uids, timeout=min(self.forward_timeout or 5.0, 5.0))
        except Exception:  # noqa: BLE001 - only a log line; the forward's own lookups report failures
            logger.debug("could not list the experts of %s", self.uid_prefix, exc_info=True)
            return
        found = [e for e in endpoints if e is not None]
        logger.info("%s: found %d of %d experts on %d hosts", self.uid_prefix, len(found), len(uids), len(set(found)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the experts' outputs for each row of ``x`` (shape ``(..., in_features)``)."""
        start = time.monotonic()
        deadline = None if self.forward_timeout is None else start + self.forward_timeout
        leading, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        gate_input = flat
        if self.training and self.jitter > 0:
            gate_input = flat * torch.empty_like(flat).uniform_(1 - self.jitter, 1 + self.jitter)
        compute_dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64; halves go to float32
        logits = self.proj(gate_input.to(self.proj.weight.dtype)).to(compute_dtype).split(self.grid_size, dim=-1)

        cpu_scores = [logit.detach().to("cpu") for logit in logits]
        chosen = self._choose_experts(cpu_scores, deadline)
        info = self._get_expert_info(chosen, deadline)
        x_cpu = flat.to(device="cpu", dtype=wire.parse_dtype(info["args_schema"][0]["dtype"]))
        out_schema = info["outputs_schema"][0]
        outputs = torch.zeros(len(flat), self.k_best, *out_schema["shape"], dtype=wire.parse_dtype(out_schema["dtype"]))
        mask = torch.zeros(len(flat), self.k_best, dtype=torch.bool)
        coords = torch.zeros(len(flat), self.k_best, len(self.grid_size), dtype=torch.long)
        stats = self.last_stats = CallStats()
        answered, tried = self._call_with_retry(chosen, cpu_scores, x_cpu, outputs, mask, coords, deadline, stats)
        check_k_min(tried, mask, self.k_min)

        backward_settings = CallSettings(self.backward_k_min, self.backward_timeout, self.timeout_after_k_min, self.compression,
                                         self.secret)
        dummy = torch.empty(0, requires_grad=torch.is_grad_enabled())
        expert_outputs = RemoteMixtureCall.apply(answered, backward_settings, stats, [outputs], dummy, x_cpu)
        scores = sum(logit.gather(1, coords[..., d].to(logit.device)) for d, logit in enumerate(logits))
        weights = torch.softmax(scores.masked_fill(~mask.to(scores.device), torch.finfo(scores.dtype).min), dim=1)
        mixed = torch.einsum("bk,bk...->b...", weights.to("cpu"), expert_outputs.to(compute_dtype))
        self.aux_loss = load_balancing_loss(logits, coords, mask)
        return mixed.to(device=x.device, dtype=x.dtype).reshape(*leading, *mixed.shape[1:])

    def _call_with_retry(
        self,
        chosen: list[list[tuple[str, str]]],
        scores: list[torch.Tensor],
        x: torch.Tensor,
        outputs: torch.Tensor,
        mask: torch.Tensor,
        coords: torch.Tensor,
        deadline: float | None,
        stats: CallStats,
    ) -> tuple[list[ExpertCall], list[tuple[ExpertCall, BaseException | None]]]:
        """Call the chosen experts; for samples left short of k_min, ask other live experts once.

        Fills ``outputs``, ``mask`` and ``coords`` in place; returns the calls that answered and
        every (call, error) tried.
        """
        forward_settings = CallSettings(self.k_min, self.forward_timeout, self.timeout_after_k_min, self.compression, self.secret)
        answered: list[ExpertCall] = []
        tried: list[tuple[ExpertCall, BaseException | None]] = []
        free_slots = {b: list(range(self.k_best)) for b in range(len(chosen))}
        for attempt in range(2):
            calls = self._plan_calls(chosen, free_slots, coords)
            if not calls:
                break
            ok, errors = call_forward(calls, x, outputs, mask, forward_settings, deadline, stats)
            answered += ok
            tried += zip(calls, errors)
            for endpoint in stats.failed_endpoints:
                self.lookup.ban(endpoint)
            short = (mask.sum(1) < self.k_min).nonzero().flatten().tolist()
            if not short or attempt == 1 or (deadline is not None and time.monotonic() >= deadline):
                break
            logger.info("%d samples short of k_min=%d after failures at %s; asking other experts",
                        len(short), self.k_min, sorted(stats.failed_endpoints))
            retry = self._choose_experts([s[short] for s in scores], deadline)
            chosen, free_slots = [[] for _ in chosen], {}
            for sample, candidates in zip(short, retry):
                used = {(call.uid, call.endpoint) for call, _ in tried_by(tried, sample)}
                free_slots[sample] = (~mask[sample]).nonzero().flatten().tolist()
                chosen[sample] = [pair for pair in candidates if pair not in used]
        return answered, tried

    def _choose_experts(self, scores: Sequence[torch.Tensor], deadline: float | None) -> list[list[tuple[str, str]]]:
        """The k_best live experts of each sample, as (uid, endpoint), best first."""
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        return beam_search(self.lookup, self.uid_prefix, scores, self.k_best, timeout=timeout, return_endpoints=True)

    def _plan_calls(self, chosen: list[list[tuple[str, str]]], free_slots: dict[int, list[int]], coords: torch.Tensor) -> list[ExpertCall]:
        """One call per expert with the rows routed to it, each choice in a free slot; records its grid cell in coords."""
        samples, slots, keys = [], [], []
        for sample, free in free_slots.items():
            for slot, pair in zip(free, chosen[sample]):
                samples.append(sample)
                slots.append(slot)
                keys.append(pair)
        if not keys:
            return []
        experts = list(dict.fromkeys(keys))
        position = {pair: i for i, pair in enumerate(experts)}
        expert_index = torch.tensor([position[pair] for pair in keys])
        samples_t, slots_t = torch.tensor(samples), torch.tensor(slots)
        cells = torch.tensor([[int(c) for c in uid.split(".")[1:]] for uid, _ in experts])
        coords[samples_t, slots_t] = cells[expert_index]
        order = torch.argsort(expert_index, stable=True)
        counts = torch.bincount(expert_index, minlength=len(experts)).tolist()
        return [
            ExpertCall(uid, endpoint, rows, expert_slots)
            for (uid, endpoint), rows, expert_slots in zip(experts, samples_t[order].split(counts), slots_t[order].split(counts))
        ]

    def _get_expert_info(self, chosen: list[list[tuple[str, str]]], deadline: float | None) -> dict:
        """Input and output schemas of this layer's experts, asked once from any host that serves one.

        A host that does not answer is banned and another one asked (at most 3 rounds of routing).
        """
        if self._expert_info is not None:
            return self._expert_info
        errors = []
        for _ in range(3):
            endpoints = list(dict.fromkeys((endpoint, uid) for row in chosen for uid, endpoint in row))
            by_endpoint = dict(endpoints)
            for endpoint, uid in list(by_endpoint.items())[:4]:
                timeout = self.expert_info_timeout
                if deadline is not None:
                    timeout = max(min(timeout, deadline - time.monotonic()), 1e-3)
                try:
                    self._expert_info = RemoteExpert(uid, endpoint, secret=self.secret).info(timeout=timeout)
                    return self._expert_info
                except RemoteExpertError as e:
                    errors.append(str(e))
                    self.lookup.ban(endpoint)
            if deadline is not None and time.monotonic() >= deadline:
                break
            chosen = self._choose_experts([torch.zeros(1, g) for g in self.grid_size], deadline)  # any live expert will do
        if not errors:
            raise NotEnoughExpertsError(f"no live experts under prefix {self.uid_prefix!r} in the DHT (peers {self.initial_peers})")
        raise NotEnoughExpertsError("could not read expert schemas from any host:\n" + "\n".join(errors))

    @property
    def stats(self) -> dict[str, float]:
        """Figures of the last forward (and its backward) for ``LightningModule.log_dict``."""
        return {k: float(v) for k, v in asdict(self.last_stats).items() if isinstance(v, (int, float))}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, grid_size={self.grid_size}, uid_prefix={self.uid_prefix!r}, k_best={self.k_best}"
