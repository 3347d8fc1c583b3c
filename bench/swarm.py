"""Swarm: 1 publisher and N consumers (real daemons on 127.0.0.1) fetching the same artifact at once.

    python -m bench swarm [--consumers 8] [--tokens 512] [--codec auto] [--quick]

Each node is a `kvswap node start` subprocess with its own home under one temp dir (tiny-qwen3 as its
model, which a fetch by CID does not need: it only keeps the daemons light). The publisher's store gets a
signed synthetic artifact with the Qwen3-4B KV layout (36 x 8 x 128, bf16; 147,456 B/token; bf16-like
values, see bench/loadpath.py) before it starts, so it provides it from its first second. Consumers
bootstrap to the publisher, trust any signer (--accept-any), wait for their model, then all run
`kvswap get CID` at the same moment. Consumers provide each chunk as soon as they hold it, so a consumer
may fetch from another consumer.

Reported: total time (first start to last finish), per-consumer time and MB/s, where each consumer's
bytes came from (ledger rows by peer), and the publisher's egress from its ledger (all transfers with
direction "out", every protocol: manifest, chunks, data plane) divided by the artifact's stored size: the
artifact copies the publisher had to send. Target: <= 2.5 copies for 8 consumers.
Writes bench/results/swarm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGET_COPIES = 2.5
#: seconds a whole swarm fetch may take before the benchmark gives up
FETCH_TIMEOUT_S = 900


def seed_home(home: Path, n_tokens: int, codec: str = "auto", seed: int = 0, block_tokens: int = 64) -> dict:
    """Put a signed synthetic Qwen3-4B-layout artifact into `home`'s store (before its daemon starts)."""
    from bench.loadpath import publish_synthetic, qwen3_4b_layout, synthetic_kv
    from kvswap.home import Home

    kv = synthetic_kv(qwen3_4b_layout(), n_tokens, seed=seed)
    with Home(home) as h:
        manifest = publish_synthetic(h.store, kv, codec, key=h.key, doc_tag=f"seed={seed}",
                                     block_tokens=block_tokens)
    return {"cid": str(manifest.cid), "tokens": n_tokens, "raw_size": manifest.raw_size,
            "stored_size": manifest.stored_size, "chunks": len(manifest.chunks), "codec": codec,
            "block_tokens": block_tokens}


def stop_nodes(nodes: list, work: Path) -> None:
    """Stop every daemon a benchmark started (reporting, not raising, a failure) and remove its work dir."""
    for node in nodes:
        try:
            node.stop()
        except Exception as exc:  # keep stopping the others
            print(f"  stopping {node.home.name}: {exc}", file=sys.stderr)
    nodes.clear()
    shutil.rmtree(work, ignore_errors=True)


def egress(home: Path, artifact_size: int) -> dict:
    """A node's outgoing bytes from its own ledger, by protocol, and in artifact copies."""
    from kvswap.ledger import Ledger

    with Ledger.for_home(home) as ledger:
        rows = ledger.totals(by=("protocol",), direction="out")
    total = sum(r["wire_bytes"] for r in rows)
    return {"wire_bytes": total, "copies": round(total / artifact_size, 3),
            "by_protocol": {r["protocol"]: r["wire_bytes"] for r in rows}}


def ingress_by_peer(home: Path) -> dict[str, int]:
    from kvswap.ledger import Ledger

    with Ledger.for_home(home) as ledger:
        return {r["peer"]: r["wire_bytes"] for r in ledger.totals(by=("peer",), direction="in")}


