"""Audit: does an artifact's KV follow from its tokens? Recompute sampled blocks and compare.

Signatures prove who published an artifact and CIDs that its bytes are unchanged; neither proves that the KV
is what the model computes for the tokens. An audit recomputes block i over the artifact's OWN stored KV of
the blocks before it (kvswap/engine/audit.py) and compares with the stored block. If every block agrees with
its stored prefix, the whole KV follows from the tokens by induction; sampling k of n blocks uniformly catches
a publisher who poisoned m blocks with probability 1 - C(n-m, k) / C(n, k) (`detection_bound`). The last block
is always audited too (it carries the last position's logits, which choose the first generated token); the
bound counts only the uniform sample.

The mode (`choose_mode`): exact when the auditor's compute identity (kvswap/engine/identity.py: device,
instruction set, torch, attention, threads) equals the one the artifact declares in its manifest. kvswap
publishes block-aligned, so the recomputation is then the same computation and an honest artifact is exact
in every block: any differing bit is a poisoning, however small. Otherwise (another machine kind, or an
artifact that declares none) the mode is tolerance. `--exact` / `--tolerance` force a mode.

Verdicts, per block:
- exact mode: the recomputed K/V (and logits) must be the stored bits;
- tolerance mode: every layer's relative RMS difference must be within TOLERANCE[dtype] (what another CPU
  instruction set, thread count or device honestly produces; SECURITY.md has the figures, and the smallest
  poisoning each mode catches);
- failed: anything else, reported with the block, layer and measured difference.

No torch here: the engine does the recomputation; this module samples, judges, bounds and attests.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from ..modes import AuditMode
from ..protocol.errors import AuditFailed, UsageError

#: relative RMS difference (per layer, K or V; and max |logit diff| / max |logit| for the tail) an honest
#: recomputation may show per dtype, with a margin over the worst measured (SECURITY.md "Audit tolerances"):
#: bf16 0.0183 and fp16 0.0024 (SmolLM2-135M, monolithic artifact recomputed block by block on the build CPU),
#: fp32 1.4e-6; block-aligned artifacts on the same machine kind measure 0.
TOLERANCE = {"bf16": 0.05, "fp16": 0.01, "fp32": 1e-4}
#: fraction of blocks `kvswap audit` samples when neither --fraction, --blocks nor --full is given
DEFAULT_AUDIT_FRACTION = 0.05


#: the most intra-op threads an audit switches to in order to reproduce a publisher's count
MAX_AUDIT_THREADS = 256


def threads_to_match(declared: dict | None, here: dict) -> int | None:
    """The publisher's CPU thread count when it differs from this engine's: the audit runs with it, so the
    recomputation stays the same computation (None: nothing to change)."""
    if not declared or here.get("device") != "cpu" or declared.get("device") != "cpu":
        return None
    want = declared.get("threads", "")
    if not want.isdigit() or want == here.get("threads") or not 0 < int(want) <= MAX_AUDIT_THREADS:
        return None
    return int(want)


def choose_mode(asked: AuditMode, declared: dict | None, here: dict) -> tuple[AuditMode, str]:
    """(the mode to audit in, why). `declared` is the compute identity the artifact's manifest records (None
    for one that records none), `here` the auditing engine's."""
    if asked is not AuditMode.AUTO:
        return asked, f"{asked.value} mode was asked for"
    if not declared:
        return AuditMode.TOLERANCE, "the artifact declares no compute identity"
    differ = sorted(k for k in set(declared) | set(here) if declared.get(k) != here.get(k))
    if differ:
        shown = ", ".join(f"{k} {declared.get(k)!s:.24} vs {here.get(k)!s:.24} here" for k in differ[:3])
        return AuditMode.TOLERANCE, f"another computation made it ({shown})"
    return AuditMode.EXACT, "the same computation made it (compute identities match)"


def choose_blocks(n_blocks: int, *, fraction: float | None = None, blocks: int | None = None, full: bool = False,
                  seed: int | None = None) -> tuple[list[int], int]:
    """(blocks to audit in order, k = how many of them were drawn uniformly). The last block is added when the
    draw missed it. `seed` makes the draw repeatable; without one it is random."""
    if n_blocks <= 0:
        raise UsageError("the artifact has no blocks")
    if full:
        return list(range(n_blocks)), n_blocks
    if blocks is not None and fraction is not None:
        raise UsageError("give --fraction or --blocks, not both")
    if blocks is not None:
        if blocks < 1:
            raise UsageError("--blocks must be at least 1")
        k = min(blocks, n_blocks)
    else:
        f = DEFAULT_AUDIT_FRACTION if fraction is None else fraction
        if not 0 < f <= 1:
            raise UsageError("--fraction must be in (0, 1]")
        k = min(n_blocks, max(1, math.ceil(f * n_blocks)))
    drawn = sorted(random.Random(seed).sample(range(n_blocks), k))
    if drawn[-1] != n_blocks - 1:
        drawn.append(n_blocks - 1)
    return drawn, k


