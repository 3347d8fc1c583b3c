"""The control API, declared once: each route's method, path, typed request body and typed answer.

The daemon serves exactly these routes (node/api.py registers `ROUTES`, calling the daemon's handler of the
same name), the client calls them (kvswap/control/client.py), and a body is checked field by field here, where
it enters the daemon, and nowhere else (kubo declares its commands as data the same way; one typed request per
route). A bad field is a `UsageError` naming the field, which the API answers as 400 with one line: a
non-integer `block_tokens`, a negative `max_new_tokens`, a CID that does not parse or a 10,000-deep JSON
nesting is the caller's error, never a 500 with a traceback in the node's log.

    routes.PUBLISH.body.from_json({"text": "..."})   # PublishBody(text=..., codec="auto", block_tokens=64)
    client.call(routes.GET, GetBody(key=cid))         # -> JobView
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from ..artifact.codecs import CODEC_CHOICES
from ..artifact.limits import DEFAULT_BLOCK_TOKENS, MAX_TOKENS
from ..modes import AuditMode
from ..payments.limits import MAX_COUNTER, MAX_PRICE
from ..protocol.cid import Cid
from ..protocol.errors import FormatError, UsageError
from ..protocol.keys import ArtifactKey, DocumentKey, is_hex64
from ..protocol.limits import MAX_GENERATE_SEED, MAX_GENERATE_TOKENS
from .limits import API_TIMEOUT_S, MAX_API_JSON_DEPTH

_BRACKETS = re.compile(rb"[\[\]{}]")
#: the longest a hosted or local generation may run before the client stops waiting (seconds)
GENERATE_WAIT_S = 600.0
#: the longest a full audit may run before the client stops waiting (seconds)
AUDIT_WAIT_S = 3600.0


# --- fields: how each value of a body is checked ------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """How one body field is checked: its kind (str, text, int, float, bool, choice), bounds, choices."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()

    def __call__(self, route: str, name: str, value: Any) -> Any:
        what = f"{route}: field {name!r}"
        if self.kind in ("str", "text"):
            if not isinstance(value, str):
                raise UsageError(f"{what} must be a string")
            if self.kind == "text" and not value.strip():
                raise UsageError(f"{what} is empty")
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise UsageError(f"{what} must be true or false")
            return value
        if self.kind in ("int", "float"):
            ok = isinstance(value, int) if self.kind == "int" else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not self.lo <= value <= self.hi:
                kind = "an integer" if self.kind == "int" else "a number"
                raise UsageError(f"{what} must be {kind} from {self.lo:g} to {self.hi:g}")
            return float(value) if self.kind == "float" else value
        if self.kind == "choice":
            if value not in self.choices:
                raise UsageError(f"{what} must be one of {', '.join(self.choices)}")
            return value
        raise UsageError(f"{what}: unknown kind {self.kind}")  # pragma: no cover - a table typo


def _f(check: Check, default: Any = MISSING) -> Any:
    return field(default=default, metadata={"check": check})


def _key_from_json(route: str, body: dict, required: bool) -> ArtifactKey | None:
    """A body's artifact key: "cid" (a CID string) or "document_hash" (64 lowercase hex), not both."""
    cid, doc = body.get("cid"), body.get("document_hash")
    if cid is not None and doc is not None:
        raise UsageError(f"{route}: give either cid or document_hash, not both")
    if cid is not None:
        if not isinstance(cid, str):
            raise UsageError(f"{route}: field 'cid' must be a CID string")
        try:
            return Cid.parse(cid)
        except FormatError:
            raise UsageError(f"{route}: field 'cid' is not a CID: {cid!r:.80}") from None
    if doc is not None:
        if not is_hex64(doc):
            raise UsageError(f"{route}: field 'document_hash' must be 64 lowercase hex digits (sha256)")
        return DocumentKey(doc)
    if required:
        raise UsageError(f"{route}: give either cid or document_hash")
    return None


def _key_to_json(key: ArtifactKey | None) -> dict:
    if key is None:
        return {}
    if isinstance(key, Cid):
        return {"cid": str(key)}
    return {"document_hash": key.document_hash}


