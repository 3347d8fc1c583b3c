"""The paper's compute table: full prefill vs ONE continuation step over resident KV, by context length.

    python -m bench reuse [--model qwen3-4b-arch] [--dtype bf16] [--lengths 255,485,945,1888,3774]
                          [--quick] [--repeats 3] [--single-above 1000] [--device cuda]

Default model: the exact Qwen3-4B architecture with seeded random bf16 weights built in memory (~8 GB; needs
~11 GB RAM and a minute to build; the full run takes tens of minutes on 2 CPU cores). Compute time does not
depend on weight values, so the timings stand in for Qwen3-4B; the output text is meaningless.
For each length L: a document of exactly L real-vocabulary tokens is prefilled (median of --repeats), then
one single-token forward over its KV already resident in a cache is timed (median of --repeats; the cache is
rebuilt from the KvTensors before each step and the rebuild is reported separately as "load from RAM"), the
ratio is printed beside the paper's (Qwen3-4B fp16 on an M1 Pro/MPS). Then the KV is published into a
real temporary Store (codec auto, 64-token blocks, as `kvswap publish`) and "load from store + first step"
is timed: assemble_kv (read, sha256 against every CID, decode) + Engine.cache_from_kv + the same one-token
forward; the loaded KV is checked bit for bit against the prefilled one. The first token itself needs no
forward at all (the artifact carries the last position's logits), so "load + step" is the cost of the
first token a consumer computes itself, against the resident-KV step (the 1.2x target). Mind the CPU: bf16 matmul is fast only
with AMX/AVX512-BF16; on an AVX2-only CPU it ran at ~20 GFLOP/s (fp32 ~81), so a 255-token bf16 prefill of the
full model takes minutes there and the full table hours. Wall-clock on a shared machine: compare
rows within one run, not across runs. Writes JSON to bench/results/reuse-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

#: the paper's table: context tokens -> (prefill s, one reuse step s, ratio)
PAPER = {255: (0.67, 0.078, 8.6), 485: (1.29, 0.093, 13.9), 945: (2.65, 0.122, 21.7),
         1888: (5.81, 0.179, 32.4), 3774: (14.71, 0.296, 49.7)}
FULL_LENGTHS = (255, 485, 945, 1888, 3774)
QUICK_LENGTHS = (255, 485)
RESULTS = Path(__file__).parent / "results"

_PROSE = (
    "Peer-to-peer networks let many machines share data without a central server. Each node stores some "
    "content, announces what it holds, and fetches what it lacks from whichever peers respond first. "
    "Content addressing names every block by the hash of its bytes, so a receiver can verify what it got "
    "without trusting the sender. Language models read long documents by running a prefill pass that "
    "builds a key and value cache for every token; reading the same document again repeats that work. "
)


def document_ids(engine, n_tokens: int) -> list[int]:
    """Exactly `n_tokens` ids of English prose (repeated as needed) in the engine's vocabulary."""
    ids: list[int] = []
    chunk = engine.tokenize(_PROSE)
    while len(ids) < n_tokens:
        ids += chunk
    return ids[:n_tokens]


