"""Model and tokenizer fingerprints: what an artifact is bound to, more precise than a hub id.

A KV cache is only valid for the exact weights, config and tokenizer that produced it, so the fingerprint
hashes all three: sha256 over the canonical config JSON, the tokenizer fingerprint and every weight tensor
(sorted by name; name, dtype, shape and bytes as stored on disk, i.e. before any dtype cast at load time,
so one checkpoint has one fingerprint whatever dtype it runs in — dtype is checked separately).

Weights are read straight from safetensors files (8-byte header length, JSON header, raw data), so hashing
needs neither torch nor a loaded model. Hashing Qwen3-4B's 8 GB takes seconds, so a folder's fingerprint is
cached beside the model cache, keyed by every file's size and mtime; a tokenizer's fingerprint is cached there
too, keyed by the sha256 of its JSON text.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterable

from ..protocol.errors import FormatError

#: config keys that describe how a checkpoint was saved or loaded, not what it computes
VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash", "_attn_implementation",
     "_attn_implementation_autoset", "attn_implementation", "use_cache", "output_attentions",
     "output_hidden_states", "return_dict", "quantization_config"}
)
_HASH_BLOCK = 16 * 1024 * 1024
_FP_CACHE_NAME = "fingerprints.json"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str).encode()


def canonical_config(config: dict) -> bytes:
    """The config as canonical JSON without save/load bookkeeping keys."""
    return canonical_json({k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS})


def tokenizer_fingerprint_from_json(tokenizer_json: str) -> str:
    """sha256 over the fast tokenizer's JSON (vocab, merges, added tokens, normalizer, pre-tokenizer)."""
    return hashlib.sha256(canonical_json(json.loads(tokenizer_json))).hexdigest()


def tokenizer_fingerprint(tokenizer_json: str, cache_dir: Path | None) -> str:
    """`tokenizer_fingerprint_from_json`, remembered in the fingerprint cache under the sha256 of the exact JSON
    text: the same text gives the same fingerprint, and parsing and re-serialising a 6.9 MB Qwen tokenizer took
    1.3 s of every command that loads a model (hashing the text takes 15 ms)."""
    key = "tokenizer:" + hashlib.sha256(tokenizer_json.encode()).hexdigest()
    return _remembered(cache_dir, key, lambda: tokenizer_fingerprint_from_json(tokenizer_json))


def _safetensors_entries(path: Path) -> list[tuple[str, str, list[int], int, int]]:
    """(name, dtype, shape, absolute start, end) for every tensor in one safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise FormatError(f"{path}: not a safetensors file (short header)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 1024 * 1024:
            raise FormatError(f"{path}: safetensors header of {n} bytes is implausible")
        header = json.loads(f.read(n))
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out.append((name, info["dtype"], list(info["shape"]), base + start, base + end))
    return out


def weights_digest_from_files(files: Iterable[Path], hasher) -> None:
    """Feed every tensor of the given safetensors files into `hasher`, sorted by tensor name."""
    entries = []
    for path in files:
        entries += [(e, path) for e in _safetensors_entries(path)]
    entries.sort(key=lambda item: item[0][0])
    handles: dict[Path, object] = {}
    try:
        for (name, dtype, shape, start, end), path in entries:
            hasher.update(canonical_json([name, dtype, shape, end - start]))
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            f.seek(start)
            left = end - start
            while left:
                block = f.read(min(left, _HASH_BLOCK))
                if not block:
                    raise FormatError(f"{path}: tensor {name} is truncated")
                hasher.update(block)
                left -= len(block)
    finally:
        for f in handles.values():
            f.close()


def fingerprint_parts(config: dict, tokenizer_fp: str) -> "hashlib._Hash":
    """A sha256 already fed with the config and tokenizer parts; the caller adds the weights."""
    h = hashlib.sha256()
    h.update(b"kvswap-model-fingerprint-v1\0")
    h.update(canonical_config(config))
    h.update(b"\0" + tokenizer_fp.encode() + b"\0")
    return h


def folder_fingerprint(folder: Path, config: dict, tokenizer_fp: str, cache_dir: Path | None) -> str:
    """Fingerprint of a saved checkpoint folder, cached by (path, file sizes, mtimes)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder}: no *.safetensors weights to fingerprint (pickled .bin is not read)")
    key_material = [str(folder.resolve()), tokenizer_fp, canonical_config(config).decode()]
    for p in files:
        st = p.stat()
        key_material.append([p.name, st.st_size, st.st_mtime_ns])
    key = hashlib.sha256(canonical_json(key_material)).hexdigest()

    def digest() -> str:
        h = fingerprint_parts(config, tokenizer_fp)
        weights_digest_from_files(files, h)
        return h.hexdigest()

    return _remembered(cache_dir, key, digest)


def _remembered(cache_dir: Path | None, key: str, compute) -> str:
    """The fingerprint cached under `key` in `cache_dir`'s fingerprints.json, else `compute()`, then cached."""
    cache_file = cache_dir / _FP_CACHE_NAME if cache_dir else None
    cached = _read_cache(cache_file).get(key)
    if isinstance(cached, str):
        return cached
    fp = compute()
    if cache_file is not None:
        _write_cache(cache_file, key, fp)
    return fp


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a corrupt cache only costs a re-hash


def _write_cache(path: Path, key: str, fp: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = fp
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # caching is an optimisation; a read-only cache dir must not break loading
