"""The whole flow on real daemons (separate processes, real libp2p on 127.0.0.1, tiny-qwen3, real stores):
A publishes; C, which knows only B, finds the document by its hash, fetches, verifies and generates the
same tokens as A's fresh prefill; with A stopped, C serves a 4th node; D asks A to generate (hosted) and
the ledgers account for the bytes that moved."""

from __future__ import annotations

import hashlib

import pytest

from kvswap.ledger import Ledger

from bench.harness.nodes import NodeProc, cli, cli_json

DOC = (
    "The harbour board paid for every gallon of oil carried up the cliff path. Relighting a cold lamp cost a pint; "
    "keeping it low cost a few drops an hour. So the keeper kept it burning and wrote the saving in the margin. "
) * 6
PROMPT = " What did the keeper write in the margin?"


@pytest.fixture
def nodes(tmp_path):
    started: list[NodeProc] = []

    def start(name: str, **kw) -> NodeProc:
        node = NodeProc(tmp_path / name, **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def test_publish_find_by_hash_fetch_generate_and_host(nodes, tmp_path, tiny_engine):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    a = nodes("a")
    b = nodes("b", bootstrap=[a.addr])
    c = nodes("c", bootstrap=[b.addr])
    a.wait_model()
    pub = cli_json(a.home, "publish", str(doc))
    assert pub["document_hash"] == hashlib.sha256(DOC.encode()).hexdigest()
    cli(c.home, "trust", "add", cli_json(a.home, "id")["public_key"])
    c.wait_model()

    got = cli_json(c.home, "get", "--doc-hash", pub["document_hash"], "--no-progress")
    assert got["cid"] == pub["cid"] and got["tokens"] == pub["n_tokens"]
    assert cli_json(c.home, "verify", pub["cid"])["ok"]

    # C's generation from the fetched KV equals a fresh prefill of document + prompt on the same model
    shipped = cli_json(c.home, "generate", pub["cid"], "--prompt", PROMPT, "--max-new-tokens", "12")
    doc_ids = tiny_engine.tokenize(DOC)
    reference = tiny_engine.generate_two_phase(doc_ids, tiny_engine.tokenize(PROMPT), max_new_tokens=12)
    assert shipped["tokens"] == list(reference.tokens)

    # hosted: D asks A; only the suffix and output cross the wire
    d = nodes("d", bootstrap=[c.addr])
    d.wait_model()
    hosted = cli_json(d.home, "generate", pub["cid"], "--prompt", PROMPT, "--max-new-tokens", "12",
                      "--host", a.addr)
    assert hosted["tokens"] == list(reference.tokens)

    # with A gone, a 4th node fetches from C (and B, which holds nothing, is only a router)
    a.stop()
    e = nodes("e", bootstrap=[c.addr], accept_any=True)
    e.wait_model()
    got_e = cli_json(e.home, "get", pub["cid"], "--no-progress")
    assert got_e["cid"] == pub["cid"]
    assert set(got_e["providers"]) <= {c.peer_id, d.peer_id} and got_e["providers"]

    # ledgers: C received the artifact's bytes on the chunk protocols; D's hosted request moved a small
    # fraction of the artifact's size
    c_in = Ledger.for_home(c.home).totals(by=("direction",), direction="in")
    moved_in = sum(r["wire_bytes"] for r in c_in)
    assert moved_in >= pub["stored_size"]
    assert moved_in <= pub["stored_size"] * 1.05 + 64 * 1024  # framing + manifest overhead, documented
    d_rows = Ledger.for_home(d.home).transfers(protocol="/kvswap/generate/1")
    hosted_bytes = sum(r.wire_bytes for r in d_rows)
    assert 0 < hosted_bytes < pub["stored_size"] / 20

    # the report on D prices what D measured: one hosted request, a few hundred bytes; on C, one shipped
    # artifact, at least its stored size on the wire
    rep_c = cli_json(c.home, "report", "--artifact", pub["cid"])
    assert rep_c["measured"]["ship"]["requests"] >= 1
    assert rep_c["measured"]["ship"]["median_wire_bytes"] >= pub["stored_size"]
    rep_d = cli_json(d.home, "report", "--artifact", pub["cid"])
    assert rep_d["measured"]["host"]["requests"] == 1
    assert rep_d["measured"]["host"]["median_wire_bytes"] == hosted_bytes
