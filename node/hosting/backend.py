"""What a hosted-generation backend is: one typed job in, one typed result out, a capacity, a lifecycle.

    backend = for_mode(HostBackend.VLLM, ...)        # node/hosting/__init__.py
    group.create_task(backend.run())                 # engine: returns at once; vllm: starts and supervises
    result = await backend.generate(HostedJob(cid, suffix_ids, max_new_tokens, seed))   # on the daemon's loop
    backend.capacity                                 # generations at once: the generate protocol's slots
    backend.status()                                 # for `kvswap node status`
    await backend.stop()

Both backends keep the same contract (issue 28): the artifact is this node's, complete and for its model;
greedy tokens are the engine's; every generation is one `hosted_generate` row in the home's ledger; when the
backend cannot serve (a vLLM server starting or restarting) the request is refused with `Busy` and a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import ModelMismatch


@dataclass(frozen=True)
class HostedJob:
    """One hosted generation: the artifact (the document's KV), the question's token ids, how many tokens.
    Greedy without a seed; with one, sampled at `temperature` (the generate protocol's rule: T = 1)."""

    cid: Cid
    suffix_ids: tuple[int, ...]
    max_new_tokens: int
    seed: int | None = None
    temperature: float = 1.0
    #: who asked: a peer id (over libp2p) or "local" (the OpenAI door), for the log
    origin: str = "local"


@dataclass(frozen=True)
class HostedResult:
    tokens: tuple[int, ...]
    text: str
    backend: str
    document_tokens: int
    suffix_tokens: int
    #: seconds from the backend taking the job to its first token (includes a load of the document's KV)
    ttft_s: float
    #: seconds from the backend taking the job to its last token
    total_s: float
    #: seconds reading and verifying the document's KV (engine; vLLM's connector logs its own load row)
    load_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    #: prompt tokens vLLM did not compute (loaded through the connector, or in its prefix cache); engine: all
    cached_tokens: int = 0
    finish_reason: str = "length"

    def timings(self) -> tuple[tuple[str, float], ...]:
        """What travels back in GenerateResponse.timings (names the engine backend always sent come first)."""
        return (("load_s", self.load_s), ("prefill_s", self.prefill_s), ("decode_s", self.decode_s),
                ("ttft_s", self.ttft_s), ("total_s", self.total_s))

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "text": self.text, "backend": self.backend,
                "document_tokens": self.document_tokens, "suffix_tokens": self.suffix_tokens,
                "cached_tokens": self.cached_tokens, "finish_reason": self.finish_reason,
                "timings": dict(self.timings())}


class Backend(Protocol):
    name: str
    #: generations this backend runs at once
    capacity: int

    async def run(self) -> None: ...

    async def generate(self, job: HostedJob) -> HostedResult: ...

    def status(self) -> dict: ...

    async def stop(self) -> None: ...


def check_hostable(manifest: Any, engine: Any) -> None:
    """ModelMismatch unless `manifest` is for the model and dtype this node hosts (its engine's identity:
    the vLLM server serves the same folder, whose fingerprint the connector computes the same way)."""
    if manifest.model_fingerprint != engine.fingerprint or manifest.dtype != engine.dtype:
        raise ModelMismatch(f"artifact is for model {manifest.model_fingerprint[:12]} ({manifest.dtype}); this host "
                            f"runs {engine.model_id} ({engine.fingerprint[:12]}, {engine.dtype})")


__all__ = ["Backend", "HostedJob", "HostedResult", "check_hostable"]
