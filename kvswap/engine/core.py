"""The Engine: tokenize, prefill to KvTensors, and generate from a fresh prefill or from loaded KV.

Exactness recipe (docs/exactness.md): a prefill caches ALL document tokens and keeps the last position's
logits; the first new token is the argmax of those logits (no forward pass), every later token is a
single-token forward over the cache. With a suffix, only the suffix is prefilled over the loaded cache, with
positions continuing after the document and an attention mask covering past + new. Every generation builds
a FRESH cache (decoding grows a cache in place, so a reused one silently gives wrong output). All paths
compute logits with `logits_to_keep=1`, so the reference and the reuse path run the same kernels.

Block-aligned prefill: a document is prefilled in steps of `prefill_step` tokens (the artifact's block size,
64 by default), each step one forward over the cache of the steps before it. Then the KV of a block depends
only on the blocks before it, computed the same way, so on the same kind of machine:
- an audit that recomputes block i over the artifact's own KV of blocks 0..i-1 gets the stored bits exactly
  (kvswap/audit.py), and any poisoned block is caught exactly, not within a tolerance;
- two documents that share their first blocks of tokens share those blocks' bytes, so their CIDs (stored and
  fetched once);
- a prefix of an artifact reuses bit-exactly: the engine keeps the prefix's whole steps and re-runs its last,
  partial step (at most one step of tokens), which is the same computation as a fresh prefill of the prefix.
`step=0` is one monolithic forward (what a plain transformers user runs; the benchmarks' prefill baseline).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from transformers import DynamicCache

from ..document import EMPTY_DOCUMENT
from ..protocol.errors import ModelMismatch, UsageError
from ..kvtensors import KvLayout, KvTensors
from ..artifact.limits import DEFAULT_BLOCK_TOKENS
from .decoding import Stepper, check_mode
from .kvload import LoadedKv, cache_from_loaded, load_from_chunks, load_from_kvtensors, load_from_layers
from .rawbits import tensor_to_bits, torch_dtype


@dataclass
class GenerationResult:
    """What one generation produced and what each phase cost (seconds, wall clock)."""

    tokens: list[int]
    text: str
    first_logits: np.ndarray  # float32 [vocab]: logits that chose the first new token
    prefill_s: float = 0.0  # forward passes over prompt tokens (document and/or suffix)
    load_s: float = 0.0  # building the cache from KvTensors (0 for a fresh prefill)
    decode_s: float = 0.0  # choosing tokens and the single-token forwards after the first
    n_prompt_tokens: int = 0
    decode_mode: str = "eager"  # kvswap/engine/decoding.py

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("first_logits")
        return d


def cache_kwarg(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` since transformers 5.2x (where
    `past_key_values` warns and is to be removed in 5.40), `past_key_values` before (5.17 on the GPU machine)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _short(fp: str | None) -> str:
    return (fp or "?")[:16]


class Engine:
    """One loaded model + tokenizer in one dtype on one device. Not thread-safe: one generation at a time."""

    def __init__(self, model, tokenizer, *, model_id: str, fingerprint: str, tokenizer_fingerprint: str,
                 dtype: str, device: str):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.dtype = dtype
        self.device = str(device)
        self._torch_dtype = torch_dtype(dtype)
        cfg = model.config.get_text_config(decoder=True)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.layout = KvLayout(int(cfg.num_hidden_layers), int(kv_heads), int(head_dim), dtype)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 0) or 2048
        self.vocab_size = int(cfg.vocab_size)
        self.eos_ids = self._eos_ids()
        self._cache_kwarg = cache_kwarg(model)
        self.decode_mode = "eager"
        self._compiled_forward = None
        self.prefill_step = DEFAULT_BLOCK_TOKENS  # tokens per prefill forward (module docstring); 0 = monolithic

    def __repr__(self) -> str:
        return f"Engine({self.model_id!r}, {self.dtype}, {self.device}, fingerprint={_short(self.fingerprint)})"

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    def compute_identity(self, prefill_step: int | None = None) -> dict[str, str]:
        """What decides the bits of this engine's prefills here, in steps of `prefill_step` tokens
        (kvswap/engine/identity.py): published in the manifest, compared by auditors."""
        from .identity import compute_identity

        return compute_identity(self.model, self.device, prefill_step)

    @contextlib.contextmanager
    def threads(self, n: int | None):
        """Run the block within with torch's intra-op thread count at `n` (None: unchanged), then restore it:
        an audit reproduces the publisher's thread count (kvswap/engine/identity.py)."""
        before = torch.get_num_threads()
        if n and n != before:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def set_decode_mode(self, mode: str) -> None:
        """eager | static | compiled (CUDA only): how decode steps run (kvswap/engine/decoding.py)."""
        self.decode_mode = check_mode(mode, self.device)

    def compiled_forward(self):
        """model.forward compiled for CUDA-graph replay, built on first use (one compile per cache bucket)."""
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True)
        return self._compiled_forward

    def warm_up(self, prompt_tokens: int = 16, max_new_tokens: int = 4) -> float:
        """Run one short generation so a compiled decode step is compiled before the first request (a daemon
        calls this at start). Returns the seconds it took."""
        t0 = time.perf_counter()
        ids = [int(i) % self.vocab_size for i in range(1000, 1000 + prompt_tokens)]
        self.generate_fresh(ids, max_new_tokens=max_new_tokens, stop_at_eos=False)
        return time.perf_counter() - t0

    def describe(self) -> dict:
        return {"model_id": self.model_id, "fingerprint": self.fingerprint, "decode_mode": self.decode_mode,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "dtype": self.dtype, "device": self.device,
                "layout": self.layout.to_dict(), "max_context": self.max_context, "vocab_size": self.vocab_size}

    # --- text <-> ids ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens added (documents and suffixes concatenate as ids)."""
        if not text or not text.strip():
            raise UsageError(EMPTY_DOCUMENT)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # --- forward passes -----------------------------------------------------------------------------
    def _check_ids(self, ids: list[int], what: str, past: int = 0, extra: int = 0) -> None:
        if any((not isinstance(i, (int, np.integer))) or i < 0 or i >= self.vocab_size for i in ids):
            raise UsageError(f"{what} holds token ids outside this model's vocabulary (0..{self.vocab_size - 1})")
        total = past + len(ids) + extra
        if total > self.max_context:
            raise UsageError(f"{what}: {past + len(ids)} tokens (+{extra} to generate) exceed the "
                             f"{self.max_context}-token context window of {self.model_id}")

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def _forward(self, ids: list[int], cache: DynamicCache) -> np.ndarray:
        """Feed `ids` after what `cache` holds; returns float32 logits of the last position. Grows `cache`."""
        past = cache.get_seq_length()
        n = len(ids)
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([list(ids)], dtype=torch.long, device=self.device),
                position_ids=torch.arange(past, past + n, device=self.device).unsqueeze(0),
                attention_mask=torch.ones((1, past + n), dtype=torch.long, device=self.device),
                **{self._cache_kwarg: cache},
                use_cache=True,
                logits_to_keep=1,
            )
        if cache.get_seq_length() != past + n:  # guards the silent "re-fed everything" pitfall
            raise RuntimeError(f"cache holds {cache.get_seq_length()} tokens after feeding {n} over {past}")
        return out.logits[0, -1].float().cpu().numpy()

    def _step_of(self, step: int | None) -> int:
        step = self.prefill_step if step is None else int(step)
        if step < 0:
            raise UsageError(f"prefill step must be >= 0 tokens, got {step}")
        return step

    def _prefill(self, ids: list[int], cache: DynamicCache, step: int,
                 progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Feed `ids` over `cache` in forwards of `step` tokens (0: one forward); last position's logits.
        Steps are aligned to absolute positions (multiples of `step`), so prefilling a document in two calls
        at a step boundary is the same computation as in one call."""
        past = cache.get_seq_length()
        if step <= 0 or (len(ids) <= step and past % step == 0):
            return self._forward(ids, cache)
        logits, i = None, 0
        while i < len(ids):
            end = min(len(ids), i + step - (past + i) % step)
            logits = self._forward(ids[i:end], cache)
            i = end
            if progress is not None:
                progress(i, len(ids))
        return logits

    def _kv_from_cache(self, cache: DynamicCache, ids: list[int], last_logits: np.ndarray | None,
                       prefill_s: float, step: int) -> KvTensors:
        keys = [tensor_to_bits(layer.keys[0]) for layer in cache.layers]
        values = [tensor_to_bits(layer.values[0]) for layer in cache.layers]
        meta = {"model_id": self.model_id, "model_fingerprint": self.fingerprint,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "dtype": self.dtype,
                "device": self.device, "prefill_s": prefill_s, "prefill_step": step}
        kv = KvTensors(self.layout, list(map(int, ids)), keys, values, last_logits, meta)
        kv.check_shapes()
        return kv

    def prefill(self, ids: list[int], step: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> KvTensors:
        """KV of every token in `ids` plus the logits at the last position (what an artifact stores), prefilled
        in steps of `step` tokens (default `prefill_step`; 0 = one forward; publish passes the block size)."""
        ids = list(ids)
        if not ids:
            raise UsageError(EMPTY_DOCUMENT)
        self._check_ids(ids, "document")
        step = self._step_of(step)
        cache = self._new_cache()
        t0 = time.perf_counter()
        logits = self._prefill(ids, cache, step, progress)
        self._sync()
        prefill_s = time.perf_counter() - t0
        return self._kv_from_cache(cache, ids, logits, prefill_s, step)

    # --- loading ------------------------------------------------------------------------------------
    def check_compatible(self, kv: KvTensors) -> None:
        """ModelMismatch unless `kv` was made by this model, tokenizer and dtype, with matching shapes."""
        theirs = kv.meta.get("model_fingerprint")
        if theirs is not None and theirs != self.fingerprint:
            raise ModelMismatch(
                f"KV was made by model {_short(theirs)} ({kv.meta.get('model_id', '?')}), "
                f"this engine is {_short(self.fingerprint)} ({self.model_id})")
        their_tok = kv.meta.get("tokenizer_fingerprint")
        if their_tok is not None and their_tok != self.tokenizer_fingerprint:
            raise ModelMismatch(f"KV was made with tokenizer {_short(their_tok)}, this engine uses "
                                f"{_short(self.tokenizer_fingerprint)}")
        if kv.layout.dtype != self.dtype:
            raise ModelMismatch(f"KV dtype is {kv.layout.dtype}, this engine runs {self.dtype} (dtype must match)")
        mine, other = self.layout, kv.layout
        if (other.layers, other.kv_heads, other.head_dim) != (mine.layers, mine.kv_heads, mine.head_dim):
            raise ModelMismatch(
                f"KV layout is {other.layers} layers x {other.kv_heads} KV heads x {other.head_dim} dims, "
                f"this engine ({self.model_id}) needs {mine.layers} x {mine.kv_heads} x {mine.head_dim}")
        kv.check_shapes()
        if kv.last_logits is not None:
            logits = np.asarray(kv.last_logits)
            if logits.shape != (self.vocab_size,) or logits.dtype != np.float32:
                raise ModelMismatch(f"stored logits are {logits.shape} {logits.dtype}, this engine needs "
                                    f"({self.vocab_size},) float32")

    def cache_from_kv(self, kv: KvTensors, n_tokens: int | None = None) -> DynamicCache:
        """A fresh DynamicCache over `kv` (or its first `n_tokens`); the arrays are never written."""
        return cache_from_loaded(self.model.config, load_from_kvtensors(self, kv, n_tokens))

    def load_chunks(self, layout: KvLayout, token_ids: list[int], chunk_tokens: list[int], fill,
                    last_logits: np.ndarray | None = None, meta: dict | None = None, *, step: int = 64,
                    whole: bool = True) -> LoadedKv:
        """KV from the store's load path: `fill(dest)` loads verified chunks into this engine's destination
        and yields each chunk's index when it is in place (kvswap/engine/kvload.py)."""
        if layout != self.layout:
            raise ModelMismatch(f"KV layout is {layout.to_dict()}, this engine ({self.model_id}) needs "
                                f"{self.layout.to_dict()}")
        return load_from_chunks(self, layout, token_ids, chunk_tokens, fill, last_logits, meta, step, whole)

    def load_layers(self, layout: KvLayout, token_ids: list[int], total_tokens: int, pages,
                    last_logits: np.ndarray | None = None, meta: dict | None = None, *, step: int = 64,
                    whole: bool = True) -> LoadedKv:
        """KV already verified and in the cache's layout (a host-memory tier entry, kvswap/hosttier.py): views
        of `pages` on the CPU, one copy to a GPU (kvswap/engine/kvload.py)."""
        if layout != self.layout:
            raise ModelMismatch(f"KV layout is {layout.to_dict()}, this engine ({self.model_id}) needs "
                                f"{self.layout.to_dict()}")
        return load_from_layers(self, layout, token_ids, total_tokens, pages, last_logits, meta, step, whole)

    def load_kv(self, kv: KvTensors) -> LoadedKv:
        """`kv` on this engine's device (checked first), ready to seed any number of generations."""
        self.check_compatible(kv)
        return load_from_kvtensors(self, kv)

    # --- generation ---------------------------------------------------------------------------------
    def _pick(self, logits: np.ndarray, rng: np.random.Generator | None, temperature: float) -> int:
        if rng is None:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / max(temperature, 1e-6)
        probs = np.exp(scaled - scaled.max())
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))

    def _decode(self, cache: DynamicCache, first_logits: np.ndarray, max_new_tokens: int, seed: int | None,
                temperature: float, stop_at_eos: bool) -> tuple[list[int], float]:
        rng = np.random.default_rng(seed) if seed is not None else None
        tokens: list[int] = []
        logits = first_logits
        t0 = time.perf_counter()
        stepper = Stepper(self, cache, max_new_tokens)
        for step in range(max_new_tokens):
            token = self._pick(logits, rng, temperature)
            tokens.append(token)
            if (stop_at_eos and token in self.eos_ids) or step == max_new_tokens - 1:
                break
            logits = stepper.step(token)
        self._sync()
        return tokens, time.perf_counter() - t0

    def _result(self, tokens, first_logits, n_prompt, prefill_s=0.0, load_s=0.0, decode_s=0.0):
        return GenerationResult(tokens, self.detokenize(tokens), np.asarray(first_logits, dtype=np.float32).copy(),
                                prefill_s, load_s, decode_s, n_prompt, self.decode_mode)

    def generate_fresh(self, ids: list[int], max_new_tokens: int = 24, seed: int | None = None, *,
                       temperature: float = 1.0, stop_at_eos: bool = True, step: int | None = None
                       ) -> GenerationResult:
        """The reference: a prefill of all of `ids` (in steps of `step`, default `prefill_step`), then decode.
        Greedy unless `seed` is given."""
        ids = list(ids)
        if not ids:
            raise UsageError("empty prompt: nothing to generate from")
        self._check_ids(ids, "prompt", extra=max_new_tokens)
        cache = self._new_cache()
        t0 = time.perf_counter()
        logits = self._prefill(ids, cache, self._step_of(step))
        self._sync()
        prefill_s = time.perf_counter() - t0
        tokens, decode_s = self._decode(cache, logits, max_new_tokens, seed, temperature, stop_at_eos)
        return self._result(tokens, logits, len(ids), prefill_s=prefill_s, decode_s=decode_s)

    def generate_two_phase(self, doc_ids: list[int], suffix_ids: list[int], max_new_tokens: int = 24,
                           seed: int | None = None, *, temperature: float = 1.0,
                           stop_at_eos: bool = True) -> GenerationResult:
        """The oracle for prefix reuse: prefill the document (in `prefill_step` steps), then prefill the suffix
        over it in one forward, from scratch."""
        doc_ids, suffix_ids = list(doc_ids), list(suffix_ids)
        if not doc_ids:
            raise UsageError(EMPTY_DOCUMENT)
        self._check_ids(doc_ids + suffix_ids, "prompt", extra=max_new_tokens)
        cache = self._new_cache()
        t0 = time.perf_counter()
        logits = self._prefill(doc_ids, cache, self.prefill_step)
        if suffix_ids:
            logits = self._forward(suffix_ids, cache)
        self._sync()
        prefill_s = time.perf_counter() - t0
        tokens, decode_s = self._decode(cache, logits, max_new_tokens, seed, temperature, stop_at_eos)
        return self._result(tokens, logits, len(doc_ids) + len(suffix_ids), prefill_s=prefill_s, decode_s=decode_s)

    def generate_from_kv(self, kv: KvTensors, suffix_ids: list[int] | None = None, max_new_tokens: int = 24,
                         seed: int | None = None, *, temperature: float = 1.0,
                         stop_at_eos: bool = True) -> GenerationResult:
        """Generate after the document whose KV is `kv`, prefilling only `suffix_ids`.

        Checks fingerprint, tokenizer, dtype and shapes before touching the model, then runs
        `generate_from_loaded` (whose load_s here includes moving the arrays to the device)."""
        self.check_compatible(kv)
        loaded = load_from_kvtensors(self, kv)
        result = self.generate_from_loaded(loaded, suffix_ids, max_new_tokens, seed, temperature=temperature,
                                           stop_at_eos=stop_at_eos)
        result.load_s += loaded.load_s
        return result

    def generate_from_loaded(self, loaded: LoadedKv, suffix_ids: list[int] | None = None,
                             max_new_tokens: int = 24, seed: int | None = None, *, temperature: float = 1.0,
                             stop_at_eos: bool = True) -> GenerationResult:
        """Generate after a document whose KV is resident on this engine's device (`load_kv`, or the store's
        load path), prefilling only `suffix_ids`. `loaded` is never modified: each call builds a fresh cache.

        Bitwise the same computation as `generate_two_phase(loaded.token_ids, suffix_ids)` (and, without a suffix,
        `generate_fresh(loaded.token_ids)`) with the prefill step the KV was made with: the KV of whole steps is
        used as is; a prefix whose last step is cut short (no stored logits) has that step re-run, and without a
        suffix the last step is re-run for its logits (at most `loaded.step` tokens of forward; module docstring).
        """
        suffix_ids = list(suffix_ids or [])
        n = loaded.n_tokens
        if n == 0:
            raise UsageError("KV holds no tokens")
        lay = loaded.layout
        if (lay.layers, lay.kv_heads, lay.head_dim, lay.dtype) != (
                self.layout.layers, self.layout.kv_heads, self.layout.head_dim, self.dtype):
            raise ModelMismatch(f"loaded KV is {lay.to_dict()}, this engine ({self.model_id}) needs "
                                f"{self.layout.to_dict()}")
        self._check_ids(loaded.token_ids + suffix_ids, "prompt", extra=max_new_tokens)
        keep = loaded.exact_tokens
        if keep == n and not suffix_ids and loaded.last_logits is None:
            keep = ((n - 1) // loaded.step) * loaded.step if loaded.step else 0  # re-run the last step for logits
        t0 = time.perf_counter()
        cache = cache_from_loaded(self.model.config, loaded, keep) if keep else self._new_cache()
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        logits = None
        if keep < n:
            logits = self._prefill(loaded.token_ids[keep:], cache, loaded.step)
        if suffix_ids:
            logits = self._forward(suffix_ids, cache)
        elif logits is None:
            logits = np.asarray(loaded.last_logits, dtype=np.float32)
        self._sync()
        prefill_s = time.perf_counter() - t1
        tokens, decode_s = self._decode(cache, logits, max_new_tokens, seed, temperature, stop_at_eos)
        return self._result(tokens, logits, n + len(suffix_ids), prefill_s=prefill_s, load_s=load_s,
                            decode_s=decode_s)

    def step_time(self, kv: KvTensors, token: int | None = None) -> float:
        """Seconds for ONE continuation step (a single-token forward) over `kv` resident in a cache.

        The paper's "one reuse step": the cache is built before the clock starts, so load time is excluded.
        """
        self.check_compatible(kv)
        cache = self.cache_from_kv(kv)
        token = int(np.argmax(kv.last_logits)) if token is None and kv.last_logits is not None else int(token or 0)
        self._sync()
        t0 = time.perf_counter()
        self._forward([token], cache)
        self._sync()
        return time.perf_counter() - t0
