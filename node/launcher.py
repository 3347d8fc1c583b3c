"""Start `kvswap node start` as a child process and drive it through the CLI: what `kvswap demo` (and a
script that wants a throwaway testnet on 127.0.0.1) uses. Each node has its own home; nothing is shared.

`prefix` puts a wrapper in front of every command line, e.g. `ip netns exec NS` for a node that lives in
its own network namespace (node/testnet.py): the daemon and the CLI calls that reach its loopback control
API must run in the same namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import KvswapError

#: seconds a child node may take to write node.json, and to load its model
NODE_START_TIMEOUT_S = 300.0


def run_cli(home: Path, *args: str, timeout: float = 900, prefix: Sequence[str] = ()) -> dict:
    """Run one `kvswap ... --json` command against `home`; its JSON result, or its one-line error raised."""
    proc = subprocess.run([*prefix, sys.executable, "-m", "kvswap", *args, "--home", str(home), "--json"],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")] or proc.stderr.strip().splitlines()[-1:]
        raise KvswapError(f"`kvswap {args[0]}` failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout)


class ChildNode:
    """A daemon child process with its own home; stop() sends SIGTERM and waits."""

    def __init__(self, home: Path, model: str, bootstrap: list[str] | None = None, accept_any: bool = False,
                 prefix: Sequence[str] = (), extra_args: Sequence[str] = ()):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.prefix = tuple(prefix)
        argv = [*self.prefix, sys.executable, "-m", "kvswap", "node", "start", "--home", str(self.home),
                "--model", model, *extra_args]
        if bootstrap:
            argv += ["--bootstrap", *bootstrap]
        if accept_any:
            argv.append("--accept-any")
        self._log = open(self.home / "stderr.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.info = self._wait_started()

    def _wait_started(self) -> dict:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KvswapError(f"node in {self.home} exited early; see {self.home / 'stderr.log'}")
            try:
                info = json.loads((self.home / "node.json").read_text())
            except (FileNotFoundError, ValueError):
                info = {}
            if info.get("pid") == self.proc.pid:  # not a stale file left by a killed daemon in this home
                return info
            time.sleep(0.1)
        raise KvswapError(f"node in {self.home} did not start within {NODE_START_TIMEOUT_S:.0f} s")

    def wait_model(self) -> dict:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                status = run_cli(self.home, "node", "status", prefix=self.prefix)
            except KvswapError:  # a daemon busy loading its model may not answer in time: ask again
                if self.proc.poll() is not None:
                    raise KvswapError(f"node in {self.home} exited; see {self.home / 'stderr.log'}") from None
                time.sleep(0.5)
                continue
            if status.get("model"):
                return status
            if status.get("model_error"):
                raise KvswapError(f"node model failed to load: {status['model_error']}")
            time.sleep(0.5)
        raise KvswapError(f"node in {self.home} did not load its model within {NODE_START_TIMEOUT_S:.0f} s")

    @property
    def addr(self) -> str:
        return self.info["addrs"][0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
