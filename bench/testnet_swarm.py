"""Swarm on real links: 1 publisher and N consumers in their own network namespaces (root), all fetching
one artifact at once, under the swarm rules before and after issue 24, measured in the same run.

    python -m bench testnet_swarm [--consumers 8] [--tokens 3774] [--publisher-rate 100mbit]
                                  [--consumer-rate 100mbit] [--modes legacy:2,superseed:1] [--churn 2]
                                  [--churn-at 0.3] [--light] [--codec auto] [--quick]

--modes: the runs, each `SWARM:R` (`node.swarm` = superseed | legacy, `--ration-copies R`; `off` = legacy with
no rationing). The issue's old behaviour is `legacy:2` (no upload slots, patience from the refusal, 60 s per
chunk request, 2 copies), the new `superseed:1` (upload slots, one copy of a chunk at a time, the next only
a patience after the last completed, progress-based timeouts). --churn K: each run is repeated with K
consumers killed (SIGKILL) once they hold --churn-at of the artifact's bytes; the others' all-complete time
is compared with the undisturbed run's. --light: every daemon runs `--no-model` (a fetch by CID needs no
model; what makes 32 consumers fit this machine).

The namespace testnet (bench/harness/netns.py): node0 is the publisher (and bootstrap peer) behind a
--publisher-rate link, nodes 1..N are consumers behind --consumer-rate links (both directions, tbf). Every
node is a real `kvswap node start` (tiny-qwen3 as its model; a fetch by CID needs none) started with
`--ration-copies R`. node0's store holds a signed synthetic artifact with the Qwen3-4B KV layout
(bench/swarm.py `seed_home`; 3774 tokens: 556.5 MB raw, ~381 MB stored, 59 chunks + tail), copied into
each run's home before its daemon starts. Once every daemon has loaded its model, all consumers run
`kvswap get CID` at the same moment.

Reported per run (a fresh testnet each): time to all-complete (first `get` start to last exit)
against the ideal, size / publisher uplink + size / consumer link (the publisher must send every byte
once, and a consumer must receive it: the store-and-forward bound of the issue); the publisher's egress
from its own ledger (every protocol, direction "out") in artifact copies; what each consumer received from
whom and sent. Targets: publisher egress <= 1.2 copies and all-complete within 1.5x the ideal.

Then, for the first R: `kvswap report --json --artifact CID --readers N` on every host's home, and each
host's sent and received bytes from its ledger, beside the cost model's "ship" scenario (which charges
the publisher one egress per reader). Writes bench/results/testnet_swarm.json.
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
TARGET_COPIES = 1.2
TARGET_TIME_RATIO = 1.5
#: seconds a whole swarm fetch may take before the benchmark gives up
FETCH_TIMEOUT_S = 1200


def ledger_totals(home: Path) -> dict:
    """What a host sent and received (wire bytes, every protocol), from its own ledger."""
    from kvswap.ledger import Ledger

    with Ledger.for_home(home) as ledger:
        rows = ledger.totals(by=("direction",))
    return {r["direction"]: r["wire_bytes"] for r in rows}


def parse_mode(text: str) -> tuple[str, int]:
    """`superseed:1` -> ("superseed", 1); `off` -> ("legacy", 0); `legacy` -> ("legacy", 2)."""
    if text == "off":
        return "legacy", 0
    swarm, _, copies = text.partition(":")
    if swarm not in ("superseed", "legacy"):
        raise SystemExit(f"testnet_swarm: unknown swarm mode {swarm!r} (superseed, legacy, off)")
    return swarm, int(copies) if copies else (1 if swarm == "superseed" else 2)


def _held_bytes(home: Path) -> int:
    folder = home / "store" / "chunks"
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def _kill_at(hosts: list, fraction: float, stored_size: int, deadline: float) -> list[dict]:
    """SIGKILL each of `hosts`' daemons once its store holds `fraction` of the artifact's bytes (polled)."""
    left, killed = list(hosts), []
    while left and time.perf_counter() < deadline:
        for h in list(left):
            held = _held_bytes(h.home)
            if held >= fraction * stored_size:
                h.node.kill()
                killed.append({"node": h.name, "held_fraction": round(held / stored_size, 3)})
                left.remove(h)
        time.sleep(0.1)
    return killed


def run_swarm(template: Path, art: dict, consumers: int, pub_rate: str, cons_rate: str, swarm: str, ration: int,
              root: Path, report: bool, light: bool = False, churn: int = 0, churn_at: float = 0.3) -> dict:
    import threading

    from bench.swarm import egress, ingress_by_peer
    from bench.testnet_fetch import cpu_sample, cpu_used
    from bench.harness import netns as tn

    label = f"{swarm}:{ration}" + (f" churn {churn}" if churn else "")
    with tn.Testnet([pub_rate] + [cons_rate] * consumers, root=root, model=None if light else tn.DEFAULT_MODEL) as net:
        pub, cons = net.hosts[0], net.hosts[1:]
        shutil.copytree(template, pub.home, dirs_exist_ok=True)
        t0 = time.perf_counter()
        net.start(extra_args=["--ration-copies", str(ration), "--swarm", swarm])
        print(f"  {label}: {len(net.hosts)} daemons up in {time.perf_counter() - t0:.1f} s; fetching", flush=True)
        load_before = os.getloadavg()
        cpu0 = cpu_sample(net.hosts)
        begin_wall = time.time()
        begin = time.perf_counter()
        procs = [(h, h.spawn("get", art["cid"], "--no-progress"), time.perf_counter()) for h in cons]
        victims = cons[:churn]
        killed: list[dict] = []
        killer = None
        if victims:
            killer = threading.Thread(target=lambda: killed.extend(
                _kill_at(victims, churn_at, art["stored_size"], begin + FETCH_TIMEOUT_S)), daemon=True)
            killer.start()
        per_node, failed = [], []
        for h, proc, t_start in procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, FETCH_TIMEOUT_S - (time.perf_counter() - begin)))
            except subprocess.TimeoutExpired:
                for _, p, _ in procs:
                    p.kill()
                raise
            t_end = time.perf_counter()
            if h in victims:
                continue
            if proc.returncode != 0:  # a consumer that could not finish (the old rule on slow links): recorded
                failed.append({"node": h.name, "wall_s": round(t_end - t_start, 3),
                               "error": (err.strip().splitlines() or ["?"])[-1][:300]})
                continue
            got = json.loads(out)
            per_node.append({"node": h.name, "wall_s": round(t_end - t_start, 3), "fetch_s": got["seconds"],
                             "bytes": got["bytes"], "peers": got["peers"], "complete": got["complete"]})
        if killer is not None:
            killer.join(5)
        if failed:  # a consumer could not finish: its daemon's log says why (kept after teardown)
            net.keep_logs()
        total_s = time.perf_counter() - begin
        cpu = cpu_used(cpu0, cpu_sample(net.hosts))
        names = {h.peer_id: h.name for h in net.hosts}
        by_name = {h.name: h for h in cons}
        for row in per_node:
            h = by_name[row["node"]]
            row["mb_s"] = round(row["bytes"] / 1e6 / row["fetch_s"], 2)
            row["ingress_by_peer"] = {names.get(p, p[:12]): b for p, b in ingress_by_peer(h.home).items()}
            row["egress_copies"] = egress(h.home, art["stored_size"])["copies"]
        bits = {"pub": tn.parse_rate(pub_rate), "cons": tn.parse_rate(cons_rate)}
        ideal = art["stored_size"] * 8 / bits["pub"] + art["stored_size"] * 8 / bits["cons"]
        pub_out = egress(pub.home, art["stored_size"])
        first_chunk = min(_first_chunk_at(h.home, art["cid"], begin_wall) for h in cons) - begin_wall
        done_s = max((r["wall_s"] for r in per_node), default=float("nan"))
        result = {
            "label": label, "swarm": swarm, "light": light, "churn": churn, "killed": killed, "failed": failed,
            "completed": len(per_node), "done_s": round(done_s, 2),
            "ration_copies": ration, "total_s": round(total_s, 2), "ideal_s": round(ideal, 2),
            "time_ratio": round(total_s / ideal, 3), "publisher_egress": pub_out,
            "publisher_uplink_busy": round(pub_out["wire_bytes"] * 8 / total_s / bits["pub"], 3),
            "consumer_link_busy": round(sum(r["bytes"] for r in per_node) * 8 / sum(r["fetch_s"] for r in per_node)
                                        / bits["cons"], 3) if per_node else 0.0,
            "first_chunk_s": round(first_chunk, 2),
            "publisher_sends": sends_past_ration(pub.home, art["cid"], max(ration, 1)),
            "per_node": per_node, "load_before": load_before, "cpu": cpu,
        }
        log = (pub.home / "node.log").read_text(errors="replace").splitlines()
        result["publisher_ration_log"] = [line[-200:] for line in log if "kvswap.node.ration" in line][-60:]
        if report:
            result["ledgers"] = ledgers_and_cost_model(net, art, consumers)
        return result


def sends_past_ration(home: Path, cid: str, copies: int) -> dict:
    """From a server's ledger: chunk copies it sent beyond its ration (to a third, fourth... peer: its
    patience ran out for that fetcher) and copies sent twice to the same peer (a retry)."""
    from collections import defaultdict

    from kvswap.ledger import Ledger

    peers: dict[str, list[str]] = defaultdict(list)
    with Ledger.for_home(home) as ledger:
        for r in ledger.transfers(artifact=cid, direction="out"):
            if r.chunk and r.raw_bytes:
                peers[r.chunk].append(r.peer)
    past = sum(max(0, len(set(p)) - copies) for p in peers.values()) if copies else 0
    repeats = sum(len(p) - len(set(p)) for p in peers.values())
    return {"chunks": len(peers), "sends": sum(map(len, peers.values())), "past_ration": past, "repeats": repeats}


def _first_chunk_at(home: Path, cid: str, since: float) -> float:
    """When `home` had its first chunk of `cid` in (unix time, from its ledger): until then no consumer can
    share anything with another."""
    from kvswap.ledger import Ledger

    with Ledger.for_home(home) as ledger:
        rows = [r for r in ledger.transfers(artifact=cid, direction="in", since=since) if r.raw_bytes]
    return min((r.at for r in rows), default=float("inf"))


def ledgers_and_cost_model(net, art: dict, readers: int) -> dict:
    """Every host's `kvswap report --json` for the artifact (N = the consumers), and its ledger totals."""
    hosts = {}
    for h in net.hosts:
        rep = h.kvswap("report", "--json", "--artifact", art["cid"], "--readers", str(readers))
        sent_recv = ledger_totals(h.home)
        ship = rep["measured"]["ship"]
        hosts[h.name] = {"sent": sent_recv.get("out", 0), "received": sent_recv.get("in", 0),
                         "ship_requests": ship["requests"], "ship_egress_out": ship["egress_out_bytes"]}
        if h.index == 0:
            scen = {s["key"]: s for s in rep["scenarios"]}["ship_codec"]
            model = {"egress_per_gb": rep["inputs"]["egress_per_gb"]["value"],
                     "stored_bytes": rep["inputs"]["stored_bytes"]["value"],
                     "stored_bytes_source": rep["inputs"]["stored_bytes"]["source"],
                     "readers": rep["readers"], "ship_codec": scen}
    beta = model["egress_per_gb"] / 1e9
    for row in hosts.values():
        row["egress_usd"] = round(row["sent"] * beta, 6)
        row["sent_copies"] = round(row["sent"] / art["stored_size"], 3)
    model["publisher_egress_usd"] = round(readers * model["stored_bytes"] * beta, 6)
    return {"hosts": hosts, "cost_model": model}