def detection_bound(n_blocks: int, k: int, poisoned: int) -> float:
    """P(at least one of `poisoned` blocks is among k drawn uniformly without replacement from n_blocks)."""
    poisoned = max(0, min(poisoned, n_blocks))
    if poisoned == 0:
        return 0.0
    if k >= n_blocks - poisoned + 1:
        return 1.0
    return 1.0 - math.comb(n_blocks - poisoned, k) / math.comb(n_blocks, k)


def bounds(n_blocks: int, k: int) -> dict[str, float]:
    """The detection bound for a few poisoned fractions: one block, 5%, 10%, 25% of the blocks."""
    out = {"1 block": detection_bound(n_blocks, k, 1)}
    for p in (0.05, 0.10, 0.25):
        out[f"{p:.0%} of blocks"] = detection_bound(n_blocks, k, max(1, math.ceil(p * n_blocks)))
    return out


@dataclass
class AuditResult:
    cid: str
    dtype: str
    engine: str  # model fingerprint of the auditing engine
    device: str
    n_blocks: int
    drawn: int
    blocks: list[int]
    mode: str = AuditMode.TOLERANCE.value  # the mode used (AuditMode)
    why: str = ""  # why that mode (choose_mode)
    checks: list[dict] = field(default_factory=list)
    exact: bool = True  # every audited block bit-equal (in either mode)
    passed: bool = True
    failure: str | None = None
    max_rel: float = 0.0
    seconds: float = 0.0
    bounds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def judge(check, dtype: str, mode: AuditMode) -> str | None:
    """None when a block passes in `mode`, else the one-line reason it fails."""
    worst, layer, kind = check.worst
    require_exact = mode is AuditMode.EXACT
    limit = 0.0 if require_exact else TOLERANCE[dtype]
    span = f"block {check.index} (tokens {check.t0}-{check.t1})"
    if not check.exact and worst > limit:
        return (f"{span} does not follow from its tokens: layer {layer} {kind} differs by {worst:.3g} "
                f"(relative RMS; {'exact audit' if require_exact else f'{dtype} tolerance {limit:g}'})")
    if check.tail_rel is not None and not check.tail_exact and check.tail_rel > limit:
        return (f"{span}: the stored last-position logits differ from the recomputed ones by {check.tail_rel:.3g} "
                f"(relative max; {'exact audit' if require_exact else f'{dtype} tolerance {limit:g}'})")
    return None


def run_audit(engine, loaded, manifest, blocks: list[int], drawn: int, mode: AuditMode = AuditMode.TOLERANCE,
              why: str = "") -> AuditResult:
    """Recompute `blocks` of the artifact whose verified KV is `loaded` (the whole artifact, on the engine's
    device) and judge each in `mode` (EXACT or TOLERANCE; `choose_mode` decides). Raises AuditFailed with the
    first failure's line; returns the result otherwise."""
    if mode is AuditMode.AUTO:
        raise UsageError("run_audit takes a decided mode (choose_mode)")
    from ..engine.audit import check_block

    t_start = time.perf_counter()
    result = AuditResult(str(manifest.cid), manifest.dtype, engine.fingerprint, engine.device,
                         len(manifest.chunks), drawn, list(blocks), mode=mode.value, why=why,
                         bounds=bounds(len(manifest.chunks), drawn))
    for i in blocks:
        chunk = manifest.chunks[i]
        check = check_block(engine, loaded, i, chunk.t0, chunk.t1)
        worst, layer, kind = check.worst
        result.checks.append({"block": i, "t0": chunk.t0, "t1": chunk.t1, "exact": check.exact,
                              "max_rel": worst, "layer": layer, "kind": kind, "tail_rel": check.tail_rel})
        result.exact = result.exact and check.exact and check.tail_exact is not False
        result.max_rel = max(result.max_rel, worst, check.tail_rel or 0.0)
        reason = judge(check, manifest.dtype, mode)
        if reason is not None:
            result.passed, result.failure = False, reason
            result.seconds = time.perf_counter() - t_start
            raise AuditFailed(reason, result=result)
    result.seconds = time.perf_counter() - t_start
    return result


__all__ = ["DEFAULT_AUDIT_FRACTION", "TOLERANCE", "AuditResult", "bounds", "choose_blocks", "detection_bound",
           "choose_mode", "judge", "run_audit", "threads_to_match"]
