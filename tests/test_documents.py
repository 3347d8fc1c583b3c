"""One reading of a document for every command: the bytes `publish` hashes are the bytes `get --doc` and
`generate --doc` hash, for CRLF line ends, a byte-order mark, and non-UTF-8 input (a clear error)."""

from __future__ import annotations

import argparse
import hashlib

import pytest

from kvswap.document import EMPTY_DOCUMENT, Document
from kvswap.protocol.errors import UsageError

from bench.harness.nodes import NodeProc, cli, cli_json

CRLF_TEXT = "First line of a Windows file.\r\nSecond line, still CRLF.\r\nThe end.\r\n" * 8
BOM = b"\xef\xbb\xbf"


def test_crlf_is_content_and_hashed_as_the_file_bytes(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(CRLF_TEXT.encode("utf-8"))
    doc = Document.read(path)
    assert doc.text == CRLF_TEXT and "\r\n" in doc.text  # no newline translation
    assert doc.hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert Document.read(path).hash != Document(CRLF_TEXT.replace("\r\n", "\n")).hash


def test_a_leading_bom_is_not_content(tmp_path):
    with_bom, without = tmp_path / "bom.txt", tmp_path / "plain.txt"
    with_bom.write_bytes(BOM + CRLF_TEXT.encode())
    without.write_bytes(CRLF_TEXT.encode())
    assert Document.read(with_bom) == Document.read(without)
    assert Document.read(with_bom).hash == hashlib.sha256(CRLF_TEXT.encode()).hexdigest()
    assert Document("\ufeff" + CRLF_TEXT).hash == Document(CRLF_TEXT).hash
    assert Document("a \ufeff inside").text == "a \ufeff inside"  # only a leading BOM is dropped


@pytest.mark.parametrize("content,match", [
    (b"caf\xe9 latin-1", "not UTF-8 text"),
    (b"\xff\xfeU\x00T\x00F\x00-\x001\x006\x00", "not UTF-8 text"),
    (b"", "empty"),
    (b"  \r\n\t ", "empty"),
    (BOM, "empty"),
])
def test_bad_documents_are_one_clear_usage_error(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=match) as info:
        Document.read(path)
    assert "\n" not in str(info.value)
    if match == "empty":
        assert str(info.value) == EMPTY_DOCUMENT


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UsageError, match="no such document"):
        Document.read(tmp_path / "nope.txt")
    with pytest.raises(UsageError, match="directory"):
        Document.read(tmp_path)


def test_get_request_and_publish_agree_on_the_hash_of_a_crlf_bom_file(tmp_path, tiny_engine):
    """`get --doc` builds its request from the same Document as `publish` (no daemon needed to check that)."""
    from kvswap.cli.node_cmds import fetch_source

    path = tmp_path / "win.txt"
    path.write_bytes(BOM + CRLF_TEXT.encode())
    home = tmp_path / "home"
    pub = cli_json(home, "publish", str(path), "--model", "tiny-qwen3", "--block-tokens", "16")
    source = fetch_source(argparse.Namespace(cid=None, doc=path, doc_hash=None, tokens=None))
    assert source.hash == pub["document_hash"] == hashlib.sha256(CRLF_TEXT.encode()).hexdigest()
    # `generate --doc` (local store, no daemon) finds the same artifact by the same hash
    out = cli_json(home, "generate", "--doc", str(path), "--prompt", " Next:", "--max-new-tokens", "4",
                   "--model", "tiny-qwen3")
    assert out["cid"] == pub["cid"] and len(out["tokens"]) == 4


def test_non_utf8_document_fails_each_command_with_one_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"Caf\xe9 au lait.\n")
    home = tmp_path / "home"
    for args in (("publish", str(path), "--model", "tiny-qwen3"), ("get", "--doc", str(path)),
                 ("exact", "--doc", str(path), "--model", "tiny-qwen3")):
        proc = cli(home, *args, check=False, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and errors == [f"error: {path} is not UTF-8 text (byte 3: b'\\xe9')"], proc.stderr


def test_get_doc_on_a_daemon_finds_a_crlf_document_published_elsewhere(tmp_path, tiny_engine):
    path = tmp_path / "win.txt"
    path.write_bytes(BOM + CRLF_TEXT.encode())
    a = NodeProc(tmp_path / "a")
    try:
        b = NodeProc(tmp_path / "b", bootstrap=[a.addr])
        try:
            a.wait_model()
            pub = cli_json(a.home, "publish", str(path))
            cli(b.home, "trust", "add", cli_json(a.home, "id")["public_key"])
            b.wait_model()
            got = cli_json(b.home, "get", "--doc", str(path), "--no-progress")
            assert got["cid"] == pub["cid"] and got["complete"]
        finally:
            b.stop()
    finally:
        a.stop()
