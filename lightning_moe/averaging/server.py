"""The averaging endpoints of a trainer that answers: a small aiohttp server on the process's network loop.

- ``POST /average``: the body is the initiator's parameters (``state.encode``); the answer is ours,
  and both sides then move halfway towards each other (symmetric pairwise averaging).
- ``GET /state``: our parameters and global step, for a joiner.

In a private swarm every request carries ``X-Timestamp``, ``X-Nonce`` and ``X-Signature`` (HMAC over
method, path, timestamp, nonce, compression and body, as for expert calls; replays are refused) and
every answer ``X-Timestamp`` and ``X-Signature`` over (``response``, path, the request's nonce,
timestamp, body), so an initiator knows that the parameters come from a member of the swarm.
Bodies larger than the model's message are refused by aiohttp before they are read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from lightning_moe import auth
from lightning_moe.net import loop as net_loop
from lightning_moe.net.reachability import NONCE_BYTES, PROBES
from lightning_moe.net.signing import MAX_CLOCK_SKEW, RequestVerifier, SignatureError

from .state import RefusedState

logger = logging.getLogger(__name__)



class Unavailable(RuntimeError):
    """No parameters to answer with yet (the trainer has not published any)."""


def response_signature(secret: bytes, path: str, nonce: str, timestamp: str, body: bytes) -> str:
    """What an answer's ``X-Signature`` must be."""
    return auth.sign(secret, b"response", path.encode(), nonce.encode(), timestamp.encode(), body)


def verify_answer(secret: bytes | None, path: str, nonce: str, headers: Any, body: bytes) -> None:
    """In a private swarm, raises RefusedState unless the answer (``headers``: lower-case names) carries a fresh
    ``X-Timestamp`` and its ``X-Signature`` for the request's ``nonce``."""
    if secret is None:
        return
    timestamp = headers.get("x-timestamp", "")
    try:
        fresh = abs(float(timestamp) - time.time()) <= MAX_CLOCK_SKEW
    except ValueError:
        fresh = False
    if not fresh or headers.get("x-signature", "") != response_signature(secret, path, nonce, timestamp, body):
        raise RefusedState("the answer is not signed with this swarm's secret")


def signed_answer(secret: bytes | None, path: str, nonce: str, body: bytes) -> web.Response:
    """An octet-stream answer; in a private swarm with ``X-Timestamp`` and its ``X-Signature``."""
    headers = {"Content-Type": "application/octet-stream"}
    if secret is not None:
        timestamp = f"{time.time():.3f}"
        headers.update({"X-Timestamp": timestamp,
                        "X-Signature": response_signature(secret, path, nonce, timestamp, body)})
    return web.Response(body=body, headers=headers)


class AveragingServer:
    """Serves ``/average`` and ``/state`` on ``host:port`` (0: a free port) until :meth:`stop`.

    Args:
        on_average: ``body -> our message``; raises RefusedState (answered 400) or Unavailable (503).
            Runs on a worker thread: it may wait a little for the trainer's next step boundary.
        on_state: ``() -> our message`` for joiners; raises Unavailable (503).
        max_body: the largest request body accepted (413 above it).
        secret: a private swarm's secret (None: public).
        on_refused: called with ``(reason,)`` after each refused request (for counters).
    """

    def __init__(self, on_average: Callable[[bytes], bytes], on_state: Callable[[], bytes], max_body: int,
                 host: str, port: int = 0, secret: bytes | None = None,
                 on_refused: Callable[[str], None] | None = None, start_timeout: float = 10.0):
        self.on_average, self.on_state, self.secret = on_average, on_state, secret
        self.on_refused = on_refused or (lambda reason: None)
        self.host, self.port, self.max_body = host, port, int(max_body)
        self.verifier = RequestVerifier(secret)
        self._runner: web.AppRunner | None = None
        try:
            self.port = net_loop.run(self._start(), start_timeout)
        except BaseException:
            self.stop()
            raise

    async def _start(self) -> int:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post("/average", self._average)
        app.router.add_get("/state", self._state)
        app.router.add_get("/reachability/{nonce}", self._reachability)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        return self._runner.addresses[0][1]

    async def _answer(self, request: web.Request, work: Callable[[], bytes], body: bytes) -> web.Response:
        try:
            self.verifier.verify(request.method, request.raw_path, request.headers, body)
        except SignatureError as e:
            self.on_refused(str(e))
            return web.json_response({"error": str(e)}, status=401)
        try:
            answer = await asyncio.get_running_loop().run_in_executor(None, work)
        except RefusedState as e:
            self.on_refused(str(e))
            return web.json_response({"error": f"refused: {e}"}, status=400)
        except Unavailable as e:
            return web.json_response({"error": str(e)}, status=503)
        except Exception as e:  # noqa: BLE001 - a peer's request must never take the trainer down
            logger.exception("averaging request failed")
            return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=500)
        return signed_answer(self.secret, request.path, request.headers.get("X-Nonce", ""), answer)

    async def _average(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.on_refused("body too large")
            raise
        return await self._answer(request, lambda: self.on_average(body), body)

    async def _reachability(self, request: web.Request) -> web.Response:
        """A peer's dial-back (:mod:`lightning_moe.net.reachability`): the nonce arrived at this port."""
        arrived = PROBES.arrived(request.match_info["nonce"][:2 * NONCE_BYTES], f"tcp:{self.port}")
        return web.Response(status=204 if arrived else 404)

    async def _state(self, request: web.Request) -> web.Response:
        return await self._answer(request, self.on_state, b"")

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        """Close the server (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            try:
                net_loop.run(runner.cleanup(), timeout)
            except Exception:  # noqa: BLE001
                logger.debug("averaging server cleanup failed", exc_info=True)
