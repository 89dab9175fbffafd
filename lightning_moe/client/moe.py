"""DecentralizedMoE: a mixture-of-experts layer whose experts live on volunteer hosts."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from lightning_moe import auth, wire
from lightning_moe.client.beam_search import beam_search
from lightning_moe.client.dht_cache import CachedExpertLookup
from lightning_moe.client.gating import load_balancing_loss
from lightning_moe.client.health import HealthRegistry
from lightning_moe.config import DHTConfig, HealthConfig, to_dataclass
from lightning_moe.client.parallel_call import (
    CallSettings,
    CallStats,
    MixtureForward,
    NotEnoughExpertsError,
    RemoteMixtureCall,
    record_outcome,
)
from lightning_moe.client.remote_expert import RemoteExpert, RemoteExpertError
from lightning_moe.shared import process_dht, process_health, release_process_dht, usable

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
        timeout_after_k_min: once the first expert answered, wait at most this long for the others (or as long
            again as the first answer took, if that is longer: a slow link is not cut off);
            samples they leave short of ``k_min`` are re-routed to the next-best experts not tried
            yet, and stragglers count against their hosts' health (so a slow host cannot stall steps).
        backward_k_min: expert gradients a sample should get; fewer is logged as a warning and counted.
        backward_timeout: seconds for all backward calls; experts that do not answer are dropped and counted.
        backward_timeout_after_k_min: once the first backward answered, wait at most this long for the others.
        dht: a :class:`lightning_moe.dht.DHT` to use, or where to join the swarm: a
            :class:`~lightning_moe.config.DHTConfig` (or the ``dht`` group's mapping). With a config or
            ``initial_peers``, the process's node is used (a volunteer's in the same process, else a
            client-mode node made from the config and shared by every layer), looked up in the process
            that first runs forward (safe for DDP and pickling).
        initial_peers: ``"host:port"`` of DHT nodes, used when ``dht`` is None (the other ``dht.*`` keys
            keep their defaults: the node binds so that it reaches these peers).
        compression: wire compression of activations and gradients: none, float16 or uint8.
        cache_ttl: seconds that a DHT answer is fresh; it is refreshed in the background before then, and an
            older one is still used while its refresh runs (up to ``dht_cache.DEFAULT_MAX_STALE``), so a step
            waits on the DHT only for prefixes it never looked up (``stats["dht_blocking"]``). 0: no caching.
        jitter: multiplicative noise ``U(1 - jitter, 1 + jitter)`` on the gating input during training.
        expert_info_timeout: seconds to wait for a host's ``/info`` (schemas), fetched once.
        secret: a private swarm's shared secret for requests and DHT records (default: the
            LIGHTNING_MOE_SECRET environment variable; none: a public swarm).
        max_retries: rounds of re-routing for samples left short of ``k_min`` after failures.
        allow_zero_outputs: a sample that no expert answered contributes zeros instead of raising
            :class:`NotEnoughExpertsError` (hivemind's option of the same name); off by default.
        max_call_bytes: a call to one expert larger than this goes out as several requests in parallel (each on
            its own kept-alive connection: over a long link one large message costs a round trip per TCP window).
        health: how failing experts and hosts are excluded: a :class:`HealthConfig` (or its mapping) for
            the process's registry, shared by every layer (:func:`lightning_moe.shared.process_health`),
            or a :class:`HealthRegistry` of this layer's own; default: the process's as it is.
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
        backward_timeout_after_k_min: float | None = 1.0,
        max_retries: int = 2,
        allow_zero_outputs: bool = False,
        health: HealthRegistry | HealthConfig | Mapping[str, Any] | None = None,
        max_call_bytes: int = 128 * 1024,
    ):
        super().__init__()
        if compression not in wire.COMPRESSIONS:
            raise ValueError(f"compression must be one of {wire.COMPRESSIONS}, got {compression!r}")
        if not 1 <= k_min <= k_best:
            raise ValueError(f"need 1 <= k_min <= k_best, got k_min={k_min}, k_best={k_best}")
        if isinstance(dht, Mapping):
            dht = to_dataclass(dht, DHTConfig)
        if dht is None:
            if not initial_peers:
                raise ValueError("DecentralizedMoE needs a dht or initial_peers to find experts")
            dht = DHTConfig(initial_peers=list(initial_peers), secret=secret)
        if isinstance(dht, DHTConfig):
            if not dht.initial_peers:
                raise ValueError("DecentralizedMoE needs dht.initial_peers to find experts")
            if secret is not None and dht.secret is None:
                dht = dataclasses.replace(dht, secret=secret)
            self.dht_config, dht, secret = dht, None, dht.secret
        else:
            self.dht_config = DHTConfig(initial_peers=_peers_of(dht))
        self.in_features, self.grid_size, self.uid_prefix = in_features, tuple(int(g) for g in grid_size), uid_prefix
        self.k_best, self.k_min, self.backward_k_min = k_best, k_min, backward_k_min
        self.forward_timeout, self.timeout_after_k_min, self.backward_timeout = forward_timeout, timeout_after_k_min, backward_timeout
        self.compression, self.cache_ttl, self.jitter = compression, cache_ttl, jitter
        self.expert_info_timeout = expert_info_timeout
        self.secret = auth.resolve_secret(secret)
        self.backward_timeout_after_k_min, self.max_retries = backward_timeout_after_k_min, max_retries
        self.allow_zero_outputs = allow_zero_outputs
        if max_call_bytes < 1:
            raise ValueError(f"max_call_bytes must be positive, got {max_call_bytes}")
        self.max_call_bytes = int(max_call_bytes)
        self.proj = nn.Linear(in_features, sum(self.grid_size))
        if isinstance(health, Mapping):
            health = HealthConfig(**health)
        self._dht, self._lookup, self._expert_info = dht, None, None
        self._health = health if isinstance(health, HealthRegistry) else None
        self.health_config = health if isinstance(health, HealthConfig) else None
        self._owns_dht_ref = False
        self._lock = threading.Lock()
        self.last_stats = CallStats()
        self.last_lookup_stats: dict[str, int] = {}
        self.aux_loss: torch.Tensor | None = None

    @property
    def initial_peers(self) -> list[str]:
        return list(self.dht_config.initial_peers)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_dht"], state["_lookup"], state["_lock"], state["_owns_dht_ref"] = None, None, None, False
        state["_health"] = None  # a registry belongs to its process
        state["aux_loss"] = None  # a graph: neither picklable nor deep-copyable (EMA/SWA callbacks deepcopy)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def dht(self) -> Any:
        """The DHT node; created lazily (client mode) in the process that uses it."""
        with self._lock:
            if self._dht is None or not usable(self._dht):
                self._dht, self._owns_dht_ref, self._lookup = process_dht(self.dht_config), True, None
            return self._dht

    @property
    def health(self) -> HealthRegistry:
        """The registry of failing experts and hosts (the process's unless one was given)."""
        return self._health if self._health is not None else process_health(self.health_config)

    @property
    def lookup(self) -> CachedExpertLookup:
        """This layer's cache of DHT answers (refreshed in the background; see :class:`CachedExpertLookup`)."""
        dht, health = self.dht, self.health
        if self._lookup is None or self._lookup.dht is not dht or self._lookup.health is not health:
            if self._lookup is not None:
                self._lookup.close()
            self._lookup = CachedExpertLookup(dht, len(self.grid_size), health, ttl=self.cache_ttl)
            self._log_swarm()
        return self._lookup

    def close(self) -> None:
        """Let go of the DHT node (the process's client node shuts down when its last layer closes)."""
        with self._lock:
            dht, owned, lookup = self._dht, self._owns_dht_ref, self._lookup
            self._dht, self._lookup, self._owns_dht_ref = None, None, False
        if lookup is not None:
            lookup.close()
        if dht is not None and owned:
            release_process_dht(dht)

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
        lookup = self.lookup
        lookup_before = lookup.stats
        deadline = None if self.forward_timeout is None else start + self.forward_timeout
        leading, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        gate_input = flat
        if self.training and self.jitter > 0:
            gate_input = flat * torch.empty_like(flat).uniform_(1 - self.jitter, 1 + self.jitter)
        compute_dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64; halves go to float32
        logits = self.proj(gate_input.to(self.proj.weight.dtype)).to(compute_dtype).split(self.grid_size, dim=-1)

        cpu_scores = [logit.detach().to("cpu") for logit in logits]
        chosen = self._choose_experts(cpu_scores, self.k_best, deadline)
        info = self._get_expert_info(chosen, deadline)
        x_cpu = flat.to(device="cpu", dtype=wire.parse_dtype(info["args_schema"][0]["dtype"]))
        out_schema = info["outputs_schema"][0]
        state = MixtureForward.empty(len(flat), self.k_best, tuple(out_schema["shape"]), wire.parse_dtype(out_schema["dtype"]),
                                     len(self.grid_size))
        self.last_stats = state.stats
        self._dispatch(state, chosen, cpu_scores, x_cpu, deadline)
        if not self.allow_zero_outputs:
            state.check_k_min(self.k_min, lambda: self.lookup.excluded_experts(self.uid_prefix))

        backward_settings = CallSettings(self.backward_k_min, self.backward_timeout, self.backward_timeout_after_k_min,
                                         self.compression, self.secret, self.health, self.max_call_bytes)
        dummy = torch.empty(0, requires_grad=torch.is_grad_enabled())
        expert_outputs = RemoteMixtureCall.apply(state.answered, backward_settings, state.stats, [state.outputs], dummy, x_cpu)
        device = logits[0].device
        scores = sum(logit.gather(1, state.coords[..., d].to(device)) for d, logit in enumerate(logits))
        mask = state.mask.to(device)
        weights = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=1) * mask  # no answer: weight 0
        mixed = torch.einsum("bk,bk...->b...", weights, expert_outputs.to(device=device, dtype=compute_dtype))
        self.aux_loss = load_balancing_loss(logits, state.coords, state.mask)
        self.last_lookup_stats = {k: v - lookup_before.get(k, 0) for k, v in lookup.stats.items() if k != "in_flight"}
        return mixed.to(dtype=x.dtype).reshape(*leading, *mixed.shape[1:])

    def _dispatch(self, state: MixtureForward, chosen: list[list[tuple[str, str]]], scores: list[torch.Tensor],
                  x: torch.Tensor, deadline: float | None) -> None:
        """Call the chosen experts; re-route samples left short of k_min to the next-best experts not tried yet."""
        settings = CallSettings(self.k_min, self.forward_timeout, self.timeout_after_k_min, self.compression, self.secret,
                                self.health, self.max_call_bytes)
        candidates = dict(enumerate(chosen))
        for attempt in range(self.max_retries + 1):
            calls = state.plan(candidates)
            if not calls:
                break
            state.call(calls, x, settings, deadline)
            short = state.short(self.k_min)
            if not short or attempt == self.max_retries or (deadline is not None and time.monotonic() >= deadline):
                break
            logger.info("%s: %d samples short of k_min=%d after failures at %s; asking the next-best experts", self.uid_prefix,
                        len(short), self.k_min, sorted(state.stats.failed_endpoints))
            wanted = self.k_best + max(len(state.tried_pairs.get(sample, ())) for sample in short)  # more than were tried
            found = self._choose_experts([s[short] for s in scores], wanted, deadline)
            candidates = dict(zip(short, found))

    def _choose_experts(self, scores: Sequence[torch.Tensor], k: int, deadline: float | None) -> list[list[tuple[str, str]]]:
        """The ``k`` best experts of each sample that are alive and not excluded, as (uid, endpoint), best first.

        Samples left with fewer than ``k_min`` get the least-bad excluded experts too: a layer never
        has an empty candidate set while the DHT knows experts.
        """
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        chosen = beam_search(self.lookup, self.uid_prefix, scores, k, timeout=timeout, return_endpoints=True)
        short = [i for i, row in enumerate(chosen) if len(row) < self.k_min]
        if short:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            fallback = beam_search(self.lookup.least_bad_view(), self.uid_prefix, [s[short] for s in scores], k,
                                   timeout=timeout, return_endpoints=True)
            for i, row in zip(short, fallback):
                chosen[i] = row
        return chosen

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
                    record_outcome(self.health, uid, endpoint, e)
            if deadline is not None and time.monotonic() >= deadline:
                break
            chosen = self._choose_experts([torch.zeros(1, g) for g in self.grid_size], self.k_best, deadline)  # any will do
        if not errors:
            raise NotEnoughExpertsError(f"no live experts under prefix {self.uid_prefix!r} in the DHT (peers {self.initial_peers})")
        raise NotEnoughExpertsError("could not read expert schemas from any host:\n" + "\n".join(errors))

    @property
    def stats(self) -> dict[str, float]:
        """Figures of the last forward (and its backward) for ``LightningModule.log_dict``."""
        figures = {k: float(v) for k, v in asdict(self.last_stats).items() if isinstance(v, (int, float))}
        looked_up = self.last_lookup_stats
        if looked_up:  # the last forward's DHT reads: 0 dht_blocking in steady state
            figures.update(dht_blocking=float(looked_up["blocking_lookups"]), dht_refreshes=float(looked_up["refreshes"]),
                           dht_cached=float(looked_up["fresh_hits"] + looked_up["stale_hits"]))
        return figures

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, grid_size={self.grid_size}, uid_prefix={self.uid_prefix!r}, k_best={self.k_best}"


def _peers_of(dht: Any) -> list[str]:
    """Initial peers for a layer given a DHT node: the node itself, or a client-mode node's own peers
    (a client answers nobody, so its address is useless to a copy of the layer in another process)."""
    if getattr(dht, "client_mode", False):
        return [f"{host}:{port}" for host, port in dht.initial_peers]
    return [dht.address]
