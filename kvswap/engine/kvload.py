"""KV into the model's memory: from a verified staging buffer (the store's load path) or from KvTensors.

The store's load path (kvswap/artifact/loader.py) reads chunks, each in the chunk payload layout
`[layers, K|V, kv_heads, n, head_dim]`, and here they become the per-layer cache tensors
`[1, kv_heads, tokens, head_dim]` the model attends over:

- on CUDA the loader fills one pinned host buffer with the chunks back to back, each chunk is copied to the
  device asynchronously on a side stream as soon as it is verified, so copies overlap reading and hashing,
  and the gather from chunk layout to layer layout is one device-memory copy (a permute into a preallocated
  tensor);
- on the CPU the loader reads each chunk straight into its runs of the final cache tensor (preadv), so the
  bytes are written once and hashed where they land: no staging buffer, no gather;
- the DynamicCache adopts those tensors without copying them (its constructor would `torch.cat` them onto an
  empty tensor, a second full copy): transformers' DynamicLayer grows by `torch.cat` on every update, so the
  adopted tensors are never written, and one `LoadedKv` can seed any number of generations (the hosted mode
  keeps it resident).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..kvtensors import KvLayout, KvTensors
from .rawbits import bits_to_tensor


@dataclass
class LoadedKv:
    """A document's KV on the engine's device: per-layer [1, kv_heads, n_tokens, head_dim] tensors (views that
    no cache ever writes), its token ids and, for a whole artifact, the last position's logits."""

    layout: KvLayout
    token_ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_logits: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    load_s: float = 0.0  # seconds from the first byte read to tensors ready on the device
    step: int = 64  # the prefill step the KV was computed with (an artifact's block size); 0 = monolithic
    whole: bool = True  # all tokens the KV was computed for; False: a prefix cut from a longer prefill
    #: the [layers, 2, kv_heads, tokens, head_dim] tensor the views come from (tokens may exceed n_tokens: the
    #: whole chunks a prefix was cut from), which the host-memory tier keeps (kvswap/hosttier.py)
    layer_buffer: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def exact_tokens(self) -> int:
        """Leading tokens whose KV is what a prefill of exactly these tokens computes: all of a whole KV; the
        whole steps of a prefix (its cut last step came from a forward over more tokens)."""
        if self.whole or not self.step:
            return self.n_tokens if self.whole else 0
        return (self.n_tokens // self.step) * self.step

    @property
    def device(self) -> torch.device:
        return self.keys[0].device


def staging_buffer(nbytes: int, device: str) -> torch.Tensor:
    """A host byte buffer for the loader: pinned when the engine runs on CUDA (async copies at full speed)."""
    pin = str(device).startswith("cuda") and torch.cuda.is_available()
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)


