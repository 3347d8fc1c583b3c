"""The product surface on real daemons: what `node start` prints, `node addr`, a taken port, a --model the
node does not run, control-API body validation, GET /metrics, and job cancel."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from kvswap.engine import catalog
from kvswap.node.jobs import JobTable
from kvswap.control.runfiles import api_token
from bench.harness.nodes import NodeProc, cli, cli_json, error_lines

DOC = ("A ferry crosses the strait twice a day. The captain logs the tide, the wind and the passengers; in fog "
       "she sounds the horn every two minutes and keeps to the buoys. ") * 4


def _api(node, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(node.info["api"] + path, data=body, method=method,
                                 headers={"Authorization": f"Bearer {api_token(node.home)}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels` (all of them when none are given)."""
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if line.startswith("#") or head.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def _other_tiny_model(folder) -> str:
    """tiny-qwen3 with one weight bit flipped: the same architecture and tokenizer, another fingerprint."""
    shutil.copytree(catalog.built_folder(catalog.TINY_FOLDER), folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # the last bytes are tensor data (safetensors: 8-byte length, JSON header, then data)
    weights.write_bytes(bytes(data))
    return str(folder)


def test_node_surface_metrics_validation_and_errors(tmp_path, tiny_engine):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC, encoding="utf-8")
    a = NodeProc(tmp_path / "a")
    nodes = [a]
    try:
        b = NodeProc(tmp_path / "b", bootstrap=[a.addr])
        nodes.append(b)
        c = NodeProc(tmp_path / "c-node", model=_other_tiny_model(tmp_path / "tiny-other"), bootstrap=[a.addr])
        nodes.append(c)
        addr = cli(a.home, "node", "addr").stdout.strip()
        assert addr == a.addr and addr.endswith("/p2p/" + a.peer_id) and "\n" not in addr

        # a second node on A's (fixed) port is refused with one line, before it binds anything
        port_taken = subprocess.run(
            [sys.executable, "-m", "kvswap", "node", "start", "--home", str(tmp_path / "c"), "--model", "tiny-qwen3",
             "--listen", addr.split("/p2p/")[0]], capture_output=True, text=True, timeout=120)
        errors = [line for line in port_taken.stderr.splitlines() if line.startswith("error:")]
        assert port_taken.returncode == 2 and len(errors) == 1 and "in use" in errors[0], port_taken.stderr[-1500:]

        a.wait_model()
        # --model that the running node does not serve: an error naming both, not a silent switch
        wrong = cli(a.home, "publish", str(doc), "--model", "smollm2-135m", check=False)
        assert wrong.returncode != 0 and "smollm2-135m" in wrong.stderr and "tiny-qwen3" in wrong.stderr
        pub = cli_json(a.home, "publish", str(doc))

        # control-API bodies are checked field by field: one line, 400, never a traceback
        for body, expect in ((b'{"max_new_tokens": "many", "cid": "%s"}' % pub["cid"].encode(), "max_new_tokens"),
                             (b'{"cid": "not-a-cid"}', "not a CID"), (b'{"cid": "x", "colour": 1}', "unknown field"),
                             (b"[" * 5000 + b"]" * 5000, "nests deeper"), (b"{oops", "not JSON")):
            status, answer = _api(a, "POST", "/generate", body)
            message = json.loads(answer)["error"]["message"]
            assert status == 400 and expect in message and "\n" not in message, (status, answer[:300])
        assert "Traceback" not in (a.home / "node.log").read_text()

        cli(b.home, "trust", "add", a.peer_id)  # a peer id works where a key does
        b.wait_model()
        got = cli_json(b.home, "get", "--doc", str(doc), "--no-progress")
        assert got["cid"] == pub["cid"]
        cli_json(b.home, "generate", pub["cid"], "--prompt", " Next:", "--max-new-tokens", "4")

        # a node running another model: `get` names the model its peers have the document for
        c.wait_model()
        other = cli(c.home, "get", "--doc", str(doc), "--no-progress", check=False)
        lines = error_lines(other)
        assert other.returncode != 0 and len(lines) == 1, other.stderr[-1500:]
        assert "has it for tiny-qwen3" in lines[0] and "tiny-other" in lines[0], lines[0]

        status, text = _api(b, "GET", "/metrics")
        text = text.decode()
        assert status == 200 and "kvswap_bytes_total" in text
        assert _metric(text, "kvswap_bytes_total", direction="in") >= pub["stored_size"]
        assert _metric(text, "kvswap_chunks_verified_total") == pub["chunks"] + 1  # chunks and the logits tail
        assert _metric(text, "kvswap_fetches_total", outcome="done") == 1
        assert _metric(text, "kvswap_generations_total", mode="local") == 1
        assert _metric(text, "kvswap_audits_total", outcome="passed") == 1
        assert _metric(text, "kvswap_artifacts_stored") == 1
        # the audit and the generation loaded the artifact through the host-memory tier (a miss, then a miss or
        # a hit, as the background copy of the first was done or not)
        loads = _metric(text, "kvswap_host_tier_hits_total") + _metric(text, "kvswap_host_tier_misses_total")
        assert loads >= 2 and _metric(text, "kvswap_host_tier_misses_total") >= 1
        assert _metric(text, "kvswap_host_tier_hit_bytes_total") >= 0 and "kvswap_host_tier_bytes" in text
        _, a_text = _api(a, "GET", "/metrics")
        assert _metric(a_text.decode(), "kvswap_prefill_tokens_total") == pub["n_tokens"]
        assert _metric(a_text.decode(), "kvswap_bytes_total", direction="out") >= pub["stored_size"]
        unauth = urllib.request.Request(b.info["api"] + "/metrics")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(unauth, timeout=30)
        assert info.value.code == 401
    finally:
        for node in nodes:
            node.stop()


def test_node_start_json_prints_its_addresses(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "kvswap", "node", "start", "--home", str(tmp_path), "--model",
                             "tiny-qwen3", "--listen", "/ip4/127.0.0.1/tcp/0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["peer_id"].startswith("12D3KooW") and info["addrs"][0].endswith("/p2p/" + info["peer_id"])
        assert info["api"].startswith("http://127.0.0.1:")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_cancelled_job_ends_cancelled_and_the_daemon_goes_on():
    async def main() -> None:
        async with asyncio.TaskGroup() as group:
            jobs = JobTable(group, max_finished=256)
            started = asyncio.Event()

            async def slow(job) -> dict:
                started.set()
                await asyncio.sleep(60)
                return {}

            job = jobs.start("get", slow)
            await started.wait()
            jobs.cancel(job.id)
            await asyncio.sleep(0)
            for _ in range(100):
                if job.state != "running":
                    break
                await asyncio.sleep(0.01)
            assert job.state == "cancelled" and job.error["message"] == "get cancelled"
            other = jobs.start("get", lambda j: asyncio.sleep(0, result={"ok": True}))
            await asyncio.sleep(0.05)
            assert other.state == "done" and other.result == {"ok": True}

    asyncio.run(main())
