"""The paper's correctness check: does generating from saved-then-reloaded KV equal a fresh prefill?

Steps: prefill the document; write its K/V raw bytes (and the last logits) to a real file; read them back
into new arrays (raw little-endian bytes, no pickle); load them into a fresh cache and greedy-decode; compare
with a from-scratch prefill + decode: matching tokens, max |logit difference| at the first step, and whether
the reloaded KV is bit-identical to an independent second prefill. With a question, reuse (document KV +
question prefill) is compared with its oracle "prefill D, then prefill Q" (must match) and with one
monolithic D+Q prefill (reported only: bf16 with sdpa attention may legitimately differ). With a prefix P,
the first P tokens of the artifact (no stored logits) are compared with a fresh prefill of those P tokens.

What each comparison may claim (GUARANTEES; docs/exactness.md has the table with measured figures): bits only
where both sides run the same computation on the same machine; everything else is tokens matching plus a
reported logit difference, because matrix-multiply kernels pick their blocking by row count, thread count,
CPU instruction set and device.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..protocol.errors import FormatError
from ..kvtensors import KvTensors
from .core import Engine, GenerationResult
from .guarantees import GUARANTEES


def write_kv_raw(kv: KvTensors, path: Path) -> int:
    """K then V of every layer, then the float32 logits, as raw little-endian bytes. Returns bytes written."""
    with open(path, "wb") as f:
        for k, v in zip(kv.keys, kv.values):
            f.write(np.ascontiguousarray(k, dtype=kv.layout.raw_dtype).tobytes())
            f.write(np.ascontiguousarray(v, dtype=kv.layout.raw_dtype).tobytes())
        if kv.last_logits is not None:
            f.write(np.ascontiguousarray(kv.last_logits, dtype="<f4").tobytes())
    return path.stat().st_size


def read_kv_raw(path: Path, like: KvTensors) -> KvTensors:
    """Read back what `write_kv_raw` wrote, shaped by `like`'s layout, tokens and metadata (not its arrays)."""
    lay = like.layout
    shape = (lay.kv_heads, like.n_tokens, lay.head_dim)
    count = int(np.prod(shape))
    keys, values = [], []

    def take(f, dtype, n: int) -> np.ndarray:
        arr = np.fromfile(f, dtype=dtype, count=n)
        if arr.size != n:
            raise FormatError(f"{path}: truncated KV file (wanted {n} values, got {arr.size})")
        return arr

    with open(path, "rb") as f:
        for _ in range(lay.layers):
            keys.append(take(f, lay.raw_dtype, count).reshape(shape))
            values.append(take(f, lay.raw_dtype, count).reshape(shape))
        logits = None
        if like.last_logits is not None:
            logits = take(f, np.dtype("<f4"), like.last_logits.size).astype(np.float32)
    return KvTensors(lay, list(like.token_ids), keys, values, logits, dict(like.meta))


def kv_bit_identical(a: KvTensors, b: KvTensors) -> bool:
    if a.token_ids != b.token_ids or len(a.keys) != len(b.keys):
        return False
    arrays = all(np.array_equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values))
    if (a.last_logits is None) != (b.last_logits is None):
        return False
    logits = a.last_logits is None or a.last_logits.tobytes() == b.last_logits.tobytes()
    return arrays and logits


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens agree (a greedy divergence never re-converges meaningfully)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _max_abs_diff(a: GenerationResult, b: GenerationResult) -> float:
    return float(np.max(np.abs(a.first_logits.astype(np.float64) - b.first_logits.astype(np.float64))))


def prefix_of(kv: KvTensors, n: int) -> KvTensors:
    """The first `n` tokens of `kv`, without logits (what a consumer holds after fetching a prefix)."""
    return KvTensors(kv.layout, list(kv.token_ids[:n]), [k[:, :n].copy() for k in kv.keys],
                     [v[:, :n].copy() for v in kv.values], None, dict(kv.meta))


