"""Chunk transfer between two nodes on loopback, beside a plain aiohttp transfer of the same bytes.

    python -m bench transfer [--chunks 32] [--chunk-mib 8] [--parallel 4]

One provider process serves a signed artifact of random (incompressible) bf16 KV from a real
kvswap.store.Store, as a kvswap node with its data plane and as a plain aiohttp file server over the very
same chunk files; this process fetches the bytes four ways, each into a fresh Store:

  aiohttp                 GET every chunk, bytes discarded: the reference figure
  aiohttp+verify+store    the same, plus Store.put_chunk (sha256 against the CID, temp file, fsync, rename):
                          what any honest HTTP fetcher would have to do
  kvswap libp2p           node/fetch.py with chunks inside libp2p streams (Noise + Yamux)
  kvswap data plane       node/fetch.py with chunks over the granted TCP data plane; every chunk verified
                          and written through Store.put_chunk exactly as on the libp2p path

It prints MB/s for each and the ratio to the aiohttp figure. Timings vary run to run: compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _serve_http(folder: str) -> None:
    """Child mode: a plain aiohttp server for <folder>/chunks/<cid>; prints its port, runs until stdin closes."""
    from aiohttp import web

    root = Path(folder) / "chunks"

    async def chunk(request: web.Request) -> web.StreamResponse:
        path = root / request.match_info["cid"]
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/chunk/{cid}", chunk)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    asyncio.run(main())


async def _aiohttp_fetch(port: int, cids: list[str], parallel: int, verify_into=None) -> float:
    import aiohttp

    from kvswap.protocol.cid import Cid

    queue = list(cids)
    total = 0

    def verify_and_write(cid: str, data: bytes) -> None:
        if isinstance(verify_into, Path):
            _write_verified(verify_into, cid, data)
        else:
            verify_into.put_chunk(Cid.parse(cid), data)  # hashes, writes a temp file, fsyncs, renames

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal total
        while queue:
            cid = queue.pop()
            async with session.get(f"http://127.0.0.1:{port}/chunk/{cid}") as resp:
                resp.raise_for_status()
                data = await resp.read()
            total += len(data)
            if verify_into is not None:
                await asyncio.to_thread(verify_and_write, cid, data)

    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(parallel)))
    return total / 1e6 / (time.perf_counter() - started)


def _write_verified(folder: Path, cid: str, data: bytes) -> None:
    """sha256 against the CID, temp file, rename: Store.put_chunk minus its fsyncs and index update."""
    from kvswap.protocol.cid import Cid

    Cid.parse(cid).verify(data)
    path = folder / cid
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _folder_target_class():
    from kvswap.node.storeadapter import StoreArtifacts

    class FolderTarget(StoreArtifacts):
        """Verified chunks as plain files (no fsync): the transport's own ceiling, durability aside."""

        verifies_chunks = False  # the fetcher hashes

        def put_chunk(self, cid, data) -> None:
            path = self.store.chunks_dir / str(cid)
            tmp = path.with_suffix(".part")
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)

    return FolderTarget


def _FolderTarget(store, policy):
    return _folder_target_class()(store, policy)


def _kvswap_fetch(node_addr: str, cid: str, folder: Path, dataplane: bool, parallel: int,
                  durable: bool = True) -> tuple[float, int]:
    """Fetch through node/fetch.py into a fresh Store (or, not durable, verified files without fsync)."""
    import trio

    from kvswap.artifact.signing import TrustPolicy
    from kvswap.protocol.cid import Cid
    from kvswap.node.net import TrioNode
    from kvswap.node.p2p import P2PConfig
    from kvswap.node.storeadapter import StoreArtifacts
    from kvswap.store import Store

    store = Store(folder)
    policy = TrustPolicy(frozenset(), accept_any=True)
    target = StoreArtifacts(store, policy) if durable else _FolderTarget(store, policy)

    async def main():
        node = TrioNode(P2PConfig(seed=os.urandom(32)), service=target, target=target, use_dataplane=dataplane)
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            node.fetcher.parallel = parallel
            peer = await node.p2p.connect(node_addr)
            result = await node.fetcher.fetch(Cid.parse(cid), providers=[peer])
            nursery.cancel_scope.cancel()
            return result

    result = trio.run(main)
    if durable:
        assert store.is_complete(Cid.parse(cid))
    store.close()
    return result.rate_mb_s, result.bytes_fetched


