"""Every limit in protocol/limits.py is documented once, with the value the code uses: artifact limits in
FORMAT.md's table, wire and daemon limits in README.md's."""

from __future__ import annotations

import re
from pathlib import Path

from kvswap.protocol import limits

ROOT = Path(__file__).resolve().parents[1]


def _table(path: Path) -> dict[str, float]:
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([\d.]+) \|", path.read_text(), flags=re.M)
    return {name: float(value) for name, value in rows}


def test_every_limit_is_documented_once_with_its_value():
    fmt, readme = _table(ROOT / "FORMAT.md"), _table(ROOT / "README.md")
    assert not set(fmt) & set(readme), "a limit is documented twice"
    documented = {**fmt, **readme}
    constants = {k: v for k, v in vars(limits).items() if k.isupper() and k not in ("KiB", "MiB")}
    assert set(documented) == set(constants)
    for name, value in constants.items():
        assert documented[name] == float(value), name
