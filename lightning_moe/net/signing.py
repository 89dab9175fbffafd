"""The one check of signed requests, used by every server of a private swarm (hosts, averaging peers).

A signed request carries ``X-Timestamp``, ``X-Nonce``, ``X-Signature`` (HMAC-SHA256 over method, path,
timestamp, nonce, compression, the target's ``X-Host-Id`` and the body: ``auth.request_signature``)
and ``X-Compression``. :meth:`RequestVerifier.check_headers` refuses from the headers alone what cannot
verify, before a body is read; :meth:`RequestVerifier.verify` checks the HMAC and remembers the
signature, so that a captured request cannot be sent again.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping

from lightning_moe import auth

MAX_CLOCK_SKEW = 300.0  # seconds a signed request's X-Timestamp may differ from the server's clock


class SignatureError(ValueError):
    """A request of a private swarm is not authentic; the message says why (answered with 401)."""


class RequestVerifier:
    """Checks requests signed with ``secret`` (None: a public swarm, everything passes).

    :param host_id: this server instance's id (new at every start): requests must name it
        (``X-Host-Id``), so a request signed for another instance is refused. Empty: not checked.
    :param who: what the server is, in refusals ("host", "peer").
    """

    def __init__(self, secret: bytes | None, host_id: str = "", who: str = "peer"):
        self.secret, self.host_id, self.who = secret, host_id, who
        self.replays = auth.ReplayGuard(MAX_CLOCK_SKEW)

    def check_headers(self, headers: Mapping[str, str], post: bool = True) -> None:
        """Refuse what cannot verify, from the headers alone (``post``: the request has a body)."""
        if self.secret is None:
            return
        timestamp, signature = headers.get("X-Timestamp", "").strip(), headers.get("X-Signature", "").strip()
        if not timestamp or not signature:
            raise SignatureError(f"this {self.who} serves a private swarm: sign requests with the swarm's secret "
                                 "(X-Timestamp and X-Signature headers)")
        if not auth.SIGNATURE_RE.fullmatch(signature):
            raise SignatureError("malformed X-Signature: expected 64 hex digits")
        try:
            skew = abs(time.time() - float(timestamp))
        except ValueError:
            raise SignatureError(f"invalid X-Timestamp {timestamp[:40]!r}") from None
        if not skew <= MAX_CLOCK_SKEW:  # also refuses nan
            raise SignatureError(f"X-Timestamp is {skew:.0f} s away from the {self.who}'s clock "
                                 f"(limit {MAX_CLOCK_SKEW:.0f} s)")
        host_id = headers.get("X-Host-Id", "").strip()
        if self.host_id and host_id != self.host_id and (post or host_id):
            raise SignatureError("request signed for another host instance (X-Host-Id differs): "
                                 "get this host's host_id from /info and sign again")
        if self.replays.seen(signature):
            raise SignatureError("replayed request: this signature was already used")

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes | bytearray, post: bool = True) -> None:
        """The headers' checks, the HMAC over the request and its body, and the replay guard."""
        if self.secret is None:
            return
        self.check_headers(headers, post)
        timestamp, signature = headers["X-Timestamp"].strip(), headers["X-Signature"].strip()
        expected = auth.request_signature(self.secret, method, path, timestamp, headers.get("X-Nonce", "").strip(),
                                          headers.get("X-Compression", "none").strip(),
                                          headers.get("X-Host-Id", "").strip(), body)
        if not hmac.compare_digest(signature, expected):
            raise SignatureError("bad X-Signature: the request was not signed with this swarm's secret")
        if not self.replays.first_use(signature, float(timestamp)):
            raise SignatureError("replayed request: this signature was already used")


INFO_PROOF_DOMAIN = b"lightning_moe.info.v1"


def info_proof(secret: bytes, nonce: str, host_id: str) -> str:
    """What a private swarm's host answers to ``GET /info?nonce=N`` (next to its ``host_id``): an HMAC over the
    nonce and its host_id, so a DHT node that checks an endpoint learns that a swarm member serves there."""
    return auth.sign(secret, INFO_PROOF_DOMAIN, nonce.encode(), host_id.encode())
