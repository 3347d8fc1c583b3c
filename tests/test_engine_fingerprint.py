"""Fingerprints: deterministic across processes and fresh builds, sensitive to a single changed weight."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvswap.engine import catalog
from kvswap.engine.fingerprint import (canonical_config, folder_fingerprint, tokenizer_fingerprint,
                                       tokenizer_fingerprint_from_json)
from kvswap.engine.rawbits import bits_to_tensor, tensor_to_bits
from kvswap.protocol.errors import ModelMismatch

_PRINT_FP = (
    "from kvswap.engine import load_engine; import json; e = load_engine('tiny-qwen3', dtype='fp32'); "
    "print(json.dumps([e.fingerprint, e.tokenizer_fingerprint]))"
)


def _tiny_folder() -> Path:
    return catalog.built_folder(catalog.TINY_FOLDER)


def test_fingerprint_same_in_a_fresh_build_in_another_process(tmp_path, tiny_engine):
    """Another process, building tiny-qwen3 from scratch into an empty model cache, gets the same hashes."""
    env = dict(os.environ, KVSWAP_MODEL_CACHE=str(tmp_path / "models"))
    out = subprocess.run([sys.executable, "-c", _PRINT_FP], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    fp, tok_fp = json.loads(out.stdout.strip().splitlines()[-1])
    assert fp == tiny_engine.fingerprint
    assert tok_fp == tiny_engine.tokenizer_fingerprint
    assert len(fp) == 64 and int(fp, 16) >= 0


def test_fingerprint_independent_of_runtime_dtype(tiny_engine, tiny_engine_fp32):
    assert tiny_engine.fingerprint == tiny_engine_fp32.fingerprint
    assert tiny_engine.dtype == "bf16" and tiny_engine_fp32.dtype == "fp32"


def _flip_one_weight_bit(folder: Path) -> None:
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        start, _ = header["model.layers.1.mlp.down_proj.weight"]["data_offsets"]
        f.seek(8 + n + start + 2)
        byte = f.read(1)
        f.seek(8 + n + start + 2)
        f.write(bytes([byte[0] ^ 0x01]))


def test_one_changed_weight_changes_fingerprint_and_blocks_reuse(tmp_path, tiny_engine, tiny_doc_kv):
    from kvswap.engine import load_engine

    copy = tmp_path / "tiny-copy"
    shutil.copytree(_tiny_folder(), copy)
    config = json.loads((copy / "config.json").read_text())
    same = folder_fingerprint(copy, config, tiny_engine.tokenizer_fingerprint, None)
    assert same == tiny_engine.fingerprint  # the path is not part of the fingerprint

    _flip_one_weight_bit(copy)
    changed = load_engine(str(copy), dtype="bf16", device="cpu")
    assert changed.fingerprint != tiny_engine.fingerprint
    assert changed.tokenizer_fingerprint == tiny_engine.tokenizer_fingerprint
    with pytest.raises(ModelMismatch, match=tiny_engine.fingerprint[:16]):
        changed.generate_from_kv(tiny_doc_kv, [])


def test_config_change_changes_fingerprint(tmp_path, tiny_engine):
    config = json.loads((_tiny_folder() / "config.json").read_text())
    base = folder_fingerprint(_tiny_folder(), config, tiny_engine.tokenizer_fingerprint, None)
    assert folder_fingerprint(_tiny_folder(), {**config, "rope_theta": 10000.0},
                              tiny_engine.tokenizer_fingerprint, None) != base
    assert folder_fingerprint(_tiny_folder(), config, "0" * 64, None) != base
    # bookkeeping keys are not part of what the model computes
    assert canonical_config({**config, "transformers_version": "0.0"}) == canonical_config(config)


def test_fingerprint_cache_is_keyed_by_file_stats(tmp_path, tiny_engine):
    copy = tmp_path / "tiny-copy"
    shutil.copytree(_tiny_folder(), copy)
    config = json.loads((copy / "config.json").read_text())
    cache_dir = tmp_path / "fpcache"
    first = folder_fingerprint(copy, config, tiny_engine.tokenizer_fingerprint, cache_dir)
    assert (cache_dir / "fingerprints.json").exists()
    assert folder_fingerprint(copy, config, tiny_engine.tokenizer_fingerprint, cache_dir) == first
    _flip_one_weight_bit(copy)  # new mtime -> new cache key -> re-hashed
    assert folder_fingerprint(copy, config, tiny_engine.tokenizer_fingerprint, cache_dir) != first


def test_tokenizer_fingerprint_is_remembered_by_its_exact_text(tmp_path):
    """The cache only skips the parse: the same fingerprint as computing it, one entry per exact text, and
    texts that differ only in layout still share one fingerprint (it hashes canonical JSON)."""
    text = '{"model": {"vocab": {"b": 1, "a": 0}}, "added_tokens": []}'
    spaced = '{ "added_tokens": [],\n "model": {"vocab": {"a": 0, "b": 1}} }'
    fp = tokenizer_fingerprint(text, tmp_path)
    assert fp == tokenizer_fingerprint_from_json(text) == tokenizer_fingerprint(text, tmp_path)
    assert tokenizer_fingerprint(spaced, tmp_path) == fp
    cache = json.loads((tmp_path / "fingerprints.json").read_text())
    assert sorted(cache.values()) == [fp, fp] and all(k.startswith("tokenizer:") for k in cache)
    assert tokenizer_fingerprint(text.replace('"b": 1', '"b": 2'), tmp_path) != fp
    assert tokenizer_fingerprint(text, None) == fp  # no cache: computed


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_raw_bits_round_trip_is_exact(dtype):
    import torch

    from kvswap.engine.rawbits import torch_dtype

    td = torch_dtype(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3.5, 65504.0])
    values = torch.cat([special, torch.randn(1000, generator=torch.Generator().manual_seed(1))]).to(td)
    bits = tensor_to_bits(values)
    assert bits.dtype == (np.dtype("<u4") if dtype == "fp32" else np.dtype("<u2"))
    back = bits_to_tensor(bits, td)
    assert back.dtype == td
    assert torch.equal(back.view(torch.int32 if dtype == "fp32" else torch.int16),
                       values.view(torch.int32 if dtype == "fp32" else torch.int16))
    assert np.array_equal(tensor_to_bits(back), bits)
    # bf16 1.0 is 0x3F80: the bits are the real encoding, little-endian on disk
    if dtype == "bf16":
        assert tensor_to_bits(torch.tensor([1.0], dtype=td)).tobytes() == b"\x80\x3f"
