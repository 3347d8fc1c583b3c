"""`kvswap ledger` (what crossed the wire, what was computed) and `kvswap report` (egress vs prefill).

Both read the node's files directly (<home>/ledger.sqlite, the store, config.toml): no daemon needed, and
SQLite's WAL lets them read while a daemon writes.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..protocol.cid import Cid
from ..protocol.errors import UsageError
from ..ledger import COMPUTE_KINDS
from . import add_common, emit, home_of

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """'15m' / '2h' / '3d' ago, unix seconds, or an ISO-8601 time (UTC unless it names a zone)."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"--since: not a time: {text!r} (examples: 15m, 2h, 3d, 2026-11-23T10:00, 1763892000)") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def register(sub: argparse._SubParsersAction) -> None:
    led = sub.add_parser("ledger", help="list transfer and compute events from this node's ledger")
    add_common(led)
    led.add_argument("--artifact", metavar="CID", help="only events of this artifact")
    led.add_argument("--peer", help="only transfers with this peer (hides compute events)")
    led.add_argument("--kind", choices=sorted(COMPUTE_KINDS),
                     help="only compute events of this kind (hides transfers)")
    led.add_argument("--direction", choices=["in", "out"], help="only transfers in this direction (hides compute events)")
    led.add_argument("--protocol", help="only transfers on this protocol id, e.g. /kvswap/chunks/1")
    led.add_argument("--since", help="only events since: 15m, 2h, 3d, unix seconds or ISO time")
    led.add_argument("--limit", type=int, default=None, help="at most the newest N rows of each table")
    led.set_defaults(func=cmd_ledger)
    from .pay_cmds import add_ledger_actions

    add_ledger_actions(led)  # `kvswap ledger tabs`, `kvswap ledger settle`

    rep = sub.add_parser("report", help="egress vs prefill economics from this node's measurements")
    add_common(rep)
    rep.add_argument("--artifact", metavar="CID", help="measure this artifact (default: the best-measured one)")
    rep.add_argument("--readers", type=float, default=None, help="readers N (default: the paper's 80,000,000)")
    rep.add_argument("--tokens", type=int, default=None, help="document tokens (default: measured, else 3774)")
    rep.add_argument("--basis", choices=["tokens", "time"], default="tokens",
                     help="price prefill as input tokens (default) or as measured seconds x GPU $/hour")
    rep.add_argument("--prefill-cost", type=float, default=None, metavar="USD", help="C_prefill, given explicitly")
    rep.add_argument("--load-cost", type=float, default=None, metavar="USD", help="C_load (one reuse call), given explicitly")
    rep.add_argument("--reuse-ratio", type=float, default=None, help="prefill / reuse-step cost ratio (default: measured, else 49.7)")
    rep.add_argument("--raw-bytes", type=int, default=None, help="artifact raw size in bytes")
    rep.add_argument("--stored-bytes", type=int, default=None, help="artifact stored (lossless codec) size in bytes")
    rep.add_argument("--egress-per-gb", type=float, default=None, metavar="USD")
    rep.add_argument("--storage-per-gb-month", type=float, default=None, metavar="USD")
    rep.add_argument("--gpu-per-hour", type=float, default=None, metavar="USD")
    rep.add_argument("--input-per-mtok", type=float, default=None, metavar="USD")
    rep.add_argument("--cache-read-tariff", type=float, default=None, metavar="X", help="fraction of the input price")
    rep.add_argument("--horizon-months", type=float, default=None, metavar="T")
    rep.add_argument("--out", type=Path, default=None, metavar="DIR", help="write report.md, report.html and PNG plots")
    rep.add_argument("--calibrate", action="store_true",
                     help="first time one prefill of the artifact and one reuse step with this node's model, "
                          "log them to the ledger as calibration events, then report")
    rep.add_argument("--model", default=None, help="with --calibrate: the model to time (default: the one this "
                                                   "node's ledger records for the artifact, else its manifest's)")
    rep.add_argument("--repeats", type=int, default=1, help="with --calibrate: prefills to time (default 1)")
    rep.set_defaults(func=cmd_report)


