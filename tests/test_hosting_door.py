"""The hosted backend setting and the OpenAI door, without vLLM (the vLLM backend's tests are in
tests/vllm_connector/test_hosting.py): real `kvswap node start` daemons on 127.0.0.1 with tiny-qwen3 and the
engine backend. A local agent's `POST /v1/completions` by document hash equals `kvswap generate` (found in the
store, or fetched from a peer first); a bad body is one line; `--host-backend vllm` that cannot run is one line
before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bench.harness.nodes import NodeProc, cli, cli_json
from tests.conftest import DOC_TEXT, QUESTION_TEXT

pytestmark = pytest.mark.timeout(600)


def door(home: Path, body: dict) -> tuple[int, dict]:
    api = cli_json(home, "node", "status")["api"]
    req = urllib.request.Request(f"{api}/v1/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {(home / 'api.token').read_text().strip()}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_door_by_document_hash_local_and_fetched_equals_generate(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC_TEXT, encoding="utf-8")
    a = NodeProc(tmp_path / "a")
    b = None
    try:
        b = NodeProc(tmp_path / "b", bootstrap=[a.addr])
        a.wait_model()
        b.wait_model()
        pub = cli_json(a.home, "publish", str(doc))
        want = cli_json(a.home, "generate", pub["cid"], "--prompt", QUESTION_TEXT, "--max-new-tokens", "12")["tokens"]
        status, got = door(a.home, {"document_hash": pub["document_hash"], "prompt": QUESTION_TEXT, "max_tokens": 12,
                                    "model": "anything"})
        assert status == 200, got
        assert got["object"] == "text_completion" and got["kvswap"]["fetched"] is False
        assert got["kvswap"]["tokens"] == want and got["kvswap"]["backend"] == "engine"
        assert got["usage"] == {"prompt_tokens": pub["n_tokens"] + got["kvswap"]["suffix_tokens"], "completion_tokens": 12,
                                "total_tokens": pub["n_tokens"] + got["kvswap"]["suffix_tokens"] + 12}
        # B has nothing: it finds A's artifact by the document's hash, fetches and checks it, then generates
        cli(b.home, "trust", "add", a.info["public_key"])
        status, got = door(b.home, {"document_hash": pub["document_hash"], "prompt": QUESTION_TEXT, "max_tokens": 12})
        assert status == 200, got
        assert got["kvswap"]["fetched"] is True and got["kvswap"]["cid"] == pub["cid"] and got["kvswap"]["tokens"] == want
        assert 'kvswap_generations_total{mode="door"} 1.0' in subprocess.run(
            ["curl", "-s", "-H", f"Authorization: Bearer {(b.home / 'api.token').read_text().strip()}",
             cli_json(b.home, "node", "status")["api"] + "/metrics"], capture_output=True, text=True).stdout
        assert cli_json(b.home, "node", "status")["hosting"]["backend"] == "engine"
        # one line for what it does not do
        status, got = door(b.home, {"document_hash": pub["document_hash"], "prompt": "x", "stream": True})
        assert status == 400 and "stream" in got["error"]["message"]
        status, got = door(b.home, {"prompt": "x"})
        assert status == 400 and "document_hash" in got["error"]["message"]
        status, got = door(b.home, {"document_hash": pub["document_hash"], "n": 2})
        assert status == 400 and "unknown field" in got["error"]["message"]
    finally:
        for node in (b, a):
            if node is not None:
                node.stop()


@pytest.mark.parametrize("args, says", [
    (["--model", "tiny-qwen3"], "cannot serve tiny-qwen3"),
    (["--model", "smollm2-135m", "--vllm-python", "/nonexistent/python"], "/nonexistent/python is not a file"),
])
def test_a_vllm_backend_that_cannot_run_is_one_line_before_anything_starts(tmp_path, args, says):
    proc = subprocess.run([sys.executable, "-m", "kvswap", "node", "start", "--home", str(tmp_path / "h"),
                           "--listen", "/ip4/127.0.0.1/tcp/0", "--host-backend", "vllm", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "h" / "node.json").exists()
