"""Lossless codec ratios and speeds on REAL KV: SmolLM2-135M (real weights) over real English text.

    python -m bench codecs [--tokens N] [--dtypes bf16,fp16] [--block-tokens 64] [--model smollm2-135m]

Random-weight models overstate ratios (random bf16 KV compresses 1.62-1.74x with byte planes, real SmolLM2
KV 1.48-1.53x), so compression claims are made on the embedded real
model. The KV is chunked exactly as publish does (token blocks, all layers), every chunk is encoded and
decoded per codec, and each round trip is checked bit for bit. Speeds are single-threaded MB/s of RAW
bytes (compress: raw in; decompress: raw out), on this machine, within one run: compare rows, not runs.
Prints a table; writes JSON to bench/results/codecs.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from kvswap.artifact import chunking, codecs

#: real English prose that ships with the OS or Python, first found wins
TEXT_SOURCES = (
    "/usr/share/common-licenses/GPL-3",
    "/usr/share/common-licenses/GFDL-1.3",
    "/usr/lib/python3.11/LICENSE.txt",
)
#: (label, codec, zstd level)
CONFIGS = (
    ("raw", "raw", 0),
    ("zstd-1", "zstd", 1),
    ("zstd-3", "zstd", 3),
    ("planes-1", "planes", 1),
    ("planes-3", "planes", 3),
    ("planes-19", "planes", 19),
    ("auto (default)", "auto", codecs.DEFAULT_ZSTD_LEVEL),
)
RESULTS = Path(__file__).parent / "results"


def real_text() -> tuple[str, str]:
    for source in TEXT_SOURCES:
        path = Path(source)
        if path.is_file():
            return source, path.read_text(encoding="utf-8", errors="replace")
    raise SystemExit("no real English text found on this machine (looked for: " + ", ".join(TEXT_SOURCES) + ")")


def measure(payloads: list[bytes], itemsize: int, codec: str, level: int) -> dict:
    raw_total = sum(len(p) for p in payloads)
    t0 = time.perf_counter()
    encoded = [codecs.encode_best(codec, p, itemsize, level) for p in payloads]
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = [codecs.decode(used, stored, len(p), itemsize) for (used, stored), p in zip(encoded, payloads)]
    t_dec = time.perf_counter() - t0
    if any(d != p for d, p in zip(decoded, payloads)):
        raise SystemExit(f"{codec} level {level}: round trip is not bit-exact")
    stored_total = sum(len(s) for _, s in encoded)
    used = {}
    for u, _ in encoded:
        used[u] = used.get(u, 0) + 1
    return {
        "raw_bytes": raw_total,
        "stored_bytes": stored_total,
        "ratio": raw_total / stored_total,
        "compress_MBps": raw_total / 1e6 / max(t_enc, 1e-9),
        "decompress_MBps": raw_total / 1e6 / max(t_dec, 1e-9),
        "chunks_by_codec": used,
    }


def run(model: str, dtype: str, n_tokens: int, block_tokens: int, text: str) -> dict:
    from kvswap.engine import load_engine

    engine = load_engine(model, dtype=dtype)
    ids = engine.tokenize(text)[:n_tokens]
    t0 = time.perf_counter()
    kv = engine.prefill(ids)
    prefill_s = time.perf_counter() - t0
    payloads = [chunking.chunk_payload(kv, a, b) for a, b in chunking.block_ranges(kv.n_tokens, block_tokens)]
    rows = {}
    for label, codec, level in CONFIGS:
        rows[label] = measure(payloads, kv.layout.itemsize, codec, level)
    # keys vs values: the planes codec per tensor kind, on whole-document tensors
    kinds = {}
    for kind, arrays in (("keys", kv.keys), ("values", kv.values)):
        blob = b"".join(a.tobytes() for a in arrays)
        kinds[kind] = len(blob) / len(codecs.encode("planes", blob, kv.layout.itemsize))
    return {"model": engine.model_id, "fingerprint": engine.fingerprint, "dtype": dtype, "tokens": kv.n_tokens,
            "bytes_per_token": kv.layout.bytes_per_token, "block_tokens": block_tokens, "chunks": len(payloads),
            "prefill_s": prefill_s, "codecs": rows, "planes_ratio_by_kind": kinds}


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"\n{r['model']} {r['dtype']}: {r['tokens']} tokens, {r['chunks']} chunks of {r['block_tokens']} "
                     f"tokens, {r['tokens'] * r['bytes_per_token'] / 1e6:.1f} MB raw")
        lines.append(f"| codec | ratio | compress MB/s | decompress MB/s |")
        lines.append(f"|---|---:|---:|---:|")
        for label, row in r["codecs"].items():
            lines.append(f"| {label} | {row['ratio']:.3f}x | {row['compress_MBps']:.0f} | {row['decompress_MBps']:.0f} |")
        k = r["planes_ratio_by_kind"]
        lines.append(f"planes-{codecs.DEFAULT_ZSTD_LEVEL} by tensor: keys {k['keys']:.3f}x, values {k['values']:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench codecs", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1536)
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--block-tokens", type=int, default=64)
    args = parser.parse_args(argv or [])
    source, text = real_text()
    results = [run(args.model, d, args.tokens, args.block_tokens, text) for d in args.dtypes.split(",")]
    out = {"bench": "codecs", "text_source": source, "machine": platform.platform(),
           "processor": platform.processor() or platform.machine(), "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "codecs.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"text: {source}")
    print(table(results))
    print(f"\nJSON: {RESULTS / 'codecs.json'}")


if __name__ == "__main__":
    main()
