"""`kvswap ledger tabs`, `kvswap ledger settle` and `kvswap receipts verify`: the payment book as a user meets it
(kvswap/payments/). None of them needs a running node: the book is a SQLite file in the home, and a statement is
checked with nothing but its own bytes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..protocol.errors import UsageError
from . import add_common, emit, home_of


def add_ledger_actions(ledger: argparse.ArgumentParser) -> None:
    """`tabs` and `settle` under `kvswap ledger` (which alone still lists events)."""
    actions = ledger.add_subparsers(dest="ledger_command", metavar="ACTION")
    tabs = actions.add_parser("tabs", help="earned and owed per peer, from the latest vouchers (the receipts)")
    add_common(tabs)
    tabs.set_defaults(func=cmd_tabs)
    settle = actions.add_parser("settle", help="write a signed statement of the latest vouchers per counterpart")
    add_common(settle)
    settle.add_argument("--out", type=Path, required=True, help="the statement's file (JSON)")
    settle.set_defaults(func=cmd_settle)


def register(sub: argparse._SubParsersAction) -> None:
    receipts = sub.add_parser("receipts", help="check payment statements offline")
    actions = receipts.add_subparsers(dest="receipts_command", metavar="ACTION")
    verify = actions.add_parser("verify", help="check a statement: signatures, sequences and sums (no node, no network)")
    verify.add_argument("file", type=Path)
    add_common(verify)  # --home is accepted and unused: a statement is checked with nothing but its bytes
    verify.set_defaults(func=cmd_verify)
    receipts.set_defaults(func=lambda args: (receipts.print_help(), 2)[1])


def cmd_tabs(args: argparse.Namespace) -> int:
    from ..home import Home

    with Home(home_of(args)) as home:
        tabs = home.payments.tabs()
        me = home.key.public_hex
    emit(args, {"me": me, "tabs": tabs}, _render_tabs)
    return 0


def _render_tabs(result: dict) -> str:
    if not result["tabs"]:
        return "no vouchers yet: nothing earned, nothing owed"
    lines = [f"{'peer':<18} {'earned':>10} {'owed':>10} {'unit':<10} {'MB sold':>9} {'MB bought':>9} {'tokens':>7} "
             f"{'unpaid MB':>9}"]
    for t in result["tabs"]:
        lines.append(f"{t['peer_id'][:16] + '..':<18} {t['earned']:>10} {t['owed']:>10} {t['unit']:<10} "
                     f"{t['bytes_sold'] / 1e6:>9.2f} {t['bytes_bought'] / 1e6:>9.2f} "
                     f"{t['tokens_sold'] + t['tokens_bought']:>7} {t['unpaid_bytes'] / 1e6:>9.2f}")
    return "\n".join(lines)


def cmd_settle(args: argparse.Namespace) -> int:
    from ..home import Home
    from ..payments.statement import build_statement, verify_statement

    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a folder; name a file")
    with Home(home_of(args)) as home:
        data = build_statement(home.payments, home.key)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)  # never half a statement under the real name
    os.replace(tmp, out)
    summary = verify_statement(data)
    emit(args, {"file": str(out), **summary}, lambda r: f"wrote {r['file']}: {r['vouchers']} vouchers, earned "
                                                       f"{_units(r['earned'])}, owed {_units(r['owed'])}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..payments.limits import MAX_STATEMENT_BYTES
    from ..payments.statement import verify_statement

    path = Path(args.file)
    try:
        size = path.stat().st_size
        if size > MAX_STATEMENT_BYTES:
            raise UsageError(f"{path}: {size:,} bytes, over the {MAX_STATEMENT_BYTES:,} a statement may have")
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    summary = verify_statement(data)
    emit(args, {"file": str(path), "valid": True, **summary},
         lambda r: f"valid: signed by {r['signer'][:16]}..., {r['vouchers']} vouchers, earned {_units(r['earned'])}, "
                   f"owed {_units(r['owed'])}")
    return 0


def _units(by_unit: dict) -> str:
    return ", ".join(f"{v} {u}" for u, v in sorted(by_unit.items())) or "0"
