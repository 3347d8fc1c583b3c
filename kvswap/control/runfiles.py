"""Files a running daemon leaves in its home so the CLI can find and authenticate to it.

<home>/node.json   {pid, api, peer_id, addrs, started}: written after start-up, removed on clean exit
<home>/api.token   bearer token for the control API, 0600, created once per home
A stale node.json (its pid is gone) means the daemon was killed; the CLI says so instead of hanging.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from ..protocol.errors import NotFound

NODE_FILE = "node.json"
TOKEN_FILE = "api.token"
LOG_FILE = "node.log"


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a new 0600 file atomically (temp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def api_token(home: Path, create: bool = False) -> str:
    """The control API's bearer token; created (0600) on the daemon's first start."""
    path = home / TOKEN_FILE
    if not path.exists():
        if not create:
            raise NotFound(f"no control-API token in {home} (has a node ever started there?)")
        write_private(path, secrets.token_urlsafe(32).encode())
    return path.read_text().strip()


def write_node_file(home: Path, info: dict) -> None:
    write_private(home / NODE_FILE, json.dumps(info, indent=2).encode())


def remove_node_file(home: Path) -> None:
    try:
        (home / NODE_FILE).unlink()
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs. A process that exited but was not yet reaped by its parent (a zombie:
    a daemon started with `&` from a shell that is busy running `kvswap node stop`) has stopped: kill(pid, 0)
    alone would call it alive until the shell gets round to it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:  # Linux: "pid (comm) STATE ..."
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):  # no /proc (another OS), or it ended meanwhile
        return True


def read_node_file(home: Path) -> dict:
    """The running daemon's info; NotFound if none runs in this home."""
    path = home / NODE_FILE
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no node is running in {home} (start one with `kvswap node start --home {home}`)") from None
    except ValueError:
        raise NotFound(f"{path} is unreadable; remove it and start the node again") from None
    if not pid_alive(int(info.get("pid", -1))):
        raise NotFound(f"the node in {home} (pid {info.get('pid')}) is not running any more; start it again")
    return info
