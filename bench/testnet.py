"""A testnet of real hosts on this machine (root): kvswap nodes in their own network namespaces behind
rate-limited links (bench/harness/netns.py). It stays up until `down`.

    python -m bench testnet up [--nodes 3] [--rate 100mbit] [--link 0=1gbit --link 2=20mbit/100mbit]
    python -m bench testnet status
    python -m bench testnet kvswap NODE [--run RUN] ARGS...   # e.g. kvswap 1 publish doc.txt
    python -m bench testnet link NODE (up|down|RATE|UP/DOWN) [--run RUN]
    python -m bench testnet down [RUN] [--all]

`up` prints each node's namespace, address, peer id and home; `kvswap NODE ARGS` runs `kvswap ARGS --home
HOME --json` inside that node's namespace (its control API is on the namespace's own loopback). Without
`RUN`, `down` removes runs whose owner died (benchmarks and tests killed mid-run) and unaccounted
namespaces; `down RUN` or `down --all` also removes testnets started with `up`.
With no arguments (as `python -m bench all` calls it) it prints the status.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvswap.protocol.errors import KvswapError


def _links(args: argparse.Namespace) -> list[str]:
    links = [args.rate] * args.nodes
    for spec in args.link or []:
        index, _, rate = spec.partition("=")
        if not index.isdigit() or not rate or int(index) >= args.nodes:
            raise KvswapError(f"--link takes NODE=RATE with NODE below {args.nodes}: {spec!r}")
        links[int(index)] = rate
    return links


def cmd_up(args: argparse.Namespace) -> int:
    from bench.harness.netns import Testnet, parse_nat

    net = Testnet(_links(args), root=args.root, subnet=args.subnet, model=args.model, owner_pid=None,
                  nat=parse_nat(args.nat) if args.nat else None)
    net.create()
    try:
        extra = ["--ration-copies", str(args.ration_copies)] if args.ration_copies is not None else []
        net.start(extra_args=extra, wait_model=not args.no_wait)
    except BaseException:
        net.destroy()
        raise
    print_run(net.state(), net.dir)
    return 0


def print_run(state: dict, folder: Path | str) -> None:
    from kvswap.control.runfiles import pid_alive
    from bench.harness.netns import format_rate

    owner = state.get("owner_pid")
    print(f"testnet {state['run']}  ({len(state['hosts'])} nodes, {state['subnet']}, model {state['model']}, "
          f"{'owned by pid ' + str(owner) if owner else 'up until `down`'})  {folder}")
    for h in state["hosts"]:
        up, down = format_rate(h["up"]), format_rate(h["down"])
        alive = "running" if h.get("pid") and pid_alive(h["pid"]) else "stopped"
        print(f"  node{h['index']}  {h['netns']:<16} {h['ip']:<13} {up if up == down else up + '/' + down:<15} "
              f"{alive:<8} {h['peer_id'] or '-'}")
        if h.get("nat"):
            print(f"         behind a {h['nat']} NAT: router {h['router']} at {h['public_ip']}")
        print(f"         home {h['home']}")
    if state["hosts"]:
        first = state["hosts"][0]
        print(f"  run a command on a node:  ip netns exec {first['netns']} {sys.executable} -m kvswap "
              f"node status --home {first['home']}")
        print(f"                       or:  python -m bench testnet kvswap 0 node status --run {state['run']}")


def cmd_status(args: argparse.Namespace) -> int:
    from bench.harness.netns import is_stale, netns_names, runs

    known = runs(args.root)
    for state in known:
        print_run(state, state["dir"])
        if is_stale(state):
            print("  (stale: its owner is gone; `down` removes it)")
    accounted = {s["run"] for s in runs()}
    orphans = [ns for ns in netns_names() if not any(ns.startswith(f"kvtn-{r}-") for r in accounted)]
    if orphans:
        print(f"namespaces no run accounts for (`down` removes them): {' '.join(orphans)}")
    if not known and not orphans:
        print("no testnet is up")
    return 0


def cmd_kvswap(args: argparse.Namespace) -> int:
    import subprocess

    from bench.harness.netns import Testnet

    host = _host(args, Testnet.load(args.run, args.root))
    argv = [*host.prefix, sys.executable, "-m", "kvswap", *args.args, "--home", str(host.home)]
    return subprocess.run(argv).returncode


def cmd_link(args: argparse.Namespace) -> int:
    from bench.harness.netns import Testnet

    net = Testnet.load(args.run, args.root)
    host = _host(args, net)
    if args.state in ("up", "down"):
        host.set_link(args.state == "up")
        print(f"node{host.index}: link {args.state}")
    else:
        host.set_rate(args.state)
        net.save()
        print(f"node{host.index}: {host.link.describe()}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from bench.harness.netns import down

    removed = down(args.run, root=args.root, all_runs=args.all)
    print(f"removed {len(removed)} namespaces{': ' + ' '.join(removed) if removed else ''}")
    return 0


def _host(args: argparse.Namespace, net):
    if not 0 <= args.node < len(net.hosts):
        raise KvswapError(f"testnet {net.run} has nodes 0..{len(net.hosts) - 1}, not {args.node}")
    return net.hosts[args.node]


def build_parser() -> argparse.ArgumentParser:
    from bench.harness.netns import DEFAULT_MODEL, DEFAULT_ROOT, DEFAULT_SUBNET

    parser = argparse.ArgumentParser(prog="python -m bench testnet", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help=f"`up`: where run folders go (default {DEFAULT_ROOT}); otherwise: only runs there")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create namespaces and links, start a daemon in each")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--rate", default="100mbit", help="every node's link, both ways (tc units; UP/DOWN for two)")
    up.add_argument("--link", action="append", metavar="NODE=RATE", help="one node's link (repeatable)")
    up.add_argument("--subnet", default=DEFAULT_SUBNET)
    up.add_argument("--model", default=DEFAULT_MODEL, help="model every daemon loads")
    up.add_argument("--ration-copies", type=int, default=None, help="passed to every `kvswap node start`")
    up.add_argument("--no-wait", action="store_true", help="do not wait for the daemons' models to load")
    up.add_argument("--nat", default=None, metavar="I[:TYPE],...",
                    help="put hosts behind their own NAT router: '1,2' (cone) or '1:symmetric,2:cone' (node 0 stays public)")
    up.set_defaults(func=cmd_up)
    status = sub.add_parser("status", help="runs, their nodes and whether their daemons run")
    status.set_defaults(func=cmd_status)
    kv = sub.add_parser("kvswap", help="run a kvswap command inside a node's namespace, with its home")
    kv.add_argument("node", type=int)
    kv.add_argument("--run", default=None, help="which run (default: the only one)")
    kv.add_argument("args", nargs=argparse.REMAINDER)
    kv.set_defaults(func=cmd_kvswap)
    link = sub.add_parser("link", help="cut, restore or re-rate a node's link")
    link.add_argument("node", type=int)
    link.add_argument("state", help="up, down, or a rate such as 20mbit or 10mbit/100mbit")
    link.add_argument("--run", default=None)
    link.set_defaults(func=cmd_link)
    dn = sub.add_parser("down", help="remove a run (or stale runs; --all: every run)")
    dn.add_argument("run", nargs="?", default=None)
    dn.add_argument("--all", action="store_true")
    dn.set_defaults(func=cmd_down)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from bench.harness.netns import unavailable

    parser = build_parser()
    args = parser.parse_args(argv or ["status"])
    reason = unavailable()
    if reason:
        print(f"testnet: unavailable here: {reason}", file=sys.stderr)
        return 0 if not argv else 1
    try:
        return args.func(args)
    except KvswapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
