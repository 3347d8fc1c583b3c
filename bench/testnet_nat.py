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

    python -m bench testnet_nat --swarm [--consumers 8] [--tokens 1024] [--rate 100mbit] [--repeats 1] [--keep-logs]

The swarm target: 1 public publisher (node0, the bootstrap peer), 1 more public host (node1, a relay that
fetches nothing) and N consumers (node2..), all fetching one artifact at once (`kvswap get CID`, started
together), twice on the same links in one run: a fresh testnet with every host public (the no-NAT swarm),
then one with each consumer behind its own cone NAT (whose consumers must serve one another through
hole-punched connections). Every daemon light (`--no-model`), defaults otherwise (`node.swarm` superseed,
`--ration-copies 1`). Measured per swarm: the publisher's egress from its own ledger in artifact copies (as
bench/testnet_swarm.py counts it) and the bytes its interface sent (everything: relayed circuits, DHT,
identify), what each consumer got from whom, hole punches. Target: the NAT swarm's publisher egress within
0.2 copies of the no-NAT swarm's. Writes bench/results/nat_swarm.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
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
#: the swarm target: the NAT'd swarm's publisher egress at most this many copies above the no-NAT swarm's
SWARM_TARGET_COPIES = 0.2
#: seconds all consumers of one swarm get to complete
SWARM_FETCH_TIMEOUT_S = 600


