"""Real kvswap daemons as subprocesses on 127.0.0.1 for integration tests, driven through the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

#: seconds a daemon may take to write its node.json / load its model
START_TIMEOUT_S = 120.0


def cli(home: Path, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kvswap", *args, "--home", str(home)],
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvswap {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def cli_json(home: Path, *args: str, **kw) -> dict:
    return json.loads(cli(home, *args, "--json", **kw).stdout)


class NodeProc:
    """One `kvswap node start` process with its own home."""

    def __init__(self, home: Path, model: str = "tiny-qwen3", bootstrap: list[str] | None = None,
                 accept_any: bool = False):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "kvswap", "node", "start", "--home", str(self.home), "--model", model]
        if bootstrap:
            args += ["--bootstrap", *bootstrap]
        if accept_any:
            args.append("--accept-any")
        self.log = open(self.home / "stderr.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.info = self._wait_node_file()

    def _wait_node_file(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        path = self.home / "node.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited early: {self.tail()}")
            if path.exists():
                try:
                    info = json.loads(path.read_text())
                except ValueError:
                    info = {}
                if info.get("pid") == self.proc.pid:  # not a stale file left by a killed daemon in this home
                    return info
            time.sleep(0.1)
        raise AssertionError(f"node did not start: {self.tail()}")

    def wait_model(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            status = cli_json(self.home, "node", "status")
            if status.get("model"):
                return status
            assert not status.get("model_error"), status["model_error"]
            time.sleep(0.3)
        raise AssertionError("model did not load")

    @property
    def addr(self) -> str:
        return self.info["addrs"][0]

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    def tail(self) -> str:
        self.log.flush()
        return (self.home / "stderr.log").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
        return self.proc.returncode


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
