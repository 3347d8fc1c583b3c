"""KV between kvswap's arrays ([kv_heads, tokens, head_dim] raw bits per layer) and vLLM's paged cache.

vLLM's CPU attention backend (vllm/v1/attention/backends/cpu_attn.py) allocates one tensor per attention
layer, [num_blocks, kv_heads, block_size, 2 * head_dim], viewed per block and KV head as a key area then a
value area of block_size x head_dim elements each. Inside those areas the order is the kernel's business
and depends on the ISA it picked (`_get_attn_isa`: amx, vec, vec16, neon...): on this AVX-512 machine
("vec") values are row-major [token, dim] but keys are transposed, [dim, token]. Rather than hard-code
one ISA's order, `BlockLayout.learn` writes known numbers through vLLM's own cache-write kernel
(`cpu_attn_reshape_and_cache`, the op every forward uses) into a scratch block and reads back where each
(K/V, head, token, dim) landed: a permutation of one block's elements, checked to be one, then used to
gather and scatter raw bits (no float conversion, so loads and publishes are bit-exact).

Keys are stored after the rotary embedding (and after Qwen3's k_norm), as transformers' DynamicCache
holds them, so a position means the same quantities in both engines (tests/vllm_connector compare vLLM's KV of a
document with the transformers engine's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...engine.rawbits import bits_to_tensor, tensor_to_bits
from ...protocol.errors import UsageError
from ...kvtensors import KvLayout

#: digit base for encoding element indices as floats that bf16 / fp16 hold exactly
_BASE = 128


def check_layer_cache(name: str, cache: torch.Tensor, layout: KvLayout, block_size: int) -> None:
    """UsageError unless `cache` has the CPU backend's paged shape for this model."""
    want = (layout.kv_heads, block_size, 2 * layout.head_dim)
    if cache.dim() != 4 or tuple(cache.shape[1:]) != want or not cache.is_contiguous():
        raise UsageError(
            f"vLLM KV cache {name} has shape {tuple(cache.shape)}; the kvswap connector reads vLLM's CPU "
            f"attention layout [num_blocks, {want[0]}, {want[1]}, {want[2]}] (contiguous) only")


@dataclass(frozen=True)
class BlockLayout:
    """Where each element of one block lives. Canonical order: (K|V, head, token, dim), C order.

    to_memory[m] = canonical index stored at memory position m; to_canonical[c] = memory position of c."""

    kv_heads: int
    block_size: int
    head_dim: int
    to_memory: torch.Tensor
    to_canonical: torch.Tensor

    @property
    def block_elems(self) -> int:
        return 2 * self.kv_heads * self.block_size * self.head_dim

    @classmethod
    def learn(cls, dtype: torch.dtype, kv_heads: int, block_size: int, head_dim: int, isa: str) -> "BlockLayout":
        """Run vLLM's cache-write kernel on a scratch block, once per digit of the element index."""
        from vllm import _custom_ops as ops

        n = 2 * kv_heads * block_size * head_dim
        canon = torch.arange(n, dtype=torch.long)
        memory = torch.zeros(n, dtype=torch.long)
        scale = 1
        while scale < n:
            digit = ((canon // scale) % _BASE).to(dtype).view(2, kv_heads, block_size, head_dim)
            scratch = torch.zeros((1, kv_heads, block_size, 2 * head_dim), dtype=dtype)
            rows = scratch.view(1, kv_heads, 2 * block_size, head_dim)
            key_cache, value_cache = rows.chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(
                digit[0].transpose(0, 1).contiguous(), digit[1].transpose(0, 1).contiguous(),
                key_cache, value_cache, torch.arange(block_size, dtype=torch.long), isa)
            memory += scratch.reshape(-1).to(torch.long) * scale
            scale *= _BASE
        if not torch.equal(torch.sort(memory).values, canon):
            raise UsageError(f"vLLM's CPU KV cache layout for isa {isa!r} is not a per-block permutation; the kvswap "
                             "connector cannot map it")
        return cls(kv_heads, block_size, head_dim, memory, torch.argsort(memory))

    def _flat(self, cache: torch.Tensor) -> torch.Tensor:
        return cache.view(cache.shape[0], self.block_elems)

    def write_blocks(self, cache: torch.Tensor, block_ids: list[int], first_block: int,
                     keys: np.ndarray, values: np.ndarray) -> None:
        """Put whole blocks of KV (raw bits [kv_heads, nb * block_size, head_dim]) into block_ids[first_block:]."""
        h, n, d = keys.shape
        nb = n // self.block_size
        if nb * self.block_size != n:
            raise UsageError(f"{n} tokens are not whole blocks of {self.block_size}")
        ids = torch.tensor(block_ids[first_block: first_block + nb], dtype=torch.long)
        if len(ids) != nb:
            raise UsageError(f"{nb} blocks of KV but only {len(ids)} vLLM blocks allocated")
        k = bits_to_tensor(keys, cache.dtype).reshape(h, nb, self.block_size, d)
        v = bits_to_tensor(values, cache.dtype).reshape(h, nb, self.block_size, d)
        canon = torch.stack((k, v)).permute(2, 0, 1, 3, 4).reshape(nb, self.block_elems)
        self._flat(cache)[ids] = canon.index_select(1, self.to_memory)

    def read_blocks(self, cache: torch.Tensor, block_ids: list[int], n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """The KV of tokens [0, n_tokens) of a request as raw bits [kv_heads, n_tokens, head_dim] (copies)."""
        nb = -(-n_tokens // self.block_size)
        if nb > len(block_ids):
            raise UsageError(f"{n_tokens} tokens need {nb} blocks, the request has {len(block_ids)}")
        ids = torch.tensor(block_ids[:nb], dtype=torch.long)
        canon = self._flat(cache)[ids].index_select(1, self.to_canonical)
        both = canon.view(nb, 2, self.kv_heads, self.block_size, self.head_dim).permute(1, 2, 0, 3, 4)
        both = both.reshape(2, self.kv_heads, nb * self.block_size, self.head_dim)[:, :, :n_tokens]
        return tensor_to_bits(both[0]), tensor_to_bits(both[1])


def block_ids_covering(block_ids: list[int], start: int, n: int, block_size: int) -> set[int]:
    """The blocks that hold tokens [start, start + n): what vLLM must recompute when their load fails."""
    if n <= 0:
        return set()
    return set(block_ids[start // block_size: (start + n - 1) // block_size + 1])
