"""tiny-qwen3 with 32-dim heads: the vLLM tests' model.

vLLM's CPU attention kernels take head sizes 32, 64, 80, ... 512 only (`CPUAttentionBackend.
get_supported_head_sizes` in vllm/v1/attention/backends/cpu_attn.py); tiny-qwen3's 16-dim heads stop the
first forward with "Unsupported CPU attention configuration: head_dim=16". This is the same recipe (seeded
weights, the real Qwen3 vocabulary, built once into the model cache and loaded from disk by both vLLM and
kvswap's transformers engine) with head_dim 32: a real Qwen3 architecture, still built in seconds.
"""

from __future__ import annotations

from pathlib import Path

#: cache folder name; bump the suffix when the recipe changes
TINY_VLLM_FOLDER = "tiny-qwen3-hd32-v1"


def _build(tmp: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from kvswap.engine import catalog
    from kvswap.engine.models import BUILTIN_SEED, _seeded_normal, qwen3_tokenizer_folder, tiny_qwen3_config

    config = tiny_qwen3_config()
    config.head_dim = 32
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.from_numpy(_seeded_normal(name, tuple(param.shape), config.initializer_range)))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(qwen3_tokenizer_folder()).save_pretrained(tmp)
    (tmp / "kvswap-recipe.txt").write_text(f"{TINY_VLLM_FOLDER} seed {BUILTIN_SEED} ({catalog.TINY_FOLDER} with head_dim 32)\n")


def tiny_vllm_folder() -> Path:
    """The model folder, built on first use (a few seconds)."""
    from kvswap.engine import catalog
    from kvswap.engine.models import _build_once

    return _build_once(catalog.built_folder(TINY_VLLM_FOLDER), _build)
