"""End to end: time to first token for a consumer that prefills, fetches, or asks a hosting peer.

    python -m bench e2e [--model smollm2-135m] [--tokens 1024] [--quick]

Real daemons on 127.0.0.1 (`kvswap node start`, each with its own home), driven through the real CLI:
  A  publisher: `kvswap publish doc.txt` (its daemon prefills, chunks, compresses, signs, stores, provides)
  B  consumer that fetches: `kvswap get CID` (libp2p / data plane, every chunk verified into its store), then
     `kvswap generate CID --prompt Q --max-new-tokens 1` through its own daemon (read + verify + load into a
     DynamicCache + prefill of Q's tokens + first token)
  C  consumer that asks A to generate: `kvswap generate CID --prompt Q --max-new-tokens 1 --host A`
and, in this process with the same model, the consumer that prefills itself: Engine.generate_fresh(document
ids + Q ids, max_new_tokens=1) (no network, no store).
TTFT is wall clock around the CLI calls, so (b) and (c) include ~1 s of CLI process start each, which a
long-running client would not pay; the daemons' own timings are recorded beside. Bytes moved come from each
consumer's ledger (all protocols, both directions). The document is English prose cut to exactly --tokens
tokens. Writes bench/results/e2e-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from bench.swarm import stop_nodes

RESULTS = Path(__file__).parent / "results"
QUESTION = " Summarise the passage above in one sentence:"


def ledger_bytes(home: Path) -> dict:
    from kvswap.ledger import Ledger

    with Ledger.for_home(home) as ledger:
        rows = ledger.totals(by=("direction",))
    return {r["direction"]: r["wire_bytes"] for r in rows}


def document_text(engine, n_tokens: int) -> tuple[str, list[int]]:
    """Prose whose tokenization is exactly n_tokens long (decode of the first n ids, re-checked)."""
    from bench.reuse import document_ids

    ids = document_ids(engine, n_tokens)
    text = engine.detokenize(ids)
    got = engine.tokenize(text)
    return text, got


def timed_cli(home: Path, *args: str) -> tuple[dict, float]:
    from bench.harness.nodes import cli_json

    t0 = time.perf_counter()
    out = cli_json(home, *args, timeout=900)
    return out, time.perf_counter() - t0


def run(model: str = "smollm2-135m", n_tokens: int = 1024) -> dict:
    from kvswap.engine import load_engine
    from bench.harness.nodes import NodeProc

    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-e2e-"))
    started: list[NodeProc] = []
    try:
        engine = load_engine(model, dtype="bf16")
        text, doc_ids = document_text(engine, n_tokens)
        q_ids = engine.tokenize(QUESTION)
        doc = work / "doc.txt"
        doc.write_text(text, encoding="utf-8")

        a = NodeProc(work / "a", model=model)
        started.append(a)
        b = NodeProc(work / "b", model=model, bootstrap=[a.addr], accept_any=True)
        started.append(b)
        c = NodeProc(work / "c", model=model, bootstrap=[a.addr], accept_any=True)
        started.append(c)
        for node in started:
            node.wait_model()
        pub, pub_s = timed_cli(a.home, "publish", str(doc))
        print(f"  published {pub['n_tokens']} tokens, {pub['stored_size'] / 1e6:.1f} MB stored in {pub_s:.1f} s "
              f"(daemon prefill {pub['prefill_s']:.1f} s)", flush=True)

        # (a) prefill locally: document + question, first token
        t0 = time.perf_counter()
        fresh = engine.generate_fresh(doc_ids + q_ids, max_new_tokens=1)
        a_s = time.perf_counter() - t0
        del engine

        # (b) fetch from A, verify, load, first token
        got, get_s = timed_cli(b.home, "get", pub["cid"], "--no-progress")
        gen_b, gen_b_s = timed_cli(b.home, "generate", pub["cid"], "--prompt", QUESTION, "--max-new-tokens", "1")
        b_bytes = ledger_bytes(b.home)

        # (c) ask A (which holds the KV) to generate
        gen_c, c_s = timed_cli(c.home, "generate", pub["cid"], "--prompt", QUESTION, "--max-new-tokens", "1",
                               "--host", a.addr)
        c_bytes = ledger_bytes(c.home)

        same = list(fresh.tokens) == list(gen_b.get("tokens", [])) == list(gen_c.get("tokens", []))
        rows = [
            {"way": "(a) prefill locally", "ttft_s": round(a_s, 3), "bytes_moved": 0, "detail": {}},
            {"way": "(b) fetch + verify + load + first token", "ttft_s": round(get_s + gen_b_s, 3),
             "bytes_moved": sum(b_bytes.values()),
             "detail": {"get_wall_s": round(get_s, 3), "get_daemon_s": got.get("seconds"), "generate_wall_s": round(gen_b_s, 3),
                        "read_verify_s": gen_b.get("read_verify_s"),
                        "daemon_timings": {k: gen_b.get(k) for k in ("prefill_s", "load_s", "decode_s")}, "bytes_in": b_bytes.get("in", 0),
                        "bytes_out": b_bytes.get("out", 0)}},
            {"way": "(c) ask the hosting peer", "ttft_s": round(c_s, 3), "bytes_moved": sum(c_bytes.values()),
             "detail": {"bytes_in": c_bytes.get("in", 0), "bytes_out": c_bytes.get("out", 0),
                        "host_timings": {k: gen_c.get(k) for k in ("prefill_s", "load_s", "decode_s")}}},
        ]
        return {
            "benchmark": "e2e", "model": model, "dtype": "bf16", "document_tokens": pub["n_tokens"],
            "question_tokens": len(q_ids), "artifact": {k: pub[k] for k in ("cid", "stored_size", "raw_size", "chunks")},
            "publisher_prefill_s": pub["prefill_s"], "rows": rows, "same_first_token": same,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_after": os.getloadavg()},
        }
    finally:
        stop_nodes(started, work)


def print_table(r: dict) -> None:
    print(f"e2e: {r['model']} {r['dtype']}, document {r['document_tokens']} tokens + question {r['question_tokens']}, "
          f"artifact {r['artifact']['stored_size'] / 1e6:.1f} MB stored; first tokens agree: {r['same_first_token']}")
    base = r["rows"][0]["ttft_s"]
    print(f"  {'way':<42} {'TTFT s':>8} {'vs prefill':>10} {'bytes moved':>12}")
    for row in r["rows"]:
        print(f"  {row['way']:<42} {row['ttft_s']:8.2f} {base / row['ttft_s']:9.2f}x {row['bytes_moved']:12,d}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench e2e", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="tiny-qwen3, 1024 tokens")
    args = parser.parse_args(argv)
    model = "tiny-qwen3" if args.quick else args.model
    result = run(model, args.tokens)
    print_table(result)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"e2e-{model}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