class Body:
    """A typed request body: `from_json(dict)` checks every field (unknown ones are refused: a typo is not
    silently ignored), `to_json()` is what a client sends. A body with a `key` field takes it as "cid" or
    "document_hash" on the wire."""

    ROUTE: ClassVar[str] = ""
    KEY_REQUIRED: ClassVar[bool] = True

    @classmethod
    def wire_fields(cls) -> set[str]:
        names = {f.name for f in fields(cls)}
        return (names - {"key"}) | ({"cid", "document_hash"} if "key" in names else set())

    @classmethod
    def from_json(cls, body: dict) -> "Body":
        route = cls.ROUTE
        unknown = sorted(set(body) - cls.wire_fields())
        if unknown:
            raise UsageError(f"{route}: unknown field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(cls.wire_fields()))})")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "key":
                values["key"] = _key_from_json(route, body, cls.KEY_REQUIRED)
                continue
            value = body.get(f.name)
            if value is None:
                if f.default is MISSING:
                    raise UsageError(f"{route}: field {f.name!r} is required")
                values[f.name] = f.default
                continue
            values[f.name] = f.metadata["check"](route, f.name, value)
        return cls(**values)

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "key":
                out.update(_key_to_json(value))
            else:
                out[f.name] = value
        return out


_SEED = Check("int", 0, MAX_GENERATE_SEED)


@dataclass(frozen=True)
class PublishBody(Body):
    """POST /publish: prefill, sign and store a document, then provide and announce it (a job)."""

    ROUTE: ClassVar[str] = "publish"
    text: str = _f(Check("text"))
    codec: str = _f(Check("choice", choices=CODEC_CHOICES), "auto")
    block_tokens: int = _f(Check("int", 1, 65_536), DEFAULT_BLOCK_TOKENS)


@dataclass(frozen=True)
class GetBody(Body):
    """POST /get: fetch an artifact by CID, or a document's for the node's model (a job). With the document's
    text, the artifact is bound to it before first use."""

    ROUTE: ClassVar[str] = "get"
    key: ArtifactKey | None = None
    document: str | None = _f(Check("text"), None)
    tokens: int | None = _f(Check("int", 1, MAX_TOKENS), None)
    accept_any: bool = _f(Check("bool"), False)
    max_price: int | None = _f(Check("int", 0, MAX_PRICE), None)  # None: the node's pay.max_price_mb
    budget: int | None = _f(Check("int", 0, MAX_COUNTER), None)  # None: the node's pay.budget


@dataclass(frozen=True)
class GenerateBody(Body):
    """POST /generate: generate after a stored artifact (ship), or on `host` from its copy (host mode)."""

    ROUTE: ClassVar[str] = "generate"
    key: ArtifactKey | None = None
    document: str | None = _f(Check("text"), None)
    prompt: str = _f(Check("str"), "")
    max_new_tokens: int = _f(Check("int", 0, MAX_GENERATE_TOKENS), 24)
    seed: int | None = _f(_SEED, None)
    temperature: float = _f(Check("float", 1e-6, 100.0), 1.0)
    host: str | None = _f(Check("str"), None)
    max_price_token: int | None = _f(Check("int", 0, MAX_PRICE), None)  # None: the node's pay.max_price_token
    budget: int | None = _f(Check("int", 0, MAX_COUNTER), None)  # None: the node's pay.budget


@dataclass(frozen=True)
class AuditBody(Body):
    """POST /audit: recompute sampled blocks of a stored artifact with the node's model."""

    ROUTE: ClassVar[str] = "audit"
    key: ArtifactKey | None = None
    fraction: float | None = _f(Check("float", 1e-9, 1.0), None)
    blocks: int | None = _f(Check("int", 1, 1 << 26), None)
    full: bool = _f(Check("bool"), False)
    seed: int | None = _f(_SEED, None)
    mode: str = _f(Check("choice", choices=AuditMode.choices()), AuditMode.AUTO.value)
    sign: bool = _f(Check("bool"), True)
    document: str | None = _f(Check("text"), None)


