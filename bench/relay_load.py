"""A relay under load (issue 26): many reservations, circuits and bytes against one kvswap relay.

    python -m bench relay_load [--ips 20] [--per-ip 8] [--circuits-each 3] [--flood-mib MiB] [--circuit-mib MiB]
                               [--rounds N] [--trace]

The relay is a real kvswap host (node/p2p.py P2PHost, `node.relay = on`) in its own process on 127.0.0.1, so its RSS is its own. Every other peer is a real py-libp2p host in
this process speaking circuit relay v2 with py-libp2p's own client (CircuitV2Protocol for STOP,
CircuitV2Transport for dials), connected to the relay from its own loopback address (127.0.0.x: the relay
counts reservations per IP address). Nothing is simulated: every byte crosses TCP and Noise through the relay.

1. reservations: an honest peer reserves; then `--ips` addresses x `--per-ip` identities ask at once;
2. circuits: every hostile peer that got a slot is dialled through the relay by `--circuits-each` others, at
   once (more than a reservation admits, more than the relay carries in all);
3. bytes: every open hostile circuit pushes `--flood-mib` MiB (default 4x its byte budget); the relay cuts it;
2b. while those circuits are open, an honest dialler (its own address) dials the honest peer through the relay;
4. honest: once the cut circuits are gone, the honest dialler reaches the honest peer through the relay and
   gets an echo back.
Steps 2-4 run `--rounds` times (new circuits each time, flooded again). Once each round's circuits are gone and the
streams its peers closed have ended, and before the first, the relay reports what it holds (`probe`): its RSS, glibc's heap in use and free (mallinfo2),
the bytes in Yamux's stream buffers and its streams, Python objects, and with `--trace` tracemalloc's totals and
growth; at the end, its RSS after malloc_trim(0). Bounded: none of these grows from round to round.
The peers listen nowhere, so that every connection between two of them is a circuit through the relay.
Sampled every 0.1 s throughout: the relay's reservations and circuits (its `kvswap node status` numbers), its
RSS. NatTuning's limits except the circuit budget (`--circuit-mib`, 1 MiB unless told). tests/test_relay_load.py
runs this with small limits and checks every bound. Writes
bench/results/relay_load.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SINK = "/kvswap-bench/sink/1"
ECHO = "/kvswap-bench/echo/1"
#: seconds each step may take before the run gives up
STEP_TIMEOUT_S = 60
#: seconds the closed streams of a round may take to end before the probe counts them (0.8.1 ends a hop stream
#: its client left open after 2 x its 15 s read timeout)
ENDING_TIMEOUT_S = 35

_RELAY = """
import collections, ctypes, dataclasses, gc, json, os, sys, tracemalloc, trio
from kvswap.node import nat
from kvswap.node.p2p import P2PConfig, P2PHost
from kvswap.node.tuning import DEFAULT_TUNING

trace = sys.argv[3] == "1"
if trace:  # from here: the load's allocations, not the imports'
    tracemalloc.start(1)

status_file = sys.argv[2]
tuning = dataclasses.replace(DEFAULT_TUNING, nat=dataclasses.replace(DEFAULT_TUNING.nat, **json.loads(sys.argv[1])))
libc = ctypes.CDLL("libc.so.6")
first = []
buffered_peak = [0]  # the most bytes Yamux held in stream buffers at once since the last probe (sampled)
biggest = [0, None]  # ...and the fullest stream buffer since then, with its stream's window


def muxers(host):
    for conns in host.host.get_network().connections.values():
        for c in (conns if isinstance(conns, list) else [conns]):
            mx = getattr(c, "muxed_conn", None)
            if mx is not None:
                yield mx


def ending(host):
    # streams whose peer closed its side and the relay has not ended yet (a refused CONNECT's hop stream, for
    # one: 0.8.1 reads on, fails, waits 0.5 s, then returns, and libp2p_compat resets it)
    return sum(1 for mx in muxers(host) for st in getattr(mx, "streams", {}).values()
               if st.recv_closed and not st.closed)


