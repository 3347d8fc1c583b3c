"""`kvswap config show|set`: the home's one configuration file, <home>/config.toml (kvswap/config.py)."""

from __future__ import annotations

import argparse
import json

from . import add_common, emit, home_of


def register(sub: argparse._SubParsersAction) -> None:
    cfg = sub.add_parser("config", help="show or change this home's settings (config.toml)")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    show = cfg_sub.add_parser("show", help="every setting's effective value and where it comes from")
    add_common(show)
    show.set_defaults(func=cmd_show)
    setp = cfg_sub.add_parser("set", help="write a setting to config.toml (comments and layout are kept)")
    setp.add_argument("name", help="table.key, e.g. node.listen, store.budget (see `kvswap config show`)")
    setp.add_argument("value", help="the value: a string, a number, true/false, or a JSON list")
    add_common(setp)
    setp.set_defaults(func=cmd_set)
    cfg.set_defaults(func=lambda args: (cfg.print_help(), 2)[1])


def _render(r: dict) -> str:
    rows = r["settings"]
    width = max(len(n) for n in rows)
    lines = [f"# {r['file']}"]
    for name, s in rows.items():
        lines.append(f"{name:<{width}}  {json.dumps(s['value'])}  ({s['source']})")
    if r["prices"]:
        lines += [f"prices.{k:<{width - 7}}  {v}  (config.toml)" for k, v in sorted(r["prices"].items())]
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    from ..config import load_config

    emit(args, load_config(home_of(args)).show(), _render)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    from ..config import setting, update_config

    s = setting(args.name)
    value: object = args.value
    if s.kind in ("list", "keys") and args.value.lstrip().startswith("["):
        try:
            value = json.loads(args.value)
        except ValueError:
            pass  # coerce() refuses it with one line
    cfg = update_config(home_of(args), {s.name: value})
    emit(args, {"name": s.name, "value": cfg[s.name], "file": str(cfg.path)},
         lambda r: f"{r['name']} = {json.dumps(r['value'])}  ({r['file']})")
    return 0
