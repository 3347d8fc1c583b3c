"""A testnet of real hosts on one Linux machine: kvswap nodes in their own network namespaces, joined by a
bridge, each behind a rate-limited link.

Why: on 127.0.0.1 every node shares one loopback with no bandwidth limit, so nothing shows what matters on
real networks (uplinks are the scarce resource; addresses other than loopback must be advertised and
dialled). Network namespaces give each node its own interfaces, addresses and port space; a `tbf` qdisc on
each end of its veth pair gives it an uplink and a downlink of a chosen rate. Nothing here is simulated:
the daemons are real `kvswap node start` processes speaking TCP through the kernel.

One run (RUN = 6 random hex digits, so parallel runs never clash; every name starts with NS_PREFIX):

    netns kvtn-RUN-sw   the switch: bridge br0 and one veth end per node (p0, p1, ...), no address
    netns kvtn-RUN-<i>  node i: lo, and eth0 (the other veth end) at 10.77.0.(11+i)/24
    shaping             tbf on node i's eth0 egress = its uplink; tbf on the switch's p<i> egress = its downlink
    daemon              ip netns exec kvtn-RUN-<i> python -m kvswap node start --home ROOT/RUN/node<i>
                          --listen /ip4/<its address>/tcp/4001 --api 127.0.0.1:8080 --model M
                          [--accept-any --bootstrap /ip4/<node 0>/tcp/4001/p2p/<node 0's peer id>]
    state               ROOT/RUN/testnet.json and REGISTRY/RUN -> ROOT/RUN, both before the first namespace

The address and bootstrap rules are the docker testnet's (docker/compose.yaml; tests/test_docker_files.py
checks both agree through `node_options`): node i at host number 11+i of the subnet, listening on that address
at port 4001, its control API on its own loopback at 8080; node 0 is the bootstrap peer, whose identity is
fixed before anything starts so the others can name its peer id; nodes 1.. bootstrap through it and accept
any signer. Every interface, address and route lives in the run's namespaces: the caller's network
namespace is never touched, and deleting the namespaces removes everything (`down`).

Teardown: `Testnet` is a context manager (daemons stopped, namespaces deleted, also on an exception or
Ctrl-C; SIGTERM is turned into an exception while it runs; the daemons' logs of a failed run are kept in
ROOT/RUN-logs). A run whose owner died without cleaning up (kill -9) is stale (`is_stale`) and removed by
`down`; namespaces with NS_PREFIX of no registered run are removed too once older than STALE_GRACE_S. A
live run of another session (another root, a parallel test run) is never touched unless named.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from kvswap.home import Home
from kvswap.node.launcher import ChildNode, run_cli
from kvswap.node.p2p import peer_id_of_seed
from kvswap.protocol.errors import KvswapError, UsageError


class TestnetError(KvswapError):
    """The namespace testnet could not be created, used or removed; the message says which command failed.
    The harness's own error (not the product's): `python -m bench testnet` prints it as one line."""

    __test__ = False  # not a pytest class despite the name


#: every namespace a testnet creates starts with this (and only testnets use it)
NS_PREFIX = "kvtn-"
#: the private range node addresses come from (only inside the run's own namespaces)
DEFAULT_SUBNET = "10.77.0.0/24"
#: node i gets host number FIRST_HOST + i of the subnet (docker/compose.yaml: node1 = .11)
FIRST_HOST = 11
#: libp2p port of every node (each namespace has its own port space)
P2P_PORT = 4001
#: control-API port of every node, on the node's own loopback
API_PORT = 8080
#: where run folders (state file, node homes) go unless told otherwise
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "kvswap-testnet"
#: one link per live run, RUN -> its run folder, wherever its root is: how `down` tells a run that is
#: alive somewhere else (another root, a parallel test session) from a leftover
REGISTRY = Path(tempfile.gettempdir()) / "kvswap-testnet-runs"
#: the model every daemon loads unless told otherwise (light: a fetch by CID needs none)
DEFAULT_MODEL = "tiny-qwen3"
#: seconds one `ip`/`tc` command may take
IP_TIMEOUT_S = 10.0
#: seconds a process in a namespace gets between SIGTERM and SIGKILL at teardown
KILL_GRACE_S = 10.0
#: seconds before a prefixed namespace of no registered run counts as a leftover (a run registers first)
STALE_GRACE_S = 60.0
#: tbf bucket: this many seconds of the link rate, at least MIN_BURST_BYTES (one 1514-byte frame needs room)
BURST_S = 0.0025
MIN_BURST_BYTES = 16 * 1024
#: tbf queue: packets may wait this long before they are dropped (a shallow router buffer)
TBF_LATENCY_MS = 50
STATE_FILE = "testnet.json"
#: NAT behaviours a host may sit behind (its own router namespace, nftables masquerade; issue 26):
#: "cone": endpoint-independent mapping (Linux keeps the source port when it is free) with address-and-port-
#: dependent filtering (only replies come in), the port-restricted cone most home routers are: hole
#: punching works; "symmetric": a fresh random port per connection (`masquerade random`), so the address a
#: relay sees is not the one a peer could reach: hole punching fails and the node stays relayed
NAT_TYPES = ("cone", "symmetric")
#: a NAT'd host i sits at LAN_NET.<i>.2 behind its router at LAN_NET.<i>.1 (the router holds its public address)
LAN_NET = "10.88"

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps)?\s*$", re.IGNORECASE)




def parse_rate(text: str | int | None) -> int | None:
    """'100mbit', '1gbit', '500kbit', '1.5mbit' -> bits per second (tc's units: k = 1000); None = unlimited."""
    if text is None or text == "" or str(text).lower() in ("none", "unlimited", "0"):
        return None
    if isinstance(text, int):
        return text
    m = _RATE.match(str(text))
    if not m or (m.group(3) or "bit").lower() == "bps":
        raise UsageError(f"not a link rate: {text!r} (examples: 100mbit, 1gbit, 500kbit)")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    if bits < 8_000:
        raise UsageError(f"link rate {text!r} is below 8 kbit/s")
    return int(bits)


def format_rate(bits: int | None) -> str:
    if bits is None:
        return "unlimited"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale and bits % int(scale) == 0:
            return f"{bits // int(scale)}{unit}"
    return f"{bits}bit"


@dataclass(frozen=True)
class Link:
    """A node's access link: `up` shapes what it sends, `down` what it receives (bits/s; None = unlimited)."""

    up: int | None = None
    down: int | None = None

    @classmethod
    def of(cls, spec: "Link | str | int | None") -> "Link":
        """A Link from a Link, a rate for both directions ('100mbit'), or 'UP/DOWN' ('100mbit/1gbit')."""
        if isinstance(spec, Link):
            return spec
        if isinstance(spec, str) and "/" in spec:
            up, down = spec.split("/", 1)
            return cls(parse_rate(up), parse_rate(down))
        rate = parse_rate(spec)
        return cls(rate, rate)

    def describe(self) -> str:
        return format_rate(self.up) if self.up == self.down else f"{format_rate(self.up)} up / {format_rate(self.down)} down"


# --- commands ---------------------------------------------------------------------------------------------
def _run(*argv: str, check: bool = True, timeout: float = IP_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise TestnetError(f"`{argv[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise TestnetError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if check and proc.returncode != 0:
        raise TestnetError(f"`{' '.join(argv)}` failed: {(proc.stderr or proc.stdout).strip()[:300]}")
    return proc


def netns_names() -> list[str]:
    """Network namespaces on this machine whose name starts with NS_PREFIX."""
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NS_PREFIX)]


def netns_pids(ns: str) -> list[int]:
    out = _run("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _shape(ns: str, dev: str, rate: int | None) -> None:
    """Put (or replace, or remove) the tbf qdisc that limits what `dev` in `ns` sends to `rate` bits/s."""
    if rate is None:
        _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
        return
    burst = max(MIN_BURST_BYTES, int(rate / 8 * BURST_S))
    _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}bit",
         "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms")


