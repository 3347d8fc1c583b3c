"""Node keys, signature envelopes and the trust policy."""

from __future__ import annotations

import os
import stat

import pytest

from kvswap.artifact.signing import (
    DOMAIN,
    Envelope,
    NodeKey,
    TrustPolicy,
    decode_envelopes,
    encode_envelopes,
    signed_message,
    verify_envelopes,
)
from kvswap.protocol.cid import Cid
from kvswap.config import HomeLayout, read_trusted, trust_add, trust_rm
from kvswap.protocol.errors import FormatError, IntegrityError, LimitExceeded, UntrustedSigner, UsageError

CID = Cid.of(b"a manifest")
OTHER = Cid.of(b"another manifest")


def test_identity_key_is_created_once_with_0600_and_reloads(tmp_path):
    path = HomeLayout(tmp_path).identity_key
    key = NodeKey.load_or_create(path)
    assert path.read_bytes() == key.seed and len(key.seed) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = NodeKey.load_or_create(path)
    assert again.public_bytes == key.public_bytes and len(key.public_hex) == 64


def test_identity_key_rejects_wrong_size_and_loose_permissions(tmp_path):
    path = tmp_path / "identity.key"
    path.write_bytes(b"short")
    os.chmod(path, 0o600)
    with pytest.raises(FormatError):
        NodeKey.load_or_create(path)
    path.write_bytes(os.urandom(32))
    os.chmod(path, 0o644)
    with pytest.raises(FormatError, match="chmod 600"):
        NodeKey.load_or_create(path)


