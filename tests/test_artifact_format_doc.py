"""FORMAT.md's limits table and constants agree with the code (a spec that drifts is worse than none)."""

from __future__ import annotations

import re
from pathlib import Path

from kvswap.artifact import codecs
from kvswap.artifact.manifest import FORMAT_NAME, FORMAT_VERSION
from kvswap.artifact.signing import DOMAIN
from kvswap.artifact import limits
from kvswap.payments import limits as payment_limits
from kvswap.payments import statement, terms, vouchers
from kvswap.store import EXPORT_MAGIC

FORMAT_MD = (Path(__file__).resolve().parent.parent / "FORMAT.md").read_text()


def test_limits_table_matches_protocol_limits():
    rows = re.findall(r"^\| `([A-Z_]+)` \| (\d+) \|", FORMAT_MD, flags=re.M)
    assert len(rows) >= 8
    for name, value in rows:  # the artifact format's limits, then the payment format's (FORMAT.md "Payments")
        assert getattr(limits, name, getattr(payment_limits, name, None)) == int(value), name


def test_documented_constants_match_the_code():
    assert f"# kvswap artifact format, version {FORMAT_VERSION}" in FORMAT_MD
    assert f'`"{FORMAT_NAME}"`' in FORMAT_MD
    assert DOMAIN.decode().rstrip("\n") + "\\n" in FORMAT_MD
    for domain in (terms.DOMAIN, vouchers.DOMAIN, statement.DOMAIN):  # every signing domain is specified
        assert domain.decode().rstrip("\n") + "\\n" in FORMAT_MD, domain
    assert '"KVSWAPX\\x01"' in FORMAT_MD and EXPORT_MAGIC == b"KVSWAPX\x01"
    assert f"level {codecs.DEFAULT_ZSTD_LEVEL} (`DEFAULT_ZSTD_LEVEL`)" in FORMAT_MD
    assert f"at least {codecs.AUTO_MIN_SAVING:.0%} (`AUTO_MIN_SAVING`)" in FORMAT_MD
    for codec in codecs.CODECS:
        assert f"| `{codec}` |" in FORMAT_MD


def _section(title: str) -> str:
    start = FORMAT_MD.index(title)
    end = FORMAT_MD.find("\n## ", start + len(title))
    return FORMAT_MD[start:end if end > 0 else None]


def test_manifest_key_table_is_in_canonical_order_and_complete():
    from kvswap.artifact.manifest import _TOP_KEYS, MAX_COMPUTE_CHARS, MAX_COMPUTE_ENTRIES

    table = _section("## Manifest")
    keys = re.findall(r"^\| `([a-z_]+)` \| (?:int|str|bin|map|array|map or nil)", table, flags=re.M)
    assert set(keys) == _TOP_KEYS | {"compute"}  # `compute`: version 2
    assert f"`MAX_COMPUTE_ENTRIES` ({MAX_COMPUTE_ENTRIES})" in table and f"`MAX_COMPUTE_CHARS` ({MAX_COMPUTE_CHARS})" in table
    assert keys == sorted(keys, key=lambda k: k.encode("utf-8"))  # the order the encoder writes


def test_store_schema_in_the_doc_is_the_code():
    from kvswap import store

    doc_sql = re.search(r"```sql\n(.*?)```", _section("## Store layout"), flags=re.S).group(1)
    norm = lambda text: " ".join(text.split())  # noqa: E731
    assert norm(doc_sql) == norm(store._SCHEMA)
    assert f"schema version {store._SCHEMA_VERSION}" in FORMAT_MD


def test_stored_size_bounds_in_the_doc_compute_what_the_code_computes():
    """Evaluate the formulas as written in FORMAT.md and compare them with the validator's bounds."""
    block = re.search(r"```\n(ZSTD_COMPRESSBOUND.*?)```", _section("## Codecs"), flags=re.S).group(1)
    lines = dict(line.split(":", 1) if not line.startswith("ZSTD") else ("bound", line.split("=", 1)[1])
                 for line in block.strip().splitlines())

    def py(expr: str) -> str:
        expr = expr.split("(and")[0].split("      (")[0].replace("128 KiB", "131072").replace("n / s", "n // s")
        return expr.replace("ZSTD_COMPRESSBOUND", "bound").strip()

    def bound(n: int) -> int:
        return eval(py(lines["bound"]), {}, {"n": n})  # noqa: S307 - our own document

    env = {"bound": bound, "min": min, "MAX_CHUNK_STORED_BYTES": limits.MAX_CHUNK_STORED_BYTES}
    for n in (2, 64, 4094, 131070, 131072, 131074, 9437184, limits.MAX_CHUNK_RAW_BYTES):
        assert bound(n) == codecs.zstd_bound(n)
        assert eval(py(lines["raw"]), env, {"n": n}) == codecs.max_stored_size("raw", n, 2)  # noqa: S307
        assert eval(py(lines["zstd"]), env, {"n": n}) == codecs.max_stored_size("zstd", n, 2)  # noqa: S307
        for s in (2, 4):
            if n % s == 0:
                assert eval(py(lines["planes"]), env, {"n": n, "s": s}) == codecs.max_stored_size("planes", n, s)  # noqa: S307


def test_zstd_frames_are_as_the_doc_says():
    import os

    import zstandard

    assert "Content_Checksum_flag 0" in FORMAT_MD and "Dictionary_ID 0" in FORMAT_MD
    for n in (64, 300_000):
        frame = codecs.encode("zstd", os.urandom(n // 2) + bytes(n - n // 2), 2)
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == n and not params.has_checksum and params.dict_id == 0


def test_export_record_types_and_envelope_domain():
    from kvswap import store

    text = _section("## Export file")
    for kind, what in ((store.REC_MANIFEST, "manifest"), (store.REC_ENVELOPES, "envelopes"),
                       (store.REC_BLOB, "one blob"), (store.REC_END, "end")):
        assert re.search(rf"type {kind}\s+{what}", text), what
    assert "u8 type, u64 big-endian length" in text and store._RECORD.format == ">BQ"
