"""Many agents asking one host at once: each a real libp2p host with its own identity (kvswap's P2PHost and
the exchange's client side, serving nothing), all in one trio loop in this process, so N agents cost N
libp2p hosts and no N daemons. Used by bench/hosted.py and tests/vllm_connector/test_hosting.py.

    runs = ask_at_once(host_addr, cid, [suffix_ids, ...], max_new_tokens=32)
    runs[i].tokens, runs[i].latency_s, runs[i].timings["ttft_s"], runs[i].host_interval()   # per agent

Every agent connects first; then all requests start together (a trio.Event), and each agent's send and
answer times are taken on this process's clock.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import trio

from kvswap.node.exchange import Exchange
from kvswap.node.p2p import P2PConfig, P2PHost
from kvswap.protocol.cid import Cid
from kvswap.protocol.messages import GenerateRequest


@dataclass
class AgentRun:
    index: int
    sent: float = 0.0  # time.perf_counter() when the request was written
    answered: float = 0.0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    timings: dict = field(default_factory=dict)  # the host's (node/hosting/backend.py HostedResult.timings)
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.answered - self.sent

    def host_interval(self) -> tuple[float, float]:
        """When the host's backend worked on it, on this process's clock: it ended when the answer came back
        (less the return trip, ~ms on loopback) and began `total_s` earlier."""
        return self.answered - float(self.timings.get("total_s", 0.0)), self.answered

    def ttft_s(self) -> float:
        """From the agent's send to the host's first token: the whole wait, less what the host spent after its
        first token (there is no streaming over the generate protocol, so this is as close as an agent sees)."""
        after_first = float(self.timings.get("total_s", 0.0)) - float(self.timings.get("ttft_s", 0.0))
        return self.latency_s - after_first


def ask_at_once(host_addr: str, cid: Cid | str, suffixes: Sequence[Sequence[int]], max_new_tokens: int,
                seed: int | None = None, timeout_s: float = 900.0) -> list[AgentRun]:
    """One agent per suffix, all asking `host_addr` (a multiaddr ending in /p2p/<peer id>) at once."""
    cid = Cid.parse(str(cid))
    peer = host_addr.rsplit("/p2p/", 1)[1]
    runs = [AgentRun(i) for i in range(len(suffixes))]

    async def main() -> None:
        go = trio.Event()
        connected = [trio.Event() for _ in suffixes]

        async def agent(i: int) -> None:
            p2p = P2PHost(P2PConfig(seed=os.urandom(32)))
            exchange = Exchange(p2p, service=None)
            async with trio.open_nursery() as inner:
                await inner.start(p2p.run)
                try:
                    await p2p.connect(host_addr)
                    connected[i].set()
                    await go.wait()
                    runs[i].sent = time.perf_counter()
                    try:
                        resp = await exchange.remote_generate(
                            peer, GenerateRequest(cid, tuple(suffixes[i]), max_new_tokens, seed))
                        runs[i].tokens, runs[i].text, runs[i].timings = list(resp.tokens), resp.text, dict(resp.timings)
                    except Exception as exc:  # boundary: one agent's outcome, reported with the others
                        runs[i].error = f"{type(exc).__name__}: {exc}"
                    runs[i].answered = time.perf_counter()
                finally:
                    connected[i].set()
                    inner.cancel_scope.cancel()

        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                for i in range(len(suffixes)):
                    nursery.start_soon(agent, i)
                for ev in connected:
                    await ev.wait()
                go.set()

    trio.run(main)
    return runs


__all__ = ["AgentRun", "ask_at_once"]
