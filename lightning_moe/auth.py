"""Private swarms: a shared secret with which hosts authenticate requests and DHT records (HMAC-SHA256)."""

from __future__ import annotations

import hashlib
import heapq
import hmac
import os
import re
import secrets
import threading
import time

SECRET_ENV = "LIGHTNING_MOE_SECRET"
SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")  # what sign() returns: hex SHA-256


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


def request_signature(
    secret: bytes, method: str, path: str, timestamp: str, nonce: str, compression: str, host_id: str, body: bytes | bytearray
) -> str:
    """The signature of an HTTP request to a host: binds the method, path, time, a nonce, the compression,
    the target host instance (its ``host_id`` from ``/info``, new at every start) and the body."""
    return sign(secret, method.encode(), path.encode("latin-1"), timestamp.encode(), nonce.encode(), compression.encode(),
                host_id.encode(), body)


def request_headers(
    secret: bytes | None, method: str, path: str, body: bytes | bytearray, compression: str = "none", host_id: str = ""
) -> dict[str, str]:
    """Headers that sign a request for the host instance ``host_id`` (none without a secret)."""
    if secret is None:
        return {}
    timestamp, nonce = f"{time.time():.3f}", secrets.token_hex(8)
    signature = request_signature(secret, method, path, timestamp, nonce, compression, host_id, body)
    return {"X-Timestamp": timestamp, "X-Nonce": nonce, "X-Host-Id": host_id, "X-Signature": signature}


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

    def seen(self, signature: str) -> bool:
        """True if ``signature`` was already used (and is still remembered); does not record it."""
        with self._lock:
            return signature in self._seen

    def __len__(self) -> int:
        return len(self._seen)
