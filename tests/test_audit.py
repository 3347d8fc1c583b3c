"""Audits on the real tiny Qwen3: honest artifacts pass (bit-exact here, in every dtype), every poisoning of
bench/harness/poison.py is caught by a full audit in the mode the rule picks (exact on the machine that made
it), a sampled audit catches at the rate its bound predicts, token binding refuses KV of other tokens, and
attestations are signed, kept, verified and counted by the trust policy."""

from __future__ import annotations

import pytest

from bench.harness.nodes import cli
from bench.harness.poison import POISONINGS, consistent_after, make_poisoned, publish, publish_text
from kvswap.artifact.attestation import decode_attestations, encode_attestations, make_statement, sign_attestation
from kvswap.artifact.audit import choose_blocks, choose_mode, detection_bound
from kvswap.artifact.signing import NodeKey, TrustPolicy
from kvswap.document import Document
from kvswap.home import Home
from kvswap.modes import AuditMode
from kvswap.ops import audit_here, check_document, check_trust
from kvswap.protocol.errors import AuditFailed, IntegrityError, UntrustedSigner, UsageError

pytestmark = pytest.mark.engine

BLOCK = 16
OTHER = ("Tide tables list the hours of high and low water for each harbour. Fishermen read them before dawn, "
         "and ferry captains plan crossings around the spring tides, when the current runs strongest.")


@pytest.fixture
def home(tmp_path):
    with Home(tmp_path / "auditor") as h:  # the auditing node: its key signs the attestations
        yield h


@pytest.fixture
def store(home):
    return home.store


def audit(home, engine, cid, **kw):
    return audit_here(home, engine, cid, sign=kw.pop("sign", False), **kw)


@pytest.mark.parametrize("which", ["tiny_engine", "tiny_engine_fp32", "tiny_engine_fp16"])
def test_honest_artifacts_pass_bit_exactly(request, which, home, store, doc_text, question_text):
    engine = request.getfixturevalue(which)
    key = NodeKey.generate()
    for text in (doc_text, doc_text + question_text):  # a document, and a document with a question after it
        manifest = publish_text(store, key, engine, text, BLOCK)
        result = audit(home, engine, manifest.cid, full=True)  # the default: exact, the same computation made it
        assert result["passed"] and result["exact"] and result["max_rel"] == 0.0
        assert result["blocks"] == list(range(len(manifest.chunks))) and result["mode"] == "exact"
        assert "same computation" in result["why"]


@pytest.mark.parametrize("kind", sorted(POISONINGS))
def test_every_poisoning_is_caught_by_a_full_audit(kind, tiny_engine, home, store, doc_text):
    key = NodeKey.generate()
    kv = make_poisoned(tiny_engine, kind, doc_text, OTHER, BLOCK)
    manifest = publish(store, key, tiny_engine, kv, doc_text, BLOCK)
    assert check_trust(store, manifest, TrustPolicy(frozenset({key.public_bytes})))  # signed and trusted...
    for mode in (AuditMode.AUTO, AuditMode.TOLERANCE):  # auto is exact here: the publisher's computation
        if kind.startswith(("noise_", "scale_")) and mode is AuditMode.TOLERANCE:
            continue  # below the bf16 tolerance: only an exact audit catches these (SECURITY.md)
        with pytest.raises(AuditFailed) as info:
            audit(home, tiny_engine, manifest.cid, full=True, mode=mode)
        message = str(info.value)
        assert "\n" not in message and message.startswith("block ")
        failing = info.value.result.checks[-1]
        if kind == "replaced_tail":
            assert "logits" in message and failing["block"] == len(manifest.chunks) - 1
        else:
            assert failing["block"] == (0 if kind == "other_document" else 2)
            assert f"layer {failing['layer']}" in message
    assert not store.get_attestations(manifest.cid)  # a failed audit is never attested


def test_edited_tokens_are_caught_by_token_binding_too(tiny_engine, home, store, doc_text):
    kv = make_poisoned(tiny_engine, "edited_tokens", doc_text, OTHER, BLOCK)
    manifest = publish(store, NodeKey.generate(), tiny_engine, kv, doc_text, BLOCK)
    with pytest.raises(IntegrityError, match="other tokens than this document's: they differ from token 33"):
        check_document(tiny_engine, manifest, Document(doc_text))
    with pytest.raises(IntegrityError, match="hashes to"):
        check_document(tiny_engine, manifest, Document(OTHER))


