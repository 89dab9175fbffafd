"""The host's HTTP protocol (lightning_moe/server/http_protocol.py) subclasses aiohttp's RequestHandler and
web_server.Server and reads some of their private members; setup.cfg pins aiohttp to a tested range. This
fails on a release that drops or renames one of them, before any host test fails obscurely."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web_protocol, web_server

HANDLER_MEMBERS = ("_messages", "_force_close", "_close", "_request_count", "_request_in_progress", "_waiter")
SERVER_MEMBERS = ("_loop", "_kwargs")


def test_aiohttp_still_has_the_private_members_the_host_protocol_reads():
    async def handler(request):
        return aiohttp.web.Response()

    async def check() -> None:
        server = web_server.Server(handler)
        missing = [name for name in SERVER_MEMBERS if not hasattr(server, name)]
        protocol = web_protocol.RequestHandler(server, loop=asyncio.get_running_loop())
        missing += [name for name in HANDLER_MEMBERS if not hasattr(protocol, name)]
        assert not missing, f"aiohttp {aiohttp.__version__} lacks {missing}: see lightning_moe/server/http_protocol.py"
        assert isinstance(protocol._messages, object) and protocol._request_count == 0

    asyncio.run(check())
