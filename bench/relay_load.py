"""A relay under load (issue 26): many reservations, circuits and bytes against one kvswap relay.

    python -m bench relay_load [--ips 20] [--per-ip 8] [--circuits-each 3] [--flood-mib MiB] [--circuit-mib MiB]

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
Sampled every 0.1 s throughout: the relay's reservations and circuits (its `kvswap node status` numbers), its
RSS. NatTuning's limits except the circuit budget (`--circuit-mib`, 1 MiB unless told). tests/test_relay_load.py
runs this with small limits and checks every bound. Writes
bench/results/relay_load.json.
"""

from __future__ import annotations

import argparse
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

_RELAY = """
import dataclasses, json, os, sys, trio
from kvswap.node import nat
from kvswap.node.p2p import P2PConfig, P2PHost
from kvswap.node.tuning import DEFAULT_TUNING

status_file = sys.argv[2]
tuning = dataclasses.replace(DEFAULT_TUNING, nat=dataclasses.replace(DEFAULT_TUNING.nat, **json.loads(sys.argv[1])))


async def main():
    host = P2PHost(P2PConfig(seed=bytes([77]) * 32, listen_addrs=["/ip4/127.0.0.1/tcp/0"], tuning=tuning,
                             nat=nat.NatConfig(reachability="public", relay="on")))
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        print(json.dumps({"addr": host.addrs[0]}), flush=True)
        while True:
            tmp = status_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(host.nat.snapshot(), f)
            os.replace(tmp, status_file)
            await trio.sleep(0.1)

trio.run(main)
"""


class Relay:
    """The relay process: start, its address, its status (the snapshot it writes), its RSS; a context manager."""

    def __init__(self, limits: dict, folder: Path) -> None:
        self.limits, self.status_file = limits, folder / "relay.json"
        self.proc: subprocess.Popen | None = None
        self.addr = ""

    def __enter__(self) -> "Relay":
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-c", _RELAY, json.dumps(self.limits), str(self.status_file)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the relay did not start: {self.proc.stderr.read()[-2000:]}")
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
            async with self.host.run(listen_addrs=[multiaddr.Multiaddr(f"/ip4/{self.ip}/tcp/0")]):
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


async def load(relay: Relay, ips: list[str], per_ip: int, circuits_each: int, flood_bytes: int) -> dict:
    """Steps 1-4 of the module docstring against `relay`; what happened, and the relay's peaks."""
    import trio

    report: dict = {"rss_before": relay.rss()}
    peak = {"reservations": 0, "circuits": 0, "rss": report["rss_before"]}
    async with trio.open_nursery() as nursery:
        async def sample() -> None:
            while True:
                s = relay.status()["relay"]
                peak.update(reservations=max(peak["reservations"], s["reservations"]),
                            circuits=max(peak["circuits"], s["circuits"]), rss=max(peak["rss"], relay.rss()))
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
        report["honest_during"] = await dialer.dial_through(relay.addr, honest.host.get_id())

        # 3. bytes
        async def flood(src: Peer, dst: Peer) -> None:
            with trio.move_on_after(STEP_TIMEOUT_S):
                try:
                    stream = await src.host.new_stream(dst.host.get_id(), [SINK])
                    chunk = bytes(64 * 1024)
                    for _ in range(max(1, flood_bytes // len(chunk))):
                        await stream.write(chunk)
                    await stream.close()
                except Exception:  # boundary: the relay reset the circuit
                    pass

        t0 = time.monotonic()
        async with trio.open_nursery() as inner:
            for src, dst in opened:
                inner.start_soon(flood, src, dst)
        report["flood_s"] = round(time.monotonic() - t0, 2)
        report["rss_after_flood"] = relay.rss()
        targets = {dst for _, dst in opened}
        report["flood_pushed_per_circuit"] = flood_bytes
        report["delivered_per_circuit_max"] = max(
            [dst.received / sum(1 for _, d in opened if d is dst) for dst in targets], default=0)
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
                stream = await dialer.host.new_stream(honest.host.get_id(), [ECHO])
                await stream.write(b"still here")
                report["honest_echo"] = await stream.read(64) == b"still here"
        nursery.cancel_scope.cancel()
    status = relay.status()
    report.update(peak_reservations=peak["reservations"], peak_circuits=peak["circuits"], rss_peak=peak["rss"],
                  rss_growth=peak["rss"] - report["rss_before"], refused=status["relay"]["refused"])
    return report


def run(limits: dict | None = None, ips: int = 20, per_ip: int = 8, circuits_each: int = 3,
        flood_bytes: int | None = None) -> dict:
    import trio

    from kvswap.node import libp2p_compat
    from kvswap.node.tuning import NatTuning

    tuning = dataclasses.replace(NatTuning(), **(limits or {}))
    libp2p_compat.apply(write_idle_s=tuning.reservation_timeout_s)  # what a kvswap host sets (quiet relay logs)
    flood = flood_bytes if flood_bytes is not None else 4 * tuning.relay_circuit_bytes
    addrs = [f"127.0.0.{21 + i}" for i in range(ips)]
    with tempfile.TemporaryDirectory(prefix="kvswap-relay-load-") as tmp, Relay(limits or {}, Path(tmp)) as relay:
        report = trio.run(load, relay, addrs, per_ip, circuits_each, flood)
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
    parser.add_argument("--out", default="relay_load.json", help="file name under bench/results/")
    args = parser.parse_args(argv)
    flood = None if args.flood_mib is None else int(args.flood_mib * 1024 * 1024)
    limits = {"relay_circuit_bytes": int(args.circuit_mib * 1024 * 1024)} if args.circuit_mib else None
    t0 = time.monotonic()
    r = run(limits, args.ips, args.per_ip, args.circuits_each, flood)
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
