"""Buying KV over rate-limited links (issue 25): a priced fetch against a free one, and a priced swarm's books.

    python -m bench testnet_pay [--tokens 3774] [--rate 100mbit] [--repeats 3] [--consumers 8] [--price 1000]

Namespace testnet (root; bench/harness/netns.py), every host a real `kvswap node start` (light nodes): node0 (the
bootstrap peer) holds a signed synthetic Qwen3-4B-layout artifact B and prices it: `--price-per-mb P` (micro-usd
per 10**6 stored bytes, the default credit window); node1 holds another one, A (same size, another seed), and
serves it for free; node2 holds C, priced, with a 4 GiB credit window. node3 is the reader, node4.. the rest of
the swarm. Every link is shaped to the rate, both directions.

1. Goodput, free against priced, in one run: per repeat the reader fetches A (free), `rm`, then B (priced, with
   `--budget` and `--max-price` that pay it), `rm`, then C from node2 (priced the same, with a 4 GiB credit
   window: what the default window costs); the order rotates between repeats. Goodput = stored bytes /
   the fetch's own seconds. Target: the priced median >= 95% of the free median.
2. The swarm: the reader and every other consumer fetch B at once, each with a budget. Afterwards node1's
   book is reconciled with its ledger, consumer by consumer: the bytes of the latest voucher against the stored
   bytes the ledger says node1 sent that consumer (every chunk verified, so they must be equal), and the amount
   against bytes x price. Also: node1's egress in copies of B, and what the consumers paid in all.

Writes bench/results/testnet_pay.json.
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

RESULTS = Path(__file__).parent / "results"
TARGET_FRACTION = 0.95
FETCH_TIMEOUT_S = 900


def _fetch(host, cid: str, pay: list[str]) -> dict:
    t0 = time.perf_counter()
    got = host.kvswap("get", cid, "--no-progress", *pay, timeout=FETCH_TIMEOUT_S)
    if not got.get("complete"):
        raise RuntimeError(f"fetch of {cid} did not complete: {got}")
    return {"seconds": got["seconds"], "wall_s": round(time.perf_counter() - t0, 3), "bytes": got["bytes"],
            "paid": got.get("paid", 0), "settle_s": got.get("settle_s", 0.0),
            "mb_s": round(got["bytes"] / got["seconds"] / 1e6, 2)}


def _sent_to(home: Path) -> dict[str, int]:
    """Peer -> stored chunk bytes this node sent it (both chunk paths)."""
    from kvswap.ledger import Ledger
    from kvswap.protocol.names import CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL

    out: dict[str, int] = {}
    with Ledger.for_home(home) as ledger:
        for r in ledger.transfers(protocols=(CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL), direction="out"):
            if r.chunk and (r.raw_bytes or 0) > 0:
                out[r.peer] = out.get(r.peer, 0) + r.raw_bytes
    return out


def reconcile(provider_home: Path, consumers: list, artifact: str, price: int) -> dict:
    """node1's vouchers against its ledger, per consumer (peer id -> key -> latest voucher)."""
    from kvswap.artifact.signing import NodeKey
    from kvswap.config import key_of_peer_id
    from kvswap.payments.book import PaymentBook
    from kvswap.payments.rules import BYTES_PER_MB

    me = NodeKey.load_or_create(provider_home / "identity.key").public_bytes
    book = PaymentBook.for_home(provider_home, me)
    try:
        vouchers = {v.consumer.hex(): v for v in book.vouchers("earned") if str(v.artifact) == artifact}
    finally:
        book.close()
    sent = _sent_to(provider_home)
    rows = []
    for c in consumers:
        v = vouchers.get(key_of_peer_id(c.peer_id))
        shipped = sent.get(c.peer_id, 0)
        rows.append({"consumer": c.name, "sent_bytes": shipped, "voucher_bytes": v.bytes if v else 0,
                     "amount": v.amount if v else 0, "sequence": v.sequence if v else 0,
                     "bytes_match": (v.bytes if v else 0) == shipped,
                     "amount_match": (v.amount if v else 0) == shipped * price // BYTES_PER_MB})
    return {"rows": rows, "all_match": all(r["bytes_match"] and r["amount_match"] for r in rows),
            "sent_bytes": sum(r["sent_bytes"] for r in rows), "earned": sum(r["amount"] for r in rows)}


#: the credit window of the third publisher: wide enough never to wait, what the default window is measured against
WIDE_CREDIT = "4GiB"
#: the testnet's subnet: its own, so it can run beside another benchmark's testnet
SUBNET = "10.79.0.0/24"


def run(n_tokens: int, rate: str, repeats: int, consumers: int, price: int) -> dict:
    from bench.harness import netns as tn
    from bench.swarm import seed_home

    reason = tn.unavailable()
    if reason:
        raise SystemExit(f"testnet_pay: no testnet here: {reason}")
    root = Path(tempfile.mkdtemp(prefix="kvswap-bench-tnpay-"))
    pay = ["--budget", str(10**12), "--max-price", str(price)]
    pairs: list[dict] = []
    try:
        with tn.Testnet([rate] * (3 + consumers), root=root, model=None, subnet=SUBNET) as net:
            paid_pub, free_pub, wide_pub, *swarm = net.hosts  # the priced publisher is the bootstrap peer: all know it
            reader = swarm[0]
            t0 = time.perf_counter()
            free_art = seed_home(free_pub.home, n_tokens, "auto", seed=1)
            paid_art = seed_home(paid_pub.home, n_tokens, "auto", seed=2)
            wide_art = seed_home(wide_pub.home, n_tokens, "auto", seed=3)
            print(f"  seeded 3 x {paid_art['chunks']} chunks, {paid_art['stored_size'] / 1e6:.1f} MB stored each, in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            net.start([0], extra_args=["--price-per-mb", str(price)])  # the bootstrap peer first
            net.start([2], extra_args=["--price-per-mb", str(price), "--credit-bytes", WIDE_CREDIT])
            net.start([1] + [h.index for h in swarm])
            load_before = os.getloadavg()
            kinds = [("free", free_art, []), ("priced", paid_art, pay), ("wide", wide_art, pay)]
            for rep in range(repeats):
                order = kinds[rep % 3:] + kinds[:rep % 3]  # each kind first once in three repeats
                row = {"rep": rep}
                for name, art, args in order:
                    row[name] = _fetch(reader, art["cid"], args)
                    reader.kvswap("rm", art["cid"])
                row["ratio"] = round(row["priced"]["mb_s"] / row["free"]["mb_s"], 4)
                row["wide_ratio"] = round(row["wide"]["mb_s"] / row["free"]["mb_s"], 4)
                pairs.append(row)
                print(f"  rep {rep}: free {row['free']['mb_s']:.2f} MB/s, priced {row['priced']['mb_s']:.2f} MB/s "
                      f"(paid {row['priced']['paid']}, settle {row['priced']['settle_s']:.2f} s), ratio "
                      f"{row['ratio']:.3f}; credit {WIDE_CREDIT}: {row['wide']['mb_s']:.2f} MB/s, "
                      f"{row['wide_ratio']:.3f}", flush=True)
            till = paid_pub.kvswap("node", "status")["payments"]
            before = _sent_to(paid_pub.home)
            t0 = time.perf_counter()
            gets = [h.spawn("get", paid_art["cid"], "--no-progress", "--json", *pay) for h in swarm]
            outs = []
            for g in gets:
                out, err = g.communicate(timeout=FETCH_TIMEOUT_S)
                outs.append(json.loads(out) if g.returncode == 0 else {"error": err.strip().splitlines()[-1:]})
            swarm_s = time.perf_counter() - t0
            after = _sent_to(paid_pub.home)
            swarm_sent = sum(after.values()) - sum(before.values())
            books = reconcile(paid_pub.home, swarm, paid_art["cid"], price)
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    free = statistics.median(p["free"]["mb_s"] for p in pairs)
    priced = statistics.median(p["priced"]["mb_s"] for p in pairs)
    return {"benchmark": "testnet_pay", "tokens": n_tokens, "rate": rate, "price_per_mb": price, "repeats": repeats,
            "artifact_stored_bytes": paid_art["stored_size"], "pairs": pairs,
            "median": {"free_mb_s": free, "priced_mb_s": priced, "ratio": round(priced / free, 4),
                       "pair_ratio": statistics.median(p["ratio"] for p in pairs),
                       "wide_mb_s": statistics.median(p["wide"]["mb_s"] for p in pairs),
                       "wide_pair_ratio": statistics.median(p["wide_ratio"] for p in pairs)},
            "till_after_goodput": till, "wide_credit": WIDE_CREDIT,
            "target_fraction": TARGET_FRACTION, "met": priced / free >= TARGET_FRACTION,
            "swarm": {"consumers": len(outs), "complete": sum(1 for o in outs if o.get("complete")),
                      "seconds": round(swarm_s, 2), "errors": [o["error"] for o in outs if "error" in o],
                      "publisher_copies": round(swarm_sent / paid_art["stored_size"], 3),
                      "paid": sum(o.get("paid", 0) for o in outs), "books": books},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load_before}}


def print_table(r: dict) -> None:
    m, s = r["median"], r["swarm"]
    print(f"testnet_pay: {r['tokens']} tokens (Qwen3-4B layout, {r['artifact_stored_bytes'] / 1e6:.1f} MB stored) at "
          f"{r['rate']}, price {r['price_per_mb']} micro-usd/MB, medians of {r['repeats']}")
    print(f"  free {m['free_mb_s']:.2f} MB/s, priced {m['priced_mb_s']:.2f} MB/s: {m['ratio']:.1%} (pairs "
          f"{m['pair_ratio']:.1%}); target >= {r['target_fraction']:.0%}: {'MET' if r['met'] else 'MISSED'}")
    t = r["till_after_goodput"]
    print(f"  priced with a {r['wide_credit']} credit window: {m['wide_mb_s']:.2f} MB/s ({m['wide_pair_ratio']:.1%} "
          f"of free); the default window's till waited {t.get('credit_waits')} times, "
          f"{t.get('credit_waited_s')} s, held back {t.get('held_back')}")
    b = s["books"]
    print(f"  swarm of {s['consumers']}: {s['complete']} complete in {s['seconds']:.1f} s, publisher sent "
          f"{s['publisher_copies']:.2f} copies, consumers paid {s['paid']}, publisher earned {b['earned']}; "
          f"vouchers vs bytes sent: {'reconciled to the byte' if b['all_match'] else 'MISMATCH'}")
    for row in b["rows"]:
        print(f"    {row['consumer']}: sent {row['sent_bytes']:,} B, voucher {row['voucher_bytes']:,} B, "
              f"amount {row['amount']} (seq {row['sequence']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench testnet_pay", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3774)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--consumers", type=int, default=8)
    parser.add_argument("--price", type=int, default=1000, help="micro-usd per MB the priced publisher charges")
    args = parser.parse_args(argv)
    from bench.harness.netns import unavailable

    if unavailable():
        print(f"testnet_pay: skipped: {unavailable()}")
        return 0
    result = run(args.tokens, args.rate, args.repeats, args.consumers, args.price)
    print_table(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "testnet_pay.json").write_text(json.dumps(result, indent=2))
    print(f"  wrote {RESULTS / 'testnet_pay.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
