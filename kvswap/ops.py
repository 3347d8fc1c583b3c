"""The operations layer: publish, get, generate, load a cache, audit, over a `Home`. The CLI's commands, the
daemon's control-API routes and Python users all run these, so each rule lives once:

- where work runs (`_node_for`): through the daemon running in the home when there is one (its resident model
  is used, new artifacts are announced, fetches need it), else in this process; a `model` other than the one
  the daemon runs is an error naming both, never a silent switch;
- what is logged: every prefill, load and generate runs through `_log_*` into the home's ledger, whichever
  way it runs (the daemon logs the work it does itself);
- what a source is (`Source.of`): an artifact CID, a document (a file path or `Document(text)`), or a
  document hash; a given document is always bound to the artifact (artifact/service.py `check_document`).

Python users call these through `kvswap` (`kvswap.load_cache`, `kvswap.publish`, ...): see README "Python".
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .cid import Cid
from .document import Document
from .errors import FormatError, ModelMismatch, NotFound, UsageError
from .home import Home, as_home
from .protocol.limits import DEFAULT_BLOCK_TOKENS

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# --- sources and models ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """What a caller names: an artifact by CID, or a document (its text, or only its hash)."""

    cid: Cid | None = None
    document: Document | None = None
    document_hash: str | None = None

    @classmethod
    def of(cls, source: Any) -> "Source":
        if isinstance(source, Source):
            return source
        if isinstance(source, Cid):
            return cls(cid=source)
        if isinstance(source, Document):
            return cls(document=source, document_hash=source.hash)
        if isinstance(source, Path):
            doc = Document.read(source)
            return cls(document=doc, document_hash=doc.hash)
        if isinstance(source, str):
            try:
                return cls(cid=Cid.parse(source))
            except FormatError:
                pass
            if _HEX64.match(source.lower()):
                return cls(document_hash=source.lower())
            if Path(source).expanduser().exists():
                return cls.of(Path(source).expanduser())
            raise UsageError(f"{source!r:.80} is neither a CID, a document hash nor an existing file "
                             "(wrap a document's text as kvswap.Document(text))")
        raise UsageError(f"cannot use {type(source).__name__} as a source: give a CID, a path, "
                         "kvswap.Document(text) or a document hash")


def engine_for(model: Any = None, dtype: str | None = None, *, device: str | None = None,
               decode: str = "eager"):
    """An Engine for `model`: a built-in name, a hub id or folder, None (the default model), an Engine, or a
    transformers model together with its tokenizer as `(model, tokenizer)`."""
    from .engine import Engine, load_engine

    if isinstance(model, Engine):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        from .engine.models import engine_from_model

        engine = engine_from_model(*model)
        engine.set_decode_mode(decode)
        return engine
    if model is not None and not isinstance(model, (str, Path)):
        raise UsageError("model must be a name, a hub id, a folder, an Engine, or (transformers model, tokenizer)")
    return load_engine(str(model) if model is not None else None, dtype=dtype or "bf16", device=device,
                       decode=decode)


def _node_for(home: Home, model: Any = None):
    """THE place that decides where work runs: the daemon's client when one runs in this home (and `model`, if
    given by name, is the one it runs), else None (in this process)."""
    client = home.node()
    if client is None or model is None:
        return client
    if not isinstance(model, (str, Path)):
        return None  # a model object the caller loaded runs here, not in the daemon
    status = client.get("/status")
    running = status.get("model")
    if running and str(model) != running and Path(str(model)).expanduser().resolve().as_posix() != running:
        raise ModelMismatch(f"--model {model} was asked for, but the node running in {home.path} serves {running}; "
                            f"stop it (`kvswap node stop`) or leave --model out")
    return client


# --- ledger: one way to log, whichever way the work ran ------------------------------------------------------
def _log_prefill(home: Home, engine, result: dict) -> None:
    home.ledger.compute(kind="prefill", seconds=float(result["prefill_s"]), tokens=int(result["n_tokens"]),
                        model=engine.model_id, dtype=engine.dtype, device=engine.device, artifact=result["cid"],
                        extra={"raw_bytes": result["raw_size"], "stored_bytes": result["stored_size"]})


def _log_generation(home: Home, engine, cid: Cid, out: dict, kind: str = "generate") -> None:
    common = dict(model=engine.model_id, dtype=engine.dtype, device=engine.device, artifact=str(cid))
    load_s = float(out.get("read_verify_s", 0.0)) + float(out.get("load_s", 0.0))
    home.ledger.compute(kind="load", seconds=load_s, tokens=int(out.get("document_tokens", 0)), **common)
    home.ledger.compute(kind=kind, seconds=float(out.get("decode_s", 0.0)), tokens=len(out.get("tokens", [])),
                        extra={"suffix_tokens": out.get("suffix_tokens", 0),
                               "suffix_prefill_s": out.get("prefill_s", 0.0)}, **common)


# --- publish -------------------------------------------------------------------------------------------------
def publish_here(home: Home, engine, document: Document, *, codec: str = "auto",
                 block_tokens: int = DEFAULT_BLOCK_TOKENS, progress: Callable[[dict], None] | None = None) -> dict:
    """Prefill, chunk, compress, sign and store `document` with `engine` in this process; logs the prefill.
    `progress({"stage": "prefill", "tokens": done, "tokens_total": n})` after each prefill block."""
    from .artifact.service import publish_document

    def tokens(done: int, total: int) -> None:
        progress({"stage": "prefill", "tokens": done, "tokens_total": total})

    result = publish_document(engine, home.store, home.key, document, codec=codec, block_tokens=block_tokens,
                              progress=tokens if progress is not None else None)
    _log_prefill(home, engine, result)
    return result


def publish(document: Document | str | Path, *, home: Home | str | Path | None = None, model: Any = None,
            dtype: str | None = None, codec: str = "auto", block_tokens: int = DEFAULT_BLOCK_TOKENS,
            progress: Callable[[dict], None] | None = None) -> dict:
    """Publish a document (a path or Document): through the running node (which also provides and announces
    it), else in this process. Returns the artifact's summary (cid, document_hash, n_tokens, sizes, ...)."""
    h, owned = as_home(home)
    try:
        doc = document if isinstance(document, Document) else Document.read(document)
        client = _node_for(h, model)
        if client is not None:
            from .node.client import wait_job

            job = client.post("/publish", {"text": doc.text, "codec": codec, "block_tokens": block_tokens})
            return wait_job(client, job["id"], progress=progress)
        engine = engine_for(model, dtype or h.config["node.dtype"])
        return publish_here(h, engine, doc, codec=codec, block_tokens=block_tokens, progress=progress)
    finally:
        if owned:
            h.close()


