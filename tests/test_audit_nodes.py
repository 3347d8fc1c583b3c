"""Audits on real daemons: a node audits what it fetches before first use (and drops a poisoned artifact with
one line), signs an attestation when the audit passes, serves it with the manifest, and a third node that does
not trust the publisher but trusts the auditor accepts the artifact because of it (accept_audited)."""

from __future__ import annotations

from kvswap.artifact.signing import NodeKey
from kvswap.home import Home
from bench.harness.nodes import NodeProc, cli, cli_json
from bench.harness.poison import make_poisoned, publish

DOC = ("The lighthouse keeper logged every ship that passed the point, the wind, and the oil he burned. "
       "In winter the entries grew short, and in one storm the log went blank for three days. ") * 3
OTHER = "Bees return to the hive along a line they learned on their first flight, and guard it from others. " * 3


def test_fetched_artifacts_are_audited_attested_and_attestations_admit(tmp_path, tiny_engine):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC, encoding="utf-8")
    a = NodeProc(tmp_path / "a")
    nodes = [a]
    try:
        b = NodeProc(tmp_path / "b", bootstrap=[a.addr])
        c = NodeProc(tmp_path / "c", bootstrap=[b.addr])
        nodes += [b, c]
        a.wait_model()
        pub = cli_json(a.home, "publish", str(doc))
        a_key = cli_json(a.home, "id")["public_key"]
        # a poisoned artifact of the same document, signed by A (a trusted publisher gone bad)
        with Home(a.home) as _home:
            store = _home.store
            bad = publish(store, NodeKey.load_or_create(a.home / "identity.key"), tiny_engine,
                          make_poisoned(tiny_engine, "other_document", DOC, OTHER, 64), DOC, 64)
        cli(b.home, "trust", "add", a_key)
        b.wait_model()

        got = cli(b.home, "get", str(bad.cid), "--no-progress", check=False)
        errors = [line for line in got.stderr.splitlines() if line.startswith("error:")]
        assert got.returncode != 0 and len(errors) == 1, got.stderr[-2000:]
        assert "does not follow from its tokens" in errors[0] and "removed" in errors[0]
        with Home(b.home) as _home:
            store = _home.store
            assert not store.has_artifact(bad.cid)
        with Home(a.home) as _home:  # A serves one artifact per document: withdraw the bad one
            store = _home.store
            store.remove(bad.cid)

        got = cli_json(b.home, "get", "--doc", str(doc), "--no-progress")  # the honest one, bound to the file
        assert got["cid"] == pub["cid"] and got["audit"]["mode"] == "exact" and got["audit"]["blocks"]
        b_key = cli_json(b.home, "id")["public_key"]
        inspect = cli_json(b.home, "inspect", pub["cid"])
        assert [x["auditor"] for x in inspect["attestations"]] == [b_key]

        # C trusts B as an auditor, not A as a publisher: B's attestation, served with the manifest, admits it
        cli(c.home, "trust", "add", b_key, "--auditor")
        cli(c.home, "trust", "policy", "--accept-audited", "1")
        c.wait_model()
        got_c = cli_json(c.home, "get", pub["cid"], "--no-progress")
        assert got_c["cid"] == pub["cid"]
        auditors = {x["auditor"] for x in cli_json(c.home, "inspect", pub["cid"])["attestations"]}
        assert b_key in auditors  # B's attestation came with the manifest (C's own audit may be there too)
    finally:
        for node in nodes:
            node.stop()
