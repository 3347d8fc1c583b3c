"""The control API: aiohttp on 127.0.0.1 only, bearer token from <home>/api.token.

Routes are thin: parse JSON, call the daemon, return JSON. A KvswapError becomes
{"error": {"type", "message"}} with the error class's own `http_status` (kvswap/errors.py); node/client.py
turns it back into the same exception on the CLI side.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..errors import KvswapError, UsageError, error_payload
from ..protocol.limits import MAX_API_BODY_BYTES
from . import apibody
from .metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger(__name__)

def check_loopback(host: str) -> None:
    """The control API never listens beyond this machine."""
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = host == "localhost"
    if not ok:
        raise UsageError(f"the control API binds loopback only, not {host!r}")


def build_app(daemon: "Daemon", token: str) -> web.Application:
    @web.middleware
    async def auth_and_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": error_payload(UsageError("bad or missing API token"))}, status=401)
        try:
            return await handler(request)
        except KvswapError as exc:
            return web.json_response({"error": error_payload(exc)}, status=exc.http_status)

    async def body(request: web.Request, route: str) -> dict:
        """The route's fields, each checked (node/apibody.py): bad input is a 400 with one line."""
        raw = await request.read() if request.can_read_body else b""
        return apibody.parse(route, apibody.loads(raw))

    async def status(request: web.Request) -> web.Response:
        return web.json_response(await daemon.status())

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=daemon.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def peers(request: web.Request) -> web.Response:
        return web.json_response(await daemon.peers())

    async def ls(request: web.Request) -> web.Response:
        return web.json_response(await daemon.list_artifacts())

    async def publish(request: web.Request) -> web.Response:
        return web.json_response(daemon.start_publish(await body(request, "publish")))

    async def get(request: web.Request) -> web.Response:
        return web.json_response(daemon.start_fetch(await body(request, "get")))

    async def generate(request: web.Request) -> web.Response:
        return web.json_response(await daemon.generate(await body(request, "generate")))

    async def audit(request: web.Request) -> web.Response:
        return web.json_response(await daemon.audit(await body(request, "audit")))

    async def job(request: web.Request) -> web.Response:
        return web.json_response(daemon.jobs.get(request.match_info["job_id"]).view())

    async def cancel_job(request: web.Request) -> web.Response:
        return web.json_response(daemon.jobs.cancel(request.match_info["job_id"]).view())

    async def stop(request: web.Request) -> web.Response:
        daemon.request_stop("control API")
        return web.json_response({"stopping": True})

    app = web.Application(middlewares=[auth_and_errors], client_max_size=MAX_API_BODY_BYTES)
    app.add_routes(
        [
            web.get("/status", status),
            web.get("/metrics", metrics),
            web.get("/peers", peers),
            web.get("/artifacts", ls),
            web.post("/publish", publish),
            web.post("/get", get),
            web.post("/generate", generate),
            web.post("/audit", audit),
            web.get("/jobs/{job_id}", job),
            web.post("/jobs/{job_id}/cancel", cancel_job),
            web.post("/stop", stop),
        ]
    )
    return app