def check_prefix(engine: Engine, kv: KvTensors, n_prefix: int, n_tokens: int = 24) -> dict:
    """The prefix row: the artifact's first `n_prefix` tokens against a fresh prefill of those tokens.

    The KV of the prefix's whole prefill steps is the artifact's (bit-equal to a fresh prefill's, checked
    here); its last, cut step is re-run by the engine, so the generation is the same computation as after a
    fresh prefill of the prefix: first-step logits and tokens are compared bit for bit."""
    if not 0 < n_prefix < kv.n_tokens:
        from ..protocol.errors import UsageError

        raise UsageError(f"--prefix must be between 1 and {kv.n_tokens - 1} (the document has {kv.n_tokens} tokens)")
    step = int(kv.meta.get("prefill_step", engine.prefill_step))
    kept = (n_prefix // step) * step if step else 0
    pre = prefix_of(kv, n_prefix)
    short = engine.prefill(kv.token_ids[:n_prefix], step=step)
    fresh = engine.generate_fresh(kv.token_ids[:n_prefix], n_tokens, stop_at_eos=False, step=step)
    reuse = engine.generate_from_kv(pre, [], n_tokens, stop_at_eos=False)
    equal = sum(np.array_equal(x[:, :kept], y[:, :kept]) for x, y in zip(pre.keys + pre.values, short.keys + short.values))
    return {
        "prefix_tokens": n_prefix, "step": step, "kept_tokens": kept, "rerun_tokens": n_prefix - kept,
        "arrays_bit_equal": int(equal), "arrays": 2 * kv.layout.layers,
        "kv_bit_identical": equal == 2 * kv.layout.layers,
        "match": matching_prefix(fresh.tokens, reuse.tokens),
        "first_logit_max_abs_diff": _max_abs_diff(fresh, reuse),
        "first_logits_bit_identical": fresh.first_logits.tobytes() == reuse.first_logits.tobytes(),
        "argmax_equal": int(np.argmax(fresh.first_logits)) == int(np.argmax(reuse.first_logits)),
        "reuse_tokens": reuse.tokens, "fresh_tokens": fresh.tokens,
        "guarantee": GUARANTEES["prefix"],
    }


def run_exact(engine: Engine, doc_ids: list[int], n_tokens: int = 24, question_ids: list[int] | None = None,
              workdir: Path | None = None, prefix: int | None = None) -> dict:
    """Run the check and return a JSON-ready dict. `exact` is True only if every bitwise promise held (whole
    artifact; suffix against the two-phase oracle; the prefix, when asked for). The monolithic rows (one
    forward over the document, or over document + question) measure computations kvswap does not promise bits
    for (GUARANTEES): reported, not part of the verdict."""
    kv = engine.prefill(doc_ids)
    with tempfile.TemporaryDirectory(prefix="kvswap-exact-", dir=workdir) as tmp:
        path = Path(tmp) / "kv.raw"
        t0 = time.perf_counter()
        file_bytes = write_kv_raw(kv, path)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        reloaded = read_kv_raw(path, kv)
        read_s = time.perf_counter() - t0
    second = engine.prefill(doc_ids)
    bit_identical = kv_bit_identical(reloaded, second)

    fresh = engine.generate_fresh(doc_ids, n_tokens, stop_at_eos=False)
    reuse = engine.generate_from_kv(reloaded, [], n_tokens, stop_at_eos=False)
    plain = engine.generate_fresh(doc_ids, n_tokens, stop_at_eos=False, step=0)  # one monolithic forward
    step_s = engine.step_time(reloaded)
    match = matching_prefix(fresh.tokens, reuse.tokens)
    result = {
        "model_id": engine.model_id, "fingerprint": engine.fingerprint, "dtype": engine.dtype,
        "decode_mode": engine.decode_mode,
        "device": engine.device, "doc_tokens": len(doc_ids), "n_tokens": n_tokens,
        "kv_bytes": kv.nbytes(), "file_bytes": file_bytes, "write_s": write_s, "read_s": read_s,
        "bit_identical": bit_identical, "match": match, "fresh_tokens": fresh.tokens, "reuse_tokens": reuse.tokens,
        "first_logit_max_abs_diff": _max_abs_diff(fresh, reuse),
        "argmax_equal": int(np.argmax(fresh.first_logits)) == int(np.argmax(reuse.first_logits)),
        "fresh_text": fresh.text, "reuse_text": reuse.text,
        "prefill_s": kv.meta.get("prefill_s"), "load_s": reuse.load_s, "step_s": step_s,
        "decode_s_fresh": fresh.decode_s, "decode_s_reuse": reuse.decode_s,
        "guarantee": GUARANTEES["whole"],
        "prefill_step": engine.prefill_step,
        "monolithic": {"match": matching_prefix(plain.tokens, reuse.tokens),
                       "first_logit_max_abs_diff": _max_abs_diff(plain, reuse),
                       "guarantee": GUARANTEES["monolithic"]},
    }
    exact = bit_identical and match == n_tokens == len(fresh.tokens) == len(reuse.tokens)
    if question_ids:
        oracle = engine.generate_two_phase(doc_ids, question_ids, n_tokens, stop_at_eos=False)
        reuse_q = engine.generate_from_kv(reloaded, question_ids, n_tokens, stop_at_eos=False)
        mono = engine.generate_fresh(list(doc_ids) + list(question_ids), n_tokens, stop_at_eos=False, step=0)
        q_match = matching_prefix(oracle.tokens, reuse_q.tokens)
        result["question"] = {
            "question_tokens": len(question_ids),
            "match_two_phase": q_match,
            "two_phase_logit_max_abs_diff": _max_abs_diff(oracle, reuse_q),
            "match_monolithic": matching_prefix(mono.tokens, reuse_q.tokens),
            "monolithic_logit_max_abs_diff": _max_abs_diff(mono, reuse_q),
            "reuse_tokens": reuse_q.tokens, "reuse_text": reuse_q.text, "monolithic_text": mono.text,
            "guarantee": GUARANTEES["suffix_two_phase"],
            "monolithic_guarantee": GUARANTEES["suffix_monolithic"],
        }
        exact = exact and q_match == n_tokens
    if prefix is not None:
        result["prefix"] = check_prefix(engine, reloaded, prefix, n_tokens)
        exact = exact and result["prefix"]["first_logits_bit_identical"] and result["prefix"]["match"] == n_tokens
    result["exact"] = bool(exact)
    return result