# --- kvswap ledger ---------------------------------------------------------------------------------
def ledger_listing(home: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The rows and byte totals `kvswap ledger` shows, as a JSON-able dict."""
    from ..ledger import Ledger, ledger_path

    if args.artifact:
        Cid.parse(args.artifact)
    if args.limit is not None and args.limit < 0:
        raise UsageError("--limit must be >= 0")
    since = parse_since(args.since) if args.since else None
    path = ledger_path(home)
    show_transfers = args.kind is None
    show_computes = args.peer is None and args.direction is None and args.protocol is None
    result: dict[str, Any] = {"ledger": str(path), "transfers": [], "computes": [], "totals": []}
    if not path.is_file():
        return result
    with Ledger(path) as ledger:
        tfilter = dict(artifact=args.artifact, peer=args.peer, direction=args.direction,
                       protocol=args.protocol, since=since)
        if show_transfers:
            result["transfers"] = [r.to_dict() for r in ledger.transfers(**tfilter, limit=args.limit)]
            result["totals"] = ledger.totals(("protocol", "direction"), **tfilter)
        if show_computes:
            result["computes"] = [r.to_dict() for r in ledger.computes(artifact=args.artifact, kind=args.kind,
                                                                        since=since, limit=args.limit)]
    return result


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str | None, keep: int = 14) -> str:
    if not text:
        return "-"
    return text if len(text) <= keep + 2 else f"{text[:8]}..{text[-(keep - 8):]}"


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)])


def render_ledger(result: dict[str, Any]) -> str:
    parts = []
    if result["transfers"]:
        rows = [(_when(t["at"]), t["direction"], t["protocol"], _short(t["peer"]), f"{t['wire_bytes']:,}",
                 "-" if t["raw_bytes"] is None else f"{t['raw_bytes']:,}", _short(t["artifact"]),
                 _short(t["chunk"])) for t in result["transfers"]]
        parts += [f"Transfers ({len(rows)})",
                  _table(("time (UTC)", "dir", "protocol", "peer", "wire bytes", "raw bytes", "artifact", "chunk"), rows)]
    if result["totals"]:
        rows = [(t["protocol"], t["direction"], t["events"], f"{t['wire_bytes']:,}", f"{t['raw_bytes']:,}")
                for t in result["totals"]]
        parts += ["", "Totals", _table(("protocol", "dir", "events", "wire bytes", "raw bytes"), rows)]
    if result["computes"]:
        rows = [(_when(c["at"]), c["kind"] + (" (calibration)" if c["extra"].get("calibration") else ""),
                 c["model"] or "-", c["dtype"] or "-", c["tokens"], f"{c['seconds']:.4f}",
                 c["device"] or "-", _short(c["artifact"])) for c in result["computes"]]
        parts += ["" if parts else "", f"Compute events ({len(rows)})",
                  _table(("time (UTC)", "kind", "model", "dtype", "tokens", "seconds", "device", "artifact"), rows)]
    return "\n".join(parts).strip() or f"no matching events in {result['ledger']}"


def cmd_ledger(args: argparse.Namespace) -> int:
    emit(args, ledger_listing(home_of(args), args), render_ledger)
    return 0


# --- kvswap report ---------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    from ..reporting import ReportOptions, calibrate, make_report, write_report
    from ..reporting.render import render_terminal

    options = ReportOptions(
        readers=args.readers, tokens=args.tokens, basis=args.basis, prefill_cost=args.prefill_cost,
        load_cost=args.load_cost, reuse_ratio=args.reuse_ratio, raw_bytes=args.raw_bytes,
        stored_bytes=args.stored_bytes,
    )
    overrides = {
        "egress_per_gb": args.egress_per_gb, "storage_per_gb_month": args.storage_per_gb_month,
        "gpu_per_hour": args.gpu_per_hour, "input_per_mtok": args.input_per_mtok,
        "cache_read_tariff": args.cache_read_tariff, "horizon_months": args.horizon_months,
    }
    if args.artifact:
        Cid.parse(args.artifact)  # a typo is a clear FormatError, not an empty report
    if not args.calibrate and (args.model is not None or args.repeats != 1):
        raise UsageError("report: --model and --repeats belong to --calibrate")
    calibration = None
    if args.calibrate:
        print(f"calibrating: {args.repeats} prefill(s) with this node's model, logged to the ledger...",
              file=sys.stderr, flush=True)
        calibration = calibrate(home_of(args), model=args.model, tokens=args.tokens, artifact=args.artifact,
                                repeats=args.repeats)
    report = make_report(home_of(args), artifact=args.artifact, options=options, price_overrides=overrides)
    if calibration is not None:
        report["calibration"] = calibration
    if args.out is not None:
        report["files"] = write_report(report, args.out)

    def render(rep: dict[str, Any]) -> str:
        text = render_terminal(rep)
        if rep.get("files"):
            text += "\n\nWrote " + ", ".join(rep["files"].values())
        return text

    emit(args, report, render)
    return 0
