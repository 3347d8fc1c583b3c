"""The product surface (issue 13): the public Python API, kvswap.Home and the operations layer, config.toml
with its overrides, and the CLI flow details a script relies on. Daemon-level behaviour (metrics, job cancel,
model mismatch, control-API validation) is in tests/test_surface_node.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import kvswap
from kvswap.artifact.signing import NodeKey
from kvswap.config import load_config, update_config
from kvswap.protocol.errors import ModelMismatch, UntrustedSigner, UsageError
from tests.conftest import DOC_TEXT, QUESTION_TEXT

EXPORTED = sorted([
    "AuditFailed", "Cid", "Document", "FormatError", "Home", "IntegrityError", "KvLayout", "KvTensors", "KvswapError",
    "LimitExceeded", "LoadedCache", "LocalProtocolError", "ModelMismatch", "NotFound", "ProtocolError",
    "RemoteProtocolError", "UntrustedSigner", "UsageError", "audit", "generate", "get", "load_cache", "publish",
    "report",
])


def test_public_names_are_exactly_the_intended_ones_and_import_no_torch():
    assert kvswap.__all__ == EXPORTED
    assert all(hasattr(kvswap, name) for name in EXPORTED)
    probe = subprocess.run([sys.executable, "-c", "import sys, kvswap; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "False", probe.stderr


def test_config_precedence_file_env_flag_and_edits_keep_comments(tmp_path):
    cfg = load_config(tmp_path, environ={})
    assert cfg["node.listen"] == ["/ip4/127.0.0.1/tcp/4001"] and cfg.source("node.listen") == "default"
    (tmp_path / "config.toml").write_text("# my node\n[node]\n# where peers reach me\nlisten = [\"/ip4/127.0.0.1/tcp/4100\"]\n"
                                          "[prices]\negress_per_gb = 0.05\n")
    cfg = load_config(tmp_path, environ={})
    assert cfg["node.listen"] == ["/ip4/127.0.0.1/tcp/4100"] and cfg.source("node.listen") == "config.toml"
    cfg = load_config(tmp_path, environ={"KVSWAP_LISTEN": "/ip4/127.0.0.1/tcp/4200"})
    assert cfg["node.listen"] == ["/ip4/127.0.0.1/tcp/4200"] and cfg.source("node.listen") == "env KVSWAP_LISTEN"
    cfg = load_config(tmp_path, flags={"node.listen": ["/ip4/127.0.0.1/tcp/4300"]},
                      environ={"KVSWAP_LISTEN": "/ip4/127.0.0.1/tcp/4200"})
    assert cfg["node.listen"] == ["/ip4/127.0.0.1/tcp/4300"] and cfg.source("node.listen") == "flag"
    update_config(tmp_path, {"store.budget": "1GiB", "node.bootstrap": ["/ip4/10.0.0.1/tcp/4001/p2p/x"]})
    text = (tmp_path / "config.toml").read_text()
    assert "# my node" in text and "# where peers reach me" in text and "egress_per_gb = 0.05" in text
    shown = load_config(tmp_path, environ={}).show()
    assert shown["settings"]["store.budget"] == {"value": "1GiB", "source": "config.toml",
                                                 "help": shown["settings"]["store.budget"]["help"]}
    assert shown["prices"] == {"egress_per_gb": 0.05}
    for bad, match in (("[nodes]\nx = 1\n", "unknown table"), ("[node]\nlistn = []\n", "unknown setting"),
                       ("[node]\naudit_fraction = 7\n", "node.audit_fraction")):
        (tmp_path / "config.toml").write_text(bad)
        with pytest.raises(kvswap.KvswapError, match=match):
            load_config(tmp_path, environ={})


def test_cli_config_show_set_and_version(tmp_path):
    from kvswap.cli import main

    assert main(["config", "set", "node.listen", '["/ip4/127.0.0.1/tcp/4010"]', "--home", str(tmp_path)]) == 0
    assert main(["config", "set", "store.budget", "lots", "--home", str(tmp_path)]) == 2
    out = subprocess.run([sys.executable, "-m", "kvswap", "config", "show", "--json", "--home", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["settings"]["node.listen"]["value"] == ["/ip4/127.0.0.1/tcp/4010"]
    version = subprocess.run([sys.executable, "-m", "kvswap", "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"kvswap {kvswap.__version__}"


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`kvswap ledger | head -1`: the reader leaves early; the writer ends quietly (exit 141, no traceback)."""
    from kvswap.ledger import Ledger

    with Ledger.for_home(tmp_path) as led:
        for i in range(3000):
            led.transfer(peer=f"peer{i}", protocol="/kvswap/chunks/1", direction="in", wire_bytes=i + 1)
    proc = subprocess.Popen([sys.executable, "-m", "kvswap", "ledger", "--home", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (141, 0) and "Traceback" not in err, err


def test_publish_in_process_logs_its_prefill_and_load_cache_continues_like_kvswap(tmp_path, tiny_engine):
    home = kvswap.Home(tmp_path / "home")
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC_TEXT, encoding="utf-8")
    pub = kvswap.publish(doc, home=home, model="tiny-qwen3")
    prefills = home.ledger.computes(kind="prefill")
    assert len(prefills) == 1 and prefills[0].tokens == pub["n_tokens"] and prefills[0].artifact == pub["cid"]

    q_ids = tiny_engine.tokenize(QUESTION_TEXT)
    ship = kvswap.generate(pub["cid"], QUESTION_TEXT, home=home, model="tiny-qwen3", max_new_tokens=10)
    for source in (doc, kvswap.Document(DOC_TEXT), pub["cid"], kvswap.Cid.parse(pub["cid"]), pub["document_hash"]):
        loaded = kvswap.load_cache(source, model="tiny-qwen3", home=home)
        assert str(loaded.cid) == pub["cid"] and loaded.token_ids == tiny_engine.tokenize(DOC_TEXT)
        assert loaded.last_logits is not None and loaded.cache.get_seq_length() == pub["n_tokens"]
    # a transformers user continues with model.generate: same greedy tokens as kvswap's own generate
    out = tiny_engine.model.generate(**loaded.inputs(q_ids), max_new_tokens=10, do_sample=False)
    assert out[0, len(loaded.token_ids) + len(q_ids):].tolist() == ship["tokens"]
    # a model the caller loaded, with its tokenizer, gets the same artifact (same folder fingerprint)
    again = kvswap.load_cache(doc, model=(tiny_engine.model, tiny_engine.tokenizer), home=home)
    assert again.cid == loaded.cid and again.engine.fingerprint == tiny_engine.fingerprint
    fresh = again.fresh_cache()
    assert fresh is not again.cache and fresh.get_seq_length() == pub["n_tokens"]
    assert np.array_equal(again.last_logits, loaded.last_logits)
    loads = home.ledger.computes(kind="load")
    assert len(loads) >= 6 and all(r.tokens == pub["n_tokens"] for r in loads)
    home.close()


def test_load_cache_checks_trust_binding_and_model(tmp_path, tiny_engine, tiny_engine_fp32):
    from bench.harness.poison import publish_text

    home = kvswap.Home(tmp_path / "home")
    stranger = NodeKey.generate()
    manifest = publish_text(home.store, stranger, tiny_engine, DOC_TEXT, 16)
    pub = {"cid": str(manifest.cid), "n_tokens": manifest.n_tokens}
    with pytest.raises(UntrustedSigner):
        kvswap.load_cache(pub["cid"], model="tiny-qwen3", home=home)
    assert kvswap.load_cache(pub["cid"], model="tiny-qwen3", home=home, accept_any=True).n_tokens == pub["n_tokens"]
    with pytest.raises(kvswap.IntegrityError, match="hashes to"):
        kvswap.load_cache(_bound(pub["cid"]), model="tiny-qwen3", home=home, accept_any=True)
    with pytest.raises(ModelMismatch):
        kvswap.load_cache(pub["cid"], model=tiny_engine_fp32, home=home, accept_any=True)
    with pytest.raises(UsageError, match="neither a CID"):
        kvswap.load_cache("no-such-thing", model="tiny-qwen3", home=home)
    home.close()


def _bound(cid: str):
    from kvswap.ops import Source

    return Source(kvswap.Cid.parse(cid), kvswap.Document("Another text entirely."))
