"""`kvswap report --calibrate` with the real tiny-qwen3 engine: one prefill (and a reuse step when the ledger
has none) timed on this node, logged as calibration events, and used by the report, which says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness.poison import publish_text
from kvswap.home import Home
from kvswap.artifact.signing import NodeKey
from kvswap.protocol.errors import ModelMismatch, UsageError
from kvswap.ledger import Ledger, ledger_path
from kvswap.reporting import calibrate, make_report
from kvswap.reporting.render import render_terminal
from kvswap.store import Store

REPO = Path(__file__).resolve().parents[1]


def publish(home: Path, engine, text: str) -> tuple[str, int]:
    """An artifact in the home's store, as a consumer holds it after a fetch (no prefill in its ledger)."""
    with Home(home) as h:
        manifest = publish_text(h.store, NodeKey.generate(), engine, text, 16)
    return str(manifest.cid), manifest.n_tokens


def consumer_generated(home: Path, cid: str, engine) -> None:
    with Ledger(ledger_path(home)) as led:
        led.compute(kind="load", seconds=0.002, tokens=10, model=engine.model_id, dtype=engine.dtype,
                    device=engine.device, artifact=cid)
        led.compute(kind="generate", seconds=0.24, tokens=12, model=engine.model_id, dtype=engine.dtype,
                    device=engine.device, artifact=cid)


def test_calibration_prefills_the_artifacts_own_tokens_and_the_report_uses_it(tmp_path, tiny_engine, doc_text):
    cid, n_tokens = publish(tmp_path, tiny_engine, doc_text)
    consumer_generated(tmp_path, cid, tiny_engine)
    before = make_report(tmp_path)
    assert "reuse_ratio" in before["provenance"]["borrowed"]

    result = calibrate(tmp_path, engine=tiny_engine)
    assert (result["artifact"], result["tokens"], result["prefill_step"]) == (cid, n_tokens, 16)
    assert result["tokens_from"] == "the artifact's own tokens"
    assert result["reuse_step"] is True  # timed even though the ledger has a decode of real work
    with Ledger(ledger_path(tmp_path)) as led:
        prefills = led.computes(kind="prefill")
        generates = led.computes(kind="generate")
    assert len(prefills) == 1 and len(generates) == 2
    step = generates[1]
    assert step.id == result["runs"][0]["step_event"] and (step.tokens, step.extra["calibration"]) == (1, True)
    row = prefills[0]
    assert row.id == result["runs"][0]["prefill_event"] and row.seconds == result["runs"][0]["prefill_s"] > 0
    assert (row.tokens, row.artifact, row.model, row.dtype) == (n_tokens, cid, "tiny-qwen3", "bf16")
    assert row.extra["calibration"] is True and row.extra["tokens_from"] == "the artifact's own tokens"

    rep = make_report(tmp_path)
    assert rep["provenance"] == {"prefill": "calibration", "reuse_step": "ledger", "reuse_ratio": "calibration",
                                 "borrowed": ["hosted_wire_bytes", "readers"]}
    ratio = rep["inputs"]["reuse_ratio"]
    assert ratio["origin"] == "calibration"
    assert ratio["value"] == pytest.approx(row.seconds / step.seconds)
    assert [w["timing"] for w in rep["warnings"] if w["kind"] == "calibration"] == ["prefill", "reuse ratio"]
    rep["calibration"] = result  # what `kvswap report --calibrate` attaches
    text = render_terminal(rep)
    assert text.index(f"Calibrated on this node: tiny-qwen3 bf16 cpu, prefill of {n_tokens} tokens (the "
                      "artifact's own tokens)") < text.index("NOTE: prefill timing is a calibration")


