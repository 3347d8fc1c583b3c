"""`kvswap exact` (the paper's correctness check) and `kvswap models` (what can be loaded here).

torch is imported inside the command functions only, so `kvswap --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..document import Document
from ..engine.guarantees import GUARANTEES
from ..protocol.errors import UsageError
from . import add_common, emit


def cmd_exact(args: argparse.Namespace) -> int:
    from ..engine.catalog import check_name

    if args.tokens < 1:
        raise UsageError("--tokens must be at least 1")
    text = Document.read(args.doc).text
    check_name(args.model)  # bad input is one line before torch loads (5 s)
    from ..engine import load_engine, run_exact

    engine = load_engine(args.model, dtype=args.dtype, decode=args.decode)
    doc_ids = engine.tokenize(text)
    question_ids = engine.tokenize(args.question) if args.question is not None else None
    result = run_exact(engine, doc_ids, n_tokens=args.tokens, question_ids=question_ids, prefix=args.prefix)
    emit(args, result, _render_exact)
    return 0 if result["exact"] else 1


def _render_exact(r: dict) -> str:
    n = r["n_tokens"]
    rows = [
        ("model", f"{r['model_id']} ({r['dtype']}, {r['device']}, {r.get('decode_mode', 'eager')} decode), "
                  f"fingerprint {r['fingerprint'][:16]}"),
        ("document", f"{r['doc_tokens']} tokens, KV {r['kv_bytes']:,} bytes written to disk and read back"),
        ("reloaded KV bit-identical", "yes" if r["bit_identical"] else "NO"),
        ("greedy tokens matching", f"{r['match']}/{n}"),
        ("first-step max |logit diff|", f"{r['first_logit_max_abs_diff']:.6g}"
                                        f" (argmax {'equal' if r['argmax_equal'] else 'DIFFERENT'})"),
        ("prefill / one reuse step", f"{r['prefill_s']:.4f} s / {r['step_s']:.4f} s"
                                     f" ({r['prefill_s'] / max(r['step_s'], 1e-9):.1f}x)"),
        ("load from bytes", f"{r['load_s']:.4f} s"),
    ]
    q = r.get("question")
    if q:
        rows += [
            ("question: reuse vs two-phase oracle", f"{q['match_two_phase']}/{n}"),
            ("question: reuse vs monolithic D+Q", f"{q['match_monolithic']}/{n}, max |logit diff| "
                                                   f"{q['monolithic_logit_max_abs_diff']:.3g} (tokens only)"),
        ]
    m = r.get("monolithic")
    if m:
        rows.append(("vs one monolithic prefill of D", f"{m['match']}/{n}, max |logit diff| "
                                                      f"{m['first_logit_max_abs_diff']:.3g} (tokens only)"))
    p = r.get("prefix")
    if p:
        rows += [
            (f"prefix {p['prefix_tokens']}: KV of whole steps bit-equal",
             f"{p['arrays_bit_equal']}/{p['arrays']} arrays ({p['kept_tokens']} tokens kept, "
             f"{p['rerun_tokens']} re-run)"),
            (f"prefix {p['prefix_tokens']}: greedy tokens matching",
             f"{p['match']}/{n}, first-step logits {'bit-identical' if p['first_logits_bit_identical'] else 'DIFFER'}"
             f" (max |diff| {p['first_logit_max_abs_diff']:.3g})"),
        ]
    rows.append(("verdict (bitwise promises)", "EXACT" if r["exact"] else "NOT EXACT"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"{'reuse continuation':<{width}}  {r['reuse_text']!r}")
    lines.append("guarantees (docs/exactness.md):")
    lines += [f"  {name:<18} {text}" for name, text in GUARANTEES.items()]
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    from ..engine.catalog import availability

    rows = availability()
    emit(args, {"models": rows}, _render_models)
    return 0


def _render_models(result: dict) -> str:
    rows = result["models"]
    width = max(len(r["name"]) for r in rows)
    return "\n".join(f"{r['name']:<{width}}  {'yes' if r['available'] else 'no ':<3}  {r['where']}\n"
                     f"{'':<{width}}       {r['description']}" for r in rows)


def register(subparsers) -> None:
    p = subparsers.add_parser("exact", help="correctness check: fresh prefill vs saved-then-reloaded KV",
                              description="Prefill a document, save its KV to disk as raw bytes, reload it into "
                                          "a fresh cache and compare greedy continuations with a fresh prefill.")
    p.add_argument("--doc", type=Path, required=True, help="UTF-8 text file to use as the document")
    p.add_argument("--model", default=None, help="tiny-qwen3 | smollm2-135m | qwen3-4b-arch | hub id | folder")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--tokens", type=int, default=24, help="greedy tokens to compare (default 24)")
    p.add_argument("--question", default=None, help="also check a suffix against the two-phase oracle")
    p.add_argument("--decode", default="eager", choices=("eager", "static", "compiled"),
                   help="decode step: eager (default), static cache, or compiled (CUDA graphs); docs/exactness.md")
    p.add_argument("--prefix", type=int, default=None, metavar="P",
                   help="also check the artifact's first P tokens against a fresh prefill of P tokens")
    add_common(p)
    p.set_defaults(func=cmd_exact)

    m = subparsers.add_parser("models", help="list known models and whether they are available here")
    add_common(m)
    m.set_defaults(func=cmd_models)
