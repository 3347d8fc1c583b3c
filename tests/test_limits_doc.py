"""Every limit is documented once, with the value the code uses: the artifact format's (kvswap/artifact/limits.py)
and the payment format's (kvswap/payments/limits.py) in FORMAT.md's table; the wire's (protocol/limits.py), the control API's and the launcher's, and every field of
the node's tuning (node/tuning.py) in README.md's. And each wire bound admits what the format allows, so every
valid artifact can travel."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from kvswap.artifact import limits as format_limits
from kvswap.control import limits as control_limits
from kvswap.node import launcher, tuning
from kvswap.payments import limits as payment_limits
from kvswap.protocol import limits as wire_limits

ROOT = Path(__file__).resolve().parents[1]


def _table(path: Path) -> dict[str, float]:
    rows = re.findall(r"^\| `([A-Za-z_.]+)` \| ([\d.]+) \|", path.read_text(), flags=re.M)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)), "a limit is documented twice"
    return {name: float(value) for name, value in rows}


def _constants(module, names=None) -> dict[str, float]:
    return {k: float(v) for k, v in vars(module).items()
            if k.isupper() and k not in ("KiB", "MiB") and isinstance(v, (int, float)) and (names is None or k in names)}


def _tuning_fields() -> dict[str, float]:
    out = {}
    for group in dataclasses.fields(tuning.NodeTuning):
        defaults = group.default_factory()
        for f in dataclasses.fields(defaults):
            out[f"{group.name}.{f.name}"] = float(getattr(defaults, f.name))
    return out


def test_every_limit_and_tuning_default_is_documented_once_with_its_value():
    fmt, readme = _table(ROOT / "FORMAT.md"), _table(ROOT / "README.md")
    assert not set(fmt) & set(readme), "a limit is documented in both FORMAT.md and README.md"
    assert fmt == {**_constants(format_limits), **_constants(payment_limits)}
    expected = {**_constants(wire_limits), **_constants(control_limits),
                **_constants(launcher, {"NODE_START_TIMEOUT_S", "NODE_STOP_TIMEOUT_S"}), **_tuning_fields()}
    assert readme == expected


def test_the_wire_admits_every_valid_artifact():
    assert wire_limits.MAX_WIRE_MANIFEST_BYTES >= format_limits.MAX_MANIFEST_BYTES
    assert wire_limits.MAX_WIRE_SIGNATURES_BYTES >= max(format_limits.MAX_ENVELOPES_BYTES,
                                                         format_limits.MAX_ATTESTATIONS_BYTES)
    assert wire_limits.MAX_WIRE_CHUNK_BYTES >= format_limits.MAX_CHUNK_STORED_BYTES
    assert wire_limits.MAX_WIRE_TOKENS >= format_limits.MAX_TOKENS
    assert wire_limits.MAX_WIRE_TERMS_BYTES >= payment_limits.MAX_TERMS_BYTES
    assert wire_limits.MAX_WIRE_VOUCHER_BYTES >= payment_limits.VOUCHER_BYTES


def test_the_ration_setting_declares_the_tuning_default():
    from kvswap.config import setting

    assert tuning.RationTuning().copies == setting("node.ration_copies").default
