"""SIGKILL in the middle of a publish (real subprocesses) leaves a store that fsck finds consistent: no
half-written chunk visible under a CID, no index entry claiming what is not there; publishing again
completes the artifact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvswap.protocol.cid import Cid
from kvswap.store import Store

#: publishes a synthetic 400-chunk artifact through the real pipeline and store (no torch: starts fast)
PUBLISHER = textwrap.dedent("""
    import sys
    import numpy as np
    from kvswap.artifact.pipeline import publish_kv
    from kvswap.artifact.signing import NodeKey
    from kvswap.kvtensors import KvLayout, KvTensors
    from kvswap.store import Store

    lay = KvLayout(4, 4, 64, "bf16")
    n = 6400
    rng = np.random.default_rng(5)
    arr = lambda: (rng.normal(0, 1, (4, n, 64)).astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    kv = KvTensors(lay, list(range(n)), [arr() for _ in range(4)], [arr() for _ in range(4)])
    manifest, chunks = publish_kv(kv, model_id="m", model_fingerprint="ab" * 32, tokenizer_fingerprint="cd" * 32,
                                  document_hash="ef" * 32, block_tokens=16)
    store = Store(sys.argv[1])
    print(manifest.cid, flush=True)
    store.put_artifact(manifest, [NodeKey.generate().sign_manifest(manifest.cid)], chunks)
    print("done", flush=True)
""")


def _chunk_files(root: Path) -> int:
    d = root / "chunks"
    return len(os.listdir(d)) if d.is_dir() else 0


def _kill_when(proc: subprocess.Popen, root: Path, n_files: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _chunk_files(root) < n_files:
        if proc.poll() is not None:
            raise AssertionError(f"publisher exited early: {proc.stdout.read()} {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("publisher made no progress")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _assert_consistent(root: Path) -> None:
    with Store(root) as store:
        report = store.fsck()
        assert report["ok"], report["problems"]
        # every visible chunk file hashes to its name (fsck re-hashed them; check independently too)
        for path in (root / "chunks").iterdir():
            Cid.parse(path.name).verify(path.read_bytes())
        for art in store.list_artifacts():
            cid = Cid.parse(art["cid"])
            assert art["complete"] == store.is_complete(cid) or not art["complete"]


@pytest.mark.parametrize("kill_after", [1, 60, 250])
def test_sigkill_mid_publish_leaves_a_consistent_store(tmp_path, kill_after):
    root = tmp_path / "store"
    script = tmp_path / "publish.py"
    script.write_text(PUBLISHER)
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _kill_when(proc, root, kill_after)
    _assert_consistent(root)
    with Store(root) as store:
        arts = store.list_artifacts()
        assert len(arts) == 1 and not arts[0]["complete"]  # registered first, so the partial publish shows
    # publishing again fills in what is missing
    done = subprocess.run([sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with Store(root) as store:
        cid = Cid.parse(done.stdout.split()[0])
        assert store.is_complete(cid)
        repaired = store.fsck(repair=True)  # clears a temp file the kill may have left
        assert repaired["ok"]
        clean = store.fsck()
        assert clean["ok"] and not clean["problems"] and not clean["garbage"]


def test_sigkill_mid_cli_publish(tmp_path, tiny_engine):
    """The real `kvswap publish` command (tiny-qwen3, one token per block so it writes many chunks)."""
    home = tmp_path / "home"
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"Sentence number {i} talks about printing presses and paper." for i in range(120)))
    root = home / "store"
    env = {**os.environ, "KVSWAP_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "kvswap", "publish", str(doc), "--model", "tiny-qwen3",
                             "--block-tokens", "1", "--codec", "zstd"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    _kill_when(proc, root, 40, timeout=240)
    _assert_consistent(root)
