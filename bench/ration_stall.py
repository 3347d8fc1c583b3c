"""A rationing publisher whose copies' holders are gone, beside a stalling provider (issue 24, target 7).

    python -m bench ration_stall [--rounds 5] [--chunks 26] [--chunk-kb 24]

Real libp2p nodes on 127.0.0.1 (node/net.py TrioNodes in one process, as tests/test_hostile.py runs them):
a publisher rationing one copy per chunk; two takers fetch the whole artifact from it and leave; a third
fetcher, with a hostile provider that reads chunk requests and never answers (bench/harness/hostile.py)
beside the publisher, fetches it. Each round is run under both swarm rules in the same process, `legacy`
(the rule before: the publisher names the departed holders until the fetcher's patience runs out, and the
staller's requests, never compared with a measured fast peer, run to their 60 s deadline) and `superseed`
(copies held by peers no longer connected no longer count, timeouts follow progress). Reported: the median
quiet fetch (a taker's) and the median fetch beside the staller, and their ratio (target <= 3x).
Writes bench/results/ration_stall.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGET_RATIO = 3.0
#: seconds one fetch may take before the round gives up (the legacy rule's stall lasts up to 60 s)
ROUND_TIMEOUT_S = 150


def one_round(root: Path, mode: str, chunks: int, chunk_bytes: int, seed: int) -> dict:
    from bench.harness.hostile import gone_holders_beside_a_staller
    from kvswap.modes import SwarmMode
    from kvswap.node.tuning import DEFAULT_TUNING, swarm_tuning

    tuning = swarm_tuning(DEFAULT_TUNING, SwarmMode.parse(mode))
    tuning = replace(tuning, ration=replace(tuning.ration, copies=1))
    return gone_holders_beside_a_staller(root / f"{mode}-{seed}", tuning, chunks, chunk_bytes, seed,
                                         timeout_s=ROUND_TIMEOUT_S)


def run(rounds: int = 5, chunks: int = 26, chunk_kb: int = 24) -> dict:
    out: dict = {"benchmark": "ration_stall", "rounds": rounds, "chunks": chunks, "chunk_bytes": chunk_kb * 1024,
                 "target_ratio": TARGET_RATIO, "modes": {},
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="kvswap-bench-rstall-") as tmp:
        for r in range(rounds):
            for mode in ("legacy", "superseed"):  # interleaved: both see the same machine load
                t0 = time.perf_counter()
                row = one_round(Path(tmp), mode, chunks, chunk_kb * 1024, seed=r)
                out["modes"].setdefault(mode, []).append(row)
                print(f"  round {r + 1} {mode:<9} quiet {row['quiet_s']:.2f} s, beside the staller "
                      f"{row['stalled_s']:.2f} s ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    for mode, rows in out["modes"].items():
        quiet = statistics.median(r["quiet_s"] for r in rows)
        stalled = statistics.median(r["stalled_s"] for r in rows)
        out[mode] = {"quiet_median_s": round(quiet, 3), "stalled_median_s": round(stalled, 3),
                     "ratio": round(stalled / quiet, 2), "met": stalled / quiet <= TARGET_RATIO}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ration_stall", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=26)
    parser.add_argument("--chunk-kb", type=int, default=24)
    args = parser.parse_args(argv)
    result = run(args.rounds, args.chunks, args.chunk_kb)
    print(f"ration_stall: {args.chunks} chunks x {args.chunk_kb} KiB, median of {args.rounds} rounds")
    for mode in ("legacy", "superseed"):
        m = result[mode]
        print(f"  {mode:<9} quiet {m['quiet_median_s']:.2f} s, beside a staller with the holders gone "
              f"{m['stalled_median_s']:.2f} s = {m['ratio']:.1f}x (target <= {TARGET_RATIO:g}x: "
              f"{'MET' if m['met'] else 'MISSED'})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ration_stall.json").write_text(json.dumps(result, indent=2))
    print(f"  wrote {RESULTS / 'ration_stall.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