def buffered(host):
    total = 0
    for mx in muxers(host):
        for sid, b in getattr(mx, "stream_buffers", {}).items():
            total += len(b)
            st = mx.streams.get(sid)
            if len(b) > biggest[0] and st is not None:
                biggest[:] = [len(b), {"held": "_auto_tune_and_send_window_update" in vars(st),
                                       "recv_window": st.recv_window, "target": st.target_recv_window}]
    return total


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe(ask):
    # what the relay holds: RSS, glibc's heap (in use / free), Yamux's stream buffers, object counts, and with
    # --trace the Python allocations (tracemalloc) against the first probe; malloc_trim(0) if asked
    gc.collect()
    libc.mallinfo2.restype = Mallinfo2
    m = libc.mallinfo2()
    out = {"rss": rss(), "heap_arena": m.arena, "heap_mmap": m.hblkhd, "heap_in_use": m.uordblks + m.hblkhd,
           "heap_free": m.fordblks}
    objs = gc.get_objects()
    muxers = [o for o in objs if type(o).__name__ == "Yamux"]
    bufs = [b for mx in muxers for b in mx.stream_buffers.values()]
    states = collections.Counter((st.closed, st.send_closed, st.recv_closed, bool(mx.stream_buffers.get(sid)))
                                 for mx in muxers for sid, st in mx.streams.items())
    out.update(yamux_conns=len(muxers), yamux_streams=sum(len(mx.streams) for mx in muxers),
               yamux_stream_states=[[list(k), v] for k, v in states.most_common()],
               yamux_buffered=sum(len(b) for b in bufs), yamux_buffer_alloc=sum(sys.getsizeof(b) for b in bufs),
               yamux_buffered_peak=buffered_peak[0], yamux_biggest=list(biggest), objects=len(objs),
               top_types=collections.Counter(type(o).__name__ for o in objs).most_common(8))
    del objs, muxers, bufs
    if trace:
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        out["traced"] = sum(s.size for s in snap.statistics("filename"))
        out["traced_top"] = [[str(s.traceback), s.size, s.count] for s in snap.statistics("lineno")[:8]]
        if first:
            out["traced_growth_top"] = [[str(s.traceback), s.size_diff, s.count_diff]
                                        for s in snap.compare_to(first[0], "lineno")[:8]]
        else:
            first.append(snap)
    if ask.get("trim"):
        libc.malloc_trim(0)
        out["rss_after_trim"] = rss()
    return out


async def main():
    host = P2PHost(P2PConfig(seed=bytes([77]) * 32, listen_addrs=["/ip4/127.0.0.1/tcp/0"], tuning=tuning,
                             nat=nat.NatConfig(reachability="public", relay="on")))
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        print(json.dumps({"addr": host.addrs[0]}), flush=True)
        while True:
            tmp = status_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({**host.nat.snapshot(), "yamux_ending": ending(host)}, f)
            os.replace(tmp, status_file)
            buffered_peak[0] = max(buffered_peak[0], buffered(host))
            if os.path.exists(status_file + ".ask"):  # bench/relay_load.py Relay.probe
                with open(status_file + ".ask") as f:
                    ask = json.load(f)
                os.unlink(status_file + ".ask")
                with open(tmp, "w") as f:
                    json.dump(probe(ask), f)
                buffered_peak[0] = 0
                biggest[:] = [0, None]
                os.replace(tmp, status_file + ".probe")
            await trio.sleep(0.1)

