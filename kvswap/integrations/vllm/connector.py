"""`KvswapConnector`: vLLM's v1 KV connector over a kvswap home.

Select it with vLLM's kv_transfer_config (or `kvswap.integrations.vllm.kv_transfer_config(...)`):

    KVTransferConfig(kv_connector="KvswapConnector",
                     kv_connector_module_path="kvswap.integrations.vllm.connector",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"home": "~/.kvswap-b"})

vLLM builds two instances (vllm/distributed/kv_transfer/kv_connector/v1/base.py): the SCHEDULER one decides,
the WORKER one moves bytes; they talk only through the metadata built each step.

Scheduler, per waiting request (`get_num_new_matched_tokens`): match the prompt against the home's complete,
trusted artifacts for this exact model by their chained prefix keys (matching.py) and report the tokens
vLLM may skip: whole vLLM blocks, never the last prompt token. On a miss, when the request names a document
(hash) or artifact CID and a kvswap node runs in the home, a node fetch starts on a background thread
(DHT lookup + multi-peer fetch, every chunk verified into the store) and the request answers "not yet"
(None) until it ends or `fetch_timeout_s` passes: the engine loop never waits on the network. After vLLM
allocated blocks (`update_state_after_alloc`), the load is planned; `build_connector_meta` hands the worker
(cid, token range, block ids) per load, and (token count, document hash, block ids) per publish once the
request's prefill has reached the end of the document.

Worker: `start_load_kv` runs before the forward that needs the tokens; it reads the artifact through
`KvswapSource.load_kv` (manifest vs CID, model, trust policy, every chunk's CID) and writes each layer into
vLLM's paged blocks (paged.py). A failure is logged and its blocks reported to vLLM, which recomputes them
(kv_load_failure_policy="recompute"). `wait_for_save` runs after the forward: it copies the document's KV
out of the blocks (so the blocks may be reused at once) and a background thread chunks, signs and stores it.

Per request options go in `SamplingParams(extra_args={"kv_transfer_params": {"kvswap": {...}}})`
(`document_request` builds them): `load` (default true), `cid`, `document_hash`, `publish`,
`document_tokens`. Engine-wide options (kv_connector_extra_config): see `ConnectorOptions`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index

from ...protocol.errors import KvswapError, UsageError
from ...kvtensors import KvTensors
from ...artifact.limits import DEFAULT_BLOCK_TOKENS
from . import paged
from ._source import KvswapSource, document_hash
from .identity import engine_identity
from .matching import Match, best_match

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

#: a child of vLLM's "vllm" logger, so kvswap's lines appear in vLLM's log with its format and level
log = logging.getLogger("vllm.kvswap")

#: key under the request's kv_transfer_params that holds kvswap's per-request options
PARAMS_KEY = "kvswap"
#: seconds a miss may wait for the node's fetch before the request is prefilled normally
DEFAULT_FETCH_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ConnectorOptions:
    """kv_connector_extra_config, with defaults. Unknown keys are refused (a typo must not pass silently)."""

    home: str | None = None  # kvswap home; default $KVSWAP_HOME, else ~/.kvswap
    accept_any: bool = False  # accept artifacts signed by any valid key (never the default)
    fetch_on_miss: bool = True  # ask the home's node to fetch a named document/CID that is not local
    fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S
    publish_min_tokens: int | None = None  # prefix rule: publish every prompt of at least this many tokens
    block_tokens: int = DEFAULT_BLOCK_TOKENS  # artifact block size for what vLLM publishes
    codec: str = "auto"
    model_id: str | None = None  # name recorded in published manifests (default: the model folder's name)

    @classmethod
    def from_extra(cls, extra: dict | None) -> "ConnectorOptions":
        extra = dict(extra or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise UsageError(f"unknown kvswap connector option(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        opts = cls(**extra)
        if opts.fetch_timeout_s < 0 or opts.block_tokens <= 0:
            raise UsageError("fetch_timeout_s must be >= 0 and block_tokens > 0")
        return opts


@dataclass
class LoadSpec:
    req_id: str
    cid: str
    start: int
    n_tokens: int
    block_ids: list[int]


@dataclass
class SaveSpec:
    req_id: str
    token_ids: list[int]  # the document's tokens: the artifact's ids
    document_hash: str
    block_ids: list[int]


@dataclass
class KvswapMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step: what to load before the forward and what to publish after it."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Plan:
    """The scheduler's view of one request."""

    match: Match | None = None
    computed: int = 0  # block-aligned local prefix-cache hit vLLM reported
    load: tuple[str, int, int] | None = None  # (cid, start, n) once blocks are allocated
    publish: tuple[list[int], str] | None = None  # (document token ids, document hash)
    published: bool = False
    loaded_tokens: int = 0
    load_blocks: frozenset[int] = frozenset()
    load_failed: bool = False


