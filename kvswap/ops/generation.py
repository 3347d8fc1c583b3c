"""Generate after a stored artifact: here with an engine (ship), through the running node, or on a peer that
holds the artifact (host mode, through the node)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifact.pipeline import check_compatible
from ..artifact.signing import TrustPolicy
from ..control import routes
from ..document import Document
from ..home import Home, as_home
from ..modes import DecodeMode
from ..protocol.cid import Cid
from ..protocol.errors import UsageError
from .checks import check_complete, check_document, check_trust
from .ledgerlog import log_generation
from .loading import load_artifact
from .source import Source, engine_for, node_for, resolve


def generate_here(home: Home, engine, cid: Cid, prompt: str, max_new_tokens: int = 24, *,
                  policy: TrustPolicy | None = None, seed: int | None = None, document: Document | None = None,
                  temperature: float = 1.0) -> dict:
    """Load a stored artifact into `engine` (every chunk verified) and generate after the prompt; logged.

    The prompt's token ids are appended to the document's (never re-tokenizing the joined text). With a
    policy, the artifact's signatures are checked against it first; with the `document` the caller holds, the
    artifact is checked to be about it (check_document) before anything is loaded."""
    store = home.store
    manifest = store.get_manifest(cid)
    check_compatible(manifest, engine)
    if document is not None:
        check_document(engine, manifest, document)
    if policy is not None:
        check_trust(store, manifest, policy)
    check_complete(store, cid)
    loaded = load_artifact(engine, store, manifest, keep_raw=home.config["store.keep_raw"], tier=home.tier)
    store.touch(cid)
    suffix = engine.tokenize(prompt) if prompt else []
    result = engine.generate_from_loaded(loaded, suffix, max_new_tokens=max_new_tokens, seed=seed,
                                         temperature=temperature)
    out = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    out.update({"cid": str(cid), "document_tokens": manifest.n_tokens, "suffix_tokens": len(suffix),
                "read_verify_s": round(loaded.load_s, 4), "mode": "local"})
    log_generation(home, engine, cid, out)
    return out


def generate(source: Any, prompt: str = "", *, home: Home | str | Path | None = None, model: Any = None,
             dtype: str | None = None, max_new_tokens: int = 24, seed: int | None = None, temperature: float = 1.0,
             host: str | None = None, decode: DecodeMode | str = DecodeMode.EAGER, accept_any: bool = False,
             max_price_token: int | None = None, budget: int | None = None) -> dict:
    """Generate after a stored artifact (ship), or ask `host` to generate from its copy (host mode). Through the
    running node when there is one (host mode needs it), else in this process with `model` (default: the
    artifact's own model). A host that prices tokens is paid per token delivered, within `max_price_token` and
    `budget` (None: config.toml [pay]); the answer's `paid` says how much."""
    h, owned = as_home(home)
    try:
        src = Source.of(source)
        client = node_for(h, model)
        if host and client is None:
            raise UsageError("hosted generation (--host) needs a running node in this home (`kvswap node start`)")
        if client is not None:
            body = routes.GenerateBody(key=src.key, document=src.document.text if src.document else None,
                                       prompt=prompt, max_new_tokens=max_new_tokens, seed=seed,
                                       temperature=temperature, host=host, max_price_token=max_price_token,
                                       budget=budget)
            return client.call(routes.GENERATE, body)
        if model is None and src.cid is not None:
            manifest = h.store.get_manifest(src.cid)
            engine = engine_for(manifest.model_id, dtype or manifest.dtype, decode=decode)
        else:
            engine = engine_for(model, dtype or h.config["node.dtype"], decode=decode)
        cid = resolve(h, engine, src)
        return generate_here(h, engine, cid, prompt, max_new_tokens, policy=h.policy(accept_any or None),
                             seed=seed, document=src.document, temperature=temperature)
    finally:
        if owned:
            h.close()


__all__ = ["generate", "generate_here"]
