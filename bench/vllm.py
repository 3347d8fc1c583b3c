"""vLLM with and without the kvswap connector: time to first token, and exactness, on the CPU.

    .venv-vllm/bin/python -m bench vllm [--model smollm2-135m] [--lengths 2048 4096] [--repeats 3]

For each document length L (real prose: the Python Language Reference text that ships with CPython,
pydoc_data.topics, cut to exactly L tokens) plus a question:
  without  vLLM, no connector, prefix caching off: generate(document + question, max_tokens=1)
  with     vLLM with the kvswap connector loading the document's artifact from a kvswap home (read, every
           chunk's CID checked, signature checked, written into vLLM's paged blocks) and prefilling only
           the question: the same call
TTFT is the wall time of that call, median of --repeats, both engines in this process, side by side. The
artifact is made by vLLM itself (a publish=True request of the document alone) so that "with" computes
what vLLM's prefix cache would.

Exactness (first length): 24 greedy tokens of "without" vs the connector loading (a) the vLLM-made artifact
and (b) an artifact published by kvswap's transformers engine for the same tokens (different kernels, so
KV that differs in the last bits); tokens equal, first divergence, and the largest difference of the
top-5 logprobs at the first generated position. Writes bench/results/vllm-<model>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
QUESTION = " Question: in two sentences, what does the passage above explain? Answer:"
TOPICS = ("execmodel", "naming", "import", "exceptions", "compound", "typesseq")
EXACT_TOKENS = 24


def prose_ids(tokenizer, n_tokens: int) -> list[int]:
    import pydoc_data.topics as t

    text = "\n\n".join(t.topics[k] for k in TOPICS if k in t.topics)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) < n_tokens:
        raise SystemExit(f"error: the reference text has only {len(ids)} tokens, asked for {n_tokens}")
    return ids[:n_tokens]


def first_step_diff(a, b) -> float:
    """Largest |logprob difference| over the tokens both runs list in their top-5 at the first position."""
    la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
    common = set(la) & set(lb)
    return max((abs(la[t].logprob - lb[t].logprob) for t in common), default=float("nan"))


def compare(ref, got) -> dict:
    ta, tb = list(ref.outputs[0].token_ids), list(got.outputs[0].token_ids)
    first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
    return {"tokens_equal": sum(x == y for x, y in zip(ta, tb)), "of": len(ta), "first_divergence": first,
            "first_step_top5_max_abs_diff": first_step_diff(ref, got),
            "loaded_tokens": ((got.kv_transfer_params or {}).get("kvswap") or {}).get("loaded_tokens")}


def run(model: str, lengths: list[int], repeats: int) -> dict:
    from vllm import LLM, SamplingParams

    from kvswap.engine import catalog
    from kvswap.integrations.vllm import document_hash, kv_transfer_config, kvswap_params

    folder = str(catalog.built_folder(model)) if model in catalog.BUILTIN_MODELS else model
    if not Path(folder).is_dir():
        from kvswap.engine import load_engine

        load_engine(model)  # builds the folder once
    work = Path(tempfile.mkdtemp(prefix="kvswap-bench-vllm-"))
    home = work / "home"
    common = dict(model=folder, dtype="bfloat16", enforce_eager=True, max_model_len=max(lengths) + 256,
                  kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False)
    one = SamplingParams(temperature=0, max_tokens=1)
    out: dict = {"model": model, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "repeats": repeats, "lengths": {}}
    try:
        llm = LLM(**common)
        tok = llm.get_tokenizer()
        docs = {n: prose_ids(tok, n) for n in lengths}
        q_ids = list(tok.encode(QUESTION, add_special_tokens=False))
        greedy = SamplingParams(temperature=0, max_tokens=EXACT_TOKENS, logprobs=5)
        ref_exact = llm.generate({"prompt_token_ids": docs[lengths[0]] + q_ids}, greedy)[0]
        without = {}
        for n in lengths:
            prompt = {"prompt_token_ids": docs[n] + q_ids}
            llm.generate(prompt, one)  # warm-up (first-call allocations)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                llm.generate(prompt, one)
                times.append(time.perf_counter() - t0)
            without[n] = times
        del llm
        gc.collect()

        llm = LLM(kv_transfer_config=kv_transfer_config(home=str(home)), **common)
        cids = {}
        for n in lengths:  # vLLM publishes each document (the artifact a publisher running vLLM would make)
            doc_hash = document_hash(tok.decode(docs[n]))
            llm.generate({"prompt_token_ids": docs[n]},
                         SamplingParams(temperature=0, max_tokens=1,
                                        extra_args=kvswap_params(publish=True, load=False, document_hash=doc_hash)))
            cids[n] = wait_artifact(home, doc_hash)
        for n in lengths:
            prompt = {"prompt_token_ids": docs[n] + q_ids}
            load = SamplingParams(temperature=0, max_tokens=1, extra_args=kvswap_params(cid=cids[n]))
            llm.generate(prompt, load)  # warm-up
            times, loaded = [], None
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = llm.generate(prompt, load)[0]
                times.append(time.perf_counter() - t0)
                loaded = r.kv_transfer_params["kvswap"]["loaded_tokens"]
            w, c = statistics.median(without[n]), statistics.median(times)
            out["lengths"][n] = {"prompt_tokens": n + len(q_ids), "loaded_tokens": loaded,
                                 "ttft_without_s": round(w, 4), "ttft_with_s": round(c, 4),
                                 "speedup": round(w / c, 2), "runs_without": without[n], "runs_with": times}
            print(f"{n:>6} tokens: TTFT without {w:.3f} s, with kvswap {c:.3f} s ({w / c:.2f}x), "
                  f"{loaded} tokens loaded", flush=True)
        n0 = lengths[0]
        prompt = {"prompt_token_ids": docs[n0] + q_ids}
        vllm_made = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=EXACT_TOKENS, logprobs=5,
                                                        extra_args=kvswap_params(cid=cids[n0])))[0]
        hf_cid = publish_with_transformers(model, home, docs[n0], tok)
        hf_made = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=EXACT_TOKENS, logprobs=5,
                                                      extra_args=kvswap_params(cid=hf_cid)))[0]
        del llm
        gc.collect()
        out["exactness"] = {"document_tokens": n0, "vllm_made": compare(ref_exact, vllm_made),
                            "transformers_made": compare(ref_exact, hf_made)}
        for k, v in out["exactness"].items():
            if isinstance(v, dict):
                print(f"exactness, {k} artifact: {v['tokens_equal']}/{v['of']} tokens equal, first-step top-5 "
                      f"max |dlogprob| {v['first_step_top5_max_abs_diff']:.3g}, {v['loaded_tokens']} loaded",
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"vllm-{model.replace('/', '_')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


def wait_artifact(home: Path, doc_hash: str, timeout_s: float = 120) -> str:
    from kvswap.home import Home

    deadline = time.monotonic() + timeout_s
    with Home(home) as h:
        store = h.store
        while time.monotonic() < deadline:
            for row in store.list_artifacts():
                if row["document_hash"] == doc_hash and row["complete"]:
                    return row["cid"]
            time.sleep(0.2)
    raise SystemExit("error: the connector did not publish the document in time")


def publish_with_transformers(model: str, home: Path, doc_ids: list[int], tok) -> str:
    """The same tokens through kvswap's transformers engine, stored (signed by the home's key) beside."""
    from kvswap.artifact.pipeline import publish_kv
    from kvswap.engine import load_engine
    from kvswap.integrations.vllm import document_hash
    from kvswap.home import Home

    engine = load_engine(model, dtype="bf16", device="cpu")
    kv = engine.prefill(doc_ids)
    manifest, chunks = publish_kv(kv, model_id=engine.model_id, model_fingerprint=engine.fingerprint,
                                  tokenizer_fingerprint=engine.tokenizer_fingerprint,
                                  document_hash=document_hash(tok.decode(doc_ids)), compute=engine.compute_identity(prefill_step=kv.meta["prefill_step"]))
    with Home(home) as h:
        h.store.put_artifact(manifest, [h.key.sign_manifest(manifest.cid)], chunks)
    del engine
    gc.collect()
    return str(manifest.cid)


def main(argv: list[str]) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("bench vllm: vllm is not installed in this venv; run it as `.venv-vllm/bin/python -m bench vllm` "
              "(`make vllm-setup` builds .venv-vllm)")
        return
    p = argparse.ArgumentParser(prog="python -m bench vllm")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    run(args.model, args.lengths, args.repeats)