def test_calibration_without_an_artifact_uses_real_vocabulary_tokens_and_times_a_reuse_step(tmp_path, tiny_engine):
    from kvswap.reporting.calibration import _token_ids, synthetic_ids

    ids = synthetic_ids(tiny_engine, 300)
    assert len(ids) == 300 and tiny_engine.tokenize(tiny_engine.detokenize(ids[:40])) == ids[:40]
    # the default count (the paper's 3774 tokens) is clamped to the model's context window; an asked one is not
    ids, source = _token_ids(tiny_engine, None, None, 3774)
    assert len(ids) == tiny_engine.max_context == 2048 and source.endswith("clamped to tiny-qwen3's context window")
    assert len(_token_ids(tiny_engine, None, 3000, 3774)[0]) == 3000

    result = calibrate(tmp_path, tokens=300, repeats=2, engine=tiny_engine)
    assert (result["artifact"], result["tokens"], result["reuse_step"]) == (None, 300, True)
    assert result["tokens_from"].startswith("synthetic")
    with Ledger(ledger_path(tmp_path)) as led:
        prefills, steps = led.computes(kind="prefill"), led.computes(kind="generate")
    assert [r.tokens for r in prefills] == [300, 300] and [r.tokens for r in steps] == [1, 1]
    assert all(r.extra["calibration"] for r in prefills + steps)
    assert [r.id for r in steps] == [run["step_event"] for run in result["runs"]]

    rep = make_report(tmp_path)
    m = rep["measured"]
    assert (m["prefill_source"], m["step_source"]) == ("calibration", "calibration")
    assert m["timings"]["prefill_s"]["n"] == 2 and m["timings"]["step_s"]["n"] == 2
    assert m["ratio_source"] == "calibration" and not {"ratio_prefill_s", "ratio_step_s"} & set(m["timings"])
    assert rep["inputs"]["tokens"]["value"] == 300
    assert rep["inputs"]["reuse_ratio"]["origin"] == "calibration"
    assert rep["inputs"]["reuse_ratio"]["value"] == pytest.approx(m["prefill_s"] / m["step_s"])
    assert {w["timing"] for w in rep["warnings"] if w["kind"] == "calibration"} == {"prefill", "reuse step"}


def test_calibration_refuses_another_model_and_bad_input(tmp_path, tiny_engine, tiny_engine_fp32, doc_text):
    publish(tmp_path, tiny_engine, doc_text)
    with pytest.raises(ModelMismatch, match="would time another model"):
        calibrate(tmp_path, engine=tiny_engine_fp32)
    with Ledger(ledger_path(tmp_path)) as led:
        assert led.computes() == []  # nothing logged
    with pytest.raises(UsageError, match="no kvswap home"):
        calibrate(tmp_path / "missing", engine=tiny_engine)
    with pytest.raises(UsageError, match="repeats"):
        calibrate(tmp_path, engine=tiny_engine, repeats=0)
    with pytest.raises(UsageError, match="tokens"):
        calibrate(tmp_path, engine=tiny_engine, tokens=-1)


def test_cli_report_calibrate_loads_the_model_logs_and_reports(tmp_path, tiny_engine, doc_text):
    cid, n_tokens = publish(tmp_path, tiny_engine, doc_text)
    consumer_generated(tmp_path, cid, tiny_engine)
    env = dict(os.environ, KVSWAP_HOME=str(tmp_path), MPLCONFIGDIR=str(tmp_path / "mpl"))
    proc = subprocess.run([sys.executable, "-m", "kvswap", "report", "--calibrate", "--json", "--artifact", cid],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "calibrating: 1 prefill(s)" in proc.stderr
    rep = json.loads(proc.stdout)
    c = rep["calibration"]
    assert (c["model"], c["dtype"], c["tokens"], c["artifact"]) == ("tiny-qwen3", "bf16", n_tokens, cid)
    assert rep["provenance"]["prefill"] == "calibration"
    assert rep["measured"]["prefill_s"] == pytest.approx(c["runs"][0]["prefill_s"])
    assert "reuse_ratio" not in rep["provenance"]["borrowed"]
