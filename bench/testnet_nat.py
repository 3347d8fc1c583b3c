"""Nodes behind NAT on the namespace testnet (root, nftables): reachability, hole punching and fetch goodput per NAT type.

    python -m bench testnet_nat [--tokens 256] [--rate 100mbit] [--repeats 1]

Eight real `kvswap node start` daemons (light: `--no-model`), every link at `--rate` both ways
(bench/harness/netns.py; each NAT'd host behind its own router namespace, nftables masquerade):

    node0, node1   public: the bootstrap peer and the relays (circuit relay v2 once AutoNAT says public)
    node2 -> node3 public -> public             the no-NAT baseline on the same links
    node4 -> node5 cone NAT -> cone NAT          relayed first, then DCUtR hole punching
    node6 -> node7 symmetric NAT -> symmetric    no hole punch works; node7 runs with --relay-data

Each holder (node2, node4, node6) is seeded with a small artifact (one 16-token chunk: what opens the
connection and waits for its upgrade) and a large one (`--tokens` of the Qwen3-4B layout, raw, 16-token
chunks). Measured:
- time to reachability: daemon start -> public with the relay service on (public hosts), or private with a
  relay reservation (NAT'd hosts), from each daemon's `kvswap node status`;
- the cold fetch of the small artifact (DHT lookup, dial through the relay, the wait for the upgrade), then
  whether the connection was hole-punched and how long the upgrade took (the fetcher's and the holder's
  node/nat.py counters);
- the large artifact over the connection that is then open: direct, hole-punched or relayed; goodput = stored
  bytes / the fetch's own seconds, and against the no-NAT baseline (target: >= 90% after a hole punch).
Writes bench/results/nat.json.
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
#: goodput after a hole punch, against the no-NAT fetch on the same links (issue 26)
TARGET_FRACTION = 0.90
#: seconds every daemon gets to reach its reachability
READY_TIMEOUT_S = 180
PAIRS = (("none", 2, 3), ("cone", 4, 5), ("symmetric", 6, 7))


def wait_reachability(net, started: float) -> dict:
    """Seconds from `started` until each host is public with its relay on, or private with a reservation."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(done) < len(net.hosts) and time.monotonic() < deadline:
        for h in net.hosts:
            if h.name in done:
                continue
            s = h.kvswap("node", "status")["nat"]
            ok = (s["reachability"]["status"] == "private" and s["reservations"]) if h.nat else \
                 (s["reachability"]["status"] == "public" and s["relay_service"])
            if ok:
                done[h.name] = round(time.monotonic() - started, 1)
        time.sleep(0.5)
    return done


def run(n_tokens: int = 256, rate: str = "100mbit", repeats: int = 1) -> dict:
    from bench.harness import netns as tn
    from bench.swarm import seed_home
    from bench.testnet_fetch import fetch_once

    reason = tn.unavailable()
    if reason:
        raise SystemExit(f"testnet_nat: no testnet here: {reason}")
    root = Path(tempfile.mkdtemp(prefix="kvswap-bench-nat-"))
    out: dict = {"tokens": n_tokens, "rate": rate, "repeats": repeats, "pairs": {}}
    nat = {4: "cone", 5: "cone", 6: "symmetric", 7: "symmetric"}
    with tn.Testnet([rate] * 8, root=root, model=None, nat=nat) as net:
        seeds = {}
        for kind, holder, _ in PAIRS:
            seeds[kind] = [(seed_home(net.hosts[holder].home, 16, codec="raw", block_tokens=16, seed=100 + holder + 10 * r),
                            seed_home(net.hosts[holder].home, n_tokens, codec="raw", block_tokens=16, seed=holder + 10 * r))
                           for r in range(repeats)]
        big = seeds["none"][0][1]
        print(f"  seeded: small {seeds['none'][0][0]['stored_size'] / 1e6:.1f} MB, large {big['stored_size'] / 1e6:.1f} MB "
              f"({big['chunks']} chunks) per holder and repeat", flush=True)
        t0 = time.monotonic()
        net.start(list(range(7)), wait_model=False)
        net.start([7], extra_args=["--relay-data"], wait_model=False)
        out["reachability_s"] = wait_reachability(net, t0)
        print(f"  reachability (s from start): {out['reachability_s']}", flush=True)
        got, secs = tn.measure_tcp(net.hosts[2], net.hosts[3], 40_000_000)
        out["tcp_ceiling_mb_s"] = round(got / secs / 1e6, 2)
        for kind, holder, reader in PAIRS:
            h, r = net.hosts[holder], net.hosts[reader]
            rows = []
            for small, large in seeds[kind]:
                cold = fetch_once(r, small["cid"])
                status = {x.name: x.kvswap("node", "status")["nat"] for x in (h, r)}
                warm = fetch_once(r, large["cid"])
                punches = [status[x.name]["hole_punches"] for x in (h, r)]
                upgrades = [p["last_upgrade_s"] for p in punches if p["last_upgrade_s"] is not None]
                rows.append({"cold_fetch_s": cold["seconds"], "cold_bytes": cold["bytes"],
                             "hole_punched": any(p["succeeded"] for p in punches),
                             "upgrade_s": min(upgrades) if upgrades else None,
                             "relayed_peers": status[r.name]["relayed_peers"],
                             "large_fetch_s": warm["seconds"], "large_span_s": warm["span_s"],
                             "large_bytes": warm["bytes"],
                             "goodput_mb_s": round(warm["bytes"] / warm["seconds"] / 1e6, 2)})
                print(f"  {kind:<9} {rows[-1]}", flush=True)
            out["pairs"][kind] = {"rows": rows, "goodput_mb_s": statistics.median(x["goodput_mb_s"] for x in rows)}
        base = out["pairs"]["none"]["goodput_mb_s"]
        for kind in ("cone", "symmetric"):
            out["pairs"][kind]["of_no_nat"] = round(out["pairs"][kind]["goodput_mb_s"] / base, 3)
        relay = net.hosts[1].kvswap("node", "status")["nat"]["relay"]
        out["relay_after"] = {"node0": net.hosts[0].kvswap("node", "status")["nat"]["relay"], "node1": relay}
    cone = out["pairs"]["cone"]
    out["target"] = {"hole_punched_goodput_of_no_nat": TARGET_FRACTION,
                     "met": bool(all(x["hole_punched"] for x in cone["rows"]) and cone["of_no_nat"] >= TARGET_FRACTION)}
    out["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench testnet_nat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the large artifact (16 per 2.36 MB chunk)")
    parser.add_argument("--rate", default="100mbit", help="every link, both ways (tc units)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    out = run(args.tokens, args.rate, args.repeats)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "nat.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("reachability_s", "tcp_ceiling_mb_s", "target")}, indent=2))
    for kind, pair in out["pairs"].items():
        print(f"  {kind:<9} goodput {pair['goodput_mb_s']} MB/s" + (f" ({pair['of_no_nat']:.0%} of no NAT)"
                                                                      if "of_no_nat" in pair else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