def request_options(request: "Request") -> dict:
    params = getattr(request, "kv_transfer_params", None) or {}
    opts = params.get(PARAMS_KEY) or {}
    if not isinstance(opts, dict):
        raise UsageError(f"kv_transfer_params[{PARAMS_KEY!r}] must be a dict, got {type(opts).__name__}")
    return opts


class KvswapConnector(KVConnectorBase_V1):
    """Loads verified kvswap artifacts into vLLM's paged KV cache and publishes what vLLM prefills."""

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.options = ConnectorOptions.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        self.block_size = vllm_config.cache_config.block_size
        self.identity, self._tokenizer = engine_identity(vllm_config, self.options.model_id)
        self.source = KvswapSource(self.options.home, accept_any=self.options.accept_any)
        log.info("kvswap connector (%s) on home %s, model %s %s (fingerprint %s), vLLM block size %d",
                 role.name.lower(), self.source.home, self.identity.model_id, self.identity.dtype,
                 self.identity.fingerprint[:16], self.block_size)
        # scheduler side
        self._plans: dict[str, _Plan] = {}
        self._fetches: dict[str, tuple[Future, float]] = {}
        self._node_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvswap-node")
        # worker side
        self._caches: list[tuple[str, torch.Tensor]] = []
        self._load_errors: set[int] = set()
        self._publish_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvswap-publish")
        self._publishing: list[Future] = []
        self._lock = threading.Lock()

    # ============================== scheduler side ===================================================
    def _candidates(self):
        return self.source.candidates(self.identity)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        opts = request_options(request)
        if opts.get("load") is False:
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        match = best_match(self._candidates(), prompt, self.block_size, only_cid=opts.get("cid"))
        if match is None or match.n_tokens <= num_computed_tokens:
            # candidates are re-read on every call, so once a fetch has landed the match above finds it
            if self._fetch_on_miss(request, opts):
                return None, False
            self._plans[request.request_id] = _Plan(computed=num_computed_tokens)
            return 0, False
        self._plans[request.request_id] = _Plan(match=match, computed=num_computed_tokens)
        return match.n_tokens - num_computed_tokens, False

    def _fetch_on_miss(self, request: "Request", opts: dict) -> bool:
        """True while a node fetch for this request is running (the scheduler should ask again later)."""
        rid = request.request_id
        if rid in self._fetches:
            future, deadline = self._fetches[rid]
            if future.done():
                return False
            if time.monotonic() >= deadline:
                log.warning("kvswap fetch for request %s passed %.0f s; prefilling without it",
                            rid, self.options.fetch_timeout_s)
                return False
            return True
        cid, doc = opts.get("cid"), opts.get("document_hash")
        if not self.options.fetch_on_miss or not (cid or doc):
            return False
        if cid and self.source.has_complete(cid):
            return False  # here already, just not usable for this prompt
        if not cid and self.source.find_document(self.identity, doc):
            return False
        future = self._node_pool.submit(self._fetch, cid, doc, self.options.fetch_timeout_s)
        self._fetches[rid] = (future, time.monotonic() + self.options.fetch_timeout_s)
        return True

    def _fetch(self, cid: str | None, doc: str | None, timeout_s: float) -> str | None:
        """Runs on a node thread: start the node's fetch job and poll it. Never raises."""
        try:
            job = self.source.start_fetch(cid=cid, doc_hash=doc)
            if job is None:
                log.info("no kvswap node runs in %s: nothing to fetch from", self.source.home)
                return None
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                state = self.source.fetch_state(job)
                if state.state == "done":
                    log.info("kvswap node fetched %s", state.cid)
                    return state.cid
                if state.state == "failed":
                    log.warning("kvswap node fetch failed: %s", state.error)
                    return None
                time.sleep(0.1)
        except KvswapError as exc:
            log.warning("kvswap node fetch could not start: %s", exc)
        return None

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        rid = request.request_id
        plan = self._plans.setdefault(rid, _Plan())
        if num_external_tokens > 0 and plan.match is not None:
            plan.load = (plan.match.cid, plan.computed, num_external_tokens)
        if plan.publish is None and not plan.published:
            plan.publish = self._publish_intent(request, plan)

    def _publish_intent(self, request: "Request", plan: _Plan) -> tuple[list[int], str] | None:
        opts = request_options(request)
        prompt = list(request.prompt_token_ids or [])
        if opts.get("publish") is False:
            return None
        explicit = bool(opts.get("publish"))
        rule = self.options.publish_min_tokens is not None and len(prompt) >= self.options.publish_min_tokens
        if not (explicit or rule):
            return None
        n = int(opts.get("document_tokens") or len(prompt))
        if not 0 < n <= len(prompt):
            raise UsageError(f"document_tokens {n} outside 1..{len(prompt)} (the prompt's length)")
        if plan.match is not None and plan.match.shared_tokens >= n:
            return None  # an artifact already holds this whole document
        doc = opts.get("document_hash") or document_hash(self._tokenizer.decode(prompt[:n]))
        return prompt[:n], str(doc)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = KvswapMetadata()
        steps: list[tuple[str, int, list[int] | None]] = []  # (req id, computed before this step, block ids)
        for new in scheduler_output.scheduled_new_reqs:
            steps.append((new.req_id, new.num_computed_tokens, list(new.block_ids[0])))
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            resumed = rid in cached.resumed_req_ids
            ids = cached.new_block_ids[i]
            steps.append((rid, cached.num_computed_tokens[i], list(ids[0]) if resumed and ids is not None else None))
        for rid, computed, block_ids in steps:
            plan = self._plans.get(rid)
            if plan is None:
                continue
            if plan.load is not None and block_ids is not None:
                cid, start, n = plan.load
                meta.loads.append(LoadSpec(rid, cid, start, n, block_ids))
                plan.loaded_tokens, plan.load = n, None
                plan.load_blocks = frozenset(paged.block_ids_covering(block_ids, start, n, self.block_size))
            if plan.publish is not None:
                ids, doc = plan.publish
                if computed + scheduler_output.num_scheduled_tokens.get(rid, 0) >= len(ids):
                    all_ids = self._kv_cache_manager.get_block_ids(rid)[0]
                    meta.saves.append(SaveSpec(rid, ids, doc, list(all_ids)))
                    plan.publish, plan.published = None, True
        return meta

    def update_connector_output(self, connector_output) -> None:
        """A load the worker could not verify: vLLM recomputes its blocks; the request's report says so."""
        bad = getattr(connector_output, "invalid_block_ids", None)
        if not bad:
            return
        for plan in self._plans.values():
            if plan.load_blocks & bad:
                plan.loaded_tokens, plan.load_failed = 0, True

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Reports what kvswap did for the request in RequestOutput.kv_transfer_params["kvswap"]."""
        plan = self._plans.pop(request.request_id, None)
        self._fetches.pop(request.request_id, None)
        if plan is None:
            return False, None
        report = {"loaded_tokens": plan.loaded_tokens,
                  "cid": plan.match.cid if plan.match is not None and plan.loaded_tokens else None,
                  "published": plan.published, "load_failed": plan.load_failed}
        return False, {PARAMS_KEY: report}

    # ============================== worker side ======================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        layers = sorted(kv_caches.items(), key=lambda item: extract_layer_index(item[0]))
        if len(layers) != self.identity.layout.layers:
            raise UsageError(f"vLLM has {len(layers)} attention layers, the model config says "
                             f"{self.identity.layout.layers}")
        for name, cache in layers:
            paged.check_layer_cache(name, cache, self.identity.layout, self.block_size)
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        lay = self.identity.layout
        dtype = layers[0][1].dtype
        isa = _get_attn_isa(dtype, self.block_size, lay.head_dim, self._vllm_config.cache_config.cache_dtype)
        self._block_layout = paged.BlockLayout.learn(dtype, lay.kv_heads, self.block_size, lay.head_dim, isa)
        self._caches = layers

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvswapMetadata)
        for spec in meta.loads:
            t0 = time.perf_counter()
            try:
                if spec.start % self.block_size or spec.n_tokens % self.block_size:
                    raise UsageError(f"load of tokens [{spec.start}, {spec.start + spec.n_tokens}) is not in whole "
                                     f"blocks of {self.block_size}")
                kv = self.source.load_kv(spec.cid, spec.start + spec.n_tokens, self.identity)
                for (name, cache), k, v in zip(self._caches, kv.keys, kv.values):
                    self._block_layout.write_blocks(cache, spec.block_ids, spec.start // self.block_size,
                                                    k[:, spec.start:], v[:, spec.start:])
            except KvswapError as exc:
                bad = paged.block_ids_covering(spec.block_ids, spec.start, spec.n_tokens, self.block_size)
                log.warning("kvswap load of %s for request %s failed (%s); vLLM recomputes %d blocks",
                            spec.cid, spec.req_id, exc, len(bad))
                with self._lock:
                    self._load_errors |= bad
                continue
            seconds = time.perf_counter() - t0
            log.info("kvswap loaded %d tokens of %s for request %s in %.3f s", spec.n_tokens, spec.cid,
                     spec.req_id, seconds)
            try:
                self.source.record_load(spec.cid, spec.n_tokens, seconds, self.identity)
            except KvswapError as exc:  # the ledger is bookkeeping: never fail a served request over it
                log.warning("kvswap ledger: %s", exc)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous in start_load_kv

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata",
                      **kwargs: Any) -> None:
        return  # publishing reads every layer at once in wait_for_save, after the forward wrote them

    def wait_for_save(self):
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvswapMetadata)
        for spec in meta.saves:
            keys, values = [], []
            for name, cache in self._caches:
                k, v = self._block_layout.read_blocks(cache, spec.block_ids, len(spec.token_ids))
                keys.append(k)
                values.append(v)
            kv = KvTensors(self.identity.layout, list(spec.token_ids), keys, values)
            self._publishing.append(self._publish_pool.submit(self._publish, spec, kv))

    def _publish(self, spec: SaveSpec, kv: KvTensors) -> str | None:
        """Runs on the publish thread (the copy out of vLLM's blocks is already made): chunk, sign, store."""
        try:
            t0 = time.perf_counter()
            manifest = self.source.publish(kv, self.identity, spec.document_hash, self.options.block_tokens,
                                           self.options.codec)
            log.info("kvswap published %s (%d tokens, document %s) in %.3f s", manifest.cid, manifest.n_tokens,
                     spec.document_hash[:16], time.perf_counter() - t0)
            return str(manifest.cid)
        except KvswapError as exc:
            log.warning("kvswap publish for request %s failed: %s", spec.req_id, exc)
            return None

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            bad, self._load_errors = self._load_errors, set()
        return bad

    def flush(self, timeout_s: float | None = None) -> list[str | None]:
        """Wait for every publish started so far; returns their CIDs (None for a failed one)."""
        done, self._publishing = self._publishing, []
        return [f.result(timeout=timeout_s) for f in done]

    def shutdown(self):
        self.flush()
        self._publish_pool.shutdown(wait=True)
        self._node_pool.shutdown(wait=False, cancel_futures=True)
        self.source.close()
