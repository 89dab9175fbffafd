"""Private swarms: a shared secret with which hosts authenticate requests and DHT records (HMAC-SHA256)."""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import threading
import time

SECRET_ENV = "LIGHTNING_MOE_SECRET"


def resolve_secret(secret: str | bytes | None = None) -> bytes | None:
    """The swarm's secret: ``secret`` if given, else the ``LIGHTNING_MOE_SECRET`` environment variable, else None (public swarm)."""
    if secret is None:
        secret = os.environ.get(SECRET_ENV) or None
    if secret is None:
        return None
    secret = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not secret:
        raise ValueError(f"the swarm secret is empty; unset {SECRET_ENV} or give a non-empty secret")
    return secret


def sign(secret: bytes, *parts: bytes | bytearray) -> str:
    """Hex HMAC-SHA256 of ``parts``; each part is length-prefixed, so ("ab", "c") and ("a", "bc") differ."""
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    for part in parts:
        mac.update(len(part).to_bytes(8, "little"))
        mac.update(part)
    return mac.hexdigest()


def verify(secret: bytes, signature: object, *parts: bytes | bytearray) -> bool:
    """True if ``signature`` is :func:`sign` of ``parts`` (constant-time comparison)."""
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(secret, *parts))


class ReplayGuard:
    """Remembers signatures until their timestamps leave the ``window``, so a captured request cannot be sent again.

    A host accepts a timestamp within ``window`` seconds of its clock, so a signature must be
    remembered until ``timestamp + window``. At most ``max_entries`` are kept; when full, those
    closest to expiry are forgotten first.
    """

    def __init__(self, window: float, max_entries: int = 1 << 20):
        self.window, self.max_entries = float(window), int(max_entries)
        self._seen: set[str] = set()
        self._expiry: list[tuple[float, str]] = []  # a heap of (forget after, signature)
        self._lock = threading.Lock()

    def first_use(self, signature: str, timestamp: float) -> bool:
        """True the first time ``signature`` is seen (and remembers it); False for a replay."""
        now = time.time()
        with self._lock:
            while self._expiry and (self._expiry[0][0] < now or len(self._seen) >= self.max_entries):
                self._seen.discard(heapq.heappop(self._expiry)[1])
            if signature in self._seen:
                return False
            self._seen.add(signature)
            heapq.heappush(self._expiry, (timestamp + self.window, signature))
            return True

    def __len__(self) -> int:
        return len(self._seen)
