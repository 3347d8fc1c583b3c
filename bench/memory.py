"""Memory: a daemon's peak RSS while serving and while fetching a large artifact, against its idle RSS.

    python -m bench memory [--tokens 3774] [--codec auto] [--quick]

Two real daemons on 127.0.0.1 (`kvswap node start`, tiny-qwen3 as their model so the model's own memory is
small and constant). The server's store is seeded, before it starts, with a signed synthetic artifact in
the Qwen3-4B layout: 3774 tokens x 147,456 B = 557 MB raw (bf16-like values, see bench/loadpath.py). The
fetcher bootstraps to the server and, once both have loaded their model and settled, runs
`kvswap get CID --accept-any`. A thread samples both processes' RSS (psutil, the process and any children)
at ~20 Hz from before the fetch to after it. Idle RSS = the median of the samples in the 2 s before the
fetch starts; peak = the maximum during the fetch. Target: peak <= idle + 300 MB for each daemon, i.e. the
artifact streams through in chunks instead of being buffered whole.

A third daemon is a light node (`--no-model`: it never imports torch or transformers), idle beside the
others, then fetching the same artifact once the first fetch is done: its idle RSS (target <= 150 MB, what a
seed or edge node pays) and its peak while fetching.
Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.swarm import egress, seed_home, start_get, stop_nodes

RESULTS = Path(__file__).parent / "results"
TARGET_MB = 300
#: a light node's idle RSS target (issue 24): nine model-loading daemons filled this machine
TARGET_LIGHT_IDLE_MB = 150
SAMPLE_HZ = 20
IDLE_WINDOW_S = 2.0


def rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


class Sampler(threading.Thread):
    """RSS of some processes every 1/SAMPLE_HZ s, as (monotonic time, {name: bytes}) pairs."""

    def __init__(self, pids: dict[str, int]):
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append((time.monotonic(), {name: rss(pid) for name, pid in self.pids.items()}))
            self.halt.wait(1 / SAMPLE_HZ)

    def window(self, name: str, t0: float, t1: float) -> list[int]:
        return [s[name] for t, s in self.samples if t0 <= t <= t1]


def run(n_tokens: int = 3774, codec: str = "auto", model: str = "tiny-qwen3") -> dict:
    from bench.harness.nodes import NodeProc

    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-memory-"))
    started: list[NodeProc] = []
    sampler = None
    try:
        t0 = time.perf_counter()
        art = seed_home(work / "server", n_tokens, codec)
        print(f"  seeded {art['chunks']} chunks, {art['stored_size'] / 1e6:.1f} MB stored "
              f"({art['raw_size'] / 1e6:.1f} MB raw) in {time.perf_counter() - t0:.1f} s", flush=True)
        server = NodeProc(work / "server", model=model)
        started.append(server)
        fetcher = NodeProc(work / "fetcher", model=model, bootstrap=[server.addr], accept_any=True)
        started.append(fetcher)
        light = NodeProc(work / "light", model=None, bootstrap=[server.addr], accept_any=True)
        started.append(light)
        for node in (server, fetcher):
            node.wait_model()
        sampler = Sampler({"server": server.proc.pid, "fetcher": fetcher.proc.pid, "light": light.proc.pid})
        sampler.start()
        time.sleep(IDLE_WINDOW_S + 0.5)
        begin = time.monotonic()
        proc = start_get(fetcher.home, art["cid"])
        out, err = proc.communicate(timeout=900)
        end = time.monotonic()
        time.sleep(1.0)  # catch a late peak (the store's final index update)
        light_begin = time.monotonic()
        light_proc = start_get(light.home, art["cid"])
        light_out, light_err = light_proc.communicate(timeout=900)
        light_end = time.monotonic()
        time.sleep(1.0)
        sampler.halt.set()
        sampler.join(5)
        if proc.returncode != 0:
            raise RuntimeError(f"kvswap get failed: {err.strip()[-500:]}")
        if light_proc.returncode != 0:
            raise RuntimeError(f"kvswap get on the light node failed: {light_err.strip()[-500:]}")
        got = json.loads(out)
        rows = {}
        windows = {"server": (begin, end), "fetcher": (begin, end), "light": (light_begin, light_end)}
        for name, (t_begin, t_end) in windows.items():
            idle = statistics.median(sampler.window(name, begin - IDLE_WINDOW_S, begin))
            during = sampler.window(name, t_begin, t_end + 1.0)
            peak = max(during)
            rows[name] = {"idle_mb": round(idle / 1e6, 1), "peak_mb": round(peak / 1e6, 1),
                          "peak_minus_idle_mb": round((peak - idle) / 1e6, 1), "samples": len(during),
                          "met": (peak - idle) / 1e6 <= TARGET_MB}
        rows["light"]["idle_met"] = rows["light"]["idle_mb"] <= TARGET_LIGHT_IDLE_MB
        return {
            "benchmark": "memory", "model_of_daemons": model, "artifact": art, "fetch_s": round(end - begin, 3),
            "fetch": {k: got.get(k) for k in ("bytes", "seconds", "chunks_fetched", "complete")},
            "server_egress": egress(server.home, art["stored_size"]), "rows": rows, "target_mb": TARGET_MB,
            "target_light_idle_mb": TARGET_LIGHT_IDLE_MB, "light_fetch_s": round(light_end - light_begin, 3),
            "sample_hz": SAMPLE_HZ,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
        }
    finally:
        if sampler is not None:
            sampler.halt.set()
        stop_nodes(started, work)


def print_table(r: dict) -> None:
    art = r["artifact"]
    print(f"memory: artifact {art['tokens']} tokens Qwen3-4B layout, {art['raw_size'] / 1e6:.0f} MB raw, "
          f"{art['stored_size'] / 1e6:.0f} MB stored ({art['codec']}), {art['chunks']} chunks; fetched in {r['fetch_s']:.1f} s; "
          f"RSS sampled at {r['sample_hz']} Hz")
    print(f"  {'daemon':<8} {'idle MB':>8} {'peak MB':>8} {'peak-idle':>10}  target <= +{r['target_mb']} MB")
    for name, row in r["rows"].items():
        print(f"  {name:<8} {row['idle_mb']:8.0f} {row['peak_mb']:8.0f} {row['peak_minus_idle_mb']:10.0f}  "
              f"{'MET' if row['met'] else 'MISSED'}")
    light = r["rows"]["light"]
    print(f"  light node (--no-model) idle {light['idle_mb']:.0f} MB: target <= {r['target_light_idle_mb']} MB "
          f"{'MET' if light['idle_met'] else 'MISSED'} (the model daemons: {r['rows']['server']['idle_mb']:.0f} and "
          f"{r['rows']['fetcher']['idle_mb']:.0f} MB); it fetched the artifact in {r['light_fetch_s']:.1f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3774)
    parser.add_argument("--codec", default="auto", choices=("raw", "auto", "planes", "zstd"))
    parser.add_argument("--quick", action="store_true", help="1024 tokens (151 MB raw)")
    args = parser.parse_args(argv)
    result = run(1024 if args.quick else args.tokens, args.codec)
    print_table(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2))
    print(f"  wrote {RESULTS / 'memory.json'}")


if __name__ == "__main__":
    main()
