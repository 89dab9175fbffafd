"""Is this process reachable by strangers? Nonces that peers were asked to send back, and who sent them.

A node asks a few peers to *dial back* its DHT port (a UDP datagram) and its TCP ports (an HTTP
request ``GET /reachability/<nonce>``) from sockets it has never contacted, through another peer
where one exists. A home NAT drops such unsolicited traffic, so a nonce that arrives proves that
strangers reach that port. The DHT's protocol and the host's HTTP server report arrivals here.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

NONCE_BYTES = 16
MAX_EXPECTED = 256  # nonces awaited at once; the oldest are forgotten first
MAX_SOURCES = 8  # labels remembered per nonce


class ProbeRegistry:
    """Nonces awaited, and where each one arrived (``udp``, ``tcp:PORT``; thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: "OrderedDict[bytes, set[str]]" = OrderedDict()

    def expect(self) -> bytes:
        """A new nonce to hand out; :meth:`sources` then tells who sent it back."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        with self._lock:
            self._expected[nonce] = set()
            while len(self._expected) > MAX_EXPECTED:
                self._expected.popitem(last=False)
        return nonce

    def arrived(self, nonce: bytes | str, source: str) -> bool:
        """Record that ``nonce`` (bytes, or hex from an HTTP path) arrived at ``source`` (``udp``, ``tcp:PORT``);
        False if it is not awaited."""
        if isinstance(nonce, str):
            try:
                nonce = bytes.fromhex(nonce)
            except ValueError:
                return False
        with self._lock:
            sources = self._expected.get(nonce)
            if sources is None:
                return False
            if len(sources) < MAX_SOURCES:
                sources.add(source)
            return True

    def sources(self, nonce: bytes) -> set[str]:
        with self._lock:
            return set(self._expected.get(nonce, ()))

    def forget(self, nonce: bytes) -> None:
        with self._lock:
            self._expected.pop(nonce, None)

    def wait(self, nonce: bytes, expected: set[str], timeout: float) -> set[str]:
        """Wait until ``nonce`` arrived on every label in ``expected`` (``udp``, ``tcp:PORT``), or ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not expected <= self.sources(nonce):
            time.sleep(0.05)
        return self.sources(nonce)


PROBES = ProbeRegistry()  # this process's
