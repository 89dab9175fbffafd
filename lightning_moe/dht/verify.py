"""Endpoint checks: a DHT node serves an expert declaration only once its endpoint proved that it serves the expert.

An entry ``"coord@endpoint"`` of a prefix record (``records.expert_entries``) says that the host at ``endpoint``
serves an expert below ``prefix.coord``. Anyone can write one, for any endpoint: a closed port, or a stranger's
address. So a node asks the endpoint ``GET /info?nonce=N`` once (:func:`fetch_listing`) and remembers the answer per
endpoint (:class:`EndpointVerifier`): the endpoint must answer with a ``host_id`` and its list of experts, and in a
private swarm with a proof over the nonce made with the swarm's secret (``net.signing.info_proof``). An entry is
*verified* when the endpoint's last answer lists an expert under it: the node knows only the key's digest, so it
compares ``digest("prefix:" + parent)`` and the coordinate for every prefix of every uid listed.

What a stranger can make a node spend here is bounded: at most one new check per datagram received (the storage
asks for one), checks in flight at once (``max_concurrent`` worker threads), checks waiting (``max_pending``; per
target network, ``max_pending_per_network``), checks started per second (a token bucket), the time of one check
(``timeout``, the socket shut down past it) and the bytes of an answer (``MAX_INFO_BYTES``), and answers remembered
(``max_cached``, least recently used dropped). Failures are remembered too (``failed_ttl``), so a dead endpoint is
asked again at most that often. A positive answer is fresh for ``ok_ttl``; an entry stored after that starts a
new check, and the old answer stands meanwhile (up to twice ``ok_ttl``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import secrets
import time
from collections import Counter, OrderedDict
from typing import Callable, Optional

from kademlia.utils import digest

from .. import auth
from ..net import http_client
from ..net.addresses import netgroup
from ..net.signing import INFO_PROOF_DOMAIN
from .records import parse_uid, prefix_key

logger = logging.getLogger(__name__)

VERIFIED, FAILED, UNKNOWN = "verified", "failed", "unknown"
MAX_INFO_BYTES = 1 << 20  # an /info answer longer than this fails the check
MAX_LISTED_UIDS = 4096  # experts of one answer that are read
NONCE_HEX = 32


class Listing:
    """One endpoint's answer: ``ok`` and the (key digest, coordinate) pairs it serves, or why it failed."""

    __slots__ = ("ok", "pairs", "at", "since", "reason", "host_id")

    def __init__(self, ok: bool, pairs: frozenset = frozenset(), reason: str = "", host_id: str = "", at: float = 0.0):
        self.ok, self.pairs, self.reason, self.host_id, self.at = ok, pairs, reason, host_id, at
        self.since = at  # when the endpoint's answers started being good without a failure in between


def failed(reason: str) -> Listing:
    return Listing(False, reason=reason)


def fetch_listing(endpoint: str, nonce: str, secret: Optional[bytes], timeout: float,
                  handle: Optional[http_client.CallHandle] = None) -> Listing:
    """Ask ``endpoint`` for ``/info?nonce=...`` (blocking; signed in a private swarm, whose host must prove it holds
    the secret) and read which experts it serves."""
    path = f"/info?nonce={nonce}"
    headers = {**http_client.signed(secret, "GET", path, b""), "Connection": "close"}
    try:
        answer = http_client.request(endpoint, "GET", path, headers=headers, timeout=timeout, handle=handle,
                                     max_answer_bytes=MAX_INFO_BYTES)
    except http_client.TransportError as e:
        if e.refused:
            return failed(f"endpoint {endpoint} refused the connection")
        return failed(f"endpoint {endpoint}: {e}")
    if answer.status != 200:
        return failed(f"endpoint {endpoint} answered /info with HTTP {answer.status}")
    try:
        info = json.loads(answer.body)
    except ValueError:
        return failed(f"endpoint {endpoint} answered /info with something that is not JSON")
    host_id = info.get("host_id") if isinstance(info, dict) else None
    experts = info.get("experts") if isinstance(info, dict) else None
    if not isinstance(host_id, str) or not 0 < len(host_id) <= 64 or not isinstance(experts, dict):
        return failed(f"endpoint {endpoint} answered /info without a host_id and its experts")
    if secret is not None and not (info.get("nonce") == nonce and auth.verify(
            secret, info.get("proof"), INFO_PROOF_DOMAIN, nonce.encode(), host_id.encode())):
        return failed(f"endpoint {endpoint} did not prove that it holds the swarm's secret")
    pairs = set()
    for uid in list(experts)[:MAX_LISTED_UIDS]:
        try:
            prefix, coords = parse_uid(uid)
        except ValueError:
            continue
        parent = prefix
        for coord in coords:
            pairs.add((digest(prefix_key(parent)), coord))
            parent = f"{parent}.{coord}"
    if not pairs:
        return failed(f"endpoint {endpoint} serves no experts")
    return Listing(True, frozenset(pairs), host_id=host_id)