def start_get(home: Path, cid: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvswap", "get", cid, "--json", "--no-progress", "--home", str(home)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(consumers: int = 8, n_tokens: int = 512, codec: str = "auto", model: str = "tiny-qwen3",
        block_tokens: int = 64) -> dict:
    from bench.harness.nodes import NodeProc

    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-swarm-"))
    started: list[NodeProc] = []
    try:
        t0 = time.perf_counter()
        art = seed_home(work / "publisher", n_tokens, codec, block_tokens=block_tokens)
        print(f"  seeded {art['chunks']} chunks, {art['stored_size'] / 1e6:.1f} MB stored "
              f"({art['raw_size'] / 1e6:.1f} MB raw) in {time.perf_counter() - t0:.1f} s", flush=True)
        pub = NodeProc(work / "publisher", model=model)
        started.append(pub)
        nodes = []
        for i in range(consumers):
            node = NodeProc(work / f"consumer{i}", model=model, bootstrap=[pub.addr], accept_any=True)
            started.append(node)
            nodes.append(node)
        for node in started:
            node.wait_model()  # model loading burns CPU: let it finish before the clock starts
        print(f"  {len(started)} daemons up in {time.perf_counter() - t0:.1f} s; fetching", flush=True)
        load_before = os.getloadavg()
        begin = time.perf_counter()
        procs = [(node, start_get(node.home, art["cid"]), time.perf_counter()) for node in nodes]
        per_node = []
        for node, proc, t_start in procs:
            out, err = proc.communicate(timeout=max(1.0, FETCH_TIMEOUT_S - (time.perf_counter() - begin)))
            t_end = time.perf_counter()
            if proc.returncode != 0:
                raise RuntimeError(f"{node.home.name}: kvswap get failed: {err.strip()[-500:]}")
            got = json.loads(out)
            per_node.append({"node": node.home.name, "wall_s": round(t_end - t_start, 3), "fetch_s": got.get("seconds"),
                             "bytes": got.get("bytes"), "peers": got.get("peers"), "complete": got.get("complete")})
        total_s = time.perf_counter() - begin
        for row in per_node:
            secs = row["fetch_s"] or row["wall_s"]
            row["mb_s"] = round((row["bytes"] or 0) / 1e6 / secs, 1) if secs else None
        names = {n.peer_id: n.home.name for n in started}
        for row, node in zip(per_node, nodes):
            row["ingress_by_peer"] = {names.get(p, p[:12]): b for p, b in ingress_by_peer(node.home).items()}
        pub_out = egress(pub.home, art["stored_size"])
        result = {
            "benchmark": "swarm", "consumers": consumers, "model_of_daemons": model, "artifact": art,
            "total_s": round(total_s, 3), "aggregate_mb_s": round(consumers * art["stored_size"] / 1e6 / total_s, 1),
            "publisher_egress": pub_out, "target_copies": TARGET_COPIES, "per_node": per_node,
            "consumer_egress_copies": {n.home.name: egress(n.home, art["stored_size"])["copies"] for n in nodes},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load_before},
        }
        return result
    finally:
        stop_nodes(started, work)


def print_table(r: dict) -> None:
    art = r["artifact"]
    print(f"swarm: 1 publisher + {r['consumers']} consumers on 127.0.0.1, artifact {art['tokens']} tokens "
          f"Qwen3-4B layout, {art['chunks']} chunks of {art['block_tokens']} tokens, {art['stored_size'] / 1e6:.1f} MB stored ({art['codec']})")
    print(f"  {'node':<11} {'s':>7} {'MB/s':>7} {'peers':>5}  bytes in by source")
    for row in r["per_node"]:
        src = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(row["ingress_by_peer"].items()))
        print(f"  {row['node']:<11} {row['fetch_s'] or row['wall_s']:7.2f} {row['mb_s'] or 0:7.1f} {row['peers']!s:>5}  {src}")
    e = r["publisher_egress"]
    print(f"  total {r['total_s']:.2f} s, aggregate {r['aggregate_mb_s']} MB/s; consumers' egress in copies: "
          f"{', '.join(f'{v:.2f}' for v in r['consumer_egress_copies'].values())}")
    ok = e["copies"] <= r["target_copies"]
    print(f"  publisher egress {e['wire_bytes'] / 1e6:.1f} MB = {e['copies']:.2f} artifact copies "
          f"(target <= {r['target_copies']}) -> {'MET' if ok else 'MISSED'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench swarm", description=__doc__.splitlines()[0])
    parser.add_argument("--consumers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="artifact length (147,456 raw B/token)")
    parser.add_argument("--codec", default="auto", choices=("raw", "auto", "planes", "zstd"))
    parser.add_argument("--block-tokens", type=int, default=64, help="tokens per chunk (kvswap publish's default: 64)")
    parser.add_argument("--quick", action="store_true", help="128 tokens (~13 MB stored)")
    args = parser.parse_args(argv)
    result = run(args.consumers, 128 if args.quick else args.tokens, args.codec, block_tokens=args.block_tokens)
    print_table(result)
    RESULTS.mkdir(exist_ok=True)
    name = "swarm.json" if args.block_tokens == 64 else f"swarm-block{args.block_tokens}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"  wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
