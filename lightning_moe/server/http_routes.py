"""The host's routes besides the experts' own: ``GET /info`` and ``GET /stats``, ``GET /state/<uid>`` (a joining replica's handover) and
``GET``/``POST /punch`` (hole punching while relayed). Each takes the :class:`~lightning_moe.server.http.ExpertHTTPServer`
that serves it and uses its checks, counters and limits."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from aiohttp import web

from lightning_moe import wire
from lightning_moe.net.punch import MAX_BODY as MAX_PUNCH_BODY
from lightning_moe.net.punch import PunchRefused
from lightning_moe.net.signing import info_proof
from lightning_moe.server.handover import encode_state
from lightning_moe.server.http_body import RETRY_AFTER, RequestError, write_answer

NONCE = re.compile(r"[0-9a-f]{16,64}")  # a DHT node's /info challenge
MAX_STATE_REQUESTS = 2  # expert state snapshots served at once (each copies an expert's weights and optimizer state)


async def serve_info(server: Any, request: web.BaseRequest, route: str) -> web.StreamResponse:
    """``GET /info`` (the experts' schemas; with ``?nonce=N`` in a private swarm, a DHT node checking this endpoint,
    also the nonce and a proof that this host holds the swarm's secret) or ``GET /stats``."""
    if request.method not in ("GET", "HEAD"):
        raise RequestError(405, f"use GET for /{route}", None, headers={"Allow": "GET"})
    server.check_headers(request, post=False)
    if not request.content.is_eof() and not await server.drain(request):
        raise RequestError(400, f"GET /{route} takes no body", None, close=True)
    server.verify(request, b"")
    if route == "info":
        body, nonce = server.info_bytes, request.rel_url.query.get("nonce", "")
        if server.secret is not None and NONCE.fullmatch(nonce):
            proof = info_proof(server.secret, nonce, server.host_id)
            body = body[:-1] + f', "nonce": "{nonce}", "proof": "{proof}"}}'.encode()
    else:
        body = json.dumps(server.stats_fn() if server.stats_fn is not None else {}).encode()
    server.count_request(route, None)
    return web.Response(body=body, content_type="application/json")


async def serve_state(server: Any, request: web.BaseRequest, uid: str) -> web.StreamResponse:
    """``GET /state/<uid>``: the expert's weights and optimizer state, for a host that joins as its replica
    (:mod:`lightning_moe.server.handover`); at most ``MAX_STATE_REQUESTS`` snapshots at once."""
    server.check_headers(request, post=False, uid=uid)
    if not request.content.is_eof() and not await server.drain(request):
        raise RequestError(400, "GET /state takes no body", uid, close=True)
    server.verify(request, b"", uid)
    backend = server.backends.get(uid)
    if backend is None:
        raise RequestError(404, f"no expert {uid!r} on this host", uid)
    if server.state_requests >= MAX_STATE_REQUESTS:
        raise RequestError(503, f"state: {server.state_requests} snapshots in progress; retry in {RETRY_AFTER} s", uid,
                            headers={"Retry-After": RETRY_AFTER})
    server.state_requests += 1
    started = time.monotonic()
    try:
        parts = await asyncio.get_running_loop().run_in_executor(
            None, lambda: wire.serialize_parts(encode_state(backend.state_dict())))
    finally:
        server.state_requests -= 1
    server.count_request("state", uid)
    return await write_answer(request, parts, time.monotonic() - started)


async def serve_punch(server: Any, request: web.BaseRequest) -> web.StreamResponse:
    """``GET /punch``: the relay to observe through; ``POST /punch``: punch towards a trainer's addresses."""
    if request.method not in ("GET", "POST"):
        raise RequestError(405, "use GET or POST for /punch", None, headers={"Allow": "GET, POST"})
    post = request.method == "POST"
    server.check_headers(request, post=post)
    body = b""
    if post:
        length = request.content_length
        if length is None or length > MAX_PUNCH_BODY:
            raise RequestError(413, f"a punch request is at most {MAX_PUNCH_BODY} bytes with Content-Length", None,
                               close=True)
        try:
            body = await asyncio.wait_for(request.content.readexactly(length), server.limits.body_timeout)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            raise RequestError(408, f"punch: body not received ({type(e).__name__})", None, close=True) from None
    elif not request.content.is_eof() and not await server.drain(request):
        raise RequestError(400, "GET /punch takes no body", None, close=True)
    server.verify(request, body)
    if server.punch is None:
        raise RequestError(404, "this host does not punch holes (not relayed, or host.hole_punch=false)", None)
    server.count_request("punch", None)
    try:
        answer = await server.punch.submit(body) if post else server.punch.offer()
    except PunchRefused as e:
        raise RequestError(e.status, str(e), None) from None
    return web.Response(body=json.dumps(answer).encode(), content_type="application/json")
