"""The CLI's side of the control API: small synchronous HTTP calls to the daemon on 127.0.0.1.

Uses only the standard library (urllib) so CLI commands that talk to a daemon start fast. Errors the
daemon reports come back as {"error": {"type": ..., "message": ...}} and are re-raised as the same
KvswapError subclass, so `kvswap get` fails with the daemon's one clear line.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import KvswapError, NotFound, error_from_payload
from ..protocol.limits import API_TIMEOUT_S, JOB_POLL_INTERVAL_S
from . import runfiles


class NodeClient:
    """Talks to the daemon running in `home`."""

    def __init__(self, home: Path, timeout: float = API_TIMEOUT_S):
        self.home = Path(home)
        info = runfiles.read_node_file(self.home)
        self.base = info["api"].rstrip("/")
        self.token = runfiles.api_token(self.home)
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise _error_from(exc) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise NotFound(f"the node's control API at {self.base} does not answer ({exc})") from None

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("GET", path, **kw)

    def post(self, path: str, body: dict | None = None, **kw: Any) -> Any:
        return self.call("POST", path, body or {}, **kw)


def _error_from(exc: urllib.error.HTTPError) -> KvswapError:
    """The daemon's error, rebuilt from its {"error": {"type", "message"}} body (kvswap/errors.py)."""
    try:
        payload = json.loads(exc.read())["error"]
    except (ValueError, KeyError, TypeError, OSError):  # not the daemon's JSON (a proxy's page, a cut body)
        return KvswapError(f"control API answered HTTP {exc.code}")
    if not isinstance(payload, dict):
        return KvswapError(f"control API answered HTTP {exc.code}")
    return error_from_payload(payload)


def wait_job(client: NodeClient, job_id: str, progress=None, cancel_on_interrupt: bool = False) -> Any:
    """Poll a daemon job to completion and return its result (or raise its error as the same KvswapError).

    `progress(dict)` is called with the job's progress after each poll (bytes/total_bytes/peers for a fetch,
    tokens/tokens_total for a publish's prefill). With `cancel_on_interrupt`, Ctrl-C cancels the job in the
    daemon before it propagates: an interrupted `kvswap get` stops fetching."""
    import time

    try:
        while True:
            job = client.get(f"/jobs/{job_id}")
            if progress is not None and job.get("progress"):
                progress(job["progress"])
            if job["state"] == "done":
                return job["result"]
            if job["state"] in ("failed", "cancelled"):
                raise error_from_payload(job.get("error") or {"message": f"job {job['state']}"})
            time.sleep(JOB_POLL_INTERVAL_S)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            try:
                client.post(f"/jobs/{job_id}/cancel", timeout=5)
            except KvswapError:
                pass  # the daemon is gone or the job ended: nothing left to cancel
        raise


def maybe_client(home: Path) -> NodeClient | None:
    """A client if a daemon runs in `home`, else None (the CLI then works on the store directly)."""
    try:
        return NodeClient(home)
    except NotFound:
        return None
