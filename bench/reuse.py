"""The paper's compute table with the load included: prefill vs loading the verified KV from the store, by
context length, and the limits of the machine measured in the same run.

    python -m bench reuse [--model qwen3-4b-arch] [--dtype bf16] [--lengths 255,485,945,1888,3774]
                          [--quick] [--repeats 3] [--single-above 1000] [--device cuda] [--suffix 16]

Default model: the exact Qwen3-4B architecture with seeded random bf16 weights built in memory (~8 GB; needs
~11 GB RAM and a minute to build). Compute time does not depend on weight values, so the timings stand in for
Qwen3-4B; the output text is meaningless. Default lengths: the paper's (255 ... 3774) on the CPU, and up to
32,768 tokens with `--device cuda` (the H100 table of BENCHMARKS.md).

For each length L (a document of exactly L real-vocabulary tokens), median of --repeats:

  prefill          one forward over the L tokens (what a consumer without kvswap pays)
  step (eager)     ONE single-token forward over the KV resident in a DynamicCache (the paper's reuse step)
  step (fast)      the same step with the engine's fast decode (compiled CUDA graphs on CUDA, static cache on
                   the CPU), after a warm-up generation that pays the compile (kvswap/engine/decoding.py)
  load             kvswap.ops.load_artifact from a real Store (codec auto, 64-token blocks, as
                   `kvswap publish`): every chunk read and sha256-verified against its CID (raw local forms of
                   compressed chunks after the first load), onto the device, in cache layout; checked bit for
                   bit against the prefilled KV
  previous load    the path before this one (assemble_kv into host arrays, then DynamicCache per layer), same
                   files, same run: the old-vs-new row
  load + suffix    load + the forward of a --suffix-token question over it: the first token a consumer with a
                   question computes, against `prefill` (the target: faster at every L >= 3774 on an H100, and
                   >= 2x at 15k)

and the limits, on the same stored files in the same run:

  read+sha256      every stored chunk file read and hashed once, on LOAD_THREADS threads (no device)
  pinned copy      one host->device copy of the KV's bytes from pinned memory (CUDA only)
  limit            read+sha256 into a pinned buffer, then one async copy (CUDA only; the issue's 9.0 GB/s row)

Wall-clock on a shared machine: compare rows within one run. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: the paper's table: context tokens -> (prefill s, one reuse step s, ratio)
PAPER = {255: (0.67, 0.078, 8.6), 485: (1.29, 0.093, 13.9), 945: (2.65, 0.122, 21.7),
         1888: (5.81, 0.179, 32.4), 3774: (14.71, 0.296, 49.7)}
FULL_LENGTHS = (255, 485, 945, 1888, 3774)
GPU_LENGTHS = (255, 945, 3774, 7548, 15096, 32768)
QUICK_LENGTHS = (255, 485)
RESULTS = Path(__file__).parent / "results"

_PROSE = (
    "Peer-to-peer networks let many machines share data without a central server. Each node stores some "
    "content, announces what it holds, and fetches what it lacks from whichever peers respond first. "
    "Content addressing names every block by the hash of its bytes, so a receiver can verify what it got "
    "without trusting the sender. Language models read long documents by running a prefill pass that "
    "builds a key and value cache for every token; reading the same document again repeats that work. "
)
_QUESTION = " Question: what does content addressing let a receiver do? Answer:"


def document_ids(engine, n_tokens: int) -> list[int]:
    """Exactly `n_tokens` ids of English prose (repeated as needed) in the engine's vocabulary."""
    ids: list[int] = []
    chunk = engine.tokenize(_PROSE)
    while len(ids) < n_tokens:
        ids += chunk
    return ids[:n_tokens]


def _median_time(fn, repeats: int, sync) -> tuple[float, list[float]]:
    runs = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), runs


def limits(paths: list[Path], nbytes: int, device: str, repeats: int, threads: int) -> dict:
    """The machine's limits for this artifact, measured now: read+sha256 on `threads` threads, pinned copy,
    and read+hash into a pinned buffer followed by one async copy."""
    import torch

    def read_hash() -> None:
        def one(p: Path) -> None:
            with open(p, "rb") as fh:
                hashlib.sha256(fh.read()).digest()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, paths))

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {"read_sha256_s": _median_time(read_hash, repeats, sync)[0]}
    if device.startswith("cuda"):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        out["pinned_copy_s"] = _median_time(lambda: dev.copy_(host, non_blocking=True), repeats, sync)[0]
        sizes = [p.stat().st_size for p in paths]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        view = memoryview(host.numpy())

        def read_hash_copy() -> None:
            def one(i: int) -> None:
                with open(paths[i], "rb", buffering=0) as fh:
                    fh.readinto(view[offsets[i]:offsets[i] + sizes[i]])
                hashlib.sha256(view[offsets[i]:offsets[i] + sizes[i]]).digest()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(len(paths))))
            dev[:sum(sizes)].copy_(host[:sum(sizes)], non_blocking=True)

        out["limit_s"] = _median_time(read_hash_copy, repeats, sync)[0]
    return out


