"""End to end with a real (tiny, seeded) Qwen3: publish a document into a home, get the same CID again,
share leading chunks with an extended document, generate from the store exactly as a fresh prefill would,
and refuse corrupted, untrusted or mismatched artifacts before the model sees them. Also the CLI, each
command in a fresh interpreter as a user runs it."""

from __future__ import annotations

import json

import pytest

from bench.harness.nodes import cli
from bench.harness.poison import publish_text
from kvswap.artifact.pipeline import assemble_kv
from kvswap.artifact.signing import NodeKey, TrustPolicy
from kvswap.document import Document, document_hash
from kvswap.home import Home
from kvswap.ops import generate_here, publish_here, verify_artifact
from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import IntegrityError, ModelMismatch, UntrustedSigner

#: also run under a second torch thread count by `make test` (kernel blocking differs)
pytestmark = pytest.mark.engine


@pytest.fixture
def home(tmp_path):
    with Home(tmp_path / "home") as h:
        yield h


@pytest.fixture
def store(home):
    return home.store


def test_same_document_same_cid_and_extension_shares_chunks(tiny_engine, home, store, doc_text):
    first = publish_here(home, tiny_engine, Document(doc_text), block_tokens=16)
    again = publish_text(store, NodeKey.generate(), tiny_engine, doc_text, 16)  # another publisher, same machine
    assert first["cid"] == str(again.cid)  # nothing signer- or time-dependent in the manifest
    assert len(store.get_envelopes(again.cid)) == 2  # but both signatures are kept
    longer = doc_text + " Printing also standardised spelling and made maps, music and pamphlets common."
    ext = publish_here(home, tiny_engine, Document(longer), block_tokens=16)
    m1, m2 = store.get_manifest(Cid.parse(first["cid"])), store.get_manifest(Cid.parse(ext["cid"]))
    full_blocks = m1.n_tokens // 16
    assert m2.token_ids[: m1.n_tokens] == m1.token_ids  # the extension keeps the document's tokens
    # equal prefix keys: a node finds the extension's leading blocks by the shorter document's tokens; and since
    # publish prefills block by block, those blocks are the same computation, so the same bytes and CIDs
    assert [c.prefix_key for c in m2.chunks[:full_blocks]] == [c.prefix_key for c in m1.chunks[:full_blocks]]
    assert [c.cid for c in m2.chunks[:full_blocks]] == [c.cid for c in m1.chunks[:full_blocks]]
    assert store.fsck()["ok"]


def test_generate_here_matches_fresh_prefill(tiny_engine, home, store, doc_text, question_text):
    key = NodeKey.generate()
    cid = publish_text(store, key, tiny_engine, doc_text).cid
    policy = TrustPolicy(frozenset({key.public_bytes}))
    out = generate_here(home, tiny_engine, cid, question_text, max_new_tokens=12, policy=policy)
    doc_ids = tiny_engine.tokenize(doc_text)
    q_ids = tiny_engine.tokenize(question_text)
    ref = tiny_engine.generate_two_phase(doc_ids, q_ids, max_new_tokens=12)
    assert out["tokens"] == ref.tokens and out["document_tokens"] == len(doc_ids)
    # whole-document continuation uses the stored last-position logits (the tail)
    kv = assemble_kv(store.get_manifest(cid), store.read_chunk)
    assert kv.last_logits is not None
    assert tiny_engine.generate_from_kv(kv, [], max_new_tokens=8).tokens == \
        tiny_engine.generate_fresh(doc_ids, max_new_tokens=8).tokens
    assert verify_artifact(store, cid, policy)["ok"]
    assert store.find_by_document(tiny_engine.fingerprint, document_hash(doc_text)) == [cid]


