"""`kvswap node start|status|stop`, `kvswap peers` and `kvswap get`: the commands that need a daemon."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import KvswapError, NotFound, UsageError
from . import add_common, emit, home_of

#: seconds `kvswap node stop` waits for the daemon's process to exit
STOP_WAIT_S = 20.0
#: seconds between progress polls of a fetch job
POLL_INTERVAL_S = 0.2


def register(sub: argparse._SubParsersAction) -> None:
    node = sub.add_parser("node", help="run and control this machine's kvswap daemon")
    node_sub = node.add_subparsers(dest="node_command", metavar="ACTION")

    start = node_sub.add_parser("start", help="start the daemon in the foreground (Ctrl-C stops it)")
    add_common(start)
    start.add_argument("--listen", action="append", default=None, metavar="MULTIADDR",
                       help="libp2p listen address (default /ip4/127.0.0.1/tcp/0); repeatable")
    start.add_argument("--bootstrap", nargs="*", default=[], metavar="MULTIADDR",
                       help="peers to join the network through (/ip4/.../tcp/.../p2p/PEERID)")
    start.add_argument("--api", default="127.0.0.1:0", metavar="HOST:PORT", help="control API address (loopback only)")
    start.add_argument("--model", default=None, help="model for publish/generate/hosting (default: see `kvswap models`)")
    start.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    start.add_argument("--accept-any", action="store_true",
                       help="accept manifests signed by any key (default: only trusted publishers)")
    start.add_argument("--ration-copies", type=int, default=None, metavar="N",
                       help="copies of each chunk sent before further fetchers are pointed at holders "
                            "(default RATION_COPIES; 0 turns upload rationing off)")
    start.set_defaults(func=cmd_start)

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
    get.set_defaults(func=cmd_get)
    node.set_defaults(func=lambda args: (node.print_help(), 2)[1])


def _client(args: argparse.Namespace):
    from ..node.client import NodeClient

    return NodeClient(home_of(args))


def cmd_start(args: argparse.Namespace) -> int:
    from ..node.daemon import NodeConfig, run_daemon
    from ..protocol.limits import RATION_COPIES

    if args.ration_copies is not None and args.ration_copies < 0:
        raise UsageError("--ration-copies takes 0 (no rationing) or more copies")
    config = NodeConfig(
        home=home_of(args),
        listen=args.listen or ["/ip4/127.0.0.1/tcp/0"],
        bootstrap=list(args.bootstrap or []),
        api=args.api,
        model=args.model,
        dtype=args.dtype,
        accept_any=args.accept_any,
        ration_copies=RATION_COPIES if args.ration_copies is None else args.ration_copies,
    )
    return run_daemon(config)


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


def fetch_request(args: argparse.Namespace) -> dict:
    """The /get request body from `get`'s CID / --doc / --doc-hash (exactly one)."""
    from ..cid import Cid, sha256_hex

    given = [x for x in (args.cid, args.doc, args.doc_hash) if x]
    if len(given) != 1:
        raise UsageError("give exactly one of CID, --doc FILE or --doc-hash HEX")
    if args.cid:
        return {"cid": str(Cid.parse(args.cid)), "tokens": args.tokens}
    if args.doc:
        try:
            text = args.doc.read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read {args.doc}: {exc.strerror}") from None
        return {"document_hash": sha256_hex(text.encode("utf-8")), "tokens": args.tokens}
    doc_hash = args.doc_hash.lower()
    if len(doc_hash) != 64 or any(c not in "0123456789abcdef" for c in doc_hash):
        raise UsageError("--doc-hash takes the 64-hex-digit sha256 of the document's UTF-8 text")
    return {"document_hash": doc_hash, "tokens": args.tokens}


def wait_job(client, job_id: str, show_progress: bool) -> dict:
    """Poll a daemon job to completion, drawing a progress bar on stderr; return its result."""
    bar = None
    if show_progress and sys.stderr.isatty():
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TextColumn("{task.fields[peers]} peers"), transient=True)
        bar.start()
        task = bar.add_task("fetching", total=None, peers=0)
    try:
        while True:
            job = client.get(f"/jobs/{job_id}")
            p = job.get("progress") or {}
            if bar is not None and p:
                bar.update(task, completed=p.get("bytes", 0), total=p.get("total_bytes") or None,
                           peers=p.get("peers", 0))
            if job["state"] == "done":
                return job["result"]
            if job["state"] == "failed":
                err = job.get("error") or {}
                from .. import errors

                cls = getattr(errors, err.get("type", ""), KvswapError)
                raise cls(err.get("message", "job failed"))
            time.sleep(POLL_INTERVAL_S)
    finally:
        if bar is not None:
            bar.stop()


def _render_get(r: dict) -> str:
    return (f"fetched {r['cid']}\n{r['tokens']} tokens, {r['chunks']} chunks, {r['bytes']:,} bytes "
            f"from {r['peers']} peer(s) in {r['seconds']:.2f} s")


def cmd_get(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.post("/get", fetch_request(args))
    result = wait_job(client, job["id"], show_progress=not (args.no_progress or args.json))
    emit(args, result, _render_get)
    return 0
