"""Start `kvswap node start` as a child process and drive it through the CLI: the one daemon starter, used by
`kvswap demo`, the tests (bench/harness/nodes.py), the benchmarks and the namespace testnet (bench/harness/netns.py). Each node has its own home; nothing is shared.

`prefix` puts a wrapper in front of every command line, e.g. `ip netns exec NS` for a node that lives in
its own network namespace (bench/harness/netns.py): the daemon and the CLI calls that reach its loopback control
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

from ..protocol.errors import KvswapError

#: Seconds a child daemon may take to write its node.json, and again to load its model.
NODE_START_TIMEOUT_S = 300.0
#: Seconds a child daemon gets to exit after SIGTERM before it is killed (it cleans up within its shutdown timeout).
NODE_STOP_TIMEOUT_S = 30.0


def run_cli(home: Path, *args: str, timeout: float = 900, prefix: Sequence[str] = ()) -> dict:
    """Run one `kvswap ... --json` command against `home`; its JSON result, or its one-line error raised."""
    proc = subprocess.run([*prefix, sys.executable, "-m", "kvswap", *args, "--home", str(home), "--json"],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")] or proc.stderr.strip().splitlines()[-1:]
        raise KvswapError(f"`kvswap {args[0]}` failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout)


class ChildNode:
    """A daemon child process with its own home. It is up once its node.json (written by this very process,
    not a stale one a killed daemon left) is there; `wait_model()` waits for its model too. stop() sends
    SIGTERM and waits; kill() is SIGKILL (a crash, for fault tests). stdout and stderr go to
    <home>/stderr.log (`tail()`)."""

    def __init__(self, home: Path, model: str | None, bootstrap: list[str] | None = None, accept_any: bool = False,
                 start_timeout: float = NODE_START_TIMEOUT_S, listen: str = "/ip4/127.0.0.1/tcp/0",
                 prefix: Sequence[str] = (), extra_args: Sequence[str] = ()):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.prefix = tuple(prefix)
        argv = [*self.prefix, sys.executable, "-m", "kvswap", "node", "start", "--home", str(self.home),
                *(("--model", model) if model else ("--no-model",)), *extra_args]  # None: a light node
        if "--listen" not in extra_args:  # any free port: children share one machine, a fixed port would collide
            argv += ["--listen", listen]
        if bootstrap:
            argv += ["--bootstrap", *bootstrap]
        if accept_any:
            argv.append("--accept-any")
        self.log = open(self.home / "stderr.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.info = self._wait_started()

    def _wait_started(self) -> dict:
        deadline = time.monotonic() + self.start_timeout
        path = self.home / "node.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise KvswapError(f"node in {self.home} exited early ({self.proc.returncode}): {self.tail(1000)}")
            try:
                info = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):  # not written yet, or being written
                info = {}
            if info.get("pid") == self.proc.pid:  # not a stale file left by a killed daemon in this home
                return info
            time.sleep(0.1)
        raise KvswapError(f"node in {self.home} did not start within {self.start_timeout:.0f} s: {self.tail(1000)}")

    def wait_model(self) -> dict:
        deadline = time.monotonic() + self.start_timeout
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
            time.sleep(0.3)
        raise KvswapError(f"node in {self.home} did not load its model within {self.start_timeout:.0f} s")

    @property
    def addr(self) -> str:
        return self.info["addrs"][0]

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    def tail(self, nbytes: int = 3000) -> str:
        """The end of the node's stdout/stderr log."""
        if not self.log.closed:
            self.log.flush()
        return (self.home / "stderr.log").read_text(errors="replace")[-nbytes:]

    def kill(self) -> None:
        """SIGKILL: the node dies without cleaning up (node.json stays, as after a crash)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        """SIGTERM and wait (SIGKILL after NODE_STOP_TIMEOUT_S); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(NODE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode
