"""Audits: the honest difference per dtype, how far each poisoning lands from the tolerances, and what a
sampled audit costs against the prefill it checks.

    python -m bench audit [--models tiny-qwen3,smollm2-135m] [--dtypes bf16,fp16,fp32]
                          [--cost-model qwen3-4b-arch] [--cost-tokens 3774] [--fraction 0.05] [--skip-cost]

Part 1, separation (for each model and dtype, the demo document, 64-token blocks, a full audit):
  honest, block-aligned   kvswap's own artifact audited on this machine (exact: 0 by design)
  honest, monolithic      the same document prefilled in ONE forward (another engine's or a plain transformers
                          publisher's bytes): the honest difference a tolerance audit must accept
  each poisoning          bench/harness/poison.py's, block-aligned, published with this machine's compute
                          identity (as an honest publisher here would): among them one layer's V in one block
                          scaled by 1+e, e in {0.5%, 1%, 2%, 5%}. The largest relative difference the audit
                          measures, its factor over the honest monolithic difference, and whether the default
                          audit (which picks exact here: the same computation), the tolerance audit and the
                          exact audit catch it

Part 2, cost (--cost-model at --cost-tokens, bf16): the publisher's block-aligned prefill and one monolithic
forward, against `kvswap audit --fraction F` (load with every chunk verified + recompute of the drawn blocks
and the last): the target is audit <= 10% of prefill at 5% of the blocks of a 3774-token Qwen3-4B artifact.
Writes bench/results/audit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
OTHER = ("Tide tables list the hours of high and low water for each harbour. Fishermen read them before dawn, "
         "and ferry captains plan crossings around the spring tides, when the current runs strongest. ") * 4
BLOCK = 64


def _demo_text() -> str:
    from importlib import resources

    return resources.files("kvswap").joinpath("data/demo_document.txt").read_text(encoding="utf-8")


def separation(model: str, dtype: str) -> dict:
    from bench.harness.poison import POISONINGS, make_poisoned, publish
    from kvswap.artifact.audit import TOLERANCE
    from kvswap.artifact.signing import NodeKey
    from kvswap.engine import load_engine
    from kvswap.home import Home
    from kvswap.modes import AuditMode
    from kvswap.ops import audit_here
    from kvswap.protocol.errors import AuditFailed

    engine = load_engine(model, dtype=dtype, device="cpu")
    text = _demo_text()
    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-audit-"))
    key = NodeKey.generate()
    rows = {}
    try:
        home = Home(work / "auditor")
        store = home.store

        def audit(manifest, mode: AuditMode) -> tuple[bool, float, str]:
            """(passed, the largest difference measured, the mode the audit used)"""
            try:
                r = audit_here(home, engine, manifest.cid, full=True, mode=mode, sign=False)
                return True, r["max_rel"], r["mode"]
            except AuditFailed as exc:
                checks = exc.result.checks
                return False, max(max(c["max_rel"], c["tail_rel"] or 0.0) for c in checks), exc.result.mode

        ids = engine.tokenize(text)
        for name, step in (("honest_aligned", BLOCK), ("honest_monolithic", 0)):
            kv = engine.prefill(ids, step=step)
            manifest = publish(store, key, engine, kv, text, BLOCK)
            default_pass, _, used = audit(manifest, AuditMode.AUTO)
            passed, rel, _ = audit(manifest, AuditMode.TOLERANCE)
            rows[name] = {"max_rel": rel, "default_pass": default_pass, "default_mode": used, "tolerance_pass": passed,
                          "exact_pass": audit(manifest, AuditMode.EXACT)[0]}
        honest = rows["honest_monolithic"]["max_rel"]
        for kind in POISONINGS:
            manifest = publish(store, key, engine, make_poisoned(engine, kind, text, OTHER, BLOCK), text, BLOCK)
            default_pass, _, used = audit(manifest, AuditMode.AUTO)
            tol_pass, rel, _ = audit(manifest, AuditMode.TOLERANCE)
            exact_pass, _, _ = audit(manifest, AuditMode.EXACT)
            rows[kind] = {"max_rel": rel, "over_honest": (rel / honest) if honest else None,
                          "over_tolerance": rel / TOLERANCE[dtype], "default_caught": not default_pass,
                          "default_mode": used, "tolerance_caught": not tol_pass, "exact_caught": not exact_pass}
        home.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"model": model, "dtype": dtype, "tokens": len(ids), "tolerance": TOLERANCE[dtype],
            "compute": engine.compute_identity(), "rows": rows}


def cost(model: str, n_tokens: int, fraction: float, repeats: int) -> dict:
    from bench.reuse import document_ids
    from kvswap.artifact.pipeline import publish_kv
    from kvswap.artifact.signing import NodeKey
    from kvswap.engine import load_engine
    from kvswap.home import Home
    from kvswap.ops import audit_here
    from kvswap.protocol.cid import sha256_hex

    engine = load_engine(model, dtype="bf16")
    ids = document_ids(engine, n_tokens)
    engine.prefill(ids[:16])  # warm-up
    aligned_runs, mono_runs, kv = [], [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        kv = engine.prefill(ids, step=BLOCK)
        aligned_runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.prefill(ids, step=0)
        mono_runs.append(time.perf_counter() - t0)
    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-audit-cost-"))
    try:
        home = Home(work / "auditor")
        manifest, chunks = publish_kv(kv, model_id=engine.model_id, model_fingerprint=engine.fingerprint,
                                      tokenizer_fingerprint=engine.tokenizer_fingerprint,
                                      document_hash=sha256_hex(b"audit cost"), block_tokens=BLOCK,
                                      compute=engine.compute_identity(prefill_step=BLOCK))
        home.store.put_artifact(manifest, [NodeKey.generate().sign_manifest(manifest.cid)], chunks)
        del kv
        audits = []
        for seed in range(repeats):
            t0 = time.perf_counter()
            r = audit_here(home, engine, manifest.cid, fraction=fraction, seed=seed, sign=False)
            audits.append({"total_s": time.perf_counter() - t0, "load_s": r["load_s"], "recompute_s": r["seconds"],
                           "blocks": r["blocks"], "exact": r["exact"], "mode": r["mode"]})
        home.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    aligned, mono = statistics.median(aligned_runs), statistics.median(mono_runs)
    total = statistics.median(a["total_s"] for a in audits)
    return {"model": engine.model_id, "device": engine.device, "tokens": n_tokens, "blocks": len(manifest.chunks),
            "fraction": fraction, "audited_blocks": len(audits[0]["blocks"]),
            "prefill_aligned_s": aligned, "prefill_monolithic_s": mono, "audit_s": total,
            "audit_load_s": statistics.median(a["load_s"] for a in audits),
            "audit_recompute_s": statistics.median(a["recompute_s"] for a in audits),
            "audit_vs_aligned_prefill": total / aligned, "audit_vs_monolithic_prefill": total / mono,
            "all_exact": all(a["exact"] for a in audits), "runs": audits,
            "prefill_aligned_runs_s": aligned_runs, "prefill_monolithic_runs_s": mono_runs}


def render(result: dict) -> str:
    lines = []
    for sep in result["separation"]:
        lines.append(f"separation: {sep['model']} {sep['dtype']}, {sep['tokens']} tokens, tolerance {sep['tolerance']:g}")
        lines.append(f"  {'artifact':<20} {'max rel diff':>12} {'x honest':>9} {'x tolerance':>11} "
                     f"{'default audit':>22} {'tolerance audit':>16} {'exact audit':>17}")
        for name, r in sep["rows"].items():
            if name.startswith("honest"):
                verdict = lambda ok: "passes" if ok else "FALSE ALARM"  # noqa: E731
                default = f"{'passes' if r['default_pass'] else 'fails'} ({r['default_mode']})"
                lines.append(f"  {name:<20} {r['max_rel']:>12.3g} {'':>9} {'':>11} {default:>22} "
                             f"{verdict(r['tolerance_pass']):>16} "
                             f"{('passes' if r['exact_pass'] else 'fails (not exact)'):>17}")
            else:
                over = f"{r['over_honest']:.0f}x" if r["over_honest"] else "inf"
                default = f"{'caught' if r['default_caught'] else 'MISSED'} ({r['default_mode']})"
                lines.append(f"  {name:<20} {r['max_rel']:>12.3g} {over:>9} {r['over_tolerance']:>10.2f}x "
                             f"{default:>22} {('caught' if r['tolerance_caught'] else 'missed'):>16} "
                             f"{('caught' if r['exact_caught'] else 'MISSED'):>17}")
    c = result.get("cost")
    if c:
        lines.append(f"cost: {c['model']} bf16 on {c['device']}, {c['tokens']} tokens ({c['blocks']} blocks), "
                     f"--fraction {c['fraction']} -> {c['audited_blocks']} blocks audited")
        lines.append(f"  prefill block-aligned {c['prefill_aligned_s']:.2f} s, monolithic {c['prefill_monolithic_s']:.2f} s; "
                     f"audit {c['audit_s']:.2f} s (load+verify {c['audit_load_s']:.2f} s, recompute "
                     f"{c['audit_recompute_s']:.2f} s): {c['audit_vs_aligned_prefill']:.1%} of the aligned prefill, "
                     f"{c['audit_vs_monolithic_prefill']:.1%} of the monolithic (target <= 10%)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench audit", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny-qwen3,smollm2-135m")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--cost-model", default="qwen3-4b-arch")
    parser.add_argument("--cost-tokens", type=int, default=3774)
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=1, help="cost runs (a 3774-token CPU prefill takes minutes)")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args(argv)
    result: dict = {"bench": "audit", "machine": platform.platform(), "cpus": os.cpu_count(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "separation": []}
    for model in [m for m in args.models.split(",") if m]:
        for dtype in [d for d in args.dtypes.split(",") if d]:
            print(f"  separation {model} {dtype} ...", file=sys.stderr, flush=True)
            result["separation"].append(separation(model, dtype))
    if not args.skip_cost:
        print(f"  cost {args.cost_model} {args.cost_tokens} tokens ...", file=sys.stderr, flush=True)
        result["cost"] = cost(args.cost_model, args.cost_tokens, args.fraction, max(1, args.repeats))
    print(render(result))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "audit.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0
