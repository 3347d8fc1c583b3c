"""FORMAT.md's limits table and constants agree with the code (a spec that drifts is worse than none)."""

from __future__ import annotations

import re
from pathlib import Path

from kvswap.artifact import codecs
from kvswap.artifact.manifest import FORMAT_NAME, FORMAT_VERSION
from kvswap.artifact.signing import DOMAIN
from kvswap.protocol import limits
from kvswap.store import EXPORT_MAGIC

FORMAT_MD = (Path(__file__).resolve().parent.parent / "FORMAT.md").read_text()


def test_limits_table_matches_protocol_limits():
    rows = re.findall(r"^\| `([A-Z_]+)` \| (\d+) \|", FORMAT_MD, flags=re.M)
    assert len(rows) >= 8
    for name, value in rows:
        assert getattr(limits, name) == int(value), name


def test_documented_constants_match_the_code():
    assert f"# kvswap artifact format, version {FORMAT_VERSION}" in FORMAT_MD
    assert f'`"{FORMAT_NAME}"`' in FORMAT_MD
    assert DOMAIN.decode().rstrip("\n") + "\\n" in FORMAT_MD
    assert '"KVSWAPX\\x01"' in FORMAT_MD and EXPORT_MAGIC == b"KVSWAPX\x01"
    assert f"level {codecs.DEFAULT_ZSTD_LEVEL} (`DEFAULT_ZSTD_LEVEL`)" in FORMAT_MD
    assert f"at least {codecs.AUTO_MIN_SAVING:.0%} (`AUTO_MIN_SAVING`)" in FORMAT_MD
    for codec in codecs.CODECS:
        assert f"| `{codec}` |" in FORMAT_MD