def test_sampled_audit_catches_at_the_rate_its_bound_predicts(tiny_engine, home, store, doc_text):
    kv = make_poisoned(tiny_engine, "swapped_block", doc_text, OTHER, BLOCK, block=2)
    manifest = publish(store, NodeKey.generate(), tiny_engine, kv, doc_text, BLOCK)
    n = len(manifest.chunks)
    caught, seeds = 0, range(60)
    for seed in seeds:
        try:
            audit(home, tiny_engine, manifest.cid, blocks=2, seed=seed, mode=AuditMode.TOLERANCE)
        except AuditFailed:
            caught += 1
    # the swapped block (2) poisons block 2 and every later block (they were computed over the original block
    # 2): n - 2 of n blocks differ, and the last block is always audited, so every draw catches it
    assert caught == len(seeds)
    # a careful poisoner recomputes the later blocks over the poisoned one, so only that block is off: it is
    # caught exactly when the draw includes it, at the bound's rate
    kv = make_poisoned(tiny_engine, "noise_1e-2", doc_text, OTHER, BLOCK, block=2)
    kv = consistent_after(tiny_engine, kv, 3 * BLOCK, BLOCK)
    manifest = publish(store, NodeKey.generate(), tiny_engine, kv, doc_text, BLOCK)
    caught = sum(1 for seed in seeds if 2 in choose_blocks(n, blocks=2, seed=seed)[0])
    for seed in seeds:
        drawn = choose_blocks(n, blocks=2, seed=seed)[0]
        if 2 in drawn:
            with pytest.raises(AuditFailed):
                audit(home, tiny_engine, manifest.cid, blocks=2, seed=seed)
        else:
            assert audit(home, tiny_engine, manifest.cid, blocks=2, seed=seed)["passed"]
    p = detection_bound(n, 2, 1)
    assert abs(caught / len(seeds) - p) < 3 * (p * (1 - p) / len(seeds)) ** 0.5  # the bound is the rate


def test_choose_blocks_and_bounds():
    blocks, k = choose_blocks(59, fraction=0.05, seed=1)
    assert k == 3 and len(set(blocks)) == len(blocks) and blocks[-1] == 58 and blocks == sorted(blocks)
    assert choose_blocks(59, fraction=0.05, seed=1) == (blocks, k)  # a seed repeats the draw
    assert choose_blocks(10, full=True) == (list(range(10)), 10)
    assert detection_bound(59, 3, 1) == pytest.approx(3 / 59)
    assert detection_bound(10, 10, 1) == 1.0 and detection_bound(10, 3, 0) == 0.0
    assert detection_bound(59, 3, 6) == pytest.approx(1 - (53 * 52 * 51) / (59 * 58 * 57))
    for bad in (dict(fraction=0.0), dict(fraction=1.5), dict(blocks=0), dict(blocks=2, fraction=0.5)):
        with pytest.raises(UsageError):
            choose_blocks(10, **bad)