def gather_layers(buf: torch.Tensor, layout: KvLayout, chunk_tokens: list[int], n_tokens: int,
                  dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V views of the first `n_tokens` tokens from a buffer of chunks laid back to back.

    `chunk_tokens` are the token counts of the chunks in the buffer: every one but the last is the artifact's
    block size. One copy (on the buffer's device) into a [layers, 2, kv_heads, tokens, head_dim] tensor."""
    L, H, D = layout.layers, layout.kv_heads, layout.head_dim
    total = sum(chunk_tokens)
    elems = buf[: total * layout.bytes_per_token].view(dtype)
    out = _layer_tensor(layout, total, dtype, buf.device)
    block = chunk_tokens[0]
    n_full = len(chunk_tokens) if chunk_tokens[-1] == block else len(chunk_tokens) - 1
    per_token = 2 * L * H * D
    if n_full:
        full = elems[: n_full * block * per_token].view(n_full, L, 2, H, block, D)
        out[:, :, :, : n_full * block].view(L, 2, H, n_full, block, D).copy_(full.permute(1, 2, 3, 0, 4, 5))
    if n_full < len(chunk_tokens):
        last = chunk_tokens[-1]
        start = n_full * block
        out[:, :, :, start:start + last].copy_(elems[start * per_token:(start + last) * per_token].view(L, 2, H, last, D))
    return _split(out, n_tokens)


def _layer_tensor(layout: KvLayout, total_tokens: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The [layers, 2, kv_heads, tokens, head_dim] tensor a load fills. On the CPU its memory comes from numpy,
    which asks the kernel for transparent huge pages on large arrays (madvise), where torch.empty gets 4 KiB
    pages: a fresh 75 MB buffer then faults in 4x faster (9 ms against 40 ms here), and the first write into
    fresh pages is most of what a load from the page cache or the host tier costs."""
    shape = (layout.layers, 2, layout.kv_heads, total_tokens, layout.head_dim)
    if str(device) != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.empty(max(nbytes, 1), dtype=np.uint8))[:nbytes].view(dtype).view(shape)


def _split(out: torch.Tensor, n_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer [1, kv_heads, n_tokens, head_dim] K and V views of a [layers, 2, kv_heads, tokens, dim] tensor."""
    keys = [out[i, 0, :, :n_tokens].unsqueeze(0) for i in range(out.shape[0])]
    values = [out[i, 1, :, :n_tokens].unsqueeze(0) for i in range(out.shape[0])]
    return keys, values


def load_from_chunks(engine, layout: KvLayout, token_ids: list[int], chunk_tokens: list[int],
                     fill: Callable[[object], Iterator[int]], last_logits: np.ndarray | None = None,
                     meta: dict | None = None, step: int = 64, whole: bool = True) -> LoadedKv:
    """Run `fill(dest)` (the store's loader) and build a LoadedKv; `fill` yields each chunk's index once its
    bytes are in place and verified. Nothing is built from the bytes before `fill` finished without error:
    if it raises, no LoadedKv exists.

    `dest` depends on the device. On CUDA it is a pinned staging buffer (chunks back to back), each verified
    chunk is copied to the device at once on a side stream, and the gather into layer layout is one device
    copy. On the CPU it is a function giving, per chunk, the 2 * layers * kv_heads runs of the final cache
    tensor the chunk's payload fills, so the loader reads each chunk straight into place (no staging copy)."""
    t0 = time.perf_counter()
    total = sum(chunk_tokens)
    starts = np.cumsum([0] + list(chunk_tokens))
    dtype = engine._torch_dtype
    if str(engine.device).startswith("cuda"):
        nbytes = total * layout.bytes_per_token
        host = staging_buffer(nbytes, engine.device)
        dev = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=engine.device)
        stream = torch.cuda.Stream(device=engine.device)
        with torch.cuda.stream(stream):
            for i in fill(memoryview(host.numpy())):
                lo, hi = int(starts[i]) * layout.bytes_per_token, int(starts[i + 1]) * layout.bytes_per_token
                dev[lo:hi].copy_(host[lo:hi], non_blocking=True)
        stream.synchronize()
        keys, values = gather_layers(dev, layout, chunk_tokens, len(token_ids), dtype)
    else:
        out = _layer_tensor(layout, total, dtype, engine.device)
        flat = out.view(torch.uint8).numpy()  # [layers, 2, kv_heads, tokens, head_dim * itemsize]

        def runs(i: int) -> list[memoryview]:
            lo, hi = int(starts[i]), int(starts[i + 1])
            return [memoryview(flat[layer, kv, head, lo:hi]).cast("B") for layer in range(layout.layers)
                    for kv in (0, 1) for head in range(layout.kv_heads)]

        for _ in fill(runs):
            pass
        keys, values = _split(out, len(token_ids))
    engine._sync()
    return LoadedKv(layout, list(token_ids), keys, values, last_logits, dict(meta or {}),
                    load_s=time.perf_counter() - t0, step=step, whole=whole, layer_buffer=out)


def load_from_layers(engine, layout: KvLayout, token_ids: list[int], total_tokens: int, pages,
                     last_logits: np.ndarray | None = None, meta: dict | None = None, step: int = 64,
                     whole: bool = True) -> LoadedKv:
    """A LoadedKv over `pages`, verified KV already in the cache's layout ([layers, 2, kv_heads, total_tokens,
    head_dim] raw bits: a host-memory tier entry). On the CPU the cache tensors are views of those pages, no
    copy; on CUDA one copy to the device."""
    t0 = time.perf_counter()
    shape = (layout.layers, 2, layout.kv_heads, total_tokens, layout.head_dim)
    with warnings.catch_warnings():  # a copy-on-write mapping: writable, though torch cannot know it
        warnings.simplefilter("ignore", UserWarning)
        host = torch.frombuffer(pages, dtype=torch.uint8)
    out = host.view(engine._torch_dtype).view(shape)
    if str(engine.device).startswith("cuda"):
        out = out.to(engine.device)
    keys, values = _split(out, len(token_ids))
    engine._sync()
    return LoadedKv(layout, list(token_ids), keys, values, last_logits, dict(meta or {}),
                    load_s=time.perf_counter() - t0, step=step, whole=whole, layer_buffer=out)


def host_layer_bytes(loaded: LoadedKv) -> memoryview | None:
    """The raw bytes of `loaded`'s layer buffer in host memory (a view on the CPU, a copy from a GPU), for
    the host-memory tier; None when it has none (KV loaded from KvTensors)."""
    buf = loaded.layer_buffer
    if buf is None:
        return None
    if buf.device.type != "cpu":
        buf = buf.cpu()
    return memoryview(buf.contiguous().view(torch.uint8).numpy()).cast("B")


def load_from_kvtensors(engine, kv: KvTensors, n_tokens: int | None = None) -> LoadedKv:
    """KvTensors (numpy raw bits) as device tensors: zero-copy views on the CPU, one copy to a GPU."""
    t0 = time.perf_counter()
    n = kv.n_tokens if n_tokens is None else n_tokens
    dt = engine._torch_dtype

    def dev(bits: np.ndarray) -> torch.Tensor:
        return bits_to_tensor(np.ascontiguousarray(bits[:, :n]), dt).unsqueeze(0).to(engine.device)

    keys = [dev(k) for k in kv.keys]
    values = [dev(v) for v in kv.values]
    logits = kv.last_logits if n == kv.n_tokens else None
    engine._sync()
    step = int(kv.meta.get("prefill_step", engine.prefill_step))
    # KvTensors say nothing of where they were cut: without the last position's logits treat them as a prefix
    # (re-running a whole KV's last step recomputes the same values, so this is safe either way)
    return LoadedKv(kv.layout, list(kv.token_ids[:n]), keys, values, logits, dict(kv.meta),
                    load_s=time.perf_counter() - t0, step=step, whole=logits is not None)


def cache_from_loaded(config, loaded: LoadedKv, n_tokens: int | None = None) -> DynamicCache:
    """A fresh DynamicCache over the first `n_tokens` of `loaded`, adopting its tensors without a copy."""
    n = loaded.n_tokens if n_tokens is None else n_tokens
    cache = DynamicCache(config=config)
    if len(cache.layers) != len(loaded.keys):  # a config the cache did not lay out per layer: the copying way
        return DynamicCache(ddp_cache_data=[(k[:, :, :n], v[:, :, :n]) for k, v in zip(loaded.keys, loaded.values)],
                            config=config)
    for layer, k, v in zip(cache.layers, loaded.keys, loaded.values):
        k, v = k[:, :, :n], v[:, :, :n]
        if type(layer) is DynamicLayer:  # adopt: update() would cat onto an empty tensor (a full copy)
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        else:  # sliding-window and other layer kinds keep their own bookkeeping
            layer.update(k, v)
    return cache


__all__ = ["LoadedKv", "cache_from_loaded", "gather_layers", "host_layer_bytes", "load_from_chunks",
           "load_from_kvtensors", "load_from_layers", "staging_buffer"]