@functools.cache
def unavailable() -> str | None:
    """Why a testnet cannot run on this machine (None: it can). Tries the real thing in a scratch namespace:
    root, `ip netns`, a veth pair, a tbf qdisc."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (run as root, or in CI, which runs as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    ns = f"{NS_PREFIX}probe-{secrets.token_hex(3)}"
    try:
        _run("ip", "netns", "add", ns)
    except TestnetError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _run("ip", "-n", ns, "link", "add", "name", "a", "type", "veth", "peer", "name", "b")
        _shape(ns, "a", 100_000_000)
    except TestnetError as exc:
        return f"veth pairs or tbf qdiscs do not work here: {exc}"
    finally:
        _run("ip", "netns", "del", ns, check=False)
    return None


# --- the pure rules shared with docker/compose.yaml -----------------------------------------------------
def host_ip(subnet: str, index: int) -> str:
    """The address of node `index` (0-based) in `subnet`: host number FIRST_HOST + index."""
    net = ipaddress.ip_network(subnet)
    if net.version != 4:
        raise UsageError(f"the testnet subnet must be IPv4: {subnet}")
    if FIRST_HOST + index >= net.num_addresses - 1:
        raise UsageError(f"{subnet} has no room for node {index}")
    return str(net.network_address + FIRST_HOST + index)


def listen_addr(ip: str) -> str:
    return f"/ip4/{ip}/tcp/{P2P_PORT}"


@dataclass(frozen=True)
class NodeOptions:
    """How node `index` is started: the `kvswap node start` options docker/compose.yaml uses too."""

    listen: str
    api: str
    bootstrap: tuple[str, ...]
    accept_any: bool

    def args(self) -> list[str]:
        """As `kvswap node start` arguments (after --home and --model)."""
        out = ["--listen", self.listen, "--api", self.api]
        return out + (["--accept-any"] if self.accept_any else []) + (["--bootstrap", *self.bootstrap] if self.bootstrap else [])


def node_options(index: int, *, subnet: str, bootstrap_peer: str) -> NodeOptions:
    """Node `index` listens on its own address at P2P_PORT with its control API on its loopback; node 0 is
    the bootstrap peer (trusting only its own key, as a publisher would); the others join through it and
    accept any signer."""
    first = f"{listen_addr(host_ip(subnet, 0))}/p2p/{bootstrap_peer}"
    return NodeOptions(listen=listen_addr(host_ip(subnet, index)), api=f"127.0.0.1:{API_PORT}",
                       bootstrap=(first,) if index > 0 else (), accept_any=index > 0)


# --- hosts and the testnet --------------------------------------------------------------------------------
@dataclass
class Host:
    """One node of a testnet: its namespace, address, link, home, and (once started) its daemon."""

    index: int
    netns: str
    switch: str
    ip: str
    home: Path
    link: Link
    peer_id: str = ""
    node: ChildNode | None = field(default=None, repr=False)
    #: the NAT it sits behind (NAT_TYPES), None: on the bridge itself
    nat: str | None = None
    #: its NAT router's namespace, which holds its public address (`public_ip`) and its shaped link
    router: str = ""
    public_ip: str = ""

    @property
    def edge(self) -> str:
        """The namespace whose eth0 is on the bridge: the router's for a NAT'd host, else its own."""
        return self.router or self.netns

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def prefix(self) -> tuple[str, ...]:
        """What runs a command inside this host's namespace."""
        return ("ip", "netns", "exec", self.netns)

    @property
    def multiaddr(self) -> str:
        return f"{listen_addr(self.ip)}/p2p/{self.peer_id}"

    def kvswap(self, *args: str, timeout: float = 900) -> Any:
        """Run `kvswap ARGS --json --home HOME` inside the namespace; its JSON answer (KvswapError on failure)."""
        return run_cli(self.home, *args, timeout=timeout, prefix=self.prefix)

    def spawn(self, *args: str) -> subprocess.Popen:
        """Start `kvswap ARGS --json --home HOME` inside the namespace without waiting (text pipes)."""
        return subprocess.Popen([*self.prefix, sys.executable, "-m", "kvswap", *args, "--json", "--home", str(self.home)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def exec(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run any command inside the namespace (TestnetError if it fails)."""
        return _run(*self.prefix, *argv, timeout=timeout)

    def set_link(self, up: bool) -> None:
        """Bring the node's interface up or down: down cuts it off the bridge at once, mid-transfer or not."""
        _run("ip", "-n", self.edge, "link", "set", "eth0", "up" if up else "down")

    def set_rate(self, link: "Link | str | int | None") -> None:
        """Change the node's link rates on the fly (replaces both tbf qdiscs)."""
        self.link = Link.of(link)
        _shape(self.edge, "eth0", self.link.up)
        _shape(self.switch, f"p{self.index}", self.link.down)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the daemon has used so far (0 when it does not run)."""
        import psutil

        try:
            t = psutil.Process(self.pid or -1).cpu_times()
        except (psutil.Error, ValueError):
            return 0.0
        return t.user + t.system

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
            self.node = None

    def to_state(self) -> dict:
        return {"index": self.index, "netns": self.netns, "ip": self.ip, "home": str(self.home),
                "up": self.link.up, "down": self.link.down, "peer_id": self.peer_id,
                "pid": self.node.proc.pid if self.node else self.pid, "nat": self.nat, "router": self.router,
                "public_ip": self.public_ip}

    @property
    def pid(self) -> int | None:
        """The daemon's pid (from its node.json, so also for a testnet loaded from its state file)."""
        if self.node is not None:
            return self.node.proc.pid
        try:
            return int(json.loads((self.home / "node.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None


class Testnet:
    """N hosts on one bridge, each in its own namespace behind its own link. Use as a context manager.

        with Testnet(["100mbit"] * 3) as net:       # namespaces, bridge, links
            seed_something(net.hosts[0].home)       # homes exist before the daemons start
            net.start()                             # a daemon per host, node 0 the bootstrap peer
            net.hosts[1].kvswap("get", cid)
    """

    __test__ = False

    def __init__(self, links: Sequence["Link | str | int | None"] | int, *, root: Path | None = None,
                 subnet: str = DEFAULT_SUBNET, model: str | None = DEFAULT_MODEL, owner_pid: int | None = -1,
                 nat: "Sequence[str | None] | dict[int, str] | None" = None) -> None:
        if isinstance(links, int):
            links = [None] * links
        if not links:
            raise UsageError("a testnet needs at least one node")
        nats = nat_plan(len(links), nat)
        self.run = secrets.token_hex(3)
        self.root = Path(root or DEFAULT_ROOT)
        self.dir = self.root / self.run
        self.subnet = subnet
        self.model = model
        #: the process whose death makes this run stale (-1: this one; None: nobody, it lives until `down`)
        self.owner_pid = os.getpid() if owner_pid == -1 else owner_pid
        self.switch = f"{NS_PREFIX}{self.run}-sw"
        self.hosts = [Host(i, f"{NS_PREFIX}{self.run}-{i}", self.switch, host_ip(subnet, i), self.dir / f"node{i}",
                           Link.of(spec))
                      for i, spec in enumerate(links)]
        for h, kind in zip(self.hosts, nats):
            if kind is not None:
                h.nat, h.router, h.public_ip, h.ip = kind, f"{h.netns}-nat", h.ip, f"{LAN_NET}.{h.index}.2"
        self._old_sigterm: Any = None

    # --- lifecycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> "Testnet":
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_exit)
        created = False
        try:
            self.create()
            created = True
        finally:
            if not created:  # a failed or interrupted create leaves no namespaces or links behind
                self.destroy()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            if exc_type is not None:
                self.keep_logs()
            self.destroy()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None

    def create(self) -> None:
        """Namespaces, bridge, veth pairs, addresses and shaping (no daemons yet)."""
        reason = unavailable()
        if reason:
            raise TestnetError(f"no testnet on this machine: {reason}")
        self.dir.mkdir(parents=True, exist_ok=False)
        self.save()  # before any namespace: `down` must always find what a run left behind
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / self.run).symlink_to(self.dir.resolve(), target_is_directory=True)
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "name", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        prefix = ipaddress.ip_network(self.subnet).prefixlen
        if any(h.nat for h in self.hosts) and shutil.which("nft") is None:
            raise TestnetError("NAT'd hosts need `nft` (nftables)")
        for h in self.hosts:
            h.home.mkdir(parents=True, exist_ok=True)
            _run("ip", "netns", "add", h.netns)
            if h.router:
                _run("ip", "netns", "add", h.router)
            _run("ip", "-n", self.switch, "link", "add", "name", f"p{h.index}", "type", "veth", "peer", "name", "eth0",
                 "netns", h.edge)
            _run("ip", "-n", self.switch, "link", "set", f"p{h.index}", "master", "br0", "up")
            _run("ip", "-n", h.edge, "addr", "add", f"{h.public_ip or h.ip}/{prefix}", "dev", "eth0")
            _run("ip", "-n", h.edge, "link", "set", "eth0", "up")
            _run("ip", "-n", h.netns, "link", "set", "lo", "up")
            if h.router:
                _make_nat(h)
            h.set_rate(h.link)
        self.save()

    def start(self, hosts: Sequence[int] | None = None, *, extra_args: Sequence[str] = (),
              wait_model: bool = True) -> None:
        """Start a daemon on each of `hosts` (default all), in parallel; node 0's identity is fixed first so
        every other node can bootstrap through it from its first second."""
        for h in self.hosts:
            if not h.peer_id:
                with Home(h.home) as home:
                    h.peer_id = peer_id_of_seed(home.key.seed)
        chosen = [self.hosts[i] for i in (range(len(self.hosts)) if hosts is None else hosts)]

        relays = [h.multiaddr for h in self.hosts[1:] if not h.nat]

        def launch(h: Host) -> None:
            opts = node_options(h.index, subnet=self.subnet, bootstrap_peer=self.hosts[0].peer_id)
            nat_args: list[str] = []
            if h.nat:  # it listens on its LAN address; the public hosts are its relays (node 0 bootstraps it)
                opts = replace(opts, listen=listen_addr(h.ip))
                nat_args = ["--relays", *relays] if relays else []
            h.node = ChildNode(h.home, self.model, prefix=h.prefix, extra_args=[*opts.args(), *nat_args, *extra_args])
            if wait_model and self.model:  # model None: light nodes (--no-model), nothing to wait for
                h.node.wait_model()

        with ThreadPoolExecutor(max_workers=len(chosen) or 1) as pool:
            errors = [f.exception() for f in [pool.submit(launch, h) for h in chosen]]
        self.save()
        failed = [e for e in errors if e is not None]
        if failed:
            raise TestnetError(f"{len(failed)} of {len(chosen)} nodes did not start: {failed[0]}")

    def keep_logs(self) -> Path:
        """Copy every daemon's logs to ROOT/RUN-logs/ (kept after teardown: what to read when a run failed)."""
        dest = self.root / f"{self.run}-logs"
        for h in self.hosts:
            for log in sorted(h.home.glob("*.log")) if h.home.is_dir() else []:
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, dest / f"{h.name}-{log.name}")
        if dest.is_dir():
            print(f"testnet {self.run}: daemon logs kept in {dest}", file=sys.stderr)
        return dest

    def stop(self) -> None:
        """Stop every daemon (SIGTERM, then SIGKILL after a grace period)."""
        with ThreadPoolExecutor(max_workers=len(self.hosts)) as pool:
            list(pool.map(lambda h: h.stop(), self.hosts))

    def destroy(self) -> None:
        """Stop the daemons, kill anything left in the namespaces, delete them and the run folder."""
        try:
            self.stop()
        finally:
            remove_run(self.dir)

    # --- state ------------------------------------------------------------------------------------------------
    def save(self) -> None:
        state = {"run": self.run, "subnet": self.subnet, "model": self.model, "owner_pid": self.owner_pid,
                 "created": time.time(), "switch": self.switch, "hosts": [h.to_state() for h in self.hosts]}
        tmp = self.dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.dir / STATE_FILE)

    def state(self) -> dict:
        return json.loads((self.dir / STATE_FILE).read_text())

    @classmethod
    def load(cls, run: str | None = None, root: Path | None = None) -> "Testnet":
        """A running testnet from its state file (daemons not owned: `Host.node` is None). `run` may be left
        out when exactly one run exists under `root`."""
        known = runs(root)
        chosen = [s for s in known if run is None or s["run"] == run]
        if len(chosen) != 1:
            names = ", ".join(s["run"] for s in known) or "none"
            raise UsageError(f"name one testnet run (runs: {names})" if chosen
                             else f"no testnet run {run!r} (runs: {names})")
        state = chosen[0]
        net = cls.__new__(cls)
        net.run, net.dir, net.root = state["run"], Path(state["dir"]), Path(state["dir"]).parent
        net.subnet, net.model, net.owner_pid = state["subnet"], state["model"], state["owner_pid"]
        net.switch = state["switch"]
        net._old_sigterm = None
        net.hosts = [Host(h["index"], h["netns"], state["switch"], h["ip"], Path(h["home"]), Link(h["up"], h["down"]),
                          peer_id=h["peer_id"], nat=h.get("nat"), router=h.get("router", ""),
                          public_ip=h.get("public_ip", "")) for h in state["hosts"]]
        return net


#: port the plain-TCP probe listens on (inside the receiver's namespace)
PROBE_PORT = 5001
_PROBE_RECV = """
import socket, sys, time
s = socket.create_server((sys.argv[1], int(sys.argv[2]))); s.settimeout(float(sys.argv[3]))
c, _ = s.accept(); c.settimeout(float(sys.argv[3])); n = 0; t0 = None
while (b := c.recv(1 << 20)):
    t0 = t0 or time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - (t0 or time.perf_counter()))
"""
_PROBE_SEND = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[4])
while True:  # the listener may take a moment to start
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
left, block = int(sys.argv[3]), b"x" * (1 << 20)
while left > 0:
    c.sendall(block[:left]); left -= len(block)
c.close()
"""


def measure_tcp(sender: Host, receiver: Host, nbytes: int, timeout: float = 120) -> tuple[int, float]:
    """Send `nbytes` over one plain TCP connection from `sender` to `receiver` (separate processes in their
    namespaces); (bytes received, seconds from the first byte in to the last). What TCP alone gets over the
    links: the ceiling any protocol on top can reach."""
    recv = subprocess.Popen([*receiver.prefix, sys.executable, "-c", _PROBE_RECV, receiver.ip, str(PROBE_PORT),
                             str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sender.exec(sys.executable, "-c", _PROBE_SEND, receiver.ip, str(PROBE_PORT), str(nbytes), "10",
                    timeout=timeout)
        out, err = recv.communicate(timeout=timeout)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    if recv.returncode != 0:
        raise TestnetError(f"TCP probe receiver failed: {err.strip()[-300:]}")
    got, seconds = out.split()
    return int(got), float(seconds)


def nat_plan(n: int, nat: "Sequence[str | None] | dict[int, str] | None") -> list[str | None]:
    """The NAT (or None) of each of `n` hosts, from a list or {index: type}; node 0, the bootstrap peer, stays
    public, as relays and bootstrap peers must."""
    if nat is None:
        return [None] * n
    kinds = [nat.get(i) for i in range(n)] if isinstance(nat, dict) else list(nat) + [None] * (n - len(nat))
    if isinstance(nat, dict) and any(not 0 <= i < n for i in nat):
        raise UsageError(f"a NAT names a host outside 0..{n - 1}")
    if len(kinds) != n or any(k is not None and k not in NAT_TYPES for k in kinds):
        raise UsageError(f"a NAT type is one of {', '.join(NAT_TYPES)}: {nat!r}")
    if kinds[0] is not None:
        raise UsageError("node 0 is the bootstrap peer and stays public (no NAT)")
    return kinds


def parse_nat(text: str) -> dict[int, str]:
    """'1,2' (cone NATs), '1:symmetric,2:cone' -> {host index: NAT type}, for `python -m bench testnet up --nat`."""
    out: dict[int, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        index, _, kind = part.partition(":")
        if not index.isdigit():
            raise UsageError(f"not a host index: {index!r} (examples: --nat 1,2 or --nat 1:symmetric)")
        out[int(index)] = kind or "cone"
    return out


def _make_nat(h: Host) -> None:
    """Host h behind its own router: the host's eth0 on a LAN with the router's lan0, the router forwarding
    and masquerading onto its eth0 (the bridge), dropping every connection the outside starts (no RST: a
    hole punch's early SYN must not kill the peer's attempt)."""
    lan_host, lan_router = f"{LAN_NET}.{h.index}.2", f"{LAN_NET}.{h.index}.1"
    _run("ip", "-n", h.router, "link", "add", "name", "lan0", "type", "veth", "peer", "name", "eth0", "netns", h.netns)
    _run("ip", "-n", h.router, "addr", "add", f"{lan_router}/24", "dev", "lan0")
    _run("ip", "-n", h.router, "link", "set", "lan0", "up")
    _run("ip", "-n", h.router, "link", "set", "lo", "up")
    _run("ip", "-n", h.netns, "addr", "add", f"{lan_host}/24", "dev", "eth0")
    _run("ip", "-n", h.netns, "link", "set", "eth0", "up")
    _run("ip", "-n", h.netns, "route", "add", "default", "via", lan_router)
    _run("ip", "netns", "exec", h.router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    masquerade = "masquerade random" if h.nat == "symmetric" else "masquerade"
    rules = f"""table ip kvnat {{
  chain postrouting {{
    type nat hook postrouting priority 100;
    oifname "eth0" {masquerade}
  }}
  chain forwarding {{
    type filter hook forward priority 0; policy drop;
    iifname "lan0" accept
    ct state established,related accept
  }}
  chain incoming {{
    type filter hook input priority 0; policy accept;
    iifname "eth0" ct state new drop
  }}
}}
"""
    try:
        proc = subprocess.run(["ip", "netns", "exec", h.router, "nft", "-f", "-"], input=rules, capture_output=True,
                              text=True, timeout=IP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise TestnetError("`nft -f -` did not finish") from None
    if proc.returncode != 0:
        raise TestnetError(f"nftables rules for {h.name}'s NAT failed: {proc.stderr.strip()[:300]}")


def _sigterm_to_exit(signum: int, frame: Any) -> None:
    raise SystemExit(f"terminated by signal {signum}: tearing the testnet down")


# --- runs on disk, and `down` -----------------------------------------------------------------------------
def runs(root: Path | None = None) -> list[dict]:
    """The state of every registered run (with its folder as "dir"); only those under `root` if given."""
    out = []
    for link in sorted(REGISTRY.iterdir()) if REGISTRY.is_dir() else []:
        folder = Path(os.path.realpath(link))
        if root is not None and Path(os.path.realpath(root)) not in folder.parents:
            continue
        try:
            state = json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError):  # its folder is gone: a leftover `down` removes
            state = {"run": link.name, "hosts": [], "owner_pid": 0}
        state["dir"] = str(folder)
        out.append(state)
    return out


def _pid_alive(pid: int | None) -> bool:
    from kvswap.control.runfiles import pid_alive

    return pid is not None and pid > 0 and pid_alive(pid)


def is_stale(state: dict) -> bool:
    """A run whose owner process is gone (a run without owner lives until an explicit `down`)."""
    owner = state.get("owner_pid")
    return owner is not None and not _pid_alive(owner)


def kill_netns_processes(ns: str) -> None:
    """SIGTERM every process in namespace `ns` (all started by the testnet), SIGKILL what is left after
    KILL_GRACE_S."""
    pids = netns_pids(ns)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + KILL_GRACE_S
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p) and p in netns_pids(ns)]
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def remove_netns(names: Sequence[str]) -> None:
    for ns in names:
        if ns in netns_names():
            kill_netns_processes(ns)
            _run("ip", "netns", "del", ns, check=False)


def remove_run(run_dir: Path) -> list[str]:
    """Remove one run: its namespaces (and whatever still runs in them) and its folder. Returns the
    namespaces it deleted."""
    run = Path(run_dir).name
    mine = [ns for ns in netns_names() if ns.startswith(f"{NS_PREFIX}{run}-")]
    # nodes first, the switch last (its veth ends go with the node namespaces)
    remove_netns(sorted(mine, key=lambda ns: ns.endswith("-sw")))
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        (REGISTRY / run).unlink()
    except FileNotFoundError:
        pass
    return mine


def down(run: str | None = None, *, root: Path | None = None, all_runs: bool = False) -> list[str]:
    """Remove testnets; returns the namespaces deleted. `run`: that run. Otherwise runs whose owner is gone
    and prefixed namespaces of no registered run (older than STALE_GRACE_S), never a live run of another
    session; `all_runs`: also every live run (under `root` if given)."""
    removed: list[str] = []
    if run is not None:
        matches = [s for s in runs() if s["run"] == run]
        if not matches:
            raise UsageError(f"no testnet run {run!r} (see `status`)")
        return remove_run(Path(matches[0]["dir"]))
    mine = {state["run"] for state in runs(root)}
    for state in runs():
        if is_stale(state) or (all_runs and state["run"] in mine):
            removed += remove_run(Path(state["dir"]))
    registered = {s["run"] for s in runs()}
    orphans = [ns for ns in netns_names()
               if ns[len(NS_PREFIX):].split("-", 1)[0] not in registered and _netns_age(ns) > STALE_GRACE_S]
    remove_netns(orphans)
    return removed + orphans


def _netns_age(ns: str) -> float:
    try:
        return time.time() - Path("/run/netns", ns).stat().st_mtime
    except OSError:
        return float("inf")


__all__ = [
    "DEFAULT_SUBNET",
    "Host",
    "Link",
    "NAT_TYPES",
    "NS_PREFIX",
    "Testnet",
    "TestnetError",
    "down",
    "host_ip",
    "measure_tcp",
    "NodeOptions",
    "node_options",
    "nat_plan",
    "parse_nat",
    "parse_rate",
    "runs",
    "unavailable",
]
