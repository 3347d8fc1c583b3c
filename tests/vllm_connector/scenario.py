"""Every vLLM run the connector tests need, in one process, written as JSON for test_connector.py.

    python tests/vllm_connector/scenario.py OUT.json

vLLM takes ~20 s to start an engine here, so the tests run this once (a module fixture) and assert on its
record. Engines (all tiny-qwen3-hd32 in bf16, real prose from kvswap/data plus a question, greedy):
  ref     no connector, prefix caching off: vLLM's own answer (the issue's reference)
  oracle  no connector, prefix caching on: the document, then document + question (vLLM reuses its blocks)
  conn    the kvswap connector on a home B whose node fetches from node A, prefix caching off:
          1. document + question naming the document's hash: B's store is empty, so the connector has B's
             node fetch A's artifact (made by kvswap's transformers engine) and loads it
          2. the document alone with publish=True: vLLM's own KV becomes an artifact in B's store
          3. document + question loading that vLLM-made artifact
          4. the same with load=False (the connector is off for this request)
          5. an artifact signed by a key B does not trust
          6. the vLLM-made artifact with a chunk corrupted on disk: vLLM must recompute
  rule    the connector on a fresh home C with publish_min_tokens=600 and no request options: the whole
          prompt is published; a longer prompt starting with it then loads it
Then kvswap's transformers engine loads the vLLM-made artifact and its KV is compared with its own prefill.
The daemons are real `kvswap node start` processes on 127.0.0.1; both are stopped at the end.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

QUESTION = " Question: what did the first keeper notice in the ledger? Answer:"
MAX_TOKENS = 16
#: vLLM's KV cache size for the tiny model (bytes): plenty, and no dependence on the machine's free memory
KV_CACHE_BYTES = 128 << 20


def top_logprobs(output) -> list[list[tuple[int, float]]]:
    return [sorted(((tok, lp.logprob) for tok, lp in step.items()), key=lambda x: -x[1]) for step in output.logprobs]


def record(out) -> dict:
    o = out.outputs[0]
    return {"tokens": list(o.token_ids), "logprobs": top_logprobs(o), "kvswap": (out.kv_transfer_params or {}).get("kvswap"),
            "cached": out.num_cached_tokens}


def main(out_path: Path) -> None:
    import shutil
    import tempfile

    import numpy as np
    from vllm import LLM, SamplingParams

    from kvswap.engine import load_engine
    from kvswap.integrations.vllm import document_hash, document_request, kv_transfer_config
    from kvswap.home import Home
    from bench.harness.nodes import NodeProc, cli
    from tests.vllm_connector.tinymodel import tiny_vllm_folder

    folder = str(tiny_vllm_folder())
    doc = (HERE.parents[1] / "kvswap" / "data" / "demo_document.txt").read_text(encoding="utf-8")
    work = Path(tempfile.mkdtemp(prefix="kvswap-vllm-test-"))
    res: dict = {}
    nodes: list[NodeProc] = []
    try:
        engine = load_engine(folder, dtype="bf16", device="cpu")
        doc_ids, q_ids = engine.tokenize(doc), engine.tokenize(QUESTION)
        res["doc_tokens"], res["prompt_tokens"] = len(doc_ids), len(doc_ids) + len(q_ids)
        res["engine"] = {"fingerprint": engine.fingerprint, "tokenizer_fingerprint": engine.tokenizer_fingerprint}

        a = NodeProc(work / "a", model=folder)
        nodes.append(a)
        b = NodeProc(work / "b", model=folder, bootstrap=[a.addr])
        nodes.append(b)
        a.wait_model()
        b.wait_model()
        (work / "doc.txt").write_text(doc, encoding="utf-8")
        pub = json.loads(cli(a.home, "publish", str(work / "doc.txt"), "--json").stdout)
        res["a_cid"] = pub["cid"]
        cli(b.home, "trust", "add", a.info["public_key"])

        sp = lambda extra=None: SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5, extra_args=extra)  # noqa: E731
        common = dict(model=folder, dtype="bfloat16", enforce_eager=True, max_model_len=2048,
                      kv_cache_memory_bytes=KV_CACHE_BYTES)
        prompt = {"prompt_token_ids": doc_ids + q_ids}

        longer = {"prompt_token_ids": doc_ids + q_ids + q_ids}  # starts with the whole of `prompt`
        llm = LLM(enable_prefix_caching=False, **common)
        res["ref"] = record(llm.generate(prompt, sp())[0])
        res["rule_reuse_ref"] = record(llm.generate(longer, sp())[0])
        res["block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
        del llm
        gc.collect()

        llm = LLM(enable_prefix_caching=True, **common)
        llm.generate({"prompt_token_ids": doc_ids}, sp())
        res["oracle"] = record(llm.generate(prompt, sp())[0])
        del llm
        gc.collect()

        llm = LLM(enable_prefix_caching=False, kv_transfer_config=kv_transfer_config(home=str(b.home), fetch_timeout_s=60),
                  **common)
        tok = llm.get_tokenizer()
        p, extra = document_request(tok, doc, QUESTION)
        res["request_prompt_equal"] = p["prompt_token_ids"] == doc_ids + q_ids
        t0 = time.perf_counter()
        res["fetched"] = record(llm.generate(p, sp(extra))[0])
        res["fetched"]["seconds"] = time.perf_counter() - t0

        p, extra = document_request(tok, doc, "", publish=True)
        extra["kv_transfer_params"]["kvswap"]["load"] = False
        res["publish"] = record(llm.generate(p, sp(extra))[0])
        b_home = Home(b.home)
        store = b_home.store
        made = []
        deadline = time.monotonic() + 60
        while not made and time.monotonic() < deadline:  # the connector publishes on a background thread
            made = [r for r in store.list_artifacts() if "(vllm " in r["model_id"] and r["complete"]]
            time.sleep(0.2)
        res["vllm_artifact"] = made[0] if made else None
        vcid = made[0]["cid"]

        p, extra = document_request(tok, doc, QUESTION, cid=vcid)
        res["vllm_made"] = record(llm.generate(p, sp(extra))[0])
        p, extra = document_request(tok, doc, QUESTION)
        extra["kv_transfer_params"]["kvswap"]["load"] = False
        res["load_off"] = record(llm.generate(p, sp(extra))[0])

        # an artifact of the same document signed by a stranger's key
        from kvswap.artifact.pipeline import publish_kv
        from kvswap.artifact.signing import NodeKey

        kv = engine.prefill(doc_ids[:300])
        manifest, chunks = publish_kv(kv, model_id="stranger", model_fingerprint=engine.fingerprint,
                                      tokenizer_fingerprint=engine.tokenizer_fingerprint, document_hash="0" * 64)
        store.put_artifact(manifest, [NodeKey.generate().sign_manifest(manifest.cid)], chunks)
        p, extra = document_request(tok, doc, QUESTION, cid=str(manifest.cid))
        res["untrusted"] = record(llm.generate(p, sp(extra))[0])

        # the vLLM-made artifact with one flipped byte in its first chunk's file
        from kvswap.protocol.cid import Cid

        first = store.get_manifest(Cid.parse(vcid)).chunks[0].cid
        # the bytes a load reads: the stored chunk, and its decoded raw local form where one is kept (a
        # compressed chunk's load cache: kvswap/store.py), both with one byte flipped
        originals = {}
        for path in (store.chunk_path(first), store.raw_dir / str(first)):
            if not path.exists():
                continue
            originals[path] = path.read_bytes()
            data = bytearray(originals[path])
            data[len(data) // 2] ^= 0x01
            path.chmod(0o644)
            path.write_bytes(bytes(data))
        if b_home.tier is not None:  # its verified copy in the host-memory tier would be served instead (as it
            b_home.tier.drop(Cid.parse(vcid))  # should: those bytes were verified); a reboot empties the tier
        p, extra = document_request(tok, doc, QUESTION, cid=vcid)
        res["corrupted"] = record(llm.generate(p, sp(extra))[0])
        del llm
        gc.collect()

        from kvswap.ledger import Ledger

        with Ledger.for_home(b.home) as ledger:
            res["ledger_loads"] = [{"artifact": r.artifact, "tokens": r.tokens, "extra": r.extra}
                                   for r in ledger.computes(kind="load") if r.extra.get("engine") == "vllm"]

        # the prefix rule: a home whose connector publishes every prompt of >= 600 tokens, no request options
        home_c = work / "c"
        llm = LLM(enable_prefix_caching=False, kv_transfer_config=kv_transfer_config(home=str(home_c),
                  publish_min_tokens=600), **common)
        res["rule_publish"] = record(llm.generate(prompt, sp())[0])
        h_c = Home(home_c)
        store_c = h_c.store
        rows = []
        deadline = time.monotonic() + 60
        while not rows and time.monotonic() < deadline:
            rows = [r for r in store_c.list_artifacts() if r["complete"]]
            time.sleep(0.2)
        res["rule_artifacts"] = rows
        res["rule_document_hash"] = document_hash(tok.decode(doc_ids + q_ids))
        res["rule_reuse"] = record(llm.generate(longer, sp())[0])
        h_c.close()
        del llm
        gc.collect()

        # kvswap's transformers engine loads what vLLM made
        from kvswap.artifact.pipeline import assemble_kv, check_compatible
        from kvswap.ops import generate_here

        for path, original in originals.items():
            if path.exists():  # a raw form that failed its check was dropped by the load: nothing to restore
                path.write_bytes(original)
        vman = store.get_manifest(Cid.parse(vcid))
        check_compatible(vman, engine)
        vkv = assemble_kv(vman, store.read_chunk_for_verifier)
        own = engine.prefill(doc_ids)
        import torch

        def floats(bits):
            return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()

        res["kv_compare"] = [
            {"layer": i, "max_abs_k": float(np.abs(floats(vk) - floats(ok)).max()),
             "max_abs_v": float(np.abs(floats(vv) - floats(ov)).max()),
             "scale": float(np.abs(floats(ok)).max()),
             "bits_equal": float(np.mean(np.concatenate([(vk == ok).ravel(), (vv == ov).ravel()])))}
            for i, (vk, vv, ok, ov) in enumerate(zip(vkv.keys, vkv.values, own.keys, own.values))]
        gen = generate_here(b_home, engine, Cid.parse(vcid), QUESTION, max_new_tokens=MAX_TOKENS)
        res["engine_from_vllm_artifact"] = gen["tokens"]
        res["engine_fresh"] = engine.generate_fresh(doc_ids + q_ids, max_new_tokens=MAX_TOKENS).tokens
        b_home.close()
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(work, ignore_errors=True)
    out_path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
