"""The model identity of a vLLM engine, computed exactly as kvswap's transformers engine computes it.

An artifact is bound to a model fingerprint (config + weights + tokenizer), a tokenizer fingerprint, a
dtype and a KV layout. For vLLM to load artifacts made by `kvswap publish` (and the other way round), the
fingerprints must be the ones `kvswap.engine` derives from the same folder: the same `folder_fingerprint`
over config.json and the safetensors files, and the same tokenizer fingerprint over the fast tokenizer's
JSON as transformers' AutoTokenizer loads it. The model id (informative only) records which engine made an
artifact: "<name> (vllm <version>)".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...engine import catalog
from ...engine.fingerprint import folder_fingerprint, tokenizer_fingerprint
from ...protocol.errors import NotFound, UsageError
from ...kvtensors import KvLayout
from ._source import ModelIdentity

#: vLLM's torch dtype -> kvswap's dtype name
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def model_folder(name: str) -> Path:
    """vLLM's `model` (a folder, or a hub id in the local cache) as a folder of safetensors + tokenizer."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    snap = catalog.hub_snapshot(name)
    if snap is None:
        raise NotFound(f"kvswap needs the model's files to fingerprint it: {name!r} is neither a folder nor in the "
                       "local Hugging Face cache")
    return snap


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def engine_identity(vllm_config, model_id: str | None = None, tokenizer=None) -> tuple[ModelIdentity, object]:
    """(identity, tokenizer) for the model vLLM serves; refuses what the connector cannot map one to one."""
    import vllm

    mc = vllm_config.model_config
    par = vllm_config.parallel_config
    if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
        raise UsageError("the kvswap connector loads whole-model KV: run vLLM with tensor_parallel_size=1 and "
                         "pipeline_parallel_size=1")
    if mc.dtype not in DTYPE_NAMES:
        raise UsageError(f"the kvswap connector handles bf16, fp16 and fp32 models, not {mc.dtype}")
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        raise UsageError("the kvswap connector needs an unquantized KV cache (kv_cache_dtype='auto')")
    folder = model_folder(mc.model)
    tok_folder = model_folder(mc.tokenizer) if mc.tokenizer and mc.tokenizer != mc.model else folder
    tokenizer = tokenizer or load_tokenizer(tok_folder)
    tok_fp = tokenizer_fingerprint(tokenizer.backend_tokenizer.to_str(), catalog.model_cache_root())
    config = json.loads((folder / "config.json").read_text())
    fp = folder_fingerprint(folder, config, tok_fp, catalog.model_cache_root())
    dtype = DTYPE_NAMES[mc.dtype]
    layout = KvLayout(mc.get_num_layers(par), mc.get_num_kv_heads(par), mc.get_head_size(), dtype)
    name = model_id or folder.name
    return ModelIdentity(f"{name} (vllm {vllm.__version__})", fp, tok_fp, dtype, layout), tokenizer