@dataclass(frozen=True)
class CompletionBody(Body):
    """POST /v1/completions: the OpenAI-compatible door for local agents (README "Hosting with vLLM"). A
    completion of `prompt` over a document, named by its hash (or an artifact by CID) in the body's top level;
    the node finds and fetches it through kvswap when its store lacks it, then its hosted backend (the engine,
    or vLLM through the connector) generates. Greedy at temperature 0 (the default); sampled otherwise, from
    `seed` when given. `model` is accepted as OpenAI clients send it; the node serves its one model."""

    ROUTE: ClassVar[str] = "completions"
    key: ArtifactKey | None = None
    prompt: str = _f(Check("str"), "")
    model: str | None = _f(Check("str"), None)
    max_tokens: int = _f(Check("int", 0, MAX_GENERATE_TOKENS), 16)
    temperature: float = _f(Check("float", 0.0, 100.0), 0.0)
    seed: int | None = _f(_SEED, None)
    document: str | None = _f(Check("text"), None)
    stream: bool = _f(Check("bool"), False)


# --- answers ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobView:
    """A daemon job (publish, get) as a poller sees it: `state` is running | done | failed | cancelled; `result`
    the operation's summary once done, `error` {"type", "message"} once failed."""

    id: str
    kind: str
    state: str
    progress: dict = field(default_factory=dict)
    result: Any = None
    error: dict | None = None
    elapsed_s: float = 0.0

    @classmethod
    def from_json(cls, data: Any) -> "JobView":
        if not isinstance(data, dict) or not {"id", "kind", "state"} <= set(data):
            raise UsageError("the control API answered something that is not a job")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Route:
    """One control-API route: `name` is the daemon's handler (`Daemon.api_<name>`), `body` the request's type
    (None: no body), `answer` what it returns (JobView, a JSON object or list, or Prometheus text)."""

    name: str
    method: str
    path: str
    body: type[Body] | None = None
    answer: Any = dict
    wait_s: float = API_TIMEOUT_S

    def url_path(self, **params: str) -> str:
        return self.path.format(**params)


STATUS = Route("status", "GET", "/status")
METRICS = Route("metrics", "GET", "/metrics", answer=str)
PEERS = Route("peers", "GET", "/peers", answer=list)
ARTIFACTS = Route("artifacts", "GET", "/artifacts", answer=list)
PUBLISH = Route("publish", "POST", "/publish", PublishBody, JobView)
GET = Route("get", "POST", "/get", GetBody, JobView)
GENERATE = Route("generate", "POST", "/generate", GenerateBody, wait_s=GENERATE_WAIT_S)
AUDIT = Route("audit", "POST", "/audit", AuditBody, wait_s=AUDIT_WAIT_S)
JOB = Route("job", "GET", "/jobs/{job_id}", answer=JobView)
CANCEL_JOB = Route("cancel_job", "POST", "/jobs/{job_id}/cancel", answer=JobView)
STOP = Route("stop", "POST", "/stop")
COMPLETIONS = Route("completions", "POST", "/v1/completions", CompletionBody, wait_s=GENERATE_WAIT_S)

#: every route the daemon serves, in the order `kvswap --help` would explain them
ROUTES: tuple[Route, ...] = (STATUS, METRICS, PEERS, ARTIFACTS, PUBLISH, GET, GENERATE, AUDIT, JOB, CANCEL_JOB, STOP,
                             COMPLETIONS)


def decode_answer(route: Route, data: Any) -> Any:
    """A route's answer as its type (a JobView for job routes; JSON objects and lists as they are)."""
    if route.answer is JobView:
        return JobView.from_json(data)
    return data


def loads(raw: bytes) -> dict:
    """The JSON object of a request body; UsageError (one line) for anything else, however malformed."""
    if not raw:
        return {}
    depth = 0
    for m in _BRACKETS.finditer(raw):  # refuse deep nesting before the parser recurses into it
        depth += 1 if m.group() in b"[{" else -1
        if depth > MAX_API_JSON_DEPTH:  # brackets inside strings count too: a conservative bound
            raise UsageError(f"request body nests deeper than {MAX_API_JSON_DEPTH} levels")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise UsageError("request body is not JSON") from None
    if not isinstance(data, dict):
        raise UsageError("request body must be a JSON object")
    return data


__all__ = ["ARTIFACTS", "AUDIT", "CANCEL_JOB", "COMPLETIONS", "GENERATE", "GET", "JOB", "METRICS", "PEERS", "PUBLISH",
           "ROUTES", "STATUS", "STOP", "AuditBody", "Body", "CompletionBody", "GenerateBody", "GetBody", "JobView",
           "PublishBody", "Route",
           "decode_answer", "loads"]