def measure(engine, n_tokens: int, repeats: int, suffix: list[int], fast_mode: str | None) -> dict:
    import torch

    from kvswap.artifact.loader import LOAD_THREADS
    from kvswap.artifact.pipeline import assemble_kv, publish_kv
    from kvswap.ops import load_artifact
    from kvswap.artifact.signing import NodeKey
    from kvswap.protocol.cid import sha256_hex
    from kvswap.engine.kvload import cache_from_loaded
    from kvswap.engine.rawbits import tensor_to_bits
    from kvswap.store import Store

    sync = engine._sync
    ids = document_ids(engine, n_tokens)
    prefill_runs, kv = [], None
    for _ in range(repeats):
        kv = engine.prefill(ids)
        prefill_runs.append(kv.meta["prefill_s"])
    token = int(kv.last_logits.argmax())
    step_runs = [engine.step_time(kv, token) for _ in range(repeats)]
    fast_runs = []
    if fast_mode:
        engine.set_decode_mode(fast_mode)
        try:
            engine.generate_from_kv(kv, [], max_new_tokens=3, stop_at_eos=False)  # compile this bucket
            for _ in range(repeats):
                out = engine.generate_from_kv(kv, [], max_new_tokens=3, stop_at_eos=False)
                fast_runs.append(out.decode_s / 2)  # two steps after the first token (which needs no forward)
        finally:
            engine.set_decode_mode("eager")
    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-reuse-"))
    try:
        store = Store(work / "store", local_key=os.urandom(32))
        manifest, chunks = publish_kv(
            kv, model_id=engine.model_id, model_fingerprint=engine.fingerprint,
            tokenizer_fingerprint=engine.tokenizer_fingerprint,
            document_hash=sha256_hex(f"reuse bench {n_tokens}".encode()), codec="auto")
        store.put_artifact(manifest, [NodeKey.generate().sign_manifest(manifest.cid)], chunks)
        loaded = load_artifact(engine, store, manifest)  # first load: writes raw forms of compressed chunks
        for mine, want in ((loaded.keys[0], kv.keys[0]), (loaded.values[-1], kv.values[-1])):
            if tensor_to_bits(mine[0]).tobytes() != want.tobytes():
                raise AssertionError("KV loaded from the store differs from the prefilled KV")
        del loaded
        load_s, load_runs = _median_time(lambda: load_artifact(engine, store, manifest), repeats, sync)

        def previous_load() -> None:  # the path the issue measured: assemble_kv, then per-layer copies to the device
            engine.cache_from_kv(assemble_kv(manifest, store.read_chunk_for_verifier))

        previous_s, previous_runs = _median_time(previous_load, repeats, sync)

        def load_and_suffix() -> None:
            cache = cache_from_loaded(engine.model.config, load_artifact(engine, store, manifest))
            engine._forward(suffix, cache)

        load_suffix_s, load_suffix_runs = _median_time(load_and_suffix, repeats, sync)
        paths = [store.chunk_path(c.cid) if c.codec == "raw" or store.raw_form(c.cid) is None
                 else store.raw_form(c.cid)[0] for c in manifest.chunks]
        lim = limits(paths, manifest.raw_size, engine.device, repeats, LOAD_THREADS)
        stored = manifest.stored_size
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prefill_s = statistics.median(prefill_runs)
    step_s = statistics.median(step_runs)
    paper = PAPER.get(n_tokens)
    row = {
        "tokens": n_tokens, "kv_bytes": kv.nbytes(), "stored_bytes": stored,
        "prefill_s": prefill_s, "step_s": step_s, "ratio": prefill_s / step_s,
        "fast_step_s": statistics.median(fast_runs) if fast_runs else None, "fast_mode": fast_mode,
        "load_s": load_s, "previous_load_s": previous_s, "load_speedup": previous_s / load_s,
        "load_suffix_s": load_suffix_s, "suffix_tokens": len(suffix),
        "prefill_vs_load_suffix": prefill_s / load_suffix_s,
        "load_gb_s": kv.nbytes() / load_s / 1e9,
        "limits": lim, "load_vs_limit": (lim.get("limit_s") or lim["read_sha256_s"]) / load_s,
        "prefill_runs_s": prefill_runs, "step_runs_s": step_runs, "fast_step_runs_s": fast_runs,
        "load_runs_s": load_runs, "previous_load_runs_s": previous_runs, "load_suffix_runs_s": load_suffix_runs,
        "paper_prefill_s": paper[0] if paper else None, "paper_step_s": paper[1] if paper else None,
        "paper_ratio": paper[2] if paper else None,
    }
    del kv
    if engine.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def render(rows: list[dict], header: str) -> str:
    lines = [header, f"{'tokens':>7} {'prefill s':>10} {'step s':>8} {'ratio':>7} {'paper':>6} {'fast step':>9} "
                     f"{'KV MB':>8} {'prev s':>8} {'load s':>8} {'GB/s':>6} {'load+sfx':>9} {'prefill/':>9} "
                     f"{'rd+sha s':>9} {'limit s':>8} {'vs limit':>8}"]
    lines.append(f"{'':>7} {'':>10} {'':>8} {'':>7} {'':>6} {'':>9} {'':>8} {'':>8} {'':>8} {'':>6} {'':>9} "
                 f"{'load+sfx':>9}")
    for r in rows:
        paper = f"{r['paper_ratio']:.1f}x" if r["paper_ratio"] else "-"
        fast = f"{r['fast_step_s']:.4f}" if r["fast_step_s"] is not None else "-"
        lim = r["limits"]
        limit = f"{lim['limit_s']:.3f}" if "limit_s" in lim else "-"
        lines.append(f"{r['tokens']:>7} {r['prefill_s']:>10.3f} {r['step_s']:>8.4f} {r['ratio']:>6.1f}x {paper:>6} "
                     f"{fast:>9} {r['kv_bytes'] / 1e6:>8.1f} {r['previous_load_s']:>8.3f} {r['load_s']:>8.3f} "
                     f"{r['load_gb_s']:>6.2f} "
                     f"{r['load_suffix_s']:>9.3f} {r['prefill_vs_load_suffix']:>8.2f}x "
                     f"{lim['read_sha256_s']:>9.3f} {limit:>8} {r['load_vs_limit']:>7.0%}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench reuse", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen3-4b-arch")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--lengths", default=None, help="comma-separated context lengths")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK_LENGTHS}")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--single-above", type=int, default=None, metavar="TOKENS",
                        help="lengths above this are measured once (a 3774-token CPU prefill takes minutes)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: the best available)")
    parser.add_argument("--fast", default=None, choices=("static", "compiled", "none"),
                        help="fast decode mode to time beside eager (default: compiled on CUDA, none on the CPU)")
    parser.add_argument("--suffix", type=int, default=16, help="question tokens prefilled over the loaded KV")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from kvswap.engine import load_engine

    t0 = time.perf_counter()
    engine = load_engine(args.model, dtype=args.dtype, device=args.device)
    build_s = time.perf_counter() - t0
    on_cuda = engine.device.startswith("cuda")
    if args.lengths:
        lengths = tuple(int(x) for x in args.lengths.split(",") if x.strip())
    else:
        lengths = QUICK_LENGTHS if args.quick else (GPU_LENGTHS if on_cuda else FULL_LENGTHS)
    fast = args.fast or ("compiled" if on_cuda else "none")
    fast = None if fast == "none" else fast
    suffix = (engine.tokenize(_QUESTION) * 8)[: args.suffix]
    engine.prefill(document_ids(engine, 16))  # warm-up: first-call allocations and kernel selection
    print(f"model ready in {build_s:.0f} s; measuring {lengths}", file=sys.stderr, flush=True)
    out = args.out or RESULTS / f"reuse-{args.model.replace('/', '_')}-{engine.dtype}-{engine.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict]) -> None:  # after every length: a run cut short keeps what it measured
        out.write_text(json.dumps({
            "bench": "reuse", "model": engine.model_id, "fingerprint": engine.fingerprint, "dtype": engine.dtype,
            "device": engine.device, "gpu": torch.cuda.get_device_name() if on_cuda else None,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "single_above": args.single_above,
            "machine": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model_ready_s": build_s, "rows": rows,
        }, indent=2) + "\n")

    rows = []
    for n in lengths:
        single = args.single_above is not None and n > args.single_above
        rows.append(measure(engine, n, 1 if single else max(1, args.repeats), suffix, fast))
        save(rows)
        r = rows[-1]
        print(f"  {n} tokens: prefill {r['prefill_s']:.3f} s, step {r['step_s']:.4f} s, load {r['load_s']:.3f} s "
              f"(previous path {r['previous_load_s']:.3f} s), load+suffix {r['load_suffix_s']:.3f} s",
              file=sys.stderr, flush=True)
    header = (f"reuse: {engine.model_id} {engine.dtype} on {engine.device}, {torch.get_num_threads()} threads, "
              f"median of {args.repeats}, codec auto, {len(suffix)}-token suffix (model ready in {build_s:.0f} s)")
    print(render(rows, header))
    print(f"wrote {out}")
    return 0