# --- get -----------------------------------------------------------------------------------------------------
def get(source: Any, *, home: Home | str | Path | None = None, n_tokens: int | None = None,
        accept_any: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    """Fetch an artifact (by CID, document or document hash) from the network into the home's store, through the
    node running there (the network lives in the daemon). A given document is bound to the artifact."""
    h, owned = as_home(home)
    try:
        src = Source.of(source)
        client = h.node()
        if client is None:
            raise NotFound(f"no node is running in {h.path}: fetching needs one (`kvswap node start --home {h.path}`)")
        body: dict = {"tokens": n_tokens, "accept_any": accept_any}
        if src.cid is not None:
            body["cid"] = str(src.cid)
        else:
            body["document_hash"] = src.document_hash
            if src.document is not None:
                body["document"] = src.document.text
        from .node.client import wait_job

        job = client.post("/get", body)
        return wait_job(client, job["id"], progress=progress, cancel_on_interrupt=True)
    finally:
        if owned:
            h.close()


# --- generate ------------------------------------------------------------------------------------------------
def resolve(home: Home, engine, src: Source) -> Cid:
    """The stored artifact a source names: its CID, or the newest complete artifact of the document for this
    engine's model."""
    if src.cid is not None:
        return src.cid
    found = home.store.find_by_document(engine.fingerprint, src.document_hash, complete_only=True)
    if not found:
        raise NotFound(f"no complete artifact of document {src.document_hash[:12]} for {engine.model_id} in "
                       f"{home.path} (publish it, or fetch it with `kvswap get --doc FILE`)")
    return found[0]


def generate(source: Any, prompt: str = "", *, home: Home | str | Path | None = None, model: Any = None,
             dtype: str | None = None, max_new_tokens: int = 24, seed: int | None = None, temperature: float = 1.0,
             host: str | None = None, decode: str = "eager", accept_any: bool = False) -> dict:
    """Generate after a stored artifact (ship), or ask `host` to generate from its copy (host mode). Through the
    running node when there is one (host mode needs it), else in this process with `model` (default: the
    artifact's own model)."""
    h, owned = as_home(home)
    try:
        src = Source.of(source)
        client = _node_for(h, model)
        if host and client is None:
            raise UsageError("hosted generation (--host) needs a running node in this home (`kvswap node start`)")
        if client is not None:
            body: dict = {"prompt": prompt, "max_new_tokens": max_new_tokens, "host": host, "seed": seed,
                          "temperature": temperature}
            if src.cid is not None:
                body["cid"] = str(src.cid)
            else:
                body["document_hash"] = src.document_hash
                if src.document is not None:
                    body["document"] = src.document.text
            return client.post("/generate", body, timeout=600)
        from .artifact.service import generate_from_store

        if model is None and src.cid is not None:
            manifest = h.store.get_manifest(src.cid)
            engine = engine_for(manifest.model_id, dtype or manifest.dtype, decode=decode)
        else:
            engine = engine_for(model, dtype or h.config["node.dtype"], decode=decode)
        cid = resolve(h, engine, src)
        out = generate_from_store(engine, h.store, cid, prompt, max_new_tokens, policy=h.policy(accept_any or None),
                                  seed=seed, document=src.document, temperature=temperature)
        _log_generation(h, engine, cid, out)
        out["mode"] = "local"
        return out
    finally:
        if owned:
            h.close()


# --- load_cache: the Python entry point -------------------------------------------------------------------------
@dataclass
class LoadedCache:
    """A verified, trust-checked artifact loaded into a fresh `transformers.DynamicCache`.

    `cache` holds the KV of `token_ids` (the document; never re-tokenize it). Continue with
    `model.generate(**loaded.inputs(suffix_ids), max_new_tokens=...)`, which passes the document's ids plus your
    suffix's, an attention mask over both, and the cache (under the keyword this transformers version takes); or, without a suffix, take the first token from
    `last_logits` (the artifact's stored logits at the last document position). A cache is grown in place by
    generation: call `fresh_cache()` for each new generation."""

    cid: Cid
    token_ids: list[int]
    last_logits: np.ndarray | None
    cache: Any
    engine: Any = field(repr=False, default=None)
    loaded: Any = field(repr=False, default=None)
    load_s: float = 0.0

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def fresh_cache(self):
        """A new DynamicCache over the same loaded KV (no copy, no re-read)."""
        from .engine.kvload import cache_from_loaded

        return cache_from_loaded(self.engine.model.config, self.loaded)

    def inputs(self, suffix_ids: list[int], cache: Any = None) -> dict:
        """Keyword arguments for `model.generate`: the document's ids + `suffix_ids`, their attention mask, and
        the cache (this one, or the one given). The suffix must hold at least one token."""
        import torch

        if not suffix_ids:
            raise UsageError("give at least one suffix token (without one, the first token is argmax(last_logits))")
        ids = torch.tensor([list(self.token_ids) + list(suffix_ids)], dtype=torch.long, device=self.engine.device)
        # the cache's keyword as this transformers version spells it (`cache` from 5.2x, `past_key_values` before)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                self.engine._cache_kwarg: self.cache if cache is None else cache}


def load_cache(source: Any, *, model: Any, home: Home | str | Path | None = None, device: str | None = None,
               n_tokens: int | None = None, accept_any: bool = False, dtype: str | None = None) -> LoadedCache:
    """One call from a document or CID to a verified `DynamicCache` for your model.

    `source`: an artifact CID (Cid or string), a path to the document's file, `kvswap.Document(text)`, or a
    document hash. `model`: a built-in name, a hub id or folder, or `(transformers_model, tokenizer)` you
    loaded. The artifact comes from the home's store (fetch it first with `kvswap.get` when it is not there);
    every chunk is verified against its CID, the signatures against the home's trust policy, and a given
    document is checked to hash and tokenize to the artifact's document and tokens. The load is logged in the
    home's ledger. Raises NotFound, ModelMismatch, IntegrityError (UntrustedSigner), UsageError."""
    from .artifact.service import check_document, check_trust, load_artifact
    from .engine.kvload import cache_from_loaded

    h, owned = as_home(home)
    try:
        src = Source.of(source)
        engine = engine_for(model, dtype, device=device)
        cid = resolve(h, engine, src)
        manifest = h.store.get_manifest(cid)
        check_trust(h.store, manifest, h.policy(accept_any or None))
        if src.document is not None:
            check_document(engine, manifest, src.document)
        missing = h.store.missing_chunks(cid)
        if missing and (n_tokens is None or any(c.cid in missing for c in manifest.chunks_for(n_tokens))):
            raise NotFound(f"artifact {cid.short()} is incomplete in {h.path} (`kvswap get {cid}`)")
        t0 = time.perf_counter()
        loaded = load_artifact(engine, h.store, manifest, n_tokens)
        cache = cache_from_loaded(engine.model.config, loaded)
        load_s = time.perf_counter() - t0
        h.ledger.compute(kind="load", seconds=load_s, tokens=loaded.n_tokens, model=engine.model_id,
                         dtype=engine.dtype, device=engine.device, artifact=str(cid), extra={"api": "load_cache"})
        h.store.touch(cid)
        return LoadedCache(cid, list(loaded.token_ids), loaded.last_logits, cache, engine, loaded, load_s)
    finally:
        if owned:
            h.close()


# --- audit and report ------------------------------------------------------------------------------------------
def audit(source: Any, *, home: Home | str | Path | None = None, model: Any = None, fraction: float | None = None,
          blocks: int | None = None, full: bool = False, seed: int | None = None, exact: bool = False,
          sign: bool = True) -> dict:
    """Audit a stored artifact (kvswap/audit.py): through the running node's model, else in this process with
    `model` (default: the artifact's). A given document is bound first. Raises AuditFailed on a failing block;
    a passing audit is signed by the home's key unless `sign=False`."""
    h, owned = as_home(home)
    try:
        src = Source.of(source)
        client = _node_for(h, model)
        if client is not None:
            if src.cid is None:
                status = client.get("/status")
                found = h.store.find_by_document(status.get("model_fingerprint") or "", src.document_hash, True)
                if not found:
                    raise NotFound(f"no complete artifact of document {src.document_hash[:12]} for the node's model")
                src = Source(found[0], src.document, src.document_hash)
            body = {"cid": str(src.cid), "fraction": fraction, "blocks": blocks, "full": full, "seed": seed,
                    "exact": exact, "sign": sign, "document": src.document.text if src.document else None}
            return client.post("/audit", body, timeout=3600)
        from .artifact.service import audit_stored

        if model is None and src.cid is not None:
            manifest = h.store.get_manifest(src.cid)
            engine = engine_for(manifest.model_id, manifest.dtype)
        else:
            engine = engine_for(model, h.config["node.dtype"])
        cid = resolve(h, engine, src)
        policy = h.policy()
        result = audit_stored(engine, h.store, cid, fraction=fraction, blocks=blocks, full=full, seed=seed,
                              require_exact=exact, key=h.key if sign else None, document=src.document,
                              prefer=policy.auditors)
        h.ledger.compute(kind="audit", seconds=result["seconds"], tokens=0, model=engine.model_id,
                         dtype=engine.dtype, device=engine.device, artifact=str(cid),
                         extra={"blocks": len(result["blocks"]), "mode": result["mode"]})
        return result
    finally:
        if owned:
            h.close()


def report(*, home: Home | str | Path | None = None, artifact: Any = None, **options: Any) -> dict:
    """The egress-vs-prefill report (kvswap/report/) from this home's ledger; `options` as `kvswap report`'s
    flags (readers, tokens, basis, prices ...). Reads files only: no node needed."""
    from .report import ReportOptions, make_report

    h, owned = as_home(home)
    try:
        prices = {k: options.pop(k) for k in list(options) if k in (
            "egress_per_gb", "storage_per_gb_month", "gpu_per_hour", "input_per_mtok", "cache_read_tariff",
            "horizon_months")}
        cid = None if artifact is None else str(Source.of(artifact).cid or artifact)
        return make_report(h.path, artifact=cid, options=ReportOptions(**options), price_overrides=prices)
    finally:
        if owned:
            h.close()


def to_dict(result: Any) -> Any:
    return asdict(result) if hasattr(result, "__dataclass_fields__") else result


__all__ = ["LoadedCache", "Source", "audit", "engine_for", "generate", "get", "load_cache", "publish",
           "publish_here", "report", "resolve"]
