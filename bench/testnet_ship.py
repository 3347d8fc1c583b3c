"""Hosted vs shipped over rate-limited links: time and bytes for one reader, on the namespace testnet (root).

    python -m bench testnet_ship [--model smollm2-135m] [--tokens 1024] [--rates 100mbit,1gbit]
                                 [--repeats 2] [--new-tokens 8] [--quick]

Two hosts in their own network namespaces (bench/harness/netns.py), both real `kvswap node start` daemons with
the model: node0 publishes an English document of exactly --tokens tokens (`kvswap publish`: its daemon
prefills, chunks, signs and stores it, and keeps hosting it); node1 is the reader. For each link rate (both
nodes, both directions) and repeat, node1 answers the same question over the document both ways:
  ship  `kvswap get CID` (fetch over libp2p + data plane, every chunk verified and stored), then
        `kvswap generate CID --prompt Q` on its own daemon (read + verify + load + Q + decode); then
        `kvswap rm CID` so the next repeat fetches again;
  host  `kvswap generate CID --prompt Q --host node0` (node0 generates next to its KV; only the prompt
        suffix and the answer cross the link).
Times are wall clock around the CLI calls (each includes ~1 s of CLI start); bytes are what node1's ledger
recorded in both directions for that way (every protocol). Medians over the repeats; the answers of both
ways are compared token for token. `--quick`: tiny-qwen3. Writes bench/results/testnet_ship-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def ledger_bytes_since(home: Path, since: float) -> int:
    from kvswap.ledger import Ledger

    with Ledger.for_home(home) as ledger:
        return sum(r["wire_bytes"] for r in ledger.totals(by=("direction",), since=since))


def timed(host, *args: str) -> tuple[dict, float, int]:
    """(JSON answer, wall seconds, bytes node's ledger recorded meanwhile) of one CLI call on `host`."""
    since = time.time()
    t0 = time.perf_counter()
    out = host.kvswap(*args, timeout=1800)
    return out, time.perf_counter() - t0, ledger_bytes_since(host.home, since)


def run(model: str = "smollm2-135m", n_tokens: int = 1024, rates: list[str] = ("100mbit", "1gbit"),
        repeats: int = 2, new_tokens: int = 8) -> dict:
    from bench.e2e import QUESTION, document_text
    from kvswap.engine import load_engine
    from bench.harness import netns as tn

    reason = tn.unavailable()
    if reason:
        raise SystemExit(f"testnet_ship: no testnet here: {reason}")
    root = Path(tempfile.mkdtemp(prefix="kvswap-bench-tnship-"))
    rows: list[dict] = []
    try:
        engine = load_engine(model, dtype="bf16")
        text, _ = document_text(engine, n_tokens)
        del engine
        doc = root / "doc.txt"
        doc.write_text(text, encoding="utf-8")
        with tn.Testnet(["1gbit", "1gbit"], root=root, model=model) as net:
            host, reader = net.hosts
            t0 = time.perf_counter()
            net.start()
            print(f"  2 daemons with {model} up in {time.perf_counter() - t0:.1f} s", flush=True)
            pub, pub_s, _ = timed(host, "publish", str(doc))
            cid = pub["cid"]
            print(f"  published {pub['n_tokens']} tokens, {pub['stored_size'] / 1e6:.2f} MB stored in {pub_s:.1f} s",
                  flush=True)
            ask = ["--prompt", QUESTION, "--max-new-tokens", str(new_tokens)]
            for rep in range(repeats):
                for rate in rates:
                    for h in net.hosts:
                        h.set_rate(rate)
                    got, get_s, get_b = timed(reader, "get", cid, "--no-progress")
                    gen, gen_s, gen_b = timed(reader, "generate", cid, *ask)
                    reader.kvswap("rm", cid)
                    hosted, host_s, host_b = timed(reader, "generate", cid, *ask, "--host", host.peer_id)
                    row = {"rate": rate, "rep": rep,
                           "ship_s": round(get_s + gen_s, 3), "ship_bytes": get_b + gen_b,
                           "ship_detail": {"get_s": round(get_s, 3), "get_daemon_s": got["seconds"],
                                           "generate_s": round(gen_s, 3),
                                                           "timings": {k: gen.get(k) for k in ("read_verify_s", "load_s", "prefill_s", "decode_s")}},
                           "host_s": round(host_s, 3), "host_bytes": host_b,
                           "host_detail": {"seconds": hosted.get("seconds"), "timings": hosted.get("host_timings")},
                           "same_tokens": list(gen.get("tokens", [])) == list(hosted.get("tokens", []))}
                    rows.append(row)
                    print(f"  {rate:>8} rep {rep}: ship {row['ship_s']:.2f} s {row['ship_bytes']:,} B "
                          f"(get {get_s:.2f} s); host {row['host_s']:.2f} s {row['host_bytes']:,} B; "
                          f"same tokens {row['same_tokens']}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    median = {}
    for rate in rates:
        rs = [r for r in rows if r["rate"] == rate]
        median[rate] = {k: statistics.median(r[k] for r in rs) for k in ("ship_s", "ship_bytes", "host_s", "host_bytes")}
        median[rate]["get_s"] = statistics.median(r["ship_detail"]["get_s"] for r in rs)
    return {"benchmark": "testnet_ship", "model": model, "document_tokens": pub["n_tokens"], "new_tokens": new_tokens,
            "artifact": {k: pub[k] for k in ("cid", "stored_size", "raw_size", "chunks")}, "rates": list(rates),
            "repeats": repeats, "runs": rows, "median": median,
            "all_same_tokens": all(r["same_tokens"] for r in rows),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_after": os.getloadavg()}}


def print_table(r: dict) -> None:
    print(f"testnet_ship: {r['model']}, document {r['document_tokens']} tokens, artifact "
          f"{r['artifact']['stored_size'] / 1e6:.2f} MB stored, {r['new_tokens']} new tokens, medians of {r['repeats']}; "
          f"same answer both ways: {r['all_same_tokens']}")
    print(f"  {'link':>8} {'ship s':>8} {'(get s)':>8} {'ship bytes':>13} {'host s':>8} {'host bytes':>11} {'bytes ship/host':>16}")
    for rate, m in r["median"].items():
        print(f"  {rate:>8} {m['ship_s']:8.2f} {m['get_s']:8.2f} {m['ship_bytes']:13,.0f} {m['host_s']:8.2f} "
              f"{m['host_bytes']:11,.0f} {m['ship_bytes'] / max(m['host_bytes'], 1):15,.0f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench testnet_ship", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rates", default="100mbit,1gbit")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny-qwen3, one repeat")
    args = parser.parse_args(argv)
    from bench.harness.netns import unavailable

    if unavailable():
        print(f"testnet_ship: skipped: {unavailable()}")
        return 0
    model = "tiny-qwen3" if args.quick else args.model
    result = run(model, args.tokens, args.rates.split(","), 1 if args.quick else args.repeats, args.new_tokens)
    print_table(result)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"testnet_ship-{model}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
