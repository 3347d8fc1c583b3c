"""`kvswap node start|status|stop`, `kvswap peers` and `kvswap get`: the commands that need a daemon."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import KvswapError, UsageError
from . import add_common, emit, home_of

#: seconds `kvswap node stop` waits for the daemon's process to exit
STOP_WAIT_S = 20.0


def register(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="run and control this machine's kvswap daemon")
    node_sub = node.add_subparsers(dest="node_command", metavar="ACTION")

    start = node_sub.add_parser("start", help="start the daemon in the foreground (Ctrl-C stops it)")
    add_common(start)
    # every default below comes from <home>/config.toml (`kvswap config show`); a flag overrides it
    start.add_argument("--listen", action="append", default=None, metavar="MULTIADDR",
                       help="libp2p listen address (default: config node.listen, /ip4/127.0.0.1/tcp/4001); repeatable")
    start.add_argument("--bootstrap", nargs="*", default=None, metavar="MULTIADDR",
                       help="peers to join through (/ip4/.../tcp/.../p2p/PEERID; `kvswap node addr` prints one)")
    start.add_argument("--api", default=None, metavar="HOST:PORT", help="control API address (loopback only)")
    start.add_argument("--model", default=None, help="model for publish/generate/hosting (default: see `kvswap models`)")
    start.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    start.add_argument("--decode", default=None, choices=["eager", "static", "compiled"],
                       help="decode step (default: compiled with CUDA graphs on a GPU, paid once at start; eager on "
                            "the CPU)")
    start.add_argument("--audit-fraction", type=float, default=None, metavar="F",
                       help="fraction of the blocks of each fetched artifact to audit before use, signing an "
                            "attestation when it passes (default 0.05; 0 turns it off)")
    start.add_argument("--accept-any", action="store_true", default=None,
                       help="accept manifests signed by any key (default: only trusted publishers)")
    start.add_argument("--ration-copies", type=int, default=None, metavar="N",
                       help="copies of each chunk sent before further fetchers are pointed at holders "
                            "(default RATION_COPIES; 0 turns upload rationing off)")
    start.set_defaults(func=cmd_start)

    addr = node_sub.add_parser("addr", help="print one multiaddr of the running node (for another's --bootstrap)")
    add_common(addr)
    addr.set_defaults(func=cmd_addr)

    status = node_sub.add_parser("status", help="show the running daemon's identity, addresses and store")
    add_common(status)
    status.set_defaults(func=cmd_status)

    stop = node_sub.add_parser("stop", help="stop the running daemon")
    add_common(stop)
    stop.set_defaults(func=cmd_stop)

    peers = sub.add_parser("peers", help="peers the daemon is connected to")
    add_common(peers)
    peers.set_defaults(func=cmd_peers)

    get = sub.add_parser("get", help="fetch an artifact from the network into the local store")
    add_common(get)
    get.add_argument("cid", nargs="?", help="artifact CID")
    get.add_argument("--doc", type=Path, help="find the artifact of this document (hash of its text)")
    get.add_argument("--doc-hash", help="find the artifact of the document with this sha256")
    get.add_argument("--tokens", type=int, default=None, help="fetch only the chunks covering this many tokens")
    get.add_argument("--no-progress", action="store_true")
    get.add_argument("--accept-any", action="store_true", help="accept a manifest signed by any key for this fetch")
    get.set_defaults(func=cmd_get)
    node.set_defaults(func=lambda args: (node.print_help(), 2)[1])


def _client(args: argparse.Namespace):
    from ..node.client import NodeClient

    return NodeClient(home_of(args))


def cmd_start(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..node.daemon import NodeConfig, run_daemon

    home = home_of(args)
    if args.ration_copies is not None and args.ration_copies < 0:
        raise UsageError("--ration-copies takes 0 (no rationing) or more copies")
    cfg = load_config(home, flags={"node.listen": args.listen, "node.bootstrap": args.bootstrap, "node.api": args.api,
                                   "node.model": args.model, "node.dtype": args.dtype, "node.decode": args.decode,
                                   "node.audit_fraction": args.audit_fraction, "node.accept_any": args.accept_any,
                                   "node.ration_copies": args.ration_copies})
    config = NodeConfig(home=home, listen=cfg["node.listen"], bootstrap=cfg["node.bootstrap"], api=cfg["node.api"],
                        model=cfg["node.model"] or None, dtype=cfg["node.dtype"], accept_any=cfg["node.accept_any"],
                        decode=cfg["node.decode"] or None, audit_fraction=cfg["node.audit_fraction"],
                        ration_copies=cfg["node.ration_copies"])

    def ready(info: dict) -> None:  # once listening: the addresses a script (or another node) needs
        if args.json:
            import json

            print(json.dumps(info), flush=True)
        else:
            print(f"kvswap node {info['peer_id']} (control API {info['api']})", flush=True)
            for a in info["addrs"]:
                print(f"  listening on {a}", flush=True)

    return run_daemon(config, on_ready=ready)


def cmd_addr(args: argparse.Namespace) -> int:
    from ..node import runfiles

    info = runfiles.read_node_file(home_of(args))
    emit(args, {"addr": info["addrs"][0], "addrs": info["addrs"], "peer_id": info["peer_id"]}, lambda r: r["addr"])
    return 0


def _render_status(s: dict) -> str:
    lines = [
        f"peer id    {s.get('peer_id')}",
        f"addresses  {' '.join(s.get('addrs', []))}",
        f"api        {s.get('api')}",
        f"model      {s.get('model') or '(loading)'} {s.get('dtype', '')}",
        f"artifacts  {s.get('artifacts')}   peers {s.get('peers')}   uptime {s.get('uptime_s')} s",
    ]
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    emit(args, _client(args).get("/status"), _render_status)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from ..node import runfiles

    home = home_of(args)
    info = runfiles.read_node_file(home)
    _client(args).post("/stop")
    deadline = time.monotonic() + STOP_WAIT_S
    while runfiles.pid_alive(int(info["pid"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    if runfiles.pid_alive(int(info["pid"])):
        raise KvswapError(f"node pid {info['pid']} did not stop within {STOP_WAIT_S:.0f} s")
    emit(args, {"stopped": True, "pid": info["pid"]})
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    peers = _client(args).get("/peers")
    emit(args, peers, lambda ps: "\n".join(f"{p['peer_id']}  {' '.join(p.get('addrs', []))}" for p in ps) or "no peers")
    return 0


def fetch_source(args: argparse.Namespace):
    """`get`'s CID / --doc / --doc-hash (exactly one), as a kvswap.ops source."""
    from ..cid import Cid
    from ..document import Document

    given = [x for x in (args.cid, args.doc, args.doc_hash) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of CID, --doc FILE or --doc-hash HEX")
    if args.cid:
        return Cid.parse(args.cid)
    if args.doc:  # the same reading and hashing as `publish` (kvswap/document.py); the node checks the binding
        return Document.read(args.doc)
    doc_hash = args.doc_hash.lower()
    if len(doc_hash) != 64 or any(c not in "0123456789abcdef" for c in doc_hash):
        raise UsageError("--doc-hash takes the 64-hex-digit sha256 of the document's UTF-8 text")
    return doc_hash


def _render_get(r: dict) -> str:
    lines = [f"fetched {r['cid']}",
             f"{r['tokens']} tokens, {r['chunks']} chunks, {r['bytes']:,} bytes from {r['peers']} peer(s) "
             f"in {r['seconds']:.2f} s"]
    a = r.get("audit")
    if a:
        lines.append(f"audited {len(a['blocks'])} of {a['n_blocks']} blocks before first use: {a['mode']}")
    return "\n".join(lines)


def cmd_get(args: argparse.Namespace) -> int:
    from .. import ops
    from .progress import bar

    source = fetch_source(args)  # bad input fails before the daemon is asked anything
    with bar("fetch", enabled=not (args.no_progress or args.json)) as progress:
        try:
            result = ops.get(source, home=home_of(args), n_tokens=args.tokens, accept_any=args.accept_any,
                             progress=progress)
        except KeyboardInterrupt:  # ops.get has cancelled the fetch in the daemon
            raise KvswapError("interrupted: the fetch was cancelled (chunks already stored stay; `get` again resumes)")
    emit(args, result, _render_get)
    return 0
