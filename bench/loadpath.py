"""Load path: store -> verified cache tensors, the previous path and the current one side by side, against
a plain file read and read + sha256 of the same bytes.

    python -m bench loadpath [--tokens 1000] [--repeats 3] [--quick]

Synthetic KV with the Qwen3-4B layout (36 layers, 8 KV heads, head dim 128, bf16: 147,456 B/token) is
published into fresh real Stores (codec raw, auto, planes; 64-token blocks as `kvswap publish` does). Values
are float32 normals cut to bf16 (top 16 bits), so the exponent byte is as repetitive as in real KV and the
compressed rows are not flattered by random bytes. Rows (methods interleaved, median of --repeats):

  plain read            open().read() of every stored chunk file, bytes discarded: the physical limit
  read+sha256 1 thread  the same plus one sha256 per chunk
  read+sha256 N threads the same on LOAD_THREADS threads: the floor for any load that verifies every byte
  previous ->DynamicCache  the path before the staging buffer: assemble_kv (read, sha256, decode, scatter into
                        per-layer numpy arrays) then DynamicCache(ddp_cache_data=...) (which copies again)
  current ->LoadedKv    kvswap/artifact/loader.py fill (readinto the staging buffer, sha256 on LOAD_THREADS
                        threads, decode) + kvswap/engine/kvload.py gather into per-layer tensors
  current ->DynamicCache  the above + the cache adopting those tensors (what `kvswap generate` runs)
  ... (auto, raw forms)   the compressed store after its first load wrote raw local forms: what every later
                        local load of a compressed artifact costs
  ... verify=none       trusting arrival checks: what the per-load sha256 costs
  hash alternatives     sha256, blake2b, crc32, and xxh3/blake3 when those packages are installed, over the
                        same bytes in memory on one thread: the candidates for "verified" on a local load

MB/s are of raw KV bytes delivered. Files are in the page cache (just written): this is the CPU cost of the
path, what the engine pays on a warm node. The GPU path (pinned buffer, async copies) runs in
`python -m bench reuse --device cuda`. Writes bench/results/loadpath.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO = 0.70


def qwen3_4b_layout():
    from kvswap.kvtensors import KvLayout

    return KvLayout(layers=36, kv_heads=8, head_dim=128, dtype="bf16")


def synthetic_kv(layout, n_tokens: int, seed: int = 0, vocab: int = 151_000):
    """KvTensors of bf16-looking bits (normal floats truncated to bf16) and float32 last-position logits."""
    from kvswap.kvtensors import KvTensors

    rng = np.random.default_rng(seed)
    shape = (layout.kv_heads, n_tokens, layout.head_dim)

    def plane(scale: float) -> np.ndarray:
        f = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype("<u2")

    keys = [plane(2.0) for _ in range(layout.layers)]
    values = [plane(0.5) for _ in range(layout.layers)]
    token_ids = [int(t) for t in rng.integers(0, vocab, n_tokens)]
    logits = rng.standard_normal(vocab, dtype=np.float32)
    return KvTensors(layout, token_ids, keys, values, logits, {})


def publish_synthetic(store, kv, codec: str, key=None, block_tokens: int = 64, doc_tag: str = ""):
    """Publish `kv` into `store` with a signature; returns the manifest. Model fingerprint is synthetic."""
    from kvswap.artifact.pipeline import publish_kv
    from kvswap.artifact.signing import NodeKey
    from kvswap.protocol.cid import sha256_hex

    key = key or NodeKey.generate()
    manifest, chunks = publish_kv(
        kv, model_id="qwen3-4b-arch-synthetic", model_fingerprint="f" * 64, tokenizer_fingerprint="e" * 64,
        document_hash=sha256_hex(f"synthetic {kv.n_tokens} {doc_tag}".encode()), codec=codec,
        block_tokens=block_tokens)
    store.put_artifact(manifest, [key.sign_manifest(manifest.cid)], chunks)
    return manifest


def stub_engine():
    """A weightless stand-in for kvswap.engine's Engine with the Qwen3-4B config: enough to build caches."""
    import torch

    from kvswap.engine.models import qwen3_4b_config
    from kvswap.engine.rawbits import TORCH_DTYPES

    return SimpleNamespace(_torch_dtype=TORCH_DTYPES["bf16"], device="cpu", _sync=lambda: None,
                           model=SimpleNamespace(config=qwen3_4b_config()), torch=torch)


