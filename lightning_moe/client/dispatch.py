"""Dispatcher: a DecentralizedMoE layer's expert calls. It finds experts through the DHT (cached), calls them inside
the layer's autograd Function (:class:`~lightning_moe.client.mixture_call.RemoteMixtureCall`: forward calls in its
forward, backward calls in its backward), re-routes samples around failures, reports every outcome to the health registry, and keeps the figures
of the last forward and its backward (:class:`CallStats`)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from lightning_moe import auth, wire
from lightning_moe.client import direct, host_calls, parallel_call
from lightning_moe.client.beam_search import beam_search, live_experts
from lightning_moe.client.call_stats import CallStats
from lightning_moe.client.dht_cache import CachedExpertLookup
from lightning_moe.client.health import HealthRegistry
from lightning_moe.client.parallel_call import (ExpertCall, GivenUp, NotEnoughExpertsError, check_k_min, forget_uid,
                                                is_refused, plan_calls, record_outcome, split_calls)
from lightning_moe.client.speed import SLOW_FACTOR, SLOW_HOST_MIN_SHARE, StragglerWait, WaitBudget, prefer_fast
from lightning_moe.client.spot_checks import AnswerChecks
from lightning_moe.client.remote_expert import RemoteExpert, RemoteExpertError, new_keep_id
from lightning_moe.config import MOE_COMPRESSIONS, DHTConfig, HealthConfig, grid_uids, to_dataclass
from lightning_moe.shared import process_dht, process_health, release_process_dht, usable

logger = logging.getLogger(__name__)

#: Hosts asked for the experts' schemas (``/info``) before a forward gives up.
MAX_INFO_HOSTS = 32

#: Rounds of re-routing in one forward, counting the rounds whose every failure was a refused connection (an endpoint
#: nobody listens on, excluded at once: each costs one failed call); other rounds count against ``max_retries``.
MAX_ROUNDS = 12


class Dispatcher:
    """The expert calls of one :class:`~lightning_moe.client.moe.DecentralizedMoE` layer, with its settings (the
    layer's constructor arguments of the same names, documented there), its DHT node and cache, and its health
    registry. The DHT node, cache and a given registry belong to the process that made them: a pickled or copied
    dispatcher makes its own when first used."""

    def __init__(self, uid_prefix: str, grid_size: Sequence[int], *, k_best: int, k_min: int, forward_timeout: float | None,
                 timeout_after_k_min: float | None, backward_k_min: int, backward_timeout: float | None,
                 backward_timeout_after_k_min: float | None, dht: Any, initial_peers: Sequence[str], compression: str,
                 cache_ttl: float, expert_info_timeout: float, secret: str | bytes | None, max_retries: int,
                 allow_zero_outputs: bool, health: HealthRegistry | HealthConfig | Mapping[str, Any] | None, max_call_bytes: int,
                 slow_wait_budget: float = 0.1, latency_margin: float = 1.0, hole_punch: bool = True,
                 spot_check_rate: float = 0.02, spot_check_tolerance: float = 0.1, liar_ban_time: float = 600.0,
                 poison: float | None = None, rows_per_host: bool = False):
        if compression not in MOE_COMPRESSIONS:
            raise ValueError(f"compression must be one of {MOE_COMPRESSIONS}, got {compression!r}")
        if not 1 <= k_min <= k_best:
            raise ValueError(f"need 1 <= k_min <= k_best, got k_min={k_min}, k_best={k_best}")
        if max_call_bytes < 1:
            raise ValueError(f"max_call_bytes must be positive, got {max_call_bytes}")
        if not 0 <= slow_wait_budget < 1 or latency_margin < 0:
            raise ValueError(f"need 0 <= slow_wait_budget < 1 and latency_margin >= 0, got {slow_wait_budget}, {latency_margin}")
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
        if isinstance(health, Mapping):
            health = HealthConfig(**health)
        self.uid_prefix, self.grid_size = uid_prefix, tuple(int(g) for g in grid_size)
        self.k_best, self.k_min, self.max_retries, self.allow_zero_outputs = k_best, k_min, max_retries, allow_zero_outputs
        self.forward_timeout, self.timeout_after_k_min = forward_timeout, timeout_after_k_min
        self.backward_k_min, self.backward_timeout = backward_k_min, backward_timeout
        self.backward_timeout_after_k_min = backward_timeout_after_k_min
        self.compression, self.secret, self.max_call_bytes = compression, auth.resolve_secret(secret), int(max_call_bytes)
        self.cache_ttl, self.expert_info_timeout = cache_ttl, expert_info_timeout
        self.latency_margin, self.wait_budget = latency_margin, WaitBudget(slow_wait_budget)
        self.hole_punch = bool(hole_punch)
        self.spot_check_rate, self.spot_check_tolerance, self.liar_ban_time = spot_check_rate, spot_check_tolerance, liar_ban_time
        self.poison, self._checks, self.rows_per_host = poison, None, bool(rows_per_host)
        self.health_config = health if isinstance(health, HealthConfig) else None
        self._health = health if isinstance(health, HealthRegistry) else None
        self._dht, self._owns_dht_ref, self._lookup = dht, False, None
        self._expert_info: dict | None = None  # the schemas, read once
        self._lock = threading.Lock()
        self.stats = CallStats()  # of the last forward, and its backward once that ran
        self._lookups_before: dict[str, int] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_dht=None, _lookup=None, _lock=None, _owns_dht_ref=False, _health=None, _checks=None)  # this process's
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the swarm: DHT node, cache, health
    @property
    def dht(self) -> Any:
        """The DHT node; the process's (:func:`lightning_moe.shared.process_dht`) unless one was given."""
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
        """The cache of DHT answers (refreshed in the background; see :class:`CachedExpertLookup`)."""
        dht, health = self.dht, self.health
        if self._lookup is None or self._lookup.dht is not dht or self._lookup.health is not health:
            if self._lookup is not None:
                self._lookup.close()
            self._lookup = CachedExpertLookup(dht, len(self.grid_size), health, ttl=self.cache_ttl)
            self._log_swarm()
        return self._lookup

    @property
    def checks(self) -> AnswerChecks:
        """The screen and spot checks of the hosts' answers (:mod:`lightning_moe.client.spot_checks`)."""
        health = self.health
        if self._checks is None or self._checks.health is not health:
            self._checks = AnswerChecks(health, self.replicas, self.codec, self.secret, self.spot_check_rate,
                                        self.spot_check_tolerance, self.liar_ban_time)
        self._checks.rate = self.spot_check_rate
        return self._checks

    def replicas(self, uid: str) -> list[str]:
        """Every endpoint the DHT (cached) lists for the expert ``uid``."""
        prefix, _, coord = uid.rpartition(".")
        return list(self.lookup.all_children([prefix], timeout=1.0).get(prefix, {}).get(int(coord), []))

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
        uids = grid_uids(self.uid_prefix, self.grid_size)
        try:
            endpoints = self.dht.get_experts(uids, timeout=min(self.forward_timeout or 5.0, 5.0))
        except Exception:  # noqa: BLE001 - only a log line; the forward's own lookups report failures
            logger.debug("could not list the experts of %s", self.uid_prefix, exc_info=True)
            return
        found = [e for e in endpoints if e is not None]
        logger.info("%s: found %d of %d experts on %d hosts", self.uid_prefix, len(found), len(uids), len(set(found)))

    def micro_batch_views(self, count: int) -> list[Dispatcher]:
        """``count`` dispatchers that share this one's settings, DHT node, cache, health registry, answer checks and
        the experts' schemas (read here first, once), each keeping the stats of its own forward and backward: the
        micro-batches of a pipelined step call through them at once (:mod:`lightning_moe.client.pipeline`)."""
        self.expert_info(None if self.forward_timeout is None else time.monotonic() + self.forward_timeout)
        self.checks  # noqa: B018 - made once here, shared by the views
        views = [object.__new__(Dispatcher) for _ in range(count)]
        for view in views:
            view.__dict__.update(self.__dict__, stats=CallStats())
        return views

    # ------------------------------------------------------------------ a forward
    def begin(self) -> float | None:
        """Start a forward: fresh stats; returns its deadline (``time.monotonic()``; ``forward_timeout`` bounds the DHT
        lookups, the beam search and the calls), None without a timeout."""
        start = time.monotonic()
        self.stats, self._lookups_before = CallStats(), self.lookup.stats
        self.stats.typical_latency = self.health.speeds.typical() or 0.0
        self.stats.count_checks(self.checks.figures())
        return None if self.forward_timeout is None else start + self.forward_timeout

    def codec(self, endpoint: str) -> str:
        """The compression of calls to ``endpoint``: the layer's, or under ``auto`` the host's link's."""
        return self.compression if self.compression != "auto" else self.health.links.codec(endpoint)

    def codecs(self, calls: list[ExpertCall], stats: CallStats | None = None) -> list[str]:
        """Each call's codec: the layer's ``compression``, or under ``auto`` its host's link's (counted in ``stats``:
        ``slow_links``, and under ``auto`` ``compressed`` and ``link_mbps``)."""
        codecs = [self.codec(call.endpoint) for call in calls]
        links = self.health.links
        if stats is not None:
            stats.slow_links = max(stats.slow_links, sum(links.slow(e) for e in {call.endpoint for call in calls}))
        if stats is not None and self.compression == "auto":
            rates = sorted(r for r in (links.rate(e) for e in {call.endpoint for call in calls}) if r is not None)
            if rates:
                stats.link_mbps = rates[(len(rates) - 1) // 2] * 8e-6
            stats.compressed += sum(codec != "none" for codec in codecs)
        return codecs

    def choose(self, scores: Sequence[torch.Tensor], k: int, deadline: float | None,
               avoid: Collection[str] = ()) -> list[list[tuple[str, str]]]:
        """The ``k`` best experts of each sample (``scores``: one ``[batch, grid_size_d]`` tensor per grid dimension)
        that are alive and not excluded, as (uid, endpoint), best first. Of an expert's replicas, one is picked by
        speed; none at the endpoints in ``avoid``.

        Samples left with fewer than ``k_min`` get the least-bad excluded experts too: a layer never
        has an empty candidate set while the DHT knows experts.
        """
        slow = self.health.speeds.slow_hosts(SLOW_FACTOR) if self.latency_margin > 0 else set()
        self.stats.slow_hosts = len(slow)
        # a call the wait budget pays for waits for the slow hosts, and the gating's choice stands; in any other call
        # their answers would not be waited for, and a sample loses fewer answers when it asks faster hosts
        lean = bool(slow) and not self.wait_budget.affords(self._slow_wait_cost(slow))
        wanted = k + max(2, k // 2) if lean else k  # alternatives to the slow hosts' experts
        lookup = self.lookup.avoiding(avoid) if avoid else self.lookup
        chosen = beam_search(lookup, self.uid_prefix, scores, wanted, timeout=_left(deadline), return_endpoints=True)
        if lean:
            keep_share = 0.0 if self.wait_budget.fraction > 0 else SLOW_HOST_MIN_SHARE  # else paid calls feed them
            chosen = prefer_fast(chosen, scores, k, slow, self.latency_margin, keep_share)
        short = [i for i, row in enumerate(chosen) if len(row) < self.k_min]
        if short:
            fallback = beam_search(self.lookup.least_bad_view(), self.uid_prefix, [s[short] for s in scores], k,
                                   timeout=_left(deadline), return_endpoints=True)
            for i, row in zip(short, fallback):
                chosen[i] = row
        return chosen

    def _slow_wait_cost(self, slow: set[str]) -> float:
        """Seconds a call would wait, forward and backward, for the slowest of the ``slow`` hosts beyond the typical."""
        speeds, cost = self.health.speeds, 0.0
        for method in ("forward", "backward"):
            typical = speeds.typical(method) or 0.0
            cost += max((speeds.expected(e, method) or typical) - typical for e in slow)
        return max(cost, 0.0)

    def expert_info(self, deadline: float | None) -> dict:
        """Input and output schemas of this layer's experts, read once from any host that serves a live one (found
        in the DHT cache). Hosts are asked in order: not excluded first, then those declared for the most experts (an
        honest host serves many; a stranger's record pointing at a closed port names one), every endpoint of every
        live expert in turn, at most ``MAX_INFO_HOSTS`` of them. A host that does not answer counts against its
        health (a refused connection excludes it at once), so each dead endpoint costs one failed call."""
        if self._expert_info is not None:
            return self._expert_info
        lookup, health = self.lookup, self.health
        errors: list[str] = []
        found = live_experts(lookup.least_bad_view(), self.uid_prefix, len(self.grid_size), timeout=_left(deadline))
        if not found:
            raise NotEnoughExpertsError(f"no live experts under prefix {self.uid_prefix!r} in the DHT "
                                        f"(peers {list(self.dht_config.initial_peers)})")
        children = lookup.all_children(sorted({uid.rpartition(".")[0] for uid, _ in found}), timeout=_left(deadline))
        serving: dict[str, list[str]] = {}  # endpoint -> the experts declared there
        for uid, endpoint in found:
            parent, _, coord = uid.rpartition(".")
            for other in [endpoint, *children.get(parent, {}).get(int(coord), [])]:
                if uid not in serving.setdefault(other, []):
                    serving[other].append(uid)
        order = sorted(serving, key=lambda e: (health.badness(serving[e][0], e) > 0, -len(serving[e])))  # ties: grid order
        for endpoint in order[:MAX_INFO_HOSTS]:
            uid = serving[endpoint][0]
            timeout = self.expert_info_timeout if deadline is None else min(self.expert_info_timeout, _left(deadline))
            try:
                self._expert_info = RemoteExpert(uid, endpoint, secret=self.secret).info(timeout=max(timeout, 1e-3))
                return self._expert_info
            except RemoteExpertError as e:
                errors.append(str(e))
                record_outcome(health, uid, endpoint, e)
            if deadline is not None and time.monotonic() >= deadline:
                break
        raise NotEnoughExpertsError("could not read expert schemas from any host:\n" + "\n".join(errors))

    def host_inputs(self, x: torch.Tensor, deadline: float | None) -> torch.Tensor:
        """``x`` as the experts take it: on the CPU, in the dtype of their input schema."""
        return x.detach().to(device="cpu", dtype=wire.parse_dtype(self.expert_info(deadline)["args_schema"][0]["dtype"]))

    def forward(self, x: torch.Tensor, chosen: list[list[tuple[str, str]]], scores: Sequence[torch.Tensor],
                deadline: float | None, keep: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[ExpertCall]]:
        """Call every sample's ``chosen`` experts with its row of ``x`` (see :meth:`host_inputs`); re-route samples left
        short of ``k_min`` to the next-best experts not tried yet, up to ``max_retries`` times. With ``keep`` the
        hosts keep the forwards for the backward.

        Returns the outputs ``[batch, k_best, *out]``, which slots hold an answer ``[batch, k_best]``, each slot's grid
        cell ``[batch, k_best, dims]``, and the calls that answered. Raises NotEnoughExpertsError if a sample got fewer
        than ``k_min`` answers, unless ``allow_zero_outputs``.
        """
        schema = self.expert_info(deadline)["outputs_schema"][0]
        batch = len(x)
        outputs = torch.zeros(batch, self.k_best, *schema["shape"], dtype=wire.parse_dtype(schema["dtype"]))
        mask = torch.zeros(batch, self.k_best, dtype=torch.bool)
        coords = torch.zeros(batch, self.k_best, len(self.grid_size), dtype=torch.long)
        tried: list[tuple[ExpertCall, BaseException | None]] = []
        asked: dict[int, set[Any]] = {}  # sample -> (uid, endpoint) pairs and uids asked for it
        candidates = dict(enumerate(chosen))
        retries = 0
        for round_ in range(MAX_ROUNDS):
            calls = plan_calls(candidates, mask, coords, asked)
            if not calls:
                break
            sent = self._call_forward(calls, x, outputs, mask, deadline, keep, patient=round_ > 0)
            tried += sent
            short = (mask.sum(1) < self.k_min).nonzero().flatten().tolist()
            errors = [error for _, error in sent if error is not None]
            retries += not (errors and all(is_refused(error) for error in errors))  # only dead endpoints: a free round
            if not short or retries > self.max_retries or (deadline is not None and time.monotonic() >= deadline):
                break
            logger.info("%s: %d samples short of k_min=%d after failures at %s; asking other replicas or the next-best "
                        "experts", self.uid_prefix, len(short), self.k_min, sorted(self.stats.failed_endpoints))
            wanted = self.k_best + max(sum(isinstance(a, tuple) for a in asked[sample]) for sample in short)  # > tried
            failed = {call.endpoint for call, error in tried if error is not None}
            for call, error in sent:
                if error is not None:
                    forget_uid(asked, call)  # another replica of this expert may answer for these rows
            candidates = dict(zip(short, self.choose([s[short] for s in scores], wanted, deadline, avoid=failed)))
        after = self.lookup.stats
        self.stats.lookups = {k: v - self._lookups_before.get(k, 0) for k, v in after.items() if k != "in_flight"}
        if not self.allow_zero_outputs:
            check_k_min(mask, tried, self.k_min, lambda: self.lookup.excluded_experts(self.uid_prefix))
        return outputs, mask, coords, [call for call, error in tried if error is None]

    def _call_forward(self, calls: list[ExpertCall], x: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor,
                      deadline: float | None, keep: bool, patient: bool = False) -> list[tuple[ExpertCall, BaseException | None]]:
        """Send every call at once (split to at most ``max_call_bytes`` each) and write the answers into their rows'
        slots of ``outputs`` and ``mask``. Returns each call sent with its error (None: it answered).

        ``patient`` (the re-routing rounds, whose rows all belong to samples still short of ``k_min``): wait for every
        answer up to ``timeout_after_k_min`` from the start, whatever the estimates say, as a host that looks slow may
        be such a sample's only way to an answer (say, a volunteer's own in-process experts answer first and make the
        only other host look slow)."""
        hosts = host_calls.group_by_host(calls, self._max_rows(x)) if self.rows_per_host else []
        calls = [call for host in hosts for call in host.calls] if self.rows_per_host else split_calls(calls, self._max_rows(x))
        for call in calls:
            call.keep = new_keep_id() if keep else None
        begin = time.monotonic()
        health = self.health
        wait = StragglerWait(self.timeout_after_k_min, health.speeds, self.wait_budget, patient=patient)
        codecs = self.codecs(calls, self.stats)
        if self.rows_per_host:
            results = host_calls.call_hosts(hosts, "forward", x, None, self.forward_timeout, wait,
                                            [self.codec(host.endpoint) for host in hosts], self.secret, deadline,
                                            health.links, self.stats)
        else:
            results = parallel_call.call_in_parallel(calls, "forward", [[x[call.rows]] for call in calls],
                                                     self.forward_timeout, wait, codecs, self.secret, deadline,
                                                     health.links, self.stats)
        self._note_calls(calls, results)
        stats, out_shape = self.stats, tuple(outputs.shape[2:])
        stats.latency += time.monotonic() - begin
        self.wait_budget.add_elapsed(time.monotonic() - begin)
        tried: list[tuple[ExpertCall, BaseException | None]] = []
        for call, result in zip(calls, results):
            stats.asked += 1
            if not isinstance(result, BaseException):
                output = result[0] if len(result) == 1 else None
                if output is None or tuple(output.shape) != (len(call.rows), *out_shape):
                    shape = None if output is None else tuple(output.shape)
                    result = RemoteExpertError(call.uid, call.endpoint, f"forward: answered shape {shape}, expected "
                                                                        f"{(len(call.rows), *out_shape)}", status=200)
                elif (odd := self.checks.screen(call.uid, call.endpoint, output)) is not None:
                    result = RemoteExpertError(call.uid, call.endpoint, f"forward: {odd}", status=200)  # dropped
            record_outcome(health, call.uid, call.endpoint, result)
            if isinstance(result, BaseException):
                shed = isinstance(result, RemoteExpertError) and result.status == 503
                stats.given_up += isinstance(result, GivenUp)
                stats.shed += shed
                stats.timed_out += isinstance(result, TimeoutError) and not isinstance(result, GivenUp)
                stats.failed += not isinstance(result, TimeoutError) and not shed
                stats.errors.append(str(result))
                stats.failed_endpoints.add(call.endpoint)
                tried.append((call, result))
                continue
            stats.answered += 1
            stats.spot_checks += self.checks.maybe_check(call.uid, call.endpoint, x[call.rows], output)
            outputs[call.rows, call.slots] = output.to(outputs.dtype)
            mask[call.rows, call.slots] = True
            tried.append((call, None))
        return tried

    def _max_rows(self, x: torch.Tensor) -> int:
        """Rows of ``x`` in one request of at most ``max_call_bytes``."""
        return max(self.max_call_bytes // max(x[0].numel() * x.element_size(), 1), 1)

    def _note_calls(self, calls: list[ExpertCall], results: list) -> None:
        """Count answered calls per endpoint: a relayed host called often is asked for a direct path (client/direct.py)."""
        if self.hole_punch:
            direct.note_calls([c.endpoint for c, r in zip(calls, results) if not isinstance(r, BaseException)], self.secret)

    # ------------------------------------------------------------------ its backward
    def backward(self, calls: list[ExpertCall], stats: CallStats, x: torch.Tensor, grad_outputs: torch.Tensor) -> torch.Tensor:
        """The gradient of ``x`` (host inputs) from the experts that answered a forward (``calls``), given the gradient
        of its outputs. An expert whose backward fails drops its contribution, counted in ``stats`` (the forward's)."""
        scale = self.poison or 1.0  # a poisoning trainer (tests and demos) sends scaled gradients
        health, begin = self.health, time.monotonic()
        wait = StragglerWait(self.backward_timeout_after_k_min, health.speeds, self.wait_budget, "backward")
        grad_x = torch.zeros_like(x)
        answers = torch.zeros(x.shape[0], dtype=torch.long)
        if self.rows_per_host:  # the input gradients come summed per row; results: None for an answer
            calls, results = host_calls.backward(calls, x, grad_outputs, scale, self._max_rows(x), self.codec,
                                                 self.backward_timeout, wait, self.secret, health.links, stats, grad_x)
        else:
            payloads = [([x[call.rows]], [grad_outputs[call.rows, call.slots] * scale]) for call in calls]
            results = parallel_call.call_in_parallel(calls, "backward", payloads, self.backward_timeout, wait,
                                                     self.codecs(calls), self.secret, links=health.links, traffic=stats)
        self.wait_budget.add_elapsed(time.monotonic() - begin)
        self._note_calls(calls, results)
        for call, result in zip(calls, results):
            stats.backward_asked += 1
            record_outcome(health, call.uid, call.endpoint, result)
            if isinstance(result, GivenUp):  # the host got the gradients and learns; its answer was not waited for
                stats.backward_given_up += 1
                continue
            if isinstance(result, BaseException) or result is not None and (len(result) != 1 or
                                                                               result[0].shape != x[call.rows].shape):
                stats.backward_failed += 1
                stats.errors.append(f"backward: {result}" if isinstance(result, BaseException)
                                    else f"backward: expert {call.uid!r} answered a wrong shape")
                continue
            stats.backward_answered += 1
            if result is not None:
                grad_x.index_add_(0, call.rows, result[0].to(x.dtype) / scale)
            answers[call.rows] += 1
        short = int((answers < self.backward_k_min).sum())
        if short:
            logger.warning("backward: %d samples got fewer than backward_k_min=%d expert gradients; %d of %d calls failed",
                           short, self.backward_k_min, stats.backward_failed, len(calls))
        return grad_x


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (never negative); None without one."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _peers_of(dht: Any) -> list[str]:
    """Initial peers for a layer given a DHT node: the node itself, or a client-mode node's own peers
    (a client answers nobody, so its address is useless to a copy of the layer in another process)."""
    if getattr(dht, "client_mode", False):
        return [f"{host}:{port}" for host, port in dht.initial_peers]
    return [dht.address]