class EndpointVerifier:
    """Checks endpoints on the event loop it is used from (each in a worker thread) and remembers the answers.

    ``verdict`` says what is known of one entry; ``request`` starts a check when one is due and allowed; listeners
    (``on_checked``) hear of each answer; ``generation`` changes whenever a verdict may have changed."""

    def __init__(self, stats: Counter, secret: Optional[bytes] = None, *, max_concurrent: int = 4,
                 max_pending: int = 64, max_pending_per_network: int = 4, checks_per_s: float = 20.0,
                 timeout: float = 2.0, ok_ttl: float = 120.0, failed_ttl: float = 60.0, max_cached: int = 4096,
                 clock: Callable[[], float] = time.monotonic,
                 fetch: Callable[..., Listing] = fetch_listing):
        self.stats, self.secret, self.clock, self.fetch = stats, secret, clock, fetch
        self.max_concurrent, self.max_pending, self.max_pending_per_network = max_concurrent, max_pending, max_pending_per_network
        self.checks_per_s, self.timeout, self.ok_ttl, self.failed_ttl = checks_per_s, timeout, ok_ttl, failed_ttl
        self.max_cached = max_cached
        self.generation = 0
        self.listeners: list[Callable[[str], None]] = []
        self._answers: "OrderedDict[str, Listing]" = OrderedDict()
        self._pending: dict[str, str] = {}  # endpoint -> its network
        self._pending_nets: Counter = Counter()
        self._tokens, self._tokens_at = float(checks_per_s), clock()
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._tasks: set[asyncio.Future] = set()
        self._handles: set[http_client.CallHandle] = set()

    def listing(self, endpoint: str) -> Optional[Listing]:
        """The last answer of ``endpoint`` (None: never asked, or forgotten)."""
        return self._answers.get(endpoint)

    def verdict(self, dkey: bytes, coord: int, endpoint: str) -> str:
        """VERIFIED: the endpoint lists an expert under (``dkey``, ``coord``); FAILED: it did not answer, or does not
        list one; UNKNOWN: not checked (or too long ago)."""
        answer = self._answers.get(endpoint)
        if answer is None:
            return UNKNOWN
        age = self.clock() - answer.at
        if answer.ok:
            if age >= 2 * self.ok_ttl:
                return UNKNOWN
            return VERIFIED if (dkey, coord) in answer.pairs else FAILED
        return FAILED if age < self.failed_ttl else UNKNOWN

    def due(self, endpoint: str) -> bool:
        """True when ``endpoint`` should be checked (never, or its answer is old) and no check of it is under way."""
        if endpoint in self._pending:
            return False
        answer = self._answers.get(endpoint)
        return answer is None or self.clock() - answer.at >= (self.ok_ttl if answer.ok else self.failed_ttl)

    def request(self, endpoint: str) -> bool:
        """Start a check of ``endpoint`` on the running loop if one is due and the limits allow; True if started."""
        if not self.due(endpoint):
            return False
        now = self.clock()
        self._tokens = min(float(self.checks_per_s), self._tokens + (now - self._tokens_at) * self.checks_per_s)
        self._tokens_at = now
        network = netgroup(endpoint.rpartition(":")[0])
        if self._tokens < 1.0:
            self.stats["endpoint_checks_rate_limited"] += 1
            return False
        if len(self._pending) >= self.max_pending or self._pending_nets[network] >= self.max_pending_per_network:
            self.stats["endpoint_checks_dropped"] += 1
            return False
        self._tokens -= 1.0
        self._pending[endpoint] = network
        self._pending_nets[network] += 1
        task = asyncio.ensure_future(self._check(endpoint))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _check(self, endpoint: str) -> None:
        handle = http_client.CallHandle()
        self._handles.add(handle)
        try:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.max_concurrent, "lightning_moe.dht-verify")
            job = asyncio.get_running_loop().run_in_executor(
                self._executor, self.fetch, endpoint, secrets.token_hex(NONCE_HEX // 2), self.secret, self.timeout, handle)
            try:
                answer = await asyncio.wait_for(asyncio.shield(job), self.timeout)
            except asyncio.TimeoutError:
                handle.cancel()  # the worker's socket is shut down: it returns now
                answer = failed(f"endpoint {endpoint} did not answer /info within {self.timeout:g} s")
            except Exception as e:  # noqa: BLE001 - a check that broke counts as failed
                answer = failed(f"endpoint {endpoint}: {type(e).__name__}: {e}")
            self._remember(endpoint, answer)
        finally:
            self._handles.discard(handle)
            network = self._pending.pop(endpoint)
            self._pending_nets[network] -= 1
            if self._pending_nets[network] <= 0:
                del self._pending_nets[network]

    def verified_for(self, endpoint: str) -> float:
        """Seconds that ``endpoint`` has answered well, every check since the first (0: not now)."""
        answer = self._answers.get(endpoint)
        return self.clock() - answer.since if answer is not None and answer.ok else 0.0

    def _remember(self, endpoint: str, answer: Listing) -> None:
        answer.at = answer.since = self.clock()
        previous = self._answers.get(endpoint)
        if answer.ok and previous is not None and previous.ok:
            answer.since = previous.since
        self._answers[endpoint] = answer
        self._answers.move_to_end(endpoint)
        while len(self._answers) > self.max_cached:
            self._answers.popitem(last=False)
        self.generation += 1
        self.stats["endpoint_checks_ok" if answer.ok else "endpoint_checks_failed"] += 1
        if not answer.ok:
            logger.debug("DHT entries for %s are not served: %s", endpoint, answer.reason)
        for listener in list(self.listeners):
            listener(endpoint)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no check is under way (tests, benchmarks); False if some still are after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self._tasks), timeout=max(deadline - time.monotonic(), 0.0))
        return not self._tasks

    def close(self) -> None:
        """Cancel the checks under way and let the worker threads go (they end within ``timeout``)."""
        for task in list(self._tasks):
            task.cancel()
        for handle in list(self._handles):
            handle.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def __repr__(self) -> str:
        return f"EndpointVerifier(cached={len(self._answers)}, pending={len(self._pending)})"

