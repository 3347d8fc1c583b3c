"""`kvswap demo`: the whole flow on this machine, with real daemons on 127.0.0.1.

Two nodes start (B bootstraps from A); A publishes a real document; B finds it by the document's hash,
fetches and verifies it, generates from it (ship), then asks A to generate from A's resident KV (host);
`kvswap exact` checks that reuse is token-exact against a fresh prefill; `kvswap report` on B prices
both ways of using the cache from the bytes and seconds the nodes just logged. The nodes stop at the end,
and everything the demo made (homes, identity keys, stores, the report) is removed unless --keep or
--workdir asks to keep it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from . import emit

DEMO_PROMPT = "\n\nThe lesson the keepers learned from their ledger is that"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole flow on two local nodes and print the report")
    p.add_argument("--model", default="smollm2-135m", help="model for both nodes (default: the embedded smollm2-135m)")
    p.add_argument("--doc", type=Path, default=None, help="document to share (default: a bundled short story)")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--workdir", type=Path, default=None, help="put the nodes' homes here, and keep them")
    p.add_argument("--keep", action="store_true",
                   help="keep the temp dir (nodes' homes, report pages); by default the demo removes what it made")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)


def _say(step: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {step}", file=sys.stderr, flush=True)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..document import Document
    from ..engine.catalog import check_name
    from ..node.launcher import ChildNode, run_cli

    import shutil

    # what a user can get wrong fails before two nodes start (a missing --doc took 21 s to say so)
    check_name(args.model)
    if args.doc is not None:
        Document.read(args.doc)
    keep = args.keep or args.workdir is not None
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kvswap-demo-"))
    doc = args.doc or work / "document.txt"
    if args.doc is None:
        work.mkdir(parents=True, exist_ok=True)
        doc.write_text(resources.files("kvswap").joinpath("data/demo_document.txt").read_text(encoding="utf-8"))
    nodes: list[ChildNode] = []
    summary: dict = {"workdir": str(work), "model": args.model}
    try:
        _say(f"starting node A and node B (model {args.model}) in {work}")
        a = ChildNode(work / "node-a", args.model)
        nodes.append(a)
        b = ChildNode(work / "node-b", args.model, bootstrap=[a.addr])
        nodes.append(b)
        run_cli(b.home, "trust", "add", run_cli(a.home, "id")["public_key"])
        _say("waiting for both nodes to load the model")
        a.wait_model()
        b.wait_model()

        _say(f"A publishes {doc.name}: prefill, chunk, compress, sign, store, provide, announce")
        pub = run_cli(a.home, "publish", str(doc))
        summary["publish"] = pub
        _say(f"  CID {pub['cid']}  {pub['n_tokens']} tokens  {pub['raw_size']:,} B raw -> "
             f"{pub['kv_stored_size']:,} B stored ({pub['ratio']:.2f}x)")

        _say(f"B looks up document {pub['document_hash'][:16]}... on the DHT and fetches it")
        got = run_cli(b.home, "get", "--doc-hash", pub["document_hash"], "--no-progress")
        summary["get"] = got
        _say(f"  {got['bytes']:,} B from {got['peers']} peer(s) in {got['seconds']:.2f} s, every chunk verified")
        summary["verify"] = run_cli(b.home, "verify", got["cid"])

        _say("B generates from the fetched KV (ship: no prefill of the document)")
        ship = run_cli(b.home, "generate", got["cid"], "--prompt", args.prompt,
                       "--max-new-tokens", str(args.max_new_tokens))
        summary["ship"] = ship
        _say("B asks A to generate from A's resident KV (host: only the prompt and the output travel)")
        host = run_cli(b.home, "generate", got["cid"], "--prompt", args.prompt,
                       "--max-new-tokens", str(args.max_new_tokens), "--host", a.addr)
        summary["host"] = host
        summary["ship_equals_host"] = ship["tokens"] == host["tokens"]

        _say("exactness: fresh prefill vs saved-and-reloaded KV (kvswap exact)")
        summary["exact"] = run_cli(b.home, "exact", "--doc", str(doc), "--model", args.model,
                                   "--question", args.prompt)
        _say("report: egress vs prefill, from B's ledger")
        out = ["--out", str(work / "report")] if keep else []
        # B never prefilled this document: --calibrate times one prefill (and a reuse step) with B's own model, so
        # the report prices B's measurements, not the paper's
        summary["report"] = run_cli(b.home, "report", "--artifact", got["cid"], "--calibrate", *out)
        summary["report_dir"] = str(work / "report") if keep else None
    finally:
        for node in reversed(nodes):
            node.stop()
        if keep:
            _say(f"nodes stopped; their homes stay in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            _say(f"nodes stopped; removed {work} (--keep keeps it)")
    if args.json:
        emit(args, summary)
    else:
        print(_render(summary, args, work))
    return 0 if summary["exact"]["exact"] else 1


def _render(s: dict, args: argparse.Namespace, work: Path) -> str:
    from ..reporting.render import render_terminal

    ex = s["exact"]
    q = ex.get("question") or {}
    lines = [
        "",
        f"Answer (ship, from B's fetched KV): {s['ship']['text'].strip()!r}",
        f"Answer (host, generated by A):      {s['host']['text'].strip()!r}",
        f"ship and host agree token for token: {s['ship_equals_host']}",
        "",
        f"Exactness (kvswap exact, {ex['model_id']} {ex['dtype']}, {ex['doc_tokens']} document tokens):",
        f"  greedy tokens from reloaded KV matching a fresh prefill: {ex['match']}/{ex['n_tokens']}",
        f"  reloaded KV bit-identical to a fresh prefill: {ex['bit_identical']};"
        f" first-step max |logit diff| {ex['first_logit_max_abs_diff']}",
        f"  with the question: {q.get('match_two_phase')}/{ex['n_tokens']} vs prefill(D) then prefill(Q);"
        f" {q.get('match_monolithic')}/{ex['n_tokens']} vs one monolithic D+Q prefill (dtype-dependent)",
        f"  exact: {ex['exact']}",
        "",
        render_terminal(s["report"]),
        "",
        f"Report page and plots: {s['report_dir']}" if s["report_dir"] else "(run with --keep to keep the report pages)",
    ]
    return "\n".join(lines)
