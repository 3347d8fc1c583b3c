"""Real kvswap daemons as subprocesses on 127.0.0.1 for integration tests, driven through the real CLI.

Daemons start through node/launcher.py's ChildNode (the one daemon starter); this module adds the CLI
helpers the tests assert with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kvswap.node.launcher import ChildNode


def cli(home: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kvswap", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvswap {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def cli_json(home: Path, *args: str, **kw) -> dict:
    return json.loads(cli(home, *args, "--json", **kw).stdout)


class NodeProc(ChildNode):
    """A test daemon, started by node/launcher.py like every other: tiny-qwen3 unless told otherwise (None: a
    light node, `--no-model`)."""

    def __init__(self, home: Path, model: str | None = "tiny-qwen3", **kw) -> None:
        super().__init__(home, model, **kw)


# --- helpers for fault tests (tests/test_faults_daemon.py) ---------------------------------------------------
def spawn_cli(home: Path, *args: str) -> subprocess.Popen:
    """Start a CLI command without waiting (e.g. a `get` to interrupt); read it with `finish_cli`."""
    return subprocess.Popen([sys.executable, "-m", "kvswap", *args, "--home", str(home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_cli(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def chunk_files(home: Path) -> list[Path]:
    """The chunk files in a home's store (kvswap/store.py layout: store/chunks/<cid>)."""
    folder = Path(home) / "store" / "chunks"
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error: ...` lines a failed CLI command printed on stderr (log lines are left out)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]
