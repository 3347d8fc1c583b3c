"""One fetch over a rate-limited link: goodput against the link rate, on the namespace testnet (root).

    python -m bench testnet_fetch [--tokens 3774] [--rates 100mbit,1gbit] [--repeats 3] [--codec auto] [--quick]

Two hosts in their own network namespaces (bench/harness/netns.py), each a real `kvswap node start` (tiny-qwen3 as
its model; a fetch by CID needs none): node0 holds a signed synthetic artifact with the Qwen3-4B KV layout
(bench/swarm.py `seed_home`; 3774 tokens: 556.5 MB raw, ~381 MB stored with the auto codec), node1 fetches
it with `kvswap get CID`. Both nodes' links are set to the rate under test, both directions (tbf).

Per rate and repeat (rates interleaved): first a plain TCP transfer between the two namespaces (one socket,
`measure_tcp`: the ceiling, ~95% of the rate with 1500-byte frames since tbf counts Ethernet, IP and TCP
headers), then the fetch, then `kvswap rm` on node1 so the next fetch starts empty. Goodput = the
artifact's stored bytes / the fetch's own seconds (the daemon's clock: DHT lookup + manifest + every chunk
verified and written); "wall" is around the CLI call (+ process start and job polling). Medians over the
repeats. Target: goodput >= 90% of the link rate. Writes bench/results/testnet_fetch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
TARGET_FRACTION = 0.90
#: seconds one fetch may take before the benchmark gives up
FETCH_TIMEOUT_S = 900
#: bytes of the plain-TCP ceiling probe per rate (a few seconds at 100 Mbit/s)
TCP_PROBE_BYTES = {100_000_000: 40_000_000, 1_000_000_000: 300_000_000}


def cpu_sample(hosts) -> dict:
    """CPU seconds so far: the whole machine's busy time and each host's daemon."""
    import psutil

    t = psutil.cpu_times()
    return {"at": time.perf_counter(), "machine": sum(t) - t.idle - getattr(t, "iowait", 0.0),
            "hosts": {h.name: h.cpu_seconds() for h in hosts}}


def cpu_used(before: dict, after: dict) -> dict:
    """Cores busy on average between two samples: the whole machine, all daemons, and each daemon."""
    wall = after["at"] - before["at"]
    per = {n: round((after["hosts"][n] - before["hosts"][n]) / wall, 3) for n in before["hosts"]}
    return {"cores": os.cpu_count(), "machine_busy_cores": round((after["machine"] - before["machine"]) / wall, 3),
            "daemons_cores": round(sum(per.values()), 3), "per_daemon_cores": per}


def fetch_once(reader, cid: str) -> dict:
    """One `kvswap get`, with the span of its transfers from the fetcher's ledger: manifest in -> last
    chunk in (what the link was busy with; the rest of the fetch's seconds is the DHT lookup, the manifest
    request and writing the last chunk)."""
    from kvswap.ledger import Ledger

    since = time.time()
    t0 = time.perf_counter()
    got = reader.kvswap("get", cid, "--no-progress", timeout=FETCH_TIMEOUT_S)
    wall = time.perf_counter() - t0
    if not got.get("complete"):
        raise RuntimeError(f"fetch of {cid} did not complete: {got}")
    with Ledger.for_home(reader.home) as ledger:
        rows = ledger.transfers(artifact=cid, direction="in", since=since)
    span = max(r.at for r in rows) - min(r.at for r in rows)
    return {"seconds": got["seconds"], "wall_s": round(wall, 3), "bytes": got["bytes"], "span_s": round(span, 3)}


def run(n_tokens: int = 3774, rates: list[str] = ("100mbit", "1gbit"), repeats: int = 3,
        codec: str = "auto") -> dict:
    from bench.swarm import seed_home
    from bench.harness import netns as tn

    reason = tn.unavailable()
    if reason:
        raise SystemExit(f"testnet_fetch: no testnet here: {reason}")
    root = Path(tempfile.mkdtemp(prefix="kvswap-bench-tnfetch-"))
    rows: dict[str, list[dict]] = {r: [] for r in rates}
    try:
        with tn.Testnet(["1gbit", "1gbit"], root=root) as net:
            pub, reader = net.hosts
            t0 = time.perf_counter()
            art = seed_home(pub.home, n_tokens, codec)
            print(f"  seeded {art['chunks']} chunks, {art['stored_size'] / 1e6:.1f} MB stored "
                  f"({art['raw_size'] / 1e6:.1f} MB raw) in {time.perf_counter() - t0:.1f} s", flush=True)
            net.start()
            print(f"  2 daemons up in {time.perf_counter() - t0:.1f} s", flush=True)
            load_before = os.getloadavg()
            for rep in range(repeats):
                for rate in rates:
                    bits = tn.parse_rate(rate)
                    for h in net.hosts:
                        h.set_rate(rate)
                    probe = TCP_PROBE_BYTES.get(bits, max(10_000_000, bits // 8 * 3))
                    got, secs = tn.measure_tcp(pub, reader, probe)
                    cpu0 = cpu_sample(net.hosts)
                    row = fetch_once(reader, art["cid"])
                    row["cpu"] = cpu_used(cpu0, cpu_sample(net.hosts))
                    reader.kvswap("rm", art["cid"])
                    row.update(rep=rep, tcp_bytes=got, tcp_s=round(secs, 3),
                               tcp_fraction=round(got * 8 / secs / bits, 4),
                               goodput_mbit_s=round(row["bytes"] * 8 / row["seconds"] / 1e6, 1),
                               fraction=round(row["bytes"] * 8 / row["seconds"] / bits, 4),
                               wall_fraction=round(row["bytes"] * 8 / row["wall_s"] / bits, 4),
                               span_fraction=round(row["bytes"] * 8 / row["span_s"] / bits, 4),
                               overhead_s=round(row["seconds"] - row["span_s"], 3))
                    rows[rate].append(row)
                    print(f"  {rate:>8} rep {rep}: fetch {row['seconds']:.2f} s ({row['fraction']:.1%} of the link; "
                          f"transfers {row['span_fraction']:.1%}, other {row['overhead_s']:.2f} s), "
                          f"wall {row['wall_s']:.2f} s; plain TCP {row['tcp_fraction']:.1%}; cores busy: machine "
                          f"{row['cpu']['machine_busy_cores']:.2f}, daemons {row['cpu']['per_daemon_cores']}", flush=True)
            egress = _sent_by(pub)
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    summary = {}
    for rate, rs in rows.items():
        summary[rate] = {k: statistics.median(r[k] for r in rs)
                         for k in ("seconds", "wall_s", "fraction", "wall_fraction", "tcp_fraction", "goodput_mbit_s",
                                   "span_fraction", "overhead_s")}
        summary[rate]["met"] = summary[rate]["fraction"] >= TARGET_FRACTION
    return {"benchmark": "testnet_fetch", "artifact": art, "rates": list(rates), "repeats": repeats,
            "target_fraction": TARGET_FRACTION, "runs": rows, "median": summary, "publisher_sent": egress,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load_before}}


def _sent_by(host) -> dict:
    from kvswap.ledger import Ledger

    with Ledger.for_home(host.home) as ledger:
        return {r["protocol"]: r["wire_bytes"] for r in ledger.totals(by=("protocol",), direction="out")}


def print_table(r: dict) -> None:
    art = r["artifact"]
    print(f"testnet_fetch: one fetch of {art['tokens']} tokens (Qwen3-4B layout, {art['stored_size'] / 1e6:.1f} MB "
          f"stored, {art['chunks']} chunks), 2 hosts, medians of {r['repeats']}")
    print(f"  {'link':>8} {'fetch s':>8} {'goodput':>12} {'of link':>8} {'transfers':>9} {'other s':>7} "
          f"{'wall s':>7} {'of link':>8} {'plain TCP':>10}  target")
    for rate, m in r["median"].items():
        print(f"  {rate:>8} {m['seconds']:8.2f} {m['goodput_mbit_s']:7.1f} Mb/s {m['fraction']:8.1%} "
              f"{m['span_fraction']:9.1%} {m['overhead_s']:7.2f} {m['wall_s']:7.2f} {m['wall_fraction']:8.1%} "
              f"{m['tcp_fraction']:10.1%}  >= {r['target_fraction']:.0%}: {'MET' if m['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench testnet_fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3774, help="artifact length (147,456 raw B/token)")
    parser.add_argument("--rates", default="100mbit,1gbit", help="comma-separated link rates (tc units)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codec", default="auto", choices=("raw", "auto", "planes", "zstd"))
    parser.add_argument("--quick", action="store_true", help="512 tokens, one repeat")
    args = parser.parse_args(argv)
    from bench.harness.netns import unavailable

    if unavailable():
        print(f"testnet_fetch: skipped: {unavailable()}")
        return 0
    result = run(512 if args.quick else args.tokens, args.rates.split(","), 1 if args.quick else args.repeats,
                 args.codec)
    print_table(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "testnet_fetch.json").write_text(json.dumps(result, indent=2))
    print(f"  wrote {RESULTS / 'testnet_fetch.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