def run(chunks: int = 32, chunk_mib: int = 8, parallel: int = 4, repeat: int = 3,
        libp2p_every_run: bool = False) -> dict:
    from kvswap.protocol.cid import Cid
    from kvswap.store import Store
    from bench.harness.netharness import SubprocessNode

    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-transfer-"))
    provider = http = None
    try:
        # no rationing: every run fetches the same artifact from this one provider, and from the third run on a
        # rationing provider would name the earlier (gone) fetchers and serve only after ration.patience_s
        provider = SubprocessNode(work / "provider", 7, n_chunks=chunks, chunk_bytes=chunk_mib << 20, real_store=True,
                                  ration=False)
        http = subprocess.Popen([sys.executable, "-m", "bench.transfer", "serve-http", str(work / "provider")],
                                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        port = json.loads(http.stdout.readline())["port"]
        cids = sorted(p.name for p in (work / "provider" / "chunks").iterdir())  # chunks and the tail
        total_mb = sum((work / "provider" / "chunks" / c).stat().st_size for c in cids) / 1e6
        asyncio.run(_aiohttp_fetch(port, cids[:2], 1, None))  # warm up the page cache and the server
        names = ("aiohttp", "aiohttp+verify+write", "kvswap data plane+verify+write", "aiohttp+Store",
                 "kvswap data plane->Store", "kvswap libp2p->Store")
        runs: dict[str, list[float]] = {k: [] for k in names}
        for i in range(repeat):  # interleaved, so a noisy neighbour hurts every method alike
            runs["aiohttp"].append(asyncio.run(_aiohttp_fetch(port, cids, parallel, None)))
            plain = work / f"http-plain-{i}"
            plain.mkdir()
            runs["aiohttp+verify+write"].append(asyncio.run(_aiohttp_fetch(port, cids, parallel, plain)))
            shutil.rmtree(plain)
            verified = Store(work / f"http-store-{i}")
            verified.put_manifest(Store(work / "provider").get_manifest(Cid.parse(provider.cid)))
            runs["aiohttp+Store"].append(asyncio.run(_aiohttp_fetch(port, cids, parallel, verified)))
            verified.close()
            shutil.rmtree(work / f"http-store-{i}")
            for name, dataplane, durable in (("kvswap data plane+verify+write", True, False),
                                             ("kvswap data plane->Store", True, True),
                                             ("kvswap libp2p->Store", False, True)):
                if name == "kvswap libp2p->Store" and i > 0 and not libp2p_every_run:
                    continue  # ~10x slower: once is enough to place it
                folder = work / f"fetch-{i}-{dataplane}-{durable}"
                rate, got = _kvswap_fetch(provider.addrs[0], provider.cid, folder, dataplane, parallel, durable)
                assert abs(got / 1e6 - total_mb) < 1e-6
                runs[name].append(rate)
                shutil.rmtree(folder)
        rows = {name: statistics.median(rates) for name, rates in runs.items()}
        base = rows["aiohttp"]
        print(f"transfer: {chunks} chunks x {chunk_mib} MiB = {total_mb:.0f} MB on loopback, {parallel} in flight, "
              f"median of {repeat} interleaved runs")
        for name, rate in rows.items():
            print(f"  {name:<31} {rate:8.0f} MB/s   {rate / base:6.2f}x of aiohttp   "
                  f"(runs: {', '.join(f'{r:.0f}' for r in runs[name])})")
        return {"total_mb": total_mb, "rates_mb_s": rows, "runs_mb_s": runs, "ratio_dataplane_verified": rows["kvswap data plane+verify+write"] / base,
                "ratio_dataplane_store": rows["kvswap data plane->Store"] / base,
                "ratio_aiohttp_store": rows["aiohttp+Store"] / base,
                "ratio_libp2p_store": rows["kvswap libp2p->Store"] / base}
    finally:
        if provider is not None:
            provider.stop()
        if http is not None:
            http.stdin.close()
            try:
                http.wait(10)
            except subprocess.TimeoutExpired:
                http.kill()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-http"]:
        _serve_http(argv[1])
        return
    parser = argparse.ArgumentParser(prog="python -m bench transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--chunk-mib", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.chunks, args.chunk_mib, args.parallel, args.repeat)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