def previous_cache(engine, kv):
    """The path before the staging buffer: per-layer arrays into DynamicCache(ddp_cache_data=...), which cats
    every layer onto an empty tensor (a second full copy)."""
    import numpy as np
    from transformers import DynamicCache

    from kvswap.engine.rawbits import bits_to_tensor

    data = [(bits_to_tensor(np.ascontiguousarray(k), engine._torch_dtype).unsqueeze(0),
             bits_to_tensor(np.ascontiguousarray(v), engine._torch_dtype).unsqueeze(0)) for k, v in zip(kv.keys, kv.values)]
    return DynamicCache(ddp_cache_data=data, config=engine.model.config)


def current_loaded(engine, store, manifest, **kw):
    """The current path: kvswap.ops.load_artifact minus its model checks (the stub has no model)."""
    from kvswap.artifact import loader
    from kvswap.engine.kvload import load_from_chunks

    plan = loader.LoadPlan.of(manifest)

    def fill(dest):
        where = (lambda slot: dest(slot.index)) if callable(dest) else dest
        for slot in loader.fill(plan, where, store, **kw):
            yield slot.index

    return load_from_chunks(engine, manifest.layout, list(manifest.token_ids), [sl.ref.n_tokens for sl in plan.slots],
                            fill)


def hash_alternatives(data: bytes, repeats: int) -> list[dict]:
    """One-thread GB/s of the hashes a local load could check, over the same bytes in memory."""
    import hashlib
    import zlib

    candidates = {"sha256 (CID)": lambda b: hashlib.sha256(b).digest(), "blake2b": lambda b: hashlib.blake2b(b).digest(),
                  "crc32 (zlib)": zlib.crc32}
    try:
        import xxhash

        candidates["xxh3_128"] = lambda b: xxhash.xxh3_128(b).digest()
    except ImportError:
        pass
    try:
        import blake3

        candidates["blake3"] = lambda b: blake3.blake3(b).digest()
    except ImportError:
        pass
    rows = []
    for name, fn in candidates.items():
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(data)
            ts.append(time.perf_counter() - t0)
        rows.append({"hash": name, "gb_s": round(len(data) / statistics.median(ts) / 1e9, 2)})
    return rows