def run(consumers: int = 8, n_tokens: int = 3774, pub_rate: str = "100mbit", cons_rate: str = "100mbit",
        modes: list[tuple[str, int]] = (("legacy", 2), ("superseed", 1)), codec: str = "auto", light: bool = False,
        churn: int = 0, churn_at: float = 0.3) -> dict:
    from bench.swarm import seed_home
    from bench.harness import netns as tn

    reason = tn.unavailable()
    if reason:
        raise SystemExit(f"testnet_swarm: no testnet here: {reason}")
    root = Path(tempfile.mkdtemp(prefix="kvswap-bench-tnswarm-"))
    ok = False
    try:
        template = root / "publisher-template"
        t0 = time.perf_counter()
        art = seed_home(template, n_tokens, codec)
        print(f"  seeded {art['chunks']} chunks, {art['stored_size'] / 1e6:.1f} MB stored "
              f"({art['raw_size'] / 1e6:.1f} MB raw) in {time.perf_counter() - t0:.1f} s", flush=True)
        runs = []
        for i, (swarm, r) in enumerate(modes):
            runs.append(run_swarm(template, art, consumers, pub_rate, cons_rate, swarm, r, root, report=(i == 0),
                                  light=light))
            if churn:
                disturbed = run_swarm(template, art, consumers, pub_rate, cons_rate, swarm, r, root, report=False,
                                      light=light, churn=churn, churn_at=churn_at)
                undisturbed = runs[-1]["done_s"]
                disturbed["vs_undisturbed"] = round(disturbed["done_s"] / undisturbed, 3) if undisturbed else None
                runs.append(disturbed)
        ok = True
    finally:
        shutil.rmtree(root / "publisher-template", ignore_errors=True)
        if ok or not any(root.glob("*-logs")):
            shutil.rmtree(root, ignore_errors=True)
    return {"benchmark": "testnet_swarm", "consumers": consumers, "artifact": art, "publisher_rate": pub_rate,
            "consumer_rate": cons_rate, "light": light, "churn": churn, "churn_at": churn_at,
            "target_copies": TARGET_COPIES, "target_time_ratio": TARGET_TIME_RATIO,
            "runs": runs, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}


