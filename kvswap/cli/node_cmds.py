"""`kvswap node start|status|stop`, `kvswap peers` and `kvswap get`: the commands that need a daemon."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..protocol.errors import KvswapError, UsageError
from . import add_common, emit, home_of

#: seconds `kvswap node stop` waits for the daemon's process to exit
STOP_WAIT_S = 20.0


def register(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="run and control this machine's kvswap daemon")
    node_sub = node.add_subparsers(dest="node_command", metavar="ACTION")

    start = node_sub.add_parser("start", help="start the daemon in the foreground (Ctrl-C stops it)")
    add_common(start)
    add_setting_flags(start, "node")
    add_setting_flags(start, "pay")
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
    get.add_argument("--max-price", type=int, default=None, metavar="UNITS",
                     help="the most this fetch pays a provider per MB (default: config pay.max_price_mb)")
    get.add_argument("--budget", type=int, default=None, metavar="UNITS",
                     help="the most this fetch spends in all (default: config pay.budget; 0 pays nobody)")
    get.set_defaults(func=cmd_get)
    node.set_defaults(func=lambda args: (node.print_help(), 2)[1])


def add_setting_flags(parser: argparse.ArgumentParser, table: str) -> None:
    """One flag per setting of `table` that declares one (kvswap/config.py SETTINGS): its help, choices and
    argparse options come from the setting, its default is None (the home's config.toml, then the setting's
    default, decide), and its value lands in `args.<table>_<key>`."""
    from ..config import SETTINGS

    kinds = {"int": int, "float": float}
    for s in SETTINGS:
        if s.table != table or s.flag is None:
            continue
        options: dict = {"dest": f"{s.table}_{s.key}", "default": None, "help": f"{s.help} (config {s.name})"}
        if s.kind == "bool":
            options["action"] = "store_true"
        else:
            options.update({"type": kinds[s.kind]} if s.kind in kinds else {})
            options.update({"choices": [c for c in s.choices if c]} if s.choices else {})
        options.update(dict(s.flag_args))
        parser.add_argument(s.flag, **options)


def setting_flags(args: argparse.Namespace, table: str) -> dict:
    """The settings the command line gave, by name ({"node.listen": [...], ...}; None for those not given)."""
    from ..config import SETTINGS

    return {s.name: getattr(args, f"{s.table}_{s.key}") for s in SETTINGS if s.table == table and s.flag}


def _client(args: argparse.Namespace):
    from ..control.client import NodeClient

    return NodeClient(home_of(args))


def cmd_start(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..node.daemon import run_daemon

    home = home_of(args)
    config = load_config(home, flags={**setting_flags(args, "node"), **setting_flags(args, "pay")})

    def ready(info: dict) -> None:  # once listening: the addresses a script (or another node) needs
        if args.json:
            import json

            print(json.dumps(info), flush=True)
        else:
            print(f"kvswap node {info['peer_id']} (control API {info['api']})", flush=True)
            for a in info["addrs"]:
                print(f"  listening on {a}", flush=True)

    return run_daemon(home, config, on_ready=ready)


def cmd_addr(args: argparse.Namespace) -> int:
    from ..control import runfiles

    info = runfiles.read_node_file(home_of(args))
    emit(args, {"addr": info["addrs"][0], "addrs": info["addrs"], "peer_id": info["peer_id"]}, lambda r: r["addr"])
    return 0


def _render_status(s: dict) -> str:
    lines = [
        f"peer id    {s.get('peer_id')}",
        f"addresses  {' '.join(s.get('addrs', []))}",
        f"api        {s.get('api')}",
        f"model      {'none (--no-model: stores and serves only)' if s.get('light') else (s.get('model') or '(loading)')}"
        f"{'' if s.get('light') else ' ' + s.get('dtype', '')}",
        f"artifacts  {s.get('artifacts')}   peers {s.get('peers')}   uptime {s.get('uptime_s')} s",
    ]
    nat = s.get("nat")
    if nat:  # node/nat.py: AutoNAT's answer, relays, hole punches
        punches = nat["hole_punches"]
        relays = ", ".join(r["relay"][:16] for r in nat["reservations"]) or "none"
        lines.append(f"reachable  {nat['reachability']['status']} ({nat['reachability']['mode']})   "
                     f"relaying for others {'yes' if nat['relay_service'] else 'no'}   reserved on {relays}")
        lines.append(f"relayed    {nat['relayed_peers']} peers   hole punches {punches['succeeded']} ok, "
                     f"{punches['failed']} failed   chunk bytes over relays {'yes' if nat['relay_data'] else 'no'}")
    pay = s.get("payments")
    if pay and pay.get("terms"):  # node/payments.py: this node's prices and what its till did
        t = pay["terms"]
        lines.append(f"prices     {t['price_per_mb']} {t['unit']}/MB, {t['price_per_token']} {t['unit']}/token   "
                     f"credit {t['credit_bytes']:,} B, {t['credit_tokens']} tokens   vouchers taken "
                     f"{pay['vouchers_taken']}   held back {pay['held_back']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    emit(args, _client(args).status(), _render_status)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from ..control import routes, runfiles

    home = home_of(args)
    info = runfiles.read_node_file(home)
    _client(args).call(routes.STOP)
    deadline = time.monotonic() + STOP_WAIT_S
    while runfiles.pid_alive(int(info["pid"])) and time.monotonic() < deadline:
        time.sleep(0.1)
    if runfiles.pid_alive(int(info["pid"])):
        raise KvswapError(f"node pid {info['pid']} did not stop within {STOP_WAIT_S:.0f} s")
    emit(args, {"stopped": True, "pid": info["pid"]})
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    from ..control import routes

    peers = _client(args).call(routes.PEERS)
    emit(args, peers, lambda ps: "\n".join(f"{p['peer_id']}  {' '.join(p.get('addrs', []))}" for p in ps) or "no peers")
    return 0


def fetch_source(args: argparse.Namespace):
    """`get`'s CID / --doc / --doc-hash (exactly one), as a kvswap.ops source."""
    from ..document import Document
    from ..protocol.cid import Cid
    from ..protocol.keys import DocumentKey, check_hex64

    given = [x for x in (args.cid, args.doc, args.doc_hash) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of CID, --doc FILE or --doc-hash HEX")
    if args.cid:
        return Cid.parse(args.cid)
    if args.doc:  # the same reading and hashing as `publish` (kvswap/document.py); the node checks the binding
        return Document.read(args.doc)
    return DocumentKey(check_hex64(args.doc_hash.lower(), "--doc-hash (the sha256 of the document's UTF-8 text)"))


def _render_get(r: dict) -> str:
    lines = [f"fetched {r['cid']}",
             f"{r['tokens']} tokens, {r['chunks']} chunks, {r['bytes']:,} bytes from {r['peers']} peer(s) "
             f"in {r['seconds']:.2f} s"]
    if r.get("paid"):  # priced providers were paid in vouchers (kvswap/payments/)
        lines.append(f"paid {r['paid']} {r.get('unit', '')} to priced providers (`kvswap ledger tabs`)")
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
                             progress=progress, max_price=args.max_price, budget=args.budget)
        except KeyboardInterrupt:  # ops.get has cancelled the fetch in the daemon
            raise KvswapError("interrupted: the fetch was cancelled (chunks already stored stay; `get` again resumes)")
    emit(args, result, _render_get)
    return 0
