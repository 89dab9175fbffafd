"""DecentralizedMoE: a mixture-of-experts layer whose experts live on volunteer hosts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_moe.client.dht_cache import CachedExpertLookup
from lightning_moe.client.dispatch import CallStats, Dispatcher
from lightning_moe.client.mixture_call import RemoteMixtureCall
from lightning_moe.client.gating import load_balancing_loss
from lightning_moe.client.health import HealthRegistry
from lightning_moe.config import HealthConfig


#: A forward's routing: the gating logits (one ``[rows, grid_size_d]`` tensor per grid dimension), each slot's grid cell
#: ``[rows, k_best, dims]`` and which slots hold an answer ``[rows, k_best]``.
Routing = tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]


class _Held:
    """A layer attribute that its dispatcher holds (a constructor argument): read and set through the layer."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        return self if layer is None else getattr(layer.dispatcher, self.name)

    def __set__(self, layer: Any, value: Any) -> None:
        setattr(layer.dispatcher, self.name, value)


class DecentralizedMoE(nn.Module):
    """A mixture of experts served by hosts found through the DHT (Learning@home's DMoE layer).

    Gating projects each input to one logit vector per grid dimension; an expert's score is the
    sum of its coordinates' logits. Beam search through the DHT picks the ``k_best`` live experts
    per sample, all chosen experts are called in parallel, and the output is the softmax-weighted
    sum over the experts that answered. Only the gating projection is a parameter of this module.

    A forward reads in four steps: gate, choose (beam search), apply (:class:`RemoteMixtureCall`, whose forward
    and backward make the expert calls through the layer's :class:`~lightning_moe.client.dispatch.Dispatcher`,
    ``self.dispatcher``), mix. The dispatcher holds the call settings below (readable and settable on the layer
    too), the DHT node and its cache, the health registry, and the stats of the last forward.

    Args:
        in_features: size of the last input dimension.
        grid_size: experts per grid dimension, e.g. ``(16, 16)`` for uids ``ffn.0.0 .. ffn.15.15``.
        uid_prefix: the layer's uid prefix in the DHT.
        k_best: experts asked per sample.
        k_min: answers a sample needs; fewer raises :class:`NotEnoughExpertsError`.
        forward_timeout: seconds for the whole forward, DHT lookups and beam search included.
        timeout_after_k_min: once the first expert answered, the others are waited for as long again as it took
            (at least 100 ms), longer for hosts whose measured answer times say they answer soon, not at all for
            hosts known to be slow, and never longer than this or that (see
            :class:`~lightning_moe.client.speed.StragglerWait`); None: every answer is waited for. Samples
            that stragglers leave short of ``k_min`` are re-routed to the next-best experts not tried yet, and those
            calls are waited for up to this long, whatever the estimates say; a straggler is counted as slow (``stats["given_up"]``), not as
            failing, so a slow host stalls only steps in which a sample has no faster way to ``k_min`` answers.
        backward_k_min: expert gradients a sample should get; fewer is logged as a warning and counted.
        backward_timeout: seconds for all backward calls; experts that do not answer are dropped and counted.
        backward_timeout_after_k_min: the same for the backward (the host still learns from gradients whose
            answer was not waited for; ``stats["backward_given_up"]`` counts them).
        dht: a :class:`lightning_moe.dht.DHT` to use, or where to join the swarm: a
            :class:`~lightning_moe.config.DHTConfig` (or the ``dht`` group's mapping). With a config or
            ``initial_peers``, the process's node is used (a volunteer's in the same process, else a
            client-mode node made from the config and shared by every layer), looked up in the process
            that first runs forward (safe for DDP and pickling).
        initial_peers: ``"host:port"`` of DHT nodes, used when ``dht`` is None (the other ``dht.*`` keys
            keep their defaults: the node binds so that it reaches these peers).
        compression: wire compression of activations and gradients: none, float16, uint8, int8 or int4; or ``auto``
            (the default): per host, from its measured link (:mod:`lightning_moe.client.links`): exact on loopback
            and fast links, int8 on links slower than 80 Mbit/s. ``stats["compressed"]`` counts the forward's
            compressed calls, ``stats["link_mbps"]`` is the median measured rate of its hosts' links.
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
        max_call_bytes: a request larger than this goes out as several in parallel (each on its own kept-alive
            connection: over a long link one large message costs a round trip per TCP window): a host's distinct rows
            are split into runs of this many bytes (per expert with ``rows_per_host=False``).
        health: how failing experts and hosts are excluded: a :class:`HealthConfig` (or its mapping) for
            the process's registry, shared by every layer (:func:`lightning_moe.shared.process_health`),
            or a :class:`HealthRegistry` of this layer's own; default: the process's as it is. The registry also
            holds each host's measured answer times (``health.speeds``).
        slow_wait_budget: the share of the layer's call time that may go to waiting for hosts known to be slow, so
            that their experts still learn and their answer times stay measured (0: never wait for them). A call the
            budget can pay for waits for them and routes as the gating says.
        latency_margin: in a call the wait budget cannot pay for, an expert on a host at least ``speed.SLOW_FACTOR``
            times slower than the typical host loses this much of its score (in gating logits) when the layer
            chooses experts, so a faster expert that scores close takes its place (with ``slow_wait_budget=0``, a
            quarter of the slow host's candidates keep their score). 0: routing ignores speed.
        hole_punch: a host behind NAT that the layer calls often through a relay is asked for a direct path (TCP
            hole punching, :mod:`lightning_moe.client.direct`); calls use it once made and go on through the relay
            when it fails or closes. False: always through the relay.
        spot_check_rate: the share of answers (one expert's rows in one forward) of which a few rows also go to up
            to 2 other replicas of the same expert in the background; a host whose answers disagree with the majority
            is excluded (:mod:`~lightning_moe.client.spot_checks`, which also screens every answer's scale against
            the expert's history). A host suspected after a gross disagreement is checked at 0.25 until checks clear
            or exclude it. 0: no spot checks.
        spot_check_tolerance: the least relative difference of two replicas' answers that counts as disagreement
            (the tolerance is calibrated from agreeing replicas, never below this).
        liar_ban_time: seconds a host caught lying stays excluded.
        poison: a poisoning trainer, for tests and demos: the output gradients sent to hosts are multiplied by this
            (the layer's own input gradients are not). None: honest.
        rows_per_host: one request per host for a forward and one for its backward, each distinct row sent once with
            every expert's index list (:mod:`lightning_moe.client.host_calls`), and in the backward its output
            gradient once with a coefficient per expert; the host answers per expert and sums the input gradients per
            row: about 40% fewer bytes per step, for slow links. False (the default): one request per expert, faster
            on loopback and LANs (the main job ran 1.2x faster) and what older hosts serve.
    """

    # the constructor arguments that the dispatcher holds (a change applies from the next forward)
    uid_prefix, grid_size, k_best, k_min = _Held(), _Held(), _Held(), _Held()
    forward_timeout, timeout_after_k_min, max_retries, allow_zero_outputs = _Held(), _Held(), _Held(), _Held()
    backward_k_min, backward_timeout, backward_timeout_after_k_min = _Held(), _Held(), _Held()
    compression, secret, max_call_bytes, cache_ttl, expert_info_timeout = _Held(), _Held(), _Held(), _Held(), _Held()
    latency_margin, hole_punch, rows_per_host = _Held(), _Held(), _Held()
    spot_check_rate, spot_check_tolerance, liar_ban_time, poison = _Held(), _Held(), _Held(), _Held()
    dht_config = _Held()  # where the layer joins the swarm (made from ``dht`` / ``initial_peers`` / ``secret``)

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
        compression: str = "auto",
        cache_ttl: float = 5.0,
        jitter: float = 0.0,
        expert_info_timeout: float = 10.0,
        secret: str | bytes | None = None,
        backward_timeout_after_k_min: float | None = 1.0,
        max_retries: int = 2,
        allow_zero_outputs: bool = False,
        health: HealthRegistry | HealthConfig | Mapping[str, Any] | None = None,
        max_call_bytes: int = 128 * 1024,
        slow_wait_budget: float = 0.1,
        latency_margin: float = 1.0,
        hole_punch: bool = True,
        spot_check_rate: float = 0.02,
        spot_check_tolerance: float = 0.1,
        liar_ban_time: float = 600.0,
        poison: float | None = None,
        rows_per_host: bool = False,
    ):
        super().__init__()
        self.dispatcher = Dispatcher(
            uid_prefix, grid_size, k_best=k_best, k_min=k_min, forward_timeout=forward_timeout,
            timeout_after_k_min=timeout_after_k_min, backward_k_min=backward_k_min, backward_timeout=backward_timeout,
            backward_timeout_after_k_min=backward_timeout_after_k_min, dht=dht, initial_peers=initial_peers,
            compression=compression, cache_ttl=cache_ttl, expert_info_timeout=expert_info_timeout, secret=secret,
            max_retries=max_retries, allow_zero_outputs=allow_zero_outputs, health=health, max_call_bytes=max_call_bytes,
            slow_wait_budget=slow_wait_budget, latency_margin=latency_margin, hole_punch=hole_punch,
            spot_check_rate=spot_check_rate, spot_check_tolerance=spot_check_tolerance, liar_ban_time=liar_ban_time,
            poison=poison, rows_per_host=rows_per_host)
        self.in_features, self.jitter = in_features, jitter
        self.proj = nn.Linear(in_features, sum(self.grid_size))
        self.aux_loss: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["aux_loss"] = None  # a graph: neither picklable nor deep-copyable (EMA/SWA callbacks deepcopy)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the experts' outputs for each row of ``x`` (shape ``(..., in_features)``); sets ``aux_loss``."""
        mixed, routing = self.mixture(x)
        self.aux_loss = load_balancing_loss(*routing)
        return mixed

    def mixture(self, x: torch.Tensor, dispatcher: Dispatcher | None = None) -> tuple[torch.Tensor, Routing]:
        """The layer's output for ``x`` and its routing (the gating logits, each slot's grid cell, which slots
        answered: what :func:`~lightning_moe.client.gating.load_balancing_loss` takes), calling the experts through
        ``dispatcher`` (default: the layer's; a micro-batch passes its own view, see
        :meth:`Dispatcher.micro_batch_views`). Leaves ``aux_loss`` alone."""
        dispatcher = self.dispatcher if dispatcher is None else dispatcher
        deadline = dispatcher.begin()  # forward_timeout bounds all of it, DHT lookups and beam search included
        leading, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
        # 1. gate: one logit vector per grid dimension
        logits = self.gate(flat)
        # 2. choose: the k_best live experts of each sample, by beam search through the (cached) DHT
        scores = [logit.detach().to("cpu") for logit in logits]
        chosen = dispatcher.choose(scores, self.k_best, deadline)
        # 3. apply: call them, re-routing around failures; backward sends them the gradients
        anchor = torch.empty(0, requires_grad=torch.is_grad_enabled())
        outputs, mask, coords = RemoteMixtureCall.apply(dispatcher, chosen, scores, deadline, anchor, flat)
        # 4. mix: softmax over the experts that answered
        mixed = self.mix(logits, outputs, mask, coords)
        return mixed.to(dtype=x.dtype).reshape(*leading, *mixed.shape[1:]), (logits, coords, mask)

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One logit vector per grid dimension for each row of ``x`` (``[batch, in_features]``), in float32 or wider
        (float64 stays float64; halves go to float32)."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        return self.proj(x.to(self.proj.weight.dtype)).to(compute_dtype).split(self.grid_size, dim=-1)

    @staticmethod
    def mix(logits: Sequence[torch.Tensor], outputs: torch.Tensor, mask: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The sum of each sample's answered ``outputs`` weighted by a softmax over their scores (an expert's score: the
        sum of its grid cell's logits); a slot without an answer (``mask`` False) weighs 0."""
        device = logits[0].device
        coords, mask = coords.to(device), mask.to(device)
        scores = sum(logit.gather(1, coords[..., d]) for d, logit in enumerate(logits))
        weights = torch.softmax(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), dim=1) * mask
        return torch.einsum("bk,bk...->b...", weights, outputs.to(device=device, dtype=scores.dtype))

    @property
    def initial_peers(self) -> list[str]:
        return list(self.dht_config.initial_peers)

    @property
    def dht(self) -> Any:
        """The DHT node; created lazily (client mode) in the process that uses it."""
        return self.dispatcher.dht

    @property
    def health(self) -> HealthRegistry:
        """The registry of failing experts and hosts (the process's unless one was given)."""
        return self.dispatcher.health

    @property
    def lookup(self) -> CachedExpertLookup:
        """This layer's cache of DHT answers (refreshed in the background; see :class:`CachedExpertLookup`)."""
        return self.dispatcher.lookup

    def close(self) -> None:
        """Let go of the DHT node (the process's client node shuts down when its last layer closes)."""
        self.dispatcher.close()

    @property
    def last_stats(self) -> CallStats:
        """What happened to the calls of the last forward (and of its backward, once that ran)."""
        return self.dispatcher.stats

    @property
    def stats(self) -> dict[str, float]:
        """Figures of the last forward (and its backward) for ``LightningModule.log_dict``."""
        return self.dispatcher.stats.figures()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, grid_size={self.grid_size}, uid_prefix={self.uid_prefix!r}, k_best={self.k_best}"