def wait_reachability(net, started: float, relays: int | None = None) -> dict:
    """Seconds from `started` until each host is public with its relay on, or private with a reservation.
    `relays`: only the first `relays` public hosts must be public and relaying; the other public hosts only
    not private (a public host whose one peer is the bootstrap node has one AutoNAT answer, not the two it
    needs, until it meets more peers: in a flat swarm, once the fetch starts)."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(done) < len(net.hosts) and time.monotonic() < deadline:
        for h in net.hosts:
            if h.name in done:
                continue
            s = h.kvswap("node", "status")["nat"]
            relay = relays is None or h.index < relays
            ok = (s["reachability"]["status"] == "private" and s["reservations"]) if h.nat else \
                 (s["reachability"]["status"] == "public" and s["relay_service"]) if relay else \
                 s["reachability"]["status"] != "private"
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


def _tx_bytes(h) -> int:
    """Bytes the host's bridge-facing interface sent so far (its router's, for a NAT'd host): every byte on the
    wire, relayed circuits and DHT traffic included."""
    return int(h.exec("cat", "/sys/class/net/eth0/statistics/tx_bytes").stdout) if not h.router else \
        int(subprocess.run(["ip", "netns", "exec", h.router, "cat", "/sys/class/net/eth0/statistics/tx_bytes"],
                           capture_output=True, text=True, timeout=10, check=True).stdout)


def swarm_run(kind: str, template: Path, art: dict, consumers: int, rate: str, root: Path,
              keep_logs: bool = False) -> dict:
    """One swarm on a fresh testnet: node0 publishes, node1 relays, node2.. fetch at once; `kind` "none" (every
    host public) or "cone" (each consumer behind its own cone NAT). `keep_logs`: the daemons' logs are kept
    (ROOT/RUN-logs) even when every fetch completed."""
    import shutil

    from bench.harness import netns as tn
    from bench.swarm import egress, ingress_by_peer
    from bench.testnet_fetch import cpu_sample, cpu_used
    from bench.testnet_swarm import sends_past_ration

    n = consumers + 2
    nat = {i: "cone" for i in range(2, n)} if kind == "cone" else None
    with tn.Testnet([rate] * n, root=root, model=None, nat=nat) as net:
        pub, cons = net.hosts[0], net.hosts[2:]
        shutil.copytree(template, pub.home, dirs_exist_ok=True)
        t0 = time.monotonic()
        net.start(wait_model=False)
        ready = wait_reachability(net, t0, relays=1)
        late = {h.name: h.kvswap("node", "status")["nat"] for h in net.hosts if h.name not in ready}
        print(f"  {kind}: {len(ready)} of {n} daemons at their reachability after {time.monotonic() - t0:.1f} s "
              f"({max(ready.values(), default=0):.0f} s the last); fetching", flush=True)
        for name, s in late.items():
            print(f"    {name} not yet: {s['reachability']}, relay service {s['relay_service']}, "
                  f"{len(s['reservations'])} reservations", flush=True)
        tx0 = {h.name: _tx_bytes(h) for h in net.hosts}
        cpu0 = cpu_sample(net.hosts)
        load_before = os.getloadavg()
        begin = time.perf_counter()
        procs = [(h, h.spawn("get", art["cid"], "--no-progress"), time.perf_counter()) for h in cons]
        per_node, failed = [], []
        try:
            for h, proc, t_start in procs:
                try:
                    out, err = proc.communicate(timeout=max(1.0, SWARM_FETCH_TIMEOUT_S - (time.perf_counter() - begin)))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, err = proc.communicate()
                    failed.append({"node": h.name, "error": f"not done within {SWARM_FETCH_TIMEOUT_S} s"})
                    continue
                if proc.returncode != 0:
                    failed.append({"node": h.name, "error": (err.strip().splitlines() or ["?"])[-1][:300]})
                    continue
                got = json.loads(out)
                per_node.append({"node": h.name, "wall_s": round(time.perf_counter() - t_start, 3),
                                 "fetch_s": got["seconds"], "bytes": got["bytes"], "complete": got["complete"]})
        finally:
            for _, proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
        total_s = time.perf_counter() - begin
        cpu = cpu_used(cpu0, cpu_sample(net.hosts))
        tx = {h.name: _tx_bytes(h) - tx0[h.name] for h in net.hosts}
        if failed or keep_logs:
            net.keep_logs()
        names = {h.peer_id: h.name for h in net.hosts}
        by_name = {h.name: h for h in cons}
        for row in per_node:
            h = by_name[row["node"]]
            row["from"] = {names.get(p, p[:12]): b for p, b in ingress_by_peer(h.home).items()}
            row["egress_copies"] = egress(h.home, art["stored_size"])["copies"]
            s = h.kvswap("node", "status")["nat"]
            row["hole_punches"] = s["hole_punches"]
            row["relayed_peers"] = s["relayed_peers"]
        from_consumers = sum(b for row in per_node for p, b in row["from"].items() if p not in ("node0", "node1"))
        from_all = sum(b for row in per_node for b in row["from"].values())
        pub_out = egress(pub.home, art["stored_size"])
        return {
            "kind": kind, "reachability_s": ready, "completed": len(per_node), "failed": failed,
            "total_s": round(total_s, 2), "publisher_egress": pub_out,
            "publisher_iface_tx_copies": round(tx["node0"] / art["stored_size"], 3),
            "relay_node1_iface_tx_copies": round(tx["node1"] / art["stored_size"], 3),
            "consumer_share_of_ingress": round(from_consumers / from_all, 3) if from_all else 0.0,
            "publisher_sends": sends_past_ration(pub.home, art["cid"], 1),
            "relays": {x.name: x.kvswap("node", "status")["nat"]["relay"] for x in net.hosts[:2]},
            "per_node": per_node, "cpu": cpu, "load_before": load_before,
        }


def run_swarm(consumers: int = 8, n_tokens: int = 1024, rate: str = "100mbit", repeats: int = 1,
              keep_logs: bool = False) -> dict:
    import shutil

    from bench.harness import netns as tn
    from bench.swarm import seed_home

    reason = tn.unavailable()
    if reason:
        raise SystemExit(f"testnet_nat: no testnet here: {reason}")
    root = Path(tempfile.mkdtemp(prefix="kvswap-bench-natswarm-"))
    template = root / "publisher-template"
    art = seed_home(template, n_tokens, codec="raw", block_tokens=16)
    print(f"  seeded {art['chunks']} chunks, {art['stored_size'] / 1e6:.1f} MB stored", flush=True)
    runs = []
    try:
        for r in range(repeats):
            for kind in ("none", "cone"):
                runs.append(swarm_run(kind, template, art, consumers, rate, root, keep_logs))
                x = runs[-1]
                print(f"  {kind:<5} repeat {r + 1}: {x['completed']} of {consumers} complete in {x['total_s']:.1f} s; "
                      f"publisher egress {x['publisher_egress']['copies']:.2f} copies (ledger), "
                      f"{x['publisher_iface_tx_copies']:.2f} (interface); from consumers "
                      f"{x['consumer_share_of_ingress']:.0%}", flush=True)
    finally:
        shutil.rmtree(template, ignore_errors=True)
    med = {k: statistics.median(x["publisher_egress"]["copies"] for x in runs if x["kind"] == k) for k in ("none", "cone")}
    med_if = {k: statistics.median(x["publisher_iface_tx_copies"] for x in runs if x["kind"] == k) for k in ("none", "cone")}
    diff = round(med["cone"] - med["none"], 3)
    return {"benchmark": "testnet_nat --swarm", "consumers": consumers, "rate": rate, "artifact": art,
            "repeats": repeats, "runs": runs,
            "publisher_copies": med, "publisher_iface_copies": med_if, "difference_copies": diff,
            "target": {"within_copies": SWARM_TARGET_COPIES,
                       "met": bool(diff <= SWARM_TARGET_COPIES and all(x["completed"] == consumers for x in runs))},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench testnet_nat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the large artifact (16 per 2.36 MB chunk)")
    parser.add_argument("--rate", default="100mbit", help="every link, both ways (tc units)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--swarm", action="store_true", help="the swarm target: no-NAT vs cone-NAT consumers")
    parser.add_argument("--consumers", type=int, default=8, help="--swarm: consumers per swarm")
    parser.add_argument("--keep-logs", action="store_true", help="--swarm: keep every daemon's logs (printed where)")
    args = parser.parse_args(argv)
    if args.swarm:
        out = run_swarm(args.consumers, args.tokens, args.rate, args.repeats, args.keep_logs)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "nat_swarm.json").write_text(json.dumps(out, indent=2) + "\n")
        print(f"  publisher egress, median of {args.repeats}: no NAT {out['publisher_copies']['none']:.2f} copies, "
              f"cone NAT {out['publisher_copies']['cone']:.2f} copies (ledger); interface "
              f"{out['publisher_iface_copies']['none']:.2f} vs {out['publisher_iface_copies']['cone']:.2f}; "
              f"difference {out['difference_copies']:+.2f} copies: target <= +{SWARM_TARGET_COPIES}: "
              f"{'MET' if out['target']['met'] else 'MISSED'}")
        return 0
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
