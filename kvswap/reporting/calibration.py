"""`kvswap report --calibrate`: time this node's own prefill (and one reuse step) when its ledger has none.

Why: a consumer that fetched an artifact never prefilled it, so its ledger holds no prefill timing, and a
node that only published never decoded over the KV; without both the report would have to borrow the paper's
49.7x reuse ratio (Qwen3-4B on an Apple M1 Pro). A calibration measures the missing figure here, with this
node's model, and logs it where every other measurement lives: the ledger.

What it runs (PAPER.md's definitions):
- ONE prefill (or `repeats`) of the artifact's own token ids, in the artifact's block steps, exactly the
  computation its publisher ran; with no manifest in the store (or `tokens` beyond the artifact), of
  synthetic real-vocabulary tokens: the bundled demo document tokenized by this model, repeated to length.
  Logged as a "prefill" compute event with extra {"calibration": true, ...}.
- ONE continuation step over the calibrated KV (Engine.step_time: a single-token forward, load excluded: the
  paper's "one reuse step") after each prefill; logged as a "generate" event of 1 token with extra
  {"calibration": true, ...}. It costs one token's forward, and it is timed even when the ledger has decode
  timings of real work: the report's reuse ratio divides a prefill by a step timed under the same conditions
  (on a shared machine, timings taken minutes apart differ several-fold: measured.py `_reuse_ratio`).
- A short warm-up first, not timed: one prefill block and one single-token step. The first forward of each
  shape in a freshly loaded model pays one-time set-up that a running node does not (the daemon warms up at
  start too); without it the first calibrated step measured 0.039 s against 0.003 s for the next two.

The report uses calibration events only where the ledger has no events of real work, and says so
(measured.py, build.py). The model is the one this node's ledger records for the artifact, else the
artifact's manifest model id, else the engine's default; a model whose fingerprint differs from the
artifact's is refused (it would time another model).
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

from ..protocol.errors import ModelMismatch, UsageError
from ..ledger import Ledger, ledger_path
from .measured import CALIBRATION_KEY, manifest_from_store, measure, only_stored_artifact
from .prices import PAPER_TOKENS

log = logging.getLogger(__name__)

#: fewest tokens of the untimed warm-up before a calibration (it runs one prefill block at least)
WARMUP_TOKENS = 16
#: most calibration repeats one call may ask for (each is a full prefill)
MAX_REPEATS = 20


def synthetic_ids(engine: Any, n: int) -> list[int]:
    """`n` real-vocabulary token ids: the bundled demo document tokenized by `engine`, repeated to length."""
    text = resources.files("kvswap").joinpath("data/demo_document.txt").read_text(encoding="utf-8")
    base = engine.tokenize(text)
    if not base:
        raise UsageError("calibration: the bundled document tokenized to nothing")
    return (base * (n // len(base) + 1))[:n]


def _token_ids(engine: Any, manifest: Any, tokens: int | None, fallback: int) -> tuple[list[int], str]:
    if manifest is not None and (tokens is None or tokens <= manifest.n_tokens):
        n = manifest.n_tokens if tokens is None else tokens
        return list(manifest.token_ids[:n]), "the artifact's own tokens"
    if tokens is None and fallback > engine.max_context:  # a default must fit; a count asked for is checked
        fallback, clamped = engine.max_context, f", clamped to {engine.model_id}'s context window"
    else:
        clamped = ""
    n = tokens or fallback
    return synthetic_ids(engine, n), f"synthetic: the bundled demo document's tokens, repeated{clamped}"


def calibrate(home: str | Path, model: str | None = None, tokens: int | None = None, *, artifact: str | None = None,
              dtype: str | None = None, device: str | None = None, reuse_step: bool = True,
              repeats: int = 1, engine: Any = None) -> dict[str, Any]:
    """Time `repeats` prefills (each followed by one reuse step) on this node and log them to its ledger.

    home: the node's home (must exist). model / dtype / device: default as the module docstring says.
    tokens: prefill this many tokens (default: the artifact's count; with no artifact, the count the ledger's
    load events saw, else the paper's 3774 or the model's context window if smaller). artifact: the CID to
    calibrate for (default: the one the report would pick, else the store's only artifact). reuse_step:
    False skips the one-step timing (the report then pairs the prefill with whatever step timing the ledger
    has, and says the pair is mixed). engine: an already-loaded kvswap Engine to use instead of loading one
    (the caller's daemon or operations layer). Returns what was run and the ledger row ids."""
    home = Path(home)
    if not home.is_dir():
        raise UsageError(f"calibration: no kvswap home at {home}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or not 1 <= repeats <= MAX_REPEATS:
        raise UsageError(f"calibration: repeats must be 1..{MAX_REPEATS}, got {repeats!r}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
        raise UsageError(f"calibration: tokens must be a positive integer, got {tokens!r}")
    if artifact is not None:
        from ..protocol.cid import Cid

        Cid.parse(artifact)  # a typo is a clear FormatError
    with Ledger(ledger_path(home)) as ledger:
        measured = measure(ledger, artifact=artifact, home=home)
        cid = measured.artifact or only_stored_artifact(home)  # a fetch logs no compute event
        manifest = manifest_from_store(home, cid)
        if engine is None:
            from ..engine import load_engine

            name = model or measured.model or (manifest.model_id if manifest is not None else None)
            kind = dtype or (manifest.dtype if manifest is not None else None) or measured.dtype or "bf16"
            log.info("calibration: loading %s (%s)", name or "the default model", kind)
            engine = load_engine(name, dtype=kind, device=device)
        if manifest is not None and (engine.fingerprint != manifest.model_fingerprint or engine.dtype != manifest.dtype):
            raise ModelMismatch(
                f"calibration: artifact {cid} was made by {manifest.model_id} {manifest.dtype} "
                f"(fingerprint {manifest.model_fingerprint[:16]}); {engine.model_id} {engine.dtype} "
                f"({engine.fingerprint[:16]}) would time another model: pass --model {manifest.model_id}")
        fallback = int(round(measured.load_tokens)) if measured.load_tokens else PAPER_TOKENS
        ids, token_source = _token_ids(engine, manifest, tokens, fallback)
        block = manifest.block_tokens if manifest is not None else engine.prefill_step

        warm = engine.prefill(ids[:max(WARMUP_TOKENS, block)], step=block)  # untimed: a fresh model's one-time
        if reuse_step:                                                        # set-up, for both shapes of forward
            engine.step_time(warm)
        common = dict(model=engine.model_id, dtype=engine.dtype, device=engine.device, artifact=cid)
        runs = []
        for run in range(1, repeats + 1):
            kv = engine.prefill(ids, step=block)
            prefill_s = float(kv.meta["prefill_s"])
            extra = {CALIBRATION_KEY: True, "tokens_from": token_source, "prefill_step": block,
                     "run": run, "of": repeats, "command": "kvswap report --calibrate"}
            entry: dict[str, Any] = {"prefill_s": prefill_s, "prefill_event": ledger.compute(
                kind="prefill", seconds=prefill_s, tokens=len(ids), extra=extra, **common)}
            if reuse_step:
                step_s = float(engine.step_time(kv))
                entry["step_s"] = step_s
                entry["step_event"] = ledger.compute(
                    kind="generate", seconds=step_s, tokens=1, extra={
                        CALIBRATION_KEY: True, "what": "one continuation step over the calibrated KV",
                        "run": run, "of": repeats, "command": "kvswap report --calibrate"}, **common)
            runs.append(entry)
            log.info("calibration run %d/%d: prefill of %d tokens %.4g s%s", run, repeats, len(ids), prefill_s,
                     f", one reuse step {entry['step_s']:.4g} s" if reuse_step else "")
    return {
        "artifact": cid, "model": engine.model_id, "dtype": engine.dtype, "device": engine.device,
        "tokens": len(ids), "tokens_from": token_source, "prefill_step": block, "repeats": repeats,
        "reuse_step": bool(reuse_step), "runs": runs, "ledger": str(ledger_path(home)),
    }