trio.run(main)
"""


class Relay:
    """The relay process: start, its address, its status (the snapshot it writes), its RSS; a context manager."""

    def __init__(self, limits: dict, folder: Path, trace: bool = False) -> None:
        self.limits, self.status_file, self.trace = limits, folder / "relay.json", trace
        self.proc: subprocess.Popen | None = None
        self.log = open(folder / "relay.log", "w+")  # its stderr: a pipe nobody reads would fill and block it
        self.addr = ""

    def __enter__(self) -> "Relay":
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-c", _RELAY, json.dumps(self.limits), str(self.status_file),
                                      "1" if self.trace else "0"],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        try:
            line = self.proc.stdout.readline()
            if not line:
                self.log.seek(0)
                raise RuntimeError(f"the relay did not start: {self.log.read()[-2000:]}")
            self.addr = json.loads(line)["addr"]
            deadline = time.monotonic() + 30
            while not self.status_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.seek(0)
        self.log_text = self.log.read()
        self.log.close()

    def status(self) -> dict:
        for _ in range(50):  # the file is replaced atomically; a read racing the first write retries
            try:
                return json.loads(self.status_file.read_text())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError("the relay wrote no status")

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def probe(self, trim: bool = False) -> dict:
        """What the relay holds (see `probe` in _RELAY); blocks this process (call it between steps)."""
        answer = Path(str(self.status_file) + ".probe")
        answer.unlink(missing_ok=True)
        Path(str(self.status_file) + ".ask").write_text(json.dumps({"trim": trim}))
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not answer.exists() and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.1)
        if not answer.exists():
            self.log.seek(0)
            raise RuntimeError(f"the relay did not answer its probe: {self.log.read()[-2000:]}")
        return json.loads(answer.read_text())


class Peer:
    """A py-libp2p host with circuit relay v2's STOP side and client transport, connected to the relay from `ip`,
    with a sink (counts what reaches it) and an echo protocol."""

    def __init__(self, ip: str) -> None:
        from libp2p import new_host

        self.ip = ip
        self.host = new_host()
        self.received = 0
        self.relay_id = None
        self.transport = None

    async def start(self, nursery, relay_addr: str) -> None:
        import multiaddr
        import trio
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
        from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
        from libp2p.relay.circuit_v2.transport import CircuitV2Transport
        from libp2p.tools.anyio_service import background_trio_service

        from kvswap.node import libp2p_compat
        from kvswap.node.tuning import NatTuning

        started = trio.Event()
        limits = libp2p_compat.relay_limits(NatTuning())

        async def run() -> None:
            # listening nowhere: every connection between two peers is a circuit through the relay (with a
            # listener, later rounds' floods went over direct connections py-libp2p had dialled meanwhile)
            async with self.host.run(listen_addrs=[]):
                stop = CircuitV2Protocol(self.host, limits=limits, allow_hop=False)
                async with background_trio_service(stop):
                    await stop.event_started.wait()
                    self.transport = CircuitV2Transport(self.host, stop, RelayConfig(
                        roles=RelayRole.STOP | RelayRole.CLIENT, limits=limits))
                    self.host.set_stream_handler(SINK, self._sink)
                    self.host.set_stream_handler(ECHO, self._echo)
                    started.set()
                    await trio.sleep_forever()

        nursery.start_soon(run)
        await started.wait()
        info = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
        self.relay_id = info.peer_id
        self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
        with trio.fail_after(STEP_TIMEOUT_S):  # from our own address: the relay counts reservations per IP
            await self.host.get_network().dial_addr(info.addrs[0], info.peer_id, (self.ip, 0))

    async def _sink(self, stream) -> None:
        try:
            while True:
                data = await stream.read(65536)
                if not data:
                    break
                self.received += len(data)
        except Exception:  # boundary: the relay reset the circuit, which is what is measured
            pass

    async def _echo(self, stream) -> None:
        try:
            await stream.write(await stream.read(65536))
            await stream.close()
        except Exception:  # boundary: the dialler went away
            pass

    async def reserve(self) -> bool:
        import trio
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID

        from kvswap.node import libp2p_compat

        with trio.move_on_after(15):
            stream = await self.host.new_stream(self.relay_id, [PROTOCOL_ID])
            try:
                return bool(await libp2p_compat.reserve_on(self.transport, stream, self.relay_id))
            finally:
                await stream.close()
        return False

    async def new_relayed_stream(self, target, protocol: str):
        """A stream to `target` over a connection through the relay, never a direct one: py-libp2p's new_stream
        dials the addresses identify taught it when no connection is open (a later round's circuit gone already)."""
        self.host.get_peerstore().clear_addrs(target)
        return await self.host.new_stream(target, [protocol])

    async def dial_through(self, relay_addr: str, target) -> bool:
        import multiaddr
        import trio

        with trio.move_on_after(15):
            try:
                await self.transport.dial(multiaddr.Multiaddr(f"{relay_addr}/p2p-circuit/p2p/{target}"))
            except Exception:  # boundary: refused by the relay, which is what is counted
                return False
            return target in self.host.get_connected_peers()
        return False


async def circuits_and_bytes(relay: Relay, sybils: list, held: list, ips: list[str], honest: Peer,
                             dialer: Peer, circuits_each: int, flood_bytes: int, peak: dict) -> dict:
    """Steps 2-4 of the module docstring, once: what happened, and the relay's RSS after it."""
    import trio

    report: dict = {}
    peak["rss"] = relay.rss()  # this round's peak
    # 2. circuits
    opened: list = []

    async def circuit(src: Peer, dst: Peer) -> None:
        if await src.dial_through(relay.addr, dst.host.get_id()):
            opened.append((src, dst))

    t0 = time.monotonic()
    async with trio.open_nursery() as inner:
        for i, dst in enumerate(held):
            others = [p for p in sybils if p is not dst]
            for k in range(circuits_each):
                inner.start_soon(circuit, others[(i * circuits_each + k) % len(others)], dst)
    report.update(circuits_tried=circuits_each * len(held), circuits_opened=len(opened),
                  circuits_s=round(time.monotonic() - t0, 2),
                  circuits_per_target_max=max([sum(1 for _, d in opened if d is dst) for dst in held], default=0),
                  circuits_per_ip_max=max([sum(1 for src, _ in opened if src.ip == ip) for ip in ips], default=0),
                  rss_after_reservations_and_circuits=relay.rss())
    # 2b. while the hostile circuits are open: an honest dialler (another address) reaches the honest peer
    report["honest_during"] = (honest.host.get_id() in dialer.host.get_connected_peers()
                               or await dialer.dial_through(relay.addr, honest.host.get_id()))

    # 3. bytes
    started: list = []
    direct: list = []
    errors: dict = {}  # why floods stopped: the relay's reset, or py-libp2p's 5 s wait for a window update

    async def flood(src: Peer, dst: Peer) -> None:
        with trio.move_on_after(STEP_TIMEOUT_S):
            try:
                from kvswap.node import libp2p_compat
                if libp2p_compat.has_direct_connection(src.host, dst.host.get_id()):
                    direct.append(src)
                stream = await src.new_relayed_stream(dst.host.get_id(), SINK)
                started.append(src)
                chunk = bytes(64 * 1024)
                try:
                    for _ in range(max(1, flood_bytes // len(chunk))):
                        await stream.write(chunk)
                    await stream.close()
                except Exception as e:  # the relay reset the circuit, or the write timed out: this flooder stops
                    why = repr(e.__cause__ or e.__context__ or e)[:80]
                    errors[why] = errors.get(why, 0) + 1
                    with trio.CancelScope(shield=True), trio.move_on_after(2), contextlib.suppress(Exception):
                        await stream.reset()
                    raise
            except Exception:  # boundary: the relay reset the circuit
                pass

    received = {p: p.received for p in held}
    t0 = time.monotonic()
    async with trio.open_nursery() as inner:
        for src, dst in opened:
            inner.start_soon(flood, src, dst)
    report["flood_s"], report["floods_started"] = round(time.monotonic() - t0, 2), len(started)
    report["floods_direct"], report["flood_errors"] = len(direct), errors
    report["rss_after_flood"] = relay.rss()
    targets = {dst for _, dst in opened}
    report["flood_pushed_per_circuit"] = flood_bytes
    report["relayed"] = sum(p.received - received[p] for p in held)
    report["delivered_per_circuit_max"] = max(
        [(dst.received - received[dst]) / sum(1 for _, d in opened if d is dst) for dst in targets], default=0)
    # the cut circuits leave the relay's books (the honest one of step 2b stays open): hostile ones left
    honest_open = 1 if honest.host.get_id() in dialer.host.get_connected_peers() else 0
    with trio.move_on_after(STEP_TIMEOUT_S):
        while relay.status()["relay"]["circuits"] > honest_open:
            await trio.sleep(0.2)
    report["circuits_gone_s"] = round(time.monotonic() - t0 - report["flood_s"], 2)
    report["circuits_left"] = max(0, relay.status()["relay"]["circuits"] - honest_open)

    # 4. an honest relayed peer, reached through the relay (again, or for the first time)
    report["honest_dialled"] = (honest.host.get_id() in dialer.host.get_connected_peers()
                                or await dialer.dial_through(relay.addr, honest.host.get_id()))
    report["honest_echo"] = False
    if report["honest_dialled"]:
        with trio.move_on_after(15):
            stream = await dialer.new_relayed_stream(honest.host.get_id(), ECHO)
            await stream.write(b"still here")
            report["honest_echo"] = await stream.read(64) == b"still here"
    report["rss_after"], report["rss_peak"] = relay.rss(), peak["rss"]
    # the streams this round's peers closed end within 0.5 s each on an idle relay, seconds later on a loaded
    # machine (one CI run probed 15 of them still open); the probe counts what stays once they have ended
    t0 = time.monotonic()
    with trio.move_on_after(ENDING_TIMEOUT_S):
        while relay.status().get("yamux_ending", 0):
            await trio.sleep(0.2)
    report["streams_ended_s"] = round(time.monotonic() - t0, 2)
    report["probe"] = relay.probe()
    return report


async def load(relay: Relay, ips: list[str], per_ip: int, circuits_each: int, flood_bytes: int,
               rounds: int = 1) -> dict:
    """Steps 1-4 of the module docstring against `relay`, steps 2-4 `rounds` times; what happened, and the relay's
    peaks."""
    import trio

    report: dict = {"rss_before": relay.rss()}
    peak = {"reservations": 0, "circuits": 0, "rss": report["rss_before"], "rss_all": report["rss_before"]}
    async with trio.open_nursery() as nursery:
        async def sample() -> None:
            while True:
                s = relay.status()["relay"]
                peak.update(reservations=max(peak["reservations"], s["reservations"]),
                            circuits=max(peak["circuits"], s["circuits"]))
                rss = relay.rss()
                peak.update(rss=max(peak["rss"], rss), rss_all=max(peak["rss_all"], rss))
                await trio.sleep(0.1)

        nursery.start_soon(sample)
        honest, dialer = Peer("127.0.0.10"), Peer("127.0.0.11")
        for p in (honest, dialer):
            await p.start(nursery, relay.addr)
        report["honest_reserved"] = await honest.reserve()

        # 1. reservations
        sybils = [Peer(ip) for ip in ips for _ in range(per_ip)]
        for p in sybils:
            await p.start(nursery, relay.addr)
        granted: dict = {}

        async def reserve(p: Peer) -> None:
            granted[p] = await p.reserve()

        t0 = time.monotonic()
        async with trio.open_nursery() as inner:
            for p in sybils:
                inner.start_soon(reserve, p)
        held = [p for p in sybils if granted[p]]
        report.update(reservations_asked=len(sybils), reservations_granted=len(held),
                      reservations_s=round(time.monotonic() - t0, 2),
                      granted_per_ip={ip: sum(1 for p in held if p.ip == ip) for ip in ips},
                      honest_renewed=await honest.reserve())

        report["probe_before"] = relay.probe()
        report["rounds"] = []
        for n in range(rounds):
            r = await circuits_and_bytes(relay, sybils, held, ips, honest, dialer, circuits_each,
                                         flood_bytes, peak)
            if not n:  # the first round's numbers, as a single-round run reports them
                report.update({k: v for k, v in r.items() if k not in ("relayed", "rss_peak", "probe")})
            report["rounds"].append({k: r[k] for k in ("circuits_opened", "floods_started", "floods_direct", "flood_errors", "relayed", "flood_s", "circuits_gone_s",
                                                       "delivered_per_circuit_max", "honest_during", "rss_after_flood", "rss_after",
                                                       "rss_peak", "circuits_left", "honest_echo", "streams_ended_s",
                                                       "probe")})
            report["honest_echo"] = report["honest_echo"] and r["honest_echo"]
            report["circuits_left"] = max(report["circuits_left"], r["circuits_left"])
            report["delivered_per_circuit_max"] = max(report["delivered_per_circuit_max"],
                                                      r["delivered_per_circuit_max"])
        report["probe_end"] = relay.probe(trim=True)  # and what glibc gives back to the system when asked
        nursery.cancel_scope.cancel()
    status = relay.status()
    report.update(peak_reservations=peak["reservations"], peak_circuits=peak["circuits"], rss_peak=peak["rss_all"],
                  rss_growth=peak["rss_all"] - report["rss_before"], refused=status["relay"]["refused"])
    return report


def run(limits: dict | None = None, ips: int = 20, per_ip: int = 8, circuits_each: int = 3,
        flood_bytes: int | None = None, rounds: int = 1, trace: bool = False) -> dict:
    import trio

    from kvswap.node import libp2p_compat
    from kvswap.node.tuning import NatTuning

    tuning = dataclasses.replace(NatTuning(), **(limits or {}))
    libp2p_compat.apply(write_idle_s=tuning.reservation_timeout_s)  # what a kvswap host sets (quiet relay logs)
    flood = flood_bytes if flood_bytes is not None else 4 * tuning.relay_circuit_bytes
    addrs = [f"127.0.0.{21 + i}" for i in range(ips)]
    with tempfile.TemporaryDirectory(prefix="kvswap-relay-load-") as tmp, Relay(limits or {}, Path(tmp),
                                                                                           trace) as relay:
        report = trio.run(load, relay, addrs, per_ip, circuits_each, flood, rounds)
    report["relay_log_lines"] = relay.log_text.count("\n")
    report["relay_window_exceeded"] = relay.log_text.count("exceeded receive window")  # Yamux's warning
    report["limits"] = {k: getattr(tuning, k) for k in ("relay_max_reservations", "relay_max_reservations_per_ip",
                                                        "relay_max_circuits", "relay_max_circuits_per_ip",
                                                        "relay_circuits_per_reservation",
                                                        "relay_circuit_bytes")}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench relay_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ips", type=int, default=20, help="hostile IP addresses (127.0.0.21..)")
    parser.add_argument("--per-ip", type=int, default=8, help="identities per address")
    parser.add_argument("--circuits-each", type=int, default=3, help="circuits asked to each hostile slot")
    parser.add_argument("--flood-mib", type=float, default=None,
                        help="MiB pushed through each circuit (default: 4x nat.relay_circuit_bytes)")
    parser.add_argument("--circuit-mib", type=float, default=1.0,
                        help="the relay's nat.relay_circuit_bytes in MiB (default 1; 0: NatTuning's 64 MiB, which 32 "
                             "circuits take minutes to spend through a Python relay on 2 cores)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times steps 2-4 run (new circuits, each flooded): the relay's RSS after each")
    parser.add_argument("--trace", action="store_true",
                        help="tracemalloc in the relay (slower): its Python allocations after each round")
    parser.add_argument("--out", default="relay_load.json", help="file name under bench/results/")
    args = parser.parse_args(argv)
    flood = None if args.flood_mib is None else int(args.flood_mib * 1024 * 1024)
    limits = {"relay_circuit_bytes": int(args.circuit_mib * 1024 * 1024)} if args.circuit_mib else None
    t0 = time.monotonic()
    r = run(limits, args.ips, args.per_ip, args.circuits_each, flood, args.rounds, args.trace)
    r["argv"] = list(argv or [])
    r["wall_s"] = round(time.monotonic() - t0, 1)
    lim = r["limits"]
    print(f"relay_load: limits {lim}")
    print(f"  reservations: {r['reservations_granted']} of {r['reservations_asked']} granted in {r['reservations_s']} s "
          f"(max per IP {max(r['granted_per_ip'].values())}); peak held {r['peak_reservations']}; honest renewed: "
          f"{r['honest_renewed']}")
    print(f"  circuits: {r['circuits_opened']} of {r['circuits_tried']} opened in {r['circuits_s']} s (max "
          f"{r['circuits_per_target_max']} per slot, {r['circuits_per_ip_max']} per address); peak {r['peak_circuits']}; "
          f"an honest dialler got one meanwhile: {r['honest_during']}")
    print(f"  bytes: {r['flood_pushed_per_circuit'] / 2**20:.0f} MiB pushed per circuit, at most "
          f"{r['delivered_per_circuit_max'] / 2**20:.1f} MiB delivered; circuits left after {r['circuits_gone_s']} s: "
          f"{r['circuits_left']}")
    print(f"  honest relayed peer reached and answered afterwards: {r['honest_dialled'] and r['honest_echo']}")
    print(f"  relay RSS {r['rss_before'] / 1e6:.0f} MB before, {r['rss_after_reservations_and_circuits'] / 1e6:.0f} MB "
          f"with {r['reservations_asked'] + 2} peers connected and the circuits open, {r['rss_after_flood'] / 1e6:.0f} MB "
          f"after the flood, peak {r['rss_peak'] / 1e6:.0f} MB "
          f"(+{r['rss_growth'] / 1e6:.1f} MB); refused by kvswap's bounds: {r['refused']}; {r['wall_s']} s in all")
    relayed = 0
    for n, rd in enumerate([{"probe": r["probe_before"], "relayed": 0}] + r["rounds"]):
        relayed += rd["relayed"]
        pr = rd["probe"]
        print(f"  {'before' if not n else f'round {n}'}: {relayed / 2**20:.0f} MiB relayed in all, RSS "
              f"{pr['rss'] / 1e6:.0f} MB, glibc heap {pr['heap_in_use'] / 1e6:.0f} MB in use + "
              f"{pr['heap_free'] / 1e6:.0f} MB free, Yamux buffers {pr['yamux_buffered'] / 1e6:.1f} MB (peak "
              f"{pr['yamux_buffered_peak'] / 1e6:.1f} MB) "
              f"({pr['yamux_streams']} streams), {pr['objects']} objects"
              + (f", traced {pr['traced'] / 1e6:.1f} MB" if "traced" in pr else ""))
    pe = r["probe_end"]
    print(f"  at the end: RSS {pe['rss'] / 1e6:.0f} MB, after malloc_trim(0) {pe['rss_after_trim'] / 1e6:.0f} MB")
    if "traced_growth_top" in pe:
        for site, size, count in pe["traced_growth_top"][:5]:
            print(f"    traced growth {size / 1e6:+.2f} MB ({count:+d} blocks) {site}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