def test_corrupted_untrusted_and_mismatched_artifacts_are_refused(tiny_engine, tiny_engine_fp32, home, store,
                                                                   doc_text):
    key = NodeKey.generate()
    cid = publish_text(store, key, tiny_engine, doc_text).cid
    manifest = store.get_manifest(cid)
    stranger_only = TrustPolicy(frozenset({NodeKey.generate().public_bytes}))
    with pytest.raises(UntrustedSigner):
        generate_here(home, tiny_engine, cid, "Q", policy=stranger_only)
    with pytest.raises(UntrustedSigner):
        verify_artifact(store, cid, stranger_only)
    with pytest.raises(ModelMismatch):
        generate_here(home, tiny_engine_fp32, cid, "Q")
    path = store.chunk_path(manifest.chunks[1].cid)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        generate_here(home, tiny_engine, cid, "Q")
    with pytest.raises(IntegrityError):
        verify_artifact(store, cid, TrustPolicy(frozenset({key.public_bytes})))


def _cli(capsys, *argv) -> tuple[int, dict | str, str]:
    """One `kvswap` command in a fresh interpreter (the way a user meets it); its exit code, output, stderr."""
    home = argv[argv.index("--home") + 1]
    rest = list(argv[:argv.index("--home")]) + list(argv[argv.index("--home") + 2:])
    proc = cli(home, *rest, check=False)
    assert "Traceback" not in proc.stderr
    try:
        return proc.returncode, json.loads(proc.stdout), proc.stderr
    except ValueError:
        return proc.returncode, proc.stdout, proc.stderr


def test_cli_publish_inspect_verify_export_import_generate(tmp_path, tiny_engine, doc_text):
    capsys = None
    doc = tmp_path / "doc.txt"
    doc.write_text(doc_text)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    code, pub, _ = _cli(capsys, "publish", str(doc), "--model", "tiny-qwen3", "--home", a, "--json")
    assert code == 0 and pub["n_tokens"] == len(tiny_engine.tokenize(doc_text))
    cid = pub["cid"]
    code, ls, _ = _cli(capsys, "ls", "--home", a, "--json")
    assert [x["cid"] for x in ls["artifacts"]] == [cid]
    code, info, _ = _cli(capsys, "inspect", cid[:20], "--home", a, "--json")
    assert info["cid"] == cid and info["complete"] and len(info["signatures"]) == 1
    assert _cli(capsys, "verify", cid, "--home", a, "--json")[1]["ok"]
    export = str(tmp_path / "x.kvx")
    assert _cli(capsys, "export", cid, export, "--home", a)[0] == 0
    # b does not trust a: import refused with one line and a non-zero exit, until a's key is trusted
    code, _, err = _cli(capsys, "import", export, "--home", b)
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1 and "untrusted" in err
    a_key = _cli(capsys, "id", "--home", a, "--json")[1]["public_key"]
    assert _cli(capsys, "trust", "add", a_key, "--home", b, "--json")[1]["trusted"] == [a_key]
    code, imp, _ = _cli(capsys, "import", export, "--home", b, "--json")
    assert code == 0 and imp["cid"] == cid
    code, gen, _ = _cli(capsys, "generate", "--doc", str(doc), "--model", "tiny-qwen3", "--prompt", " Who?",
                        "--max-new-tokens", "5", "--home", b, "--json")
    assert code == 0 and gen["cid"] == cid and len(gen["tokens"]) <= 5
    code, gen2, _ = _cli(capsys, "generate", cid, "--prompt", " Who?", "--max-new-tokens", "5", "--home", b, "--json")
    assert gen2["tokens"] == gen["tokens"]
    assert _cli(capsys, "fsck", "--home", b, "--json")[1]["ok"]
    assert _cli(capsys, "pin", cid, "--home", b)[0] == 0
    assert _cli(capsys, "gc", "--budget", "0", "--home", b, "--json")[1]["evicted"] == []
    assert _cli(capsys, "unpin", cid, "--home", b)[0] == 0
    assert _cli(capsys, "gc", "--budget", "0", "--home", b, "--json")[1]["evicted"] == [cid]
    code, _, err = _cli(capsys, "inspect", cid, "--home", b)
    assert code != 0 and "not in the store" in err
    code, _, err = _cli(capsys, "verify", "not-a-cid", "--home", b)
    assert code != 0 and err.startswith("error: ")
