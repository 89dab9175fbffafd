"""How fast the link to each host carries bytes, as this process has measured it, and the codec ``compression="auto"``
picks from it.

A call's *network time* is its answer time less the time the host itself spent on it (the ``X-Host-Seconds`` header:
from its body read to its answer ready), so it holds the upload, the download and the round trip. The requests sent to
one host at once share its link, so they are measured together: their bytes over the time to the last answer, less the
host's longest time (one request of n would see about 1/n of the rate). A link's rate is an exponentially weighted
mean of bytes (up and down) per second of network time, over measurements of at least ``MIN_SAMPLE_BYTES``. The round
trip is not subtracted: on a long path a call is slow whatever its size, and the compact codecs then cost little and
save what they can.

The choice (:meth:`LinkRates.codec`): a loopback endpoint is always exact (a loaded machine's scheduling delays would
look like a slow link); a host not measured yet is sent exact until it is; a link carrying at least
``EXACT_ABOVE`` bytes/s (a LAN: 100 Mbit/s and up) stays exact; a slower one (a home uplink: 10-50 Mbit/s) gets
``COMPACT``, blockwise 8-bit (:mod:`lightning_moe.codecs`: a quarter of float32's bytes, relative RMS error
0.4-1.6 %, 2-3 ms per MiB to encode, against 0.4 s per MiB at 20 Mbit/s).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from lightning_moe.net.addresses import is_loopback

#: Weight of a new measurement in a link's mean rate.
ALPHA = 0.2
#: Calls with fewer bytes (up and down together) are not measured: their time is all round trip and scheduling.
MIN_SAMPLE_BYTES = 32 * 1024
#: Links at least this fast (bytes per second of network time) stay exact: 80 Mbit/s.
EXACT_ABOVE = 10e6
#: The codec of slower links.
COMPACT = "int8"
#: Links remembered; the least recently measured is forgotten first.
MAX_LINKS = 4096
#: A rate older than this (seconds) is not trusted: the link is measured again, exact meanwhile.
STALE_AFTER = 300.0
#: Whether loopback endpoints are always exact (tests of the choice over an emulated link on 127.0.0.1 turn it off).
LOOPBACK_IS_EXACT = True


class LinkRates:
    """Per-endpoint link rates (thread-safe, at most ``MAX_LINKS``), and the codec each one gets under ``auto``."""

    def __init__(self, max_links: int = MAX_LINKS):
        self.max_links = max_links
        self._rates: OrderedDict[str, tuple[float, float]] = OrderedDict()  # endpoint -> (bytes/s, time.monotonic())
        self._lock = threading.Lock()

    def measured(self, endpoint: str, total_bytes: int, seconds: float, host_seconds: float | None) -> None:
        """A call moved ``total_bytes`` (request and answer) in ``seconds``, of which the host spent ``host_seconds``
        (None: the host did not say; the call is not measured)."""
        if host_seconds is None or total_bytes < MIN_SAMPLE_BYTES:
            return
        rate = total_bytes / max(seconds - max(host_seconds, 0.0), 1e-4)
        now = time.monotonic()
        with self._lock:
            old = self._rates.pop(endpoint, None)
            if old is not None and now - old[1] <= STALE_AFTER:
                rate = old[0] + ALPHA * (rate - old[0])
            self._rates[endpoint] = (rate, now)
            while len(self._rates) > self.max_links:
                self._rates.popitem(last=False)

    def rate(self, endpoint: str) -> float | None:
        """The link's mean rate in bytes/s, or None if it was not measured lately."""
        with self._lock:
            entry = self._rates.get(endpoint)
        if entry is None or time.monotonic() - entry[1] > STALE_AFTER:
            return None
        return entry[0]

    def slow(self, endpoint: str) -> bool:
        """Whether ``endpoint``'s link was measured slower than ``EXACT_ABOVE`` (never on loopback, nor unmeasured)."""
        if LOOPBACK_IS_EXACT and is_loopback(endpoint.rpartition(":")[0].strip("[]")):
            return False
        rate = self.rate(endpoint)
        return rate is not None and rate < EXACT_ABOVE

    def codec(self, endpoint: str) -> str:
        """The codec ``compression="auto"`` sends to ``endpoint`` with (see the module's docstring)."""
        return COMPACT if self.slow(endpoint) else "none"
