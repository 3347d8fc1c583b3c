"""The modes a caller chooses, as typed values checked once where they enter (a flag, a JSON body, a setting).

Each is a `StrEnum`, so it prints, compares and serialises as the word a user types ("sha256" == Verify.SHA256),
while code past the entry point holds a member, never a free string that each reader would interpret in its
own way (a loader once treated any verify value other than "sha256" as "no check").

    Verify.parse("blake3", "--verify")   # Verify.BLAKE3; UsageError naming the choices otherwise
"""

from __future__ import annotations

from enum import StrEnum

from .protocol.errors import UsageError


class _Mode(StrEnum):
    @classmethod
    def parse(cls, value: object, what: str = "mode"):
        """The member named `value` (a member passes through); UsageError with the choices otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value))
        except ValueError:
            raise UsageError(f"{what}: unknown value {str(value)!r:.40} (choose {', '.join(cls.choices())})") from None

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Verify(_Mode):
    """What a local load checks (SECURITY.md, "Loading from the local store")."""

    #: the keyed BLAKE3 record written when the chunk was verified against its CID (the default)
    BLAKE3 = "blake3"
    #: every byte's sha256 against the chunk's CID (or a raw form's recorded digest): the previous default
    SHA256 = "sha256"
    #: trust what was verified when it arrived (trusted disks; measuring what the check costs)
    NONE = "none"


class Dtype(_Mode):
    """The KV dtype of an engine and an artifact."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class DecodeMode(_Mode):
    """How the engine runs one decode step (kvswap/engine/decoding.py)."""

    EAGER = "eager"
    STATIC = "static"
    #: static cache + CUDA graphs (CUDA only), compiled once at start
    COMPILED = "compiled"


class AuditMode(_Mode):
    """How an audit judges a recomputed block (kvswap/artifact/audit.py)."""

    #: exact when this machine's compute identity is the artifact's, tolerance otherwise (the default)
    AUTO = "auto"
    #: every recomputed bit must equal the stored one
    EXACT = "exact"
    #: a relative difference within the dtype's tolerance passes
    TOLERANCE = "tolerance"


class SwarmMode(_Mode):
    """How a node shares its uploads in a swarm (NETWORK.md, "Swarm"; node/uploads.py, node/ration.py)."""

    #: upload slots, super-seeding (a chunk's next copy only after its last one completed), progress-based
    #: timeouts (the default)
    SUPERSEED = "superseed"
    #: the rule before issue 24 (no upload slots, patience from the refusal, 60 s per chunk), kept measurable
    LEGACY = "legacy"


class HostBackend(_Mode):
    """What serves the hosted generations a node answers (node/hosting/; docs/vllm.md, "Hosting")."""

    #: kvswap's transformers engine, one generation at a time (the default)
    ENGINE = "engine"
    #: a vLLM OpenAI server the daemon starts in the vLLM venv, with the kvswap connector on the node's home:
    #: continuous batching over one paged copy of the document's KV
    VLLM = "vllm"


__all__ = ["AuditMode", "DecodeMode", "Dtype", "HostBackend", "SwarmMode", "Verify"]
