"""Hosting at provider scale: many agents asking one host about the same document, engine vs vLLM backend.

    python -m bench hosted [--model smollm2-135m] [--agents 16] [--doc-tokens 2048] [--question-tokens 32]
                           [--max-new-tokens 32] [--repeats 1] [--dtype bf16]

Two real daemons (`kvswap node start` children on 127.0.0.1): E with the engine backend (it publishes the
document) and V with `--host-backend vllm` (it fetches E's artifact over kvswap, then its vLLM server loads it
through the connector). The document is real prose (CPython's pydoc topics, as bench vllm), cut to
--doc-tokens; each agent asks its own --question-tokens question (different text, exactly that many
tokens). The agents are real libp2p hosts with their own identities (bench/harness/agents.py), all sending
at once over the generate protocol, first to E, then to V, in the same run:
  aggregate   output tokens of all agents / (last answer - first send), tokens/s
  ttft        per agent: its send to the host's first token (its whole wait less what the host spent after
              the first token; the protocol answers whole), p50 / p95
  equal       agents whose greedy tokens are the same on both backends
One warm-up request per backend first (the engine keeps the verified KV resident; vLLM loads it through the
connector into its prefix cache), timed and reported as `cold`. With --repeats > 1 the rounds alternate
(engine, vLLM, engine, ...), each backend's figures are medians, and the ratio is the median of the pairs'.
Writes bench/results/hosted.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TOPICS = ("execmodel", "naming", "import", "exceptions", "compound", "typesseq")
SUBJECTS = ("names", "scopes", "exceptions", "modules", "packages", "loops", "classes", "functions", "blocks",
            "bindings", "imports", "sequences", "strings", "errors", "frames", "globals", "closures", "lists",
            "tuples", "handlers", "statements", "objects", "code", "finally")


def document(tokenize, decode, n_tokens: int) -> str:
    import pydoc_data.topics as t

    text = "\n\n".join(t.topics[k] for k in TOPICS if k in t.topics)
    ids = tokenize(text)
    if len(ids) < n_tokens:
        raise SystemExit(f"error: the reference text has only {len(ids)} tokens, asked for {n_tokens}")
    return decode(ids[:n_tokens])


def questions(tokenize, n: int, n_tokens: int) -> list[list[int]]:
    """`n` different questions of exactly `n_tokens` token ids each."""
    out = []
    filler = tokenize(" Please answer in one short sentence that quotes the passage.")
    for i in range(n):
        ids = tokenize(f"\n\nQuestion {i + 1}: what does the passage above say about "
                       f"{SUBJECTS[i % len(SUBJECTS)]}?")
        while len(ids) < n_tokens:
            ids += filler
        ids = ids[:n_tokens - 2] + tokenize("\nAnswer:")[:2]
        out.append(ids[:n_tokens])
    assert len({tuple(q) for q in out}) == n
    return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def round_of(addr: str, cid: str, suffixes: list[list[int]], max_new_tokens: int) -> dict:
    from bench.harness.agents import ask_at_once

    runs = ask_at_once(addr, cid, suffixes, max_new_tokens)
    errors = [r.error for r in runs if r.error]
    if errors:
        raise SystemExit(f"error: {len(errors)} of {len(runs)} agents failed: {errors[0]}")
    span = max(r.answered for r in runs) - min(r.sent for r in runs)
    tokens = sum(len(r.tokens) for r in runs)
    ttft = [r.ttft_s() for r in runs]
    return {"aggregate_tok_s": tokens / span, "span_s": span, "output_tokens": tokens,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "latency_p50_s": percentile([r.latency_s for r in runs], 0.5),
            "latency_max_s": max(r.latency_s for r in runs),
            "host_ttft_p50_s": percentile([float(r.timings.get("ttft_s", 0)) for r in runs], 0.5),
            "tokens": [r.tokens for r in runs]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench hosted")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--doc-tokens", type=int, default=2048)
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "hosted.json")
    args = ap.parse_args(argv)

    from bench.harness.nodes import NodeProc, cli
    from kvswap.engine import load_engine

    engine = load_engine(args.model, dtype=args.dtype)  # the daemons' tokenizer, for the questions
    tok = engine.tokenizer
    tokenize = lambda s: list(tok.encode(s, add_special_tokens=False))  # noqa: E731
    doc = document(tokenize, tok.decode, args.doc_tokens)
    suffixes = questions(tokenize, args.agents, args.question_tokens)
    del engine

    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-hosted-"))
    nodes: list = []
    res: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()}}
    try:
        e = NodeProc(work / "e", model=args.model, extra_args=["--dtype", args.dtype])
        nodes.append(e)
        t_start = time.monotonic()
        v = NodeProc(work / "v", model=args.model, bootstrap=[e.addr],
                     extra_args=["--dtype", args.dtype, "--host-backend", "vllm"])
        nodes.append(v)
        e.wait_model()
        v.wait_model()
        (work / "doc.txt").write_text(doc, encoding="utf-8")
        pub = json.loads(cli(e.home, "publish", str(work / "doc.txt"), "--json").stdout)
        cid = pub["cid"]
        res["document"] = {"tokens": pub["n_tokens"], "cid": cid}
        cli(v.home, "trust", "add", e.info["public_key"])
        cli(v.home, "get", cid, "--json")
        deadline = time.monotonic() + 900
        while True:
            hosting = json.loads(cli(v.home, "node", "status", "--json").stdout)["hosting"]
            if hosting["ready"]:
                break
            if time.monotonic() > deadline or hosting["state"] == "failed":
                raise SystemExit(f"error: the vLLM backend did not become ready: {hosting}")
            time.sleep(2)
        res["vllm_start_s"] = hosting["start_s"]
        res["vllm_ready_after_node_start_s"] = round(time.monotonic() - t_start, 1)
        rounds: dict[str, list[dict]] = {"engine": [], "vllm": []}
        backends = (("engine", e), ("vllm", v))
        for name, node in backends:
            cold = round_of(node.addr, cid, suffixes[:1], args.max_new_tokens)
            res.setdefault("cold", {})[name] = {k: cold[k] for k in ("latency_p50_s", "host_ttft_p50_s")}
        for _ in range(args.repeats):  # interleaved: a busy machine slows both sides of one pair alike
            for name, node in backends:
                rounds[name].append(round_of(node.addr, cid, suffixes, args.max_new_tokens))
                print(f"{name}: {rounds[name][-1]['aggregate_tok_s']:.1f} tok/s", flush=True)
        for name, rs in rounds.items():
            res[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "tokens"}
            res[name]["rounds"] = [{k: r[k] for k in r if k != "tokens"} for r in rs]
        te, tv = rounds["engine"][0]["tokens"], rounds["vllm"][0]["tokens"]
        res["equal_agents"] = sum(a == b for a, b in zip(te, tv))
        res["mean_output_tokens"] = res["vllm"]["output_tokens"] / args.agents  # answers end at EOS
        res["pair_ratios"] = [rv["aggregate_tok_s"] / re_["aggregate_tok_s"]
                              for re_, rv in zip(rounds["engine"], rounds["vllm"])]
        res["ratio"] = statistics.median(res["pair_ratios"])
        res["target_met"] = res["ratio"] >= 5.0
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"{args.agents} agents x {args.max_new_tokens} tokens over a {res['document']['tokens']}-token document "
          f"({args.model}, {args.dtype}):")
    for name in ("engine", "vllm"):
        r = res[name]
        print(f"  {name:6s}  {r['aggregate_tok_s']:8.1f} tok/s aggregate  TTFT p50 {r['ttft_p50_s']:.2f} s  "
              f"p95 {r['ttft_p95_s']:.2f} s  last answer {r['latency_max_s']:.1f} s")
    print(f"  ratio {res['ratio']:.1f}x (median of {len(res['pair_ratios'])} pairs; target 5x: {'MET' if res['target_met'] else 'MISSED'}); greedy tokens equal "
          f"for {res['equal_agents']}/{args.agents} agents; vLLM server ready in {res['vllm_start_s']} s; "
          f"written to {args.out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