def plain_read(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with open(p, "rb") as fh:
            total += len(fh.read())
    return total


def read_and_hash(paths: list[Path], threads: int = 1) -> int:
    """The least any verified load must do: read every stored chunk once and sha256 it once."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    def one(p: Path) -> int:
        with open(p, "rb") as fh:
            data = fh.read()
        hashlib.sha256(data).digest()
        return len(data)

    if threads <= 1:
        return sum(one(p) for p in paths)
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, paths))


def run(n_tokens: int = 1000, repeats: int = 3, codecs_list=("raw", "auto", "planes")) -> dict:
    from kvswap.artifact.loader import LOAD_THREADS
    from kvswap.artifact.pipeline import assemble_kv
    from kvswap.engine.kvload import cache_from_loaded
    from kvswap.store import Store

    layout = qwen3_4b_layout()
    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-loadpath-"))
    engine = stub_engine()
    try:
        kv = synthetic_kv(layout, n_tokens)
        raw_bytes = kv.nbytes()
        stores, manifests = {}, {}
        for codec in codecs_list:
            t0 = time.perf_counter()
            stores[codec] = Store(work / codec, local_key=b"bench-local-key-0123456789abcdef")
            manifests[codec] = publish_synthetic(stores[codec], kv, codec)
            print(f"  published {codec}: {manifests[codec].kv_stored_size / 1e6:.1f} MB stored "
                  f"({raw_bytes / manifests[codec].kv_stored_size:.3f}x) in {time.perf_counter() - t0:.1f} s", flush=True)
        sample = b"".join(stores["raw"].read_chunk(c.cid) for c in manifests["raw"].chunks[:8])
        del kv
        paths = {c: [stores[c].chunk_path(ch.cid) for ch in manifests[c].chunks] for c in codecs_list}
        times: dict[str, list[float]] = {}

        def timed(name: str, fn) -> None:
            t0 = time.perf_counter()
            fn()
            times.setdefault(name, []).append(time.perf_counter() - t0)

        def previous(codec):
            return previous_cache(engine, assemble_kv(manifests[codec], stores[codec].read_chunk_for_verifier,
                                                      with_tail=False))

        def current(codec, **kw):
            return cache_from_loaded(engine.model.config, current_loaded(engine, stores[codec], manifests[codec], **kw))

        for _ in range(repeats):
            timed("plain read (raw files)", lambda: plain_read(paths["raw"]))
            timed("read+sha256 1 thread (raw files)", lambda: read_and_hash(paths["raw"]))
            timed(f"read+sha256 {LOAD_THREADS} threads (raw files)", lambda: read_and_hash(paths["raw"], LOAD_THREADS))
            for codec in codecs_list:
                timed(f"previous ->DynamicCache ({codec})", lambda: previous(codec))
                timed(f"current ->LoadedKv ({codec}, no raw forms)",
                      lambda: current_loaded(engine, stores[codec], manifests[codec], keep_raw=False))
                timed(f"current ->DynamicCache ({codec}, no raw forms)", lambda: current(codec, keep_raw=False))
            for codec in [c for c in codecs_list if c != "raw"]:
                if not stores[codec].raw_forms_usage():
                    current(codec)  # the first load writes the raw forms
                timed(f"current ->DynamicCache ({codec}, raw forms)", lambda: current(codec))
            timed("current ->DynamicCache (raw, verify=none)", lambda: current("raw", verify="none", keep_raw=False))
        plain = statistics.median(times["plain read (raw files)"])
        rows = []
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"path": name, "median_s": round(med, 4), "raw_mb_s": round(raw_bytes / 1e6 / med, 1),
                         "vs_plain_read": round(plain / med, 3), "runs_s": [round(t, 4) for t in ts]})
        by = {r["path"]: r for r in rows}
        hashes = hash_alternatives(sample, repeats)
        for st in stores.values():
            st.close()
        return {
            "benchmark": "loadpath", "layout": layout.to_dict(), "tokens": n_tokens, "raw_mb": round(raw_bytes / 1e6, 1),
            "stored_mb": {c: round(manifests[c].kv_stored_size / 1e6, 1) for c in codecs_list},
            "repeats": repeats, "load_threads": LOAD_THREADS, "rows": rows, "hashes": hashes,
            "target_ratio": TARGET_RATIO,
            "ratio_raw_cache": by["current ->DynamicCache (raw, no raw forms)"]["vs_plain_read"],
            "speedup_raw": round(by["previous ->DynamicCache (raw)"]["median_s"]
                                 / by["current ->DynamicCache (raw, no raw forms)"]["median_s"], 3),
            "speedup_auto": round(by["previous ->DynamicCache (auto)"]["median_s"]
                                  / by["current ->DynamicCache (auto, raw forms)"]["median_s"], 3)
            if "auto" in codecs_list else None,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_table(result: dict) -> None:
    print(f"loadpath: {result['tokens']} tokens, Qwen3-4B layout bf16, {result['raw_mb']} MB raw "
          f"(stored: {', '.join(f'{c} {m} MB' for c, m in result['stored_mb'].items())}); median of "
          f"{result['repeats']}, {result['load_threads']} load threads")
    print(f"  {'path':<46} {'s':>8} {'raw MB/s':>10} {'vs plain read':>14}")
    for r in result["rows"]:
        print(f"  {r['path']:<46} {r['median_s']:8.3f} {r['raw_mb_s']:10.0f} {r['vs_plain_read']:13.2f}x")
    print("  hashes on one thread: " + ", ".join(f"{h['hash']} {h['gb_s']} GB/s" for h in result["hashes"]))
    print(f"  current vs previous ->DynamicCache: raw {result['speedup_raw']:.2f}x faster"
          + (f", auto (raw forms) {result['speedup_auto']:.2f}x faster" if result["speedup_auto"] else ""))
    ok = result["ratio_raw_cache"] >= result["target_ratio"]
    print(f"  target ->DynamicCache (raw) >= {result['target_ratio']:.0%} of plain read: "
          f"{result['ratio_raw_cache']:.0%} -> {'MET' if ok else 'MISSED'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench loadpath", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="512 tokens, 3 repeats")
    parser.add_argument("--out", type=Path, default=RESULTS / "loadpath.json")
    args = parser.parse_args(argv)
    tokens = 512 if args.quick else args.tokens
    result = run(tokens, args.repeats)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"  wrote {args.out}")


if __name__ == "__main__":
    main()