def test_attestations_are_signed_kept_and_admit_artifacts_by_policy(tiny_engine, home, store, doc_text):
    publisher, auditor, stranger = NodeKey.generate(), home.key, NodeKey.generate()
    manifest = publish_text(store, publisher, tiny_engine, doc_text, BLOCK)
    cid = manifest.cid
    result = audit(home, tiny_engine, cid, blocks=2, seed=3, sign=True)
    assert result["attestation"]["mode"] == "exact" and result["attestation"]["auditor"] == auditor.public_hex
    [att] = store.get_attestations(cid)
    claims = att.verify(cid)
    assert claims["engine"] == tiny_engine.fingerprint and claims["blocks"] == result["blocks"]
    assert decode_attestations(encode_attestations([att])) == [att]

    me = NodeKey.generate().public_bytes
    untrusted = TrustPolicy(frozenset({me}), auditors=frozenset({me}))
    with pytest.raises(UntrustedSigner):
        check_trust(store, manifest, untrusted)
    admit = TrustPolicy(frozenset({me}), auditors=frozenset({me, auditor.public_bytes}), accept_audited=1)
    assert check_trust(store, manifest, admit) == []  # no trusted publisher, but a trusted auditor's audit
    need_two = TrustPolicy(frozenset({me, publisher.public_bytes}), auditors=frozenset({me, auditor.public_bytes}),
                           require_audits=2)
    with pytest.raises(UntrustedSigner, match="requires 2"):
        check_trust(store, manifest, need_two)
    # an auditor who ran another model does not count; a forged attestation is tampering
    other_engine = make_statement(blocks=[0], drawn=1, n_blocks=len(manifest.chunks), dtype="bf16", engine="ab" * 32,
                                  device="cpu", exact=True, max_rel=0.0, tool="test")
    store.add_attestations(cid, [sign_attestation(stranger, cid, other_engine)])
    two = TrustPolicy(frozenset({me}), auditors=frozenset({me, auditor.public_bytes, stranger.public_bytes}),
                      accept_audited=2)
    with pytest.raises(UntrustedSigner, match="1 of the 2"):
        check_trust(store, manifest, two)
    forged = sign_attestation(stranger, cid, other_engine)
    forged = type(forged)(cid, auditor.public_bytes, forged.time, forged.statement, forged.signature)
    with pytest.raises(IntegrityError):
        store.add_attestations(cid, [forged])


def test_cli_audit_picks_exact_on_this_machine_and_fails_in_one_line(tmp_path, tiny_engine, doc_text):
    """The commands a user runs, each in a fresh interpreter: publish, audit (default, --exact, --tolerance),
    inspect. The default audit of an artifact made here is exact: it catches a 1e-2 noise on one block that
    the bf16 tolerance lets through."""
    home = tmp_path / "home"
    doc = tmp_path / "doc.txt"
    doc.write_text(doc_text, encoding="utf-8")
    cli(home, "publish", str(doc), "--model", "tiny-qwen3", "--block-tokens", str(BLOCK), "--json")
    with Home(home) as h:
        [row] = h.store.list_artifacts()
        cid = row["cid"]
        kv = make_poisoned(tiny_engine, "noise_1e-2", doc_text, OTHER, BLOCK, block=1)
        noisy = publish(h.store, h.key, tiny_engine, kv, doc_text, BLOCK)  # a trusted key poisons its own store
        kv = make_poisoned(tiny_engine, "swapped_block", doc_text, OTHER, BLOCK, block=1)
        swapped = publish(h.store, h.key, tiny_engine, kv, doc_text, BLOCK)
    out = cli(home, "audit", cid, "--full", "--doc", str(doc))
    assert "passed" in out.stdout and "mode      exact" in out.stdout
    assert "attested" in cli(home, "inspect", cid).stdout or "audited by" in cli(home, "inspect", cid).stdout
    for args, fails in ((["--full"], True), (["--full", "--tolerance", "--no-sign"], False), (["--full", "--exact"], True)):
        proc = cli(home, "audit", str(noisy.cid), *args, check=False)
        assert (proc.returncode != 0) == fails, (args, proc.stderr)
        if fails:
            assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: block 1 ")
    proc = cli(home, "audit", str(swapped.cid), "--full", "--tolerance", check=False)  # over any tolerance
    assert proc.returncode == 1 and proc.stderr.startswith("error: block 1 ") and "Traceback" not in proc.stderr
    proc = cli(home, "audit", cid, "--exact", "--tolerance", check=False)
    assert proc.returncode == 2 and proc.stderr == "error: give --exact or --tolerance, not both\n"


def test_the_mode_rule():
    here = {"device": "cpu", "isa": "AVX512", "torch": "2.13.0+cpu", "attn": "sdpa", "threads": "2"}
    assert choose_mode(AuditMode.AUTO, dict(here), here)[0] is AuditMode.EXACT
    mode, why = choose_mode(AuditMode.AUTO, {**here, "isa": "AVX2"}, here)
    assert mode is AuditMode.TOLERANCE and "isa AVX2 vs AVX512 here" in why
    assert choose_mode(AuditMode.AUTO, None, here) == (AuditMode.TOLERANCE, "the artifact declares no compute identity")
    assert choose_mode(AuditMode.EXACT, None, here)[0] is AuditMode.EXACT
    assert choose_mode(AuditMode.TOLERANCE, dict(here), here)[0] is AuditMode.TOLERANCE