def print_table(r: dict) -> None:
    art = r["artifact"]
    print(f"testnet_swarm: 1 publisher ({r['publisher_rate']}) + {r['consumers']} consumers ({r['consumer_rate']} "
          f"each), {art['tokens']} tokens Qwen3-4B layout, {art['stored_size'] / 1e6:.1f} MB stored, {art['chunks']} chunks")
    print(f"  {'rationing':<14} {'all done s':>10} {'ideal s':>8} {'x ideal':>8} {'pub copies':>10}  targets "
          f"(<= {r['target_copies']} copies, <= {r['target_time_ratio']}x)")
    for run in r["runs"]:
        e = run["publisher_egress"]
        label = run.get("label", f"{run['ration_copies']} copies")
        ok_c = e["copies"] <= r["target_copies"]
        ok_t = run["time_ratio"] <= r["target_time_ratio"]
        print(f"  {label:<14} {run['total_s']:10.1f} {run['ideal_s']:8.1f} {run['time_ratio']:8.2f} {e['copies']:10.2f}  "
              f"copies {'MET' if ok_c else 'MISSED'}, time {'MET' if ok_t else 'MISSED'}; "
              f"{run.get('completed', len(run['per_node']))} of {r['consumers'] - run.get('churn', 0)} completed")
        for f in run.get("failed", []):
            print(f"      {f['node']} FAILED after {f['wall_s']:.1f} s: {f['error']}")
        if run.get("killed"):
            print(f"      killed {', '.join(k['node'] + ' at ' + format(k['held_fraction'], '.0%') for k in run['killed'])}; "
                  f"the others done in {run['done_s']:.1f} s = {run.get('vs_undisturbed') or float('nan'):.2f}x the "
                  f"undisturbed run")
        print(f"      publisher uplink busy {run['publisher_uplink_busy']:.0%}, consumer links busy "
              f"{run['consumer_link_busy']:.0%} (mean over fetches); first chunk complete at any consumer after "
              f"{run['first_chunk_s']:.1f} s")
        ps = run["publisher_sends"]
        print(f"      publisher sent {ps['sends']} chunk copies of {ps['chunks']} chunks: {ps['past_ration']} past its ration "
              f"(a fetcher's patience ran out), {ps['repeats']} to a peer that had it already")
        cpu = run["cpu"]
        print(f"      cores busy while fetching: machine {cpu['machine_busy_cores']:.2f} of {cpu['cores']}, the {len(cpu['per_daemon_cores'])} daemons "
              f"{cpu['daemons_cores']:.2f} (publisher {cpu['per_daemon_cores']['node0']:.2f}); load average before "
              f"{run['load_before'][0]:.1f}")
        for row in run["per_node"]:
            src = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sorted(row["ingress_by_peer"].items()))
            print(f"      {row['node']:<7} {row['fetch_s']:7.1f} s {row['mb_s']:6.2f} MB/s sent {row['egress_copies']:.2f} "
                  f"copies; MB in from: {src}")
    led = next((run["ledgers"] for run in r["runs"] if "ledgers" in run), None)
    if led:
        m = led["cost_model"]
        print(f"  egress from each host's ledger (first run), at ${m['egress_per_gb']}/GB:")
        print(f"      {'host':<7} {'sent MB':>9} {'recv MB':>9} {'copies':>7} {'egress $':>9}")
        for name, row in led["hosts"].items():
            print(f"      {name:<7} {row['sent'] / 1e6:9.1f} {row['received'] / 1e6:9.1f} {row['sent_copies']:7.2f} "
                  f"{row['egress_usd']:9.4f}")
        total = sum(row["sent"] for row in led["hosts"].values())
        print(f"      {'all':<7} {total / 1e6:9.1f} {'':>9} {total / art['stored_size']:7.2f} "
              f"{sum(row['egress_usd'] for row in led['hosts'].values()):9.4f}")
        print(f"  cost model (ship_codec, N = {m['readers']:g} readers, s = {m['stored_bytes'] / 1e6:.1f} MB from "
              f"{m['stored_bytes_source']}): the publisher pays N x s x beta = ${m['publisher_egress_usd']:.4f} egress; "
              f"measured: ${led['hosts']['node0']['egress_usd']:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench testnet_swarm", description=__doc__.splitlines()[0])
    parser.add_argument("--consumers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=3774, help="artifact length (147,456 raw B/token)")
    parser.add_argument("--publisher-rate", default="100mbit")
    parser.add_argument("--consumer-rate", default="100mbit")
    parser.add_argument("--modes", default="legacy:2,superseed:1",
                        help="runs, comma-separated SWARM:R (superseed|legacy, --ration-copies R; off = no rationing)")
    parser.add_argument("--churn", type=int, default=0, help="also run each mode with this many consumers killed")
    parser.add_argument("--churn-at", type=float, default=0.3, help="fraction of the artifact a victim holds when killed")
    parser.add_argument("--light", action="store_true", help="every daemon --no-model")
    parser.add_argument("--out", default="testnet_swarm.json", help="file name under bench/results/")
    parser.add_argument("--codec", default="auto", choices=("raw", "auto", "planes", "zstd"))
    parser.add_argument("--quick", action="store_true", help="512 tokens, 4 consumers")
    args = parser.parse_args(argv)
    from bench.harness.netns import unavailable

    if unavailable():
        print(f"testnet_swarm: skipped: {unavailable()}")
        return 0
    result = run(4 if args.quick else args.consumers, 512 if args.quick else args.tokens, args.publisher_rate,
                 args.consumer_rate, [parse_mode(m) for m in args.modes.split(",")], args.codec, args.light,
                 args.churn, args.churn_at)
    print_table(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2))
    print(f"  wrote {RESULTS / args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
