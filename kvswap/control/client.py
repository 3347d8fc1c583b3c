"""The client's side of the control API: small synchronous HTTP calls to the daemon on 127.0.0.1.

Uses only the standard library (urllib) so commands that talk to a daemon start fast. Every call names a
route of kvswap/control/routes.py and sends its typed body; errors the daemon reports come back as
{"error": {"type": ..., "message": ...}} and are re-raised as the same KvswapError subclass, so `kvswap get`
fails with the daemon's one clear line.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from ..protocol.errors import KvswapError, NotFound, error_from_payload
from . import routes, runfiles
from .limits import JOB_POLL_INTERVAL_S
from .routes import Body, JobView, Route


class NodeClient:
    """Talks to the daemon running in `home` (NotFound when none runs there)."""

    def __init__(self, home: Path):
        self.home = Path(home)
        info = runfiles.read_node_file(self.home)
        self.base = info["api"].rstrip("/")
        self.token = runfiles.api_token(self.home)

    def call(self, route: Route, body: Body | None = None, *, wait_s: float | None = None, **params: str) -> Any:
        """Call `route` with its typed `body` (path parameters as keywords); the answer as the route's type."""
        if body is not None and not isinstance(body, route.body or ()):
            raise TypeError(f"route {route.name} takes {route.body.__name__ if route.body else 'no body'}")
        data = None if route.method == "GET" else json.dumps(body.to_json() if body is not None else {}).encode()
        req = urllib.request.Request(
            self.base + route.url_path(**params), data=data, method=route.method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=wait_s or route.wait_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise _error_from(exc) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise NotFound(f"the node's control API at {self.base} does not answer ({exc})") from None
        if route.answer is str:
            return raw.decode("utf-8", "replace")
        return routes.decode_answer(route, json.loads(raw or b"null"))

    def status(self) -> dict:
        return self.call(routes.STATUS)


def _error_from(exc: urllib.error.HTTPError) -> KvswapError:
    """The daemon's error, rebuilt from its {"error": {"type", "message"}} body (protocol/errors.py)."""
    try:
        payload = json.loads(exc.read())["error"]
    except (ValueError, KeyError, TypeError, OSError):  # not the daemon's JSON (a proxy's page, a cut body)
        return KvswapError(f"control API answered HTTP {exc.code}")
    if not isinstance(payload, dict):
        return KvswapError(f"control API answered HTTP {exc.code}")
    return error_from_payload(payload)


def wait_job(client: NodeClient, job: JobView, progress: Callable[[dict], None] | None = None,
             cancel_on_interrupt: bool = False) -> Any:
    """Poll a daemon job to completion and return its result (or raise its error as the same KvswapError).

    `progress(dict)` is called with the job's progress after each poll (bytes/total_bytes/peers for a fetch,
    tokens/tokens_total for a publish's prefill). With `cancel_on_interrupt`, Ctrl-C cancels the job in the
    daemon before it propagates: an interrupted `kvswap get` stops fetching."""
    try:
        while True:
            job = client.call(routes.JOB, job_id=job.id)
            if progress is not None and job.progress:
                progress(job.progress)
            if job.state == "done":
                return job.result
            if job.state in ("failed", "cancelled"):
                raise error_from_payload(job.error or {"message": f"job {job.state}"})
            time.sleep(JOB_POLL_INTERVAL_S)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            try:
                client.call(routes.CANCEL_JOB, wait_s=5, job_id=job.id)
            except KvswapError:
                pass  # the daemon is gone or the job ended: nothing left to cancel
        raise


def maybe_client(home: Path) -> NodeClient | None:
    """A client if a daemon runs in `home`, else None (the caller then works in its own process)."""
    try:
        return NodeClient(home)
    except NotFound:
        return None


__all__ = ["NodeClient", "maybe_client", "wait_job"]
