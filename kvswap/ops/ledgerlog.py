"""One way to log each kind of work in the home's ledger, whichever way it ran (in this process, or in the
daemon for a local or a peer's request): every prefill, load, generation and audit goes through here."""

from __future__ import annotations

from ..home import Home
from ..protocol.cid import Cid


def _common(engine, cid) -> dict:
    return dict(model=engine.model_id, dtype=engine.dtype, device=engine.device, artifact=str(cid))


def log_prefill(home: Home, engine, result: dict) -> None:
    home.ledger.compute(kind="prefill", seconds=float(result["prefill_s"]), tokens=int(result["n_tokens"]),
                        extra={"raw_bytes": result["raw_size"], "stored_bytes": result["stored_size"]},
                        **_common(engine, result["cid"]))


def log_load(home: Home, engine, cid: Cid, seconds: float, tokens: int, extra: dict | None = None) -> None:
    home.ledger.compute(kind="load", seconds=seconds, tokens=tokens, extra=extra, **_common(engine, cid))


def log_generation(home: Home, engine, cid: Cid, out: dict, kind: str = "generate") -> None:
    """A generation's load and decode, as two events (kind: generate, or hosted_generate for a peer's)."""
    load_s = float(out.get("read_verify_s", 0.0)) + float(out.get("load_s", 0.0))
    log_load(home, engine, cid, load_s, int(out.get("document_tokens", 0)))
    home.ledger.compute(kind=kind, seconds=float(out.get("decode_s", 0.0)), tokens=len(out.get("tokens", [])),
                        extra={"suffix_tokens": out.get("suffix_tokens", 0),
                               "suffix_prefill_s": out.get("prefill_s", 0.0)}, **_common(engine, cid))


def log_audit(home: Home, engine, cid: Cid, result: dict, tokens: int = 0) -> None:
    home.ledger.compute(kind="audit", seconds=result["seconds"], tokens=tokens,
                        extra={"blocks": len(result["blocks"]), "mode": result["mode"]}, **_common(engine, cid))


__all__ = ["log_audit", "log_generation", "log_load", "log_prefill"]
