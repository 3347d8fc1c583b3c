"""The engine backend (`node.host_backend = "engine"`, the default): kvswap's transformers engine, one
generation at a time behind the daemon's engine lock (the model is not re-entrant, and a peer's generation
and a local one must not interleave). The verified KV of the last `daemon.resident_kv_slots` artifacts stays
in memory, so a hot document is read and verified once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from kvswap import ops
from kvswap.home import Home
from kvswap.protocol.cid import Cid

from .backend import HostedJob, HostedResult, check_hostable


class EngineBackend:
    name = "engine"
    capacity = 1

    def __init__(self, home: Home, engine: Callable[[], Any], lock: threading.Lock, resident_slots: int) -> None:
        self.h = home
        self._engine = engine  # the daemon's engine, or NotFound while it has none
        self._lock = lock
        self._slots = resident_slots
        self._resident: OrderedDict[Cid, Any] = OrderedDict()
        self.served = 0

    async def run(self) -> None:
        return None  # nothing to start: the daemon loads the engine

    async def stop(self) -> None:
        self._resident.clear()

    def status(self) -> dict:
        return {"backend": self.name, "capacity": self.capacity, "ready": True, "served": self.served,
                "resident": [str(c) for c in self._resident]}

    async def generate(self, job: HostedJob) -> HostedResult:
        return await asyncio.to_thread(self.generate_sync, job)

    def generate_sync(self, job: HostedJob) -> HostedResult:
        """In a worker thread: wait for the engine, load (or reuse) the verified KV, generate, log."""
        engine = self._engine()
        cid = job.cid
        t_in = time.perf_counter()
        with self._lock:
            t0 = time.perf_counter()
            kv = self._resident.get(cid)
            if kv is None:
                manifest = self.h.store.get_manifest(cid)
                check_hostable(manifest, engine)
                ops.check_complete(self.h.store, cid)
                kv = ops.load_artifact(engine, self.h.store, manifest, tier=self.h.tier)  # verified, on its device
                self._resident[cid] = kv
                while len(self._resident) > self._slots:
                    self._resident.popitem(last=False)
            self._resident.move_to_end(cid)
            load_s = time.perf_counter() - t0
            result = engine.generate_from_loaded(kv, list(job.suffix_ids), max_new_tokens=job.max_new_tokens,
                                                 seed=job.seed, temperature=job.temperature)
        total_s = time.perf_counter() - t_in
        out = result.to_dict()
        out.update(read_verify_s=load_s, document_tokens=kv.n_tokens, suffix_tokens=len(job.suffix_ids))
        ops.log_generation(self.h, engine, cid, out, kind="hosted_generate")
        self.served += 1
        prefill_s, decode_s = float(out.get("prefill_s", 0.0)), float(out.get("decode_s", 0.0))
        # the first token is the argmax of the prefill's logits: it exists once the lock, load and prefill are done
        ttft_s = (t0 - t_in) + load_s + float(out.get("load_s", 0.0)) + prefill_s
        eos = bool(result.tokens) and result.tokens[-1] in getattr(engine, "eos_ids", ())
        return HostedResult(tuple(result.tokens), result.text, self.name, kv.n_tokens, len(job.suffix_ids),
                            ttft_s=ttft_s, total_s=total_s, load_s=load_s, prefill_s=prefill_s, decode_s=decode_s,
                            cached_tokens=kv.n_tokens, finish_reason="stop" if eos else "length")


__all__ = ["EngineBackend"]
