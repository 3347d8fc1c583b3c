"""The control API's server side: aiohttp on 127.0.0.1 only, bearer token from <home>/api.token.

The routes are kvswap/control/routes.py's, registered from its table: each calls the daemon's handler of the
same name (`Daemon.api_<name>`) with its typed body, already checked field by field, and answers JSON (or the
Prometheus text of /metrics). A KvswapError becomes {"error": {"type", "message"}} with the error class's own
`http_status` (protocol/errors.py); the client turns it back into the same exception.

A request body is read in pieces, never more than MAX_API_BODY_BYTES and never with a silence longer than
API_BODY_IDLE_TIMEOUT_S between two pieces: a client that declares a huge Content-Length, or stalls half way, is
answered with one line (413 / 400) and costs no more than what it sent, and nothing reaches the log as a
traceback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from typing import Any

from aiohttp import web

from kvswap.control import routes
from kvswap.control.limits import API_BODY_IDLE_TIMEOUT_S, MAX_API_BODY_BYTES
from kvswap.protocol.errors import KvswapError, LimitExceeded, UsageError, error_payload

from .metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

#: bytes read from a request body at once
_BODY_PIECE_BYTES = 1 << 20


def check_loopback(host: str) -> None:
    """The control API never listens beyond this machine."""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise UsageError(f"the control API binds loopback only, not {host!r}")


async def read_body(request: web.Request, limit: int = MAX_API_BODY_BYTES,
                    idle_s: float = API_BODY_IDLE_TIMEOUT_S) -> bytes:
    """The request body, read in pieces within `limit` bytes and `idle_s` of silence (LimitExceeded /
    UsageError otherwise, before more than `limit` is held)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise LimitExceeded(f"request body of {declared} bytes is over MAX_API_BODY_BYTES ({limit})")
    body = bytearray()
    while True:
        try:
            piece = await asyncio.wait_for(request.content.read(_BODY_PIECE_BYTES), idle_s)
        except asyncio.TimeoutError:
            raise UsageError(f"the request body stopped arriving for {idle_s:g} s "
                              f"({len(body)} of {declared if declared is not None else '?'} bytes)") from None
        if not piece:
            break
        body += piece
        if len(body) > limit:
            raise LimitExceeded(f"request body is over MAX_API_BODY_BYTES ({limit})")
    if declared is not None and len(body) != declared:
        raise UsageError(f"request body ended after {len(body)} of its {declared} declared bytes")
    return bytes(body)


def build_app(daemon: Any, token: str) -> web.Application:
    """The app serving `daemon` (node/daemon.py's Daemon: one `api_<route>` method per route) behind `token`."""
    @web.middleware
    async def auth_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": error_payload(UsageError("bad or missing API token"))}, status=401)
        try:
            return await handler(request)
        except KvswapError as exc:
            return web.json_response({"error": error_payload(exc)}, status=exc.http_status)
        except (ConnectionResetError, asyncio.IncompleteReadError) as exc:  # the client left mid-request
            log.info("control-API client left during %s %s: %s", request.method, request.path, exc)
            raise web.HTTPBadRequest() from None

    def route_handler(route: routes.Route):
        serve = getattr(daemon, f"api_{route.name}")

        async def handle(request: web.Request) -> web.StreamResponse:
            args: list = []
            if route.body is not None:
                args.append(route.body.from_json(routes.loads(await read_body(request))))
            answer = await serve(*args, **request.match_info)
            if route.answer is str:
                return web.Response(body=answer, headers={"Content-Type": CONTENT_TYPE})
            if isinstance(answer, routes.JobView):
                answer = answer.to_json()
            return web.json_response(answer)

        return handle

    # the body is read by read_body within its own bounds; aiohttp's own cap stays above them as a backstop
    app = web.Application(middlewares=[auth_and_errors], client_max_size=MAX_API_BODY_BYTES + _BODY_PIECE_BYTES)
    app.add_routes([web.route(r.method, r.path, route_handler(r)) for r in routes.ROUTES])
    return app


__all__ = ["build_app", "check_loopback", "read_body"]
