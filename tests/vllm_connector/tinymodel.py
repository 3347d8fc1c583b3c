"""tiny-qwen3 with 32-dim heads: the vLLM tests' model.

vLLM's CPU attention kernels take head sizes 32, 64, 80, ... 512 only (`CPUAttentionBackend.
get_supported_head_sizes` in vllm/v1/attention/backends/cpu_attn.py); tiny-qwen3's 16-dim heads stop the
first forward with "Unsupported CPU attention configuration: head_dim=16". The engine's public builder makes
the same recipe (seeded weights, the real Qwen3 vocabulary, built once into the model cache and loaded from
disk by both vLLM and kvswap's transformers engine) with head_dim 32.
"""

from __future__ import annotations

from pathlib import Path

#: cache folder name; bump the suffix when the recipe changes
TINY_VLLM_FOLDER = "tiny-qwen3-hd32-v1"


def tiny_vllm_folder() -> Path:
    """The model folder, built on first use (a few seconds)."""
    from kvswap.engine.models import seeded_qwen3_folder

    return seeded_qwen3_folder(TINY_VLLM_FOLDER, head_dim=32)