def load_from_store(engine, kv, repeats: int) -> tuple[list[float], list[float], int]:
    """Publish `kv` into a temporary real Store; time load (read + verify + decode + cache) and the step after.

    Returns (load seconds per run, load + step seconds per run, stored bytes)."""
    import shutil
    import tempfile

    from kvswap.artifact.pipeline import assemble_kv, publish_kv
    from kvswap.artifact.signing import NodeKey
    from kvswap.cid import sha256_hex
    from kvswap.store import Store

    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-reuse-"))
    try:
        store = Store(work / "store")
        manifest, chunks = publish_kv(
            kv, model_id=engine.model_id, model_fingerprint=engine.fingerprint,
            tokenizer_fingerprint=engine.tokenizer_fingerprint,
            document_hash=sha256_hex(f"reuse bench {kv.n_tokens}".encode()), codec="auto")
        store.put_artifact(manifest, [NodeKey.generate().sign_manifest(manifest.cid)], chunks)
        loads, totals = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            loaded = assemble_kv(store.get_manifest(manifest.cid), store.read_chunk_for_verifier)
            cache = engine.cache_from_kv(loaded)
            load_s = time.perf_counter() - t0
            del cache
            if loaded.keys[0].tobytes() != kv.keys[0].tobytes() or loaded.values[-1].tobytes() != kv.values[-1].tobytes():
                raise AssertionError("KV loaded from the store differs from the prefilled KV")
            loads.append(load_s)
            totals.append(load_s + engine.step_time(loaded))
        return loads, totals, manifest.stored_size
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(engine, n_tokens: int, repeats: int) -> dict:
    ids = document_ids(engine, n_tokens)
    prefill_times, kv = [], None
    for _ in range(repeats):
        kv = engine.prefill(ids)
        prefill_times.append(kv.meta["prefill_s"])
    step_times, load_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        cache = engine.cache_from_kv(kv)
        load_times.append(time.perf_counter() - t0)
        del cache
        step_times.append(engine.step_time(kv))
    prefill_s = statistics.median(prefill_times)
    step_s = statistics.median(step_times)
    store_loads, store_totals, stored_bytes = load_from_store(engine, kv, repeats)
    load_step_s = statistics.median(store_totals)
    paper = PAPER.get(n_tokens)
    return {
        "tokens": n_tokens, "prefill_s": prefill_s, "step_s": step_s, "ratio": prefill_s / step_s,
        "store_load_s": statistics.median(store_loads), "store_load_step_s": load_step_s,
        "load_step_vs_step": load_step_s / step_s, "stored_bytes": stored_bytes,
        "store_load_runs_s": store_loads, "store_load_step_runs_s": store_totals,
        "load_from_ram_s": statistics.median(load_times), "kv_bytes": kv.nbytes(),
        "prefill_runs_s": prefill_times, "step_runs_s": step_times,
        "paper_prefill_s": paper[0] if paper else None, "paper_step_s": paper[1] if paper else None,
        "paper_ratio": paper[2] if paper else None,
    }


def render(rows: list[dict], header: str) -> str:
    lines = [header, f"{'tokens':>7} {'prefill s':>10} {'1 step s':>9} {'ratio':>7} {'paper ratio':>12} "
                     f"{'KV MB':>8} {'RAM->cache s':>12} {'store load s':>12} {'load+step s':>11} {'vs step':>8}"]
    for r in rows:
        paper = f"{r['paper_ratio']:.1f}x" if r["paper_ratio"] else "-"
        lines.append(f"{r['tokens']:>7} {r['prefill_s']:>10.3f} {r['step_s']:>9.4f} {r['ratio']:>6.1f}x "
                     f"{paper:>12} {r['kv_bytes'] / 1e6:>8.1f} {r['load_from_ram_s']:>12.4f} {r['store_load_s']:>12.3f} "
                     f"{r['store_load_step_s']:>11.3f} {r['load_step_vs_step']:>7.2f}x")
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
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.lengths:
        lengths = tuple(int(x) for x in args.lengths.split(",") if x.strip())
    else:
        lengths = QUICK_LENGTHS if args.quick else FULL_LENGTHS

    import torch

    from kvswap.engine import load_engine

    t0 = time.perf_counter()
    engine = load_engine(args.model, dtype=args.dtype, device=args.device)
    build_s = time.perf_counter() - t0
    engine.prefill(document_ids(engine, 16))  # warm-up: first-call allocations and kernel selection
    print(f"model ready in {build_s:.0f} s; measuring {lengths}", file=sys.stderr, flush=True)
    rows = []
    for n in lengths:
        single = args.single_above is not None and n > args.single_above
        rows.append(measure(engine, n, 1 if single else max(1, args.repeats)))
        print(f"  {n} tokens: prefill {rows[-1]['prefill_s']:.2f} s, step {rows[-1]['step_s']:.3f} s, "
              f"load+step {rows[-1]['store_load_step_s']:.3f} s",
              file=sys.stderr, flush=True)
    header = (f"reuse: {engine.model_id} {engine.dtype} on {engine.device}, {torch.get_num_threads()} threads, "
              f"median of {args.repeats} (model ready in {build_s:.0f} s)")
    print(render(rows, header))
    out = args.out or RESULTS / f"reuse-{args.model.replace('/', '_')}-{engine.dtype}-{engine.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "bench": "reuse", "model": engine.model_id, "fingerprint": engine.fingerprint, "dtype": engine.dtype,
        "device": engine.device, "threads": torch.get_num_threads(), "repeats": args.repeats, "single_above": args.single_above,
        "machine": platform.platform(), "cpu_count": __import__("os").cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model_ready_s": build_s, "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