def test_same_seed_gives_the_libp2p_identity_key():
    """The network layer derives the peer id with libp2p from the same raw seed: the keys must agree."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    key = NodeKey(bytes(range(32)))
    assert create_new_key_pair(key.seed).public_key.to_bytes() == key.public_bytes


def test_sign_verify_and_tampering():
    key = NodeKey.generate()
    env = key.sign_manifest(CID, time=1_700_000_000)
    env.verify(CID)
    assert signed_message(CID, key.public_bytes, 1_700_000_000).startswith(DOMAIN)
    with pytest.raises(IntegrityError):
        env.verify(OTHER)
    forged = [
        Envelope(CID, env.signer, env.time + 1, env.signature),  # time is signed
        Envelope(CID, NodeKey.generate().public_bytes, env.time, env.signature),  # signer is bound
        Envelope(CID, env.signer, env.time, bytes([env.signature[0] ^ 1]) + env.signature[1:]),
        Envelope(OTHER, env.signer, env.time, env.signature),  # replay onto another manifest
    ]
    for bad in forged:
        with pytest.raises(IntegrityError):
            bad.verify(bad.manifest_cid)


def test_envelopes_round_trip_sorted_and_bounded():
    a, b = NodeKey.generate(), NodeKey.generate()
    envs = [a.sign_manifest(CID, 5), b.sign_manifest(CID, 6)]
    data = encode_envelopes(envs)
    assert data == encode_envelopes(list(reversed(envs)))
    assert sorted(decode_envelopes(data), key=lambda e: e.signer) == sorted(envs, key=lambda e: e.signer)
    for junk in (b"", b"\x81\xa1a\x01", b"\x91\x80", b"\xc1"):
        with pytest.raises(FormatError):
            decode_envelopes(junk)
    with pytest.raises(LimitExceeded):
        decode_envelopes(b"\x90" * (300 * 1024))


def test_trust_policy():
    me, friend, stranger = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    policy = TrustPolicy(frozenset({me.public_bytes, friend.public_bytes}))
    assert verify_envelopes([friend.sign_manifest(CID)], CID, policy)
    # a valid signature by an untrusted key: a distinct, clear error
    with pytest.raises(UntrustedSigner, match="untrusted"):
        verify_envelopes([stranger.sign_manifest(CID)], CID, policy)
    with pytest.raises(UntrustedSigner, match="unsigned"):
        verify_envelopes([], CID, policy)
    # accept_any only when asked, and still never a bad signature
    anyone = TrustPolicy(frozenset(), accept_any=True)
    assert verify_envelopes([stranger.sign_manifest(CID)], CID, anyone)
    bad = stranger.sign_manifest(OTHER)
    with pytest.raises(IntegrityError):
        verify_envelopes([friend.sign_manifest(CID), Envelope(CID, bad.signer, bad.time, bad.signature)], CID, anyone)
    assert issubclass(UntrustedSigner, IntegrityError)


def test_trust_file_and_self_trust(tmp_path):
    me = NodeKey.load_or_create(HomeLayout(tmp_path).identity_key)
    friend = NodeKey.generate()
    policy = TrustPolicy.for_home(tmp_path)
    assert policy.trusted == {me.public_bytes} and not policy.accept_any
    trust_add(tmp_path, friend.public_hex.upper())
    assert read_trusted(tmp_path) == {friend.public_hex}
    assert friend.public_bytes in TrustPolicy.for_home(tmp_path).trusted
    trust_rm(tmp_path, friend.public_hex)
    assert read_trusted(tmp_path) == set()
    with pytest.raises(UsageError):
        trust_add(tmp_path, "nothex")
    with pytest.raises(UsageError):
        trust_rm(tmp_path, friend.public_hex)
    HomeLayout(tmp_path).config_file.write_text("[trust\ntrusted = 1")
    with pytest.raises(FormatError, match="not valid TOML"):
        read_trusted(tmp_path)
    HomeLayout(tmp_path).config_file.write_text('[trust]\ntrusted = ["nothex"]\n')
    with pytest.raises(UsageError, match="trust.trusted"):
        read_trusted(tmp_path)


def test_legacy_trust_json_is_read_then_moved_into_config_toml(tmp_path):
    friend, other = NodeKey.generate(), NodeKey.generate()
    (tmp_path / "trust.json").write_text('{"trusted": ["%s"]}' % friend.public_hex)
    (tmp_path / "config.json").write_text('{"store_budget": "1GiB"}')
    assert read_trusted(tmp_path) == {friend.public_hex}
    trust_add(tmp_path, other.public_hex)
    assert read_trusted(tmp_path) == {friend.public_hex, other.public_hex}
    assert not (tmp_path / "trust.json").exists() and not (tmp_path / "config.json").exists()
    from kvswap.config import store_budget

    assert store_budget(tmp_path) == 1024**3 and "budget" in (tmp_path / "config.toml").read_text()


def test_trust_cli_takes_peer_ids_auditors_and_policy(tmp_path, capsys):
    import json

    from kvswap.cli import main
    from kvswap.config import key_of_peer_id, read_trust
    from kvswap.node.p2p import peer_id_of_seed

    publisher, auditor = NodeKey.generate(), NodeKey.generate()
    peer_id = peer_id_of_seed(publisher.seed)
    assert key_of_peer_id(peer_id) == publisher.public_hex and key_of_peer_id("12D3KooWnot-a-peer") is None
    home = str(tmp_path)
    assert main(["trust", "add", peer_id, "--home", home]) == 0  # the id every other command prints
    assert main(["trust", "add", auditor.public_hex, "--auditor", "--home", home]) == 0
    capsys.readouterr()
    assert main(["trust", "policy", "--accept-audited", "1", "--exact-audits", "--home", home, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    trust = read_trust(tmp_path)
    assert shown["accept_audited"] == 1 and shown["self"] == NodeKey.load_or_create(tmp_path / "identity.key").public_hex
    assert trust["trusted"] == [publisher.public_hex] and trust["auditors"] == [auditor.public_hex]
    assert trust["accept_audited"] == 1 and trust["require_audits"] == 0 and trust["exact_audits"] is True
    policy = TrustPolicy.for_home(tmp_path)
    assert publisher.public_bytes in policy.trusted and auditor.public_bytes in policy.auditors
    assert main(["trust", "rm", auditor.public_hex, "--auditor", "--home", home]) == 0
    assert read_trust(tmp_path)["auditors"] == []
    assert main(["trust", "add", "not-a-key", "--home", home]) == 2
    assert "peer id" in capsys.readouterr().err
