"""The report end to end: measured inputs from a real ledger, prices, pages and plots, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvswap.cid import Cid
from kvswap.errors import UsageError
from kvswap.ledger import Ledger, ledger_path
from kvswap.protocol.names import CHUNKS_PROTOCOL as PROTOCOL_CHUNKS
from kvswap.protocol.names import GENERATE_PROTOCOL as PROTOCOL_GENERATE
from kvswap.protocol.names import MANIFEST_PROTOCOL as PROTOCOL_MANIFEST
from kvswap.report import ReportOptions, make_report, resolve_prices
from kvswap.report.costmodel import BYTES_PER_GB
from kvswap.report.measured import measure
from kvswap.report.render import render_terminal

ART = str(Cid.of(b"the document's artifact"))
REPO = Path(__file__).resolve().parents[1]


def populate(home: Path) -> None:
    """A small, fully known history: 3 prefills, 2 loads, 4 generations, 2 fetches, 2 hosted generations."""
    with Ledger(ledger_path(home)) as led:
        for s in (2.0, 2.4, 1.6):
            led.compute(kind="prefill", seconds=s, tokens=100, model="tiny-qwen3", dtype="bf16", device="cpu", artifact=ART)
        for s in (0.1, 0.3):
            led.compute(kind="load", seconds=s, tokens=100, model="tiny-qwen3", dtype="bf16", device="cpu", artifact=ART)
        for s in (0.5, 0.7, 0.3):  # 10 new tokens each: 0.05, 0.07, 0.03 s/token
            led.compute(kind="generate", seconds=s, tokens=10, model="tiny-qwen3", dtype="bf16", device="cpu", artifact=ART)
        led.compute(kind="hosted_generate", seconds=1.0, tokens=20, model="tiny-qwen3", dtype="bf16", device="cpu",
                    artifact=ART)  # 0.05 s/token
        # fetch f1: we pulled the artifact from peerA; fetch f2: peerB pulled it from us
        for request, peer, direction in (("f1", "peerA", "in"), ("f2", "peerB", "out")):
            led.transfer(peer=peer, protocol=PROTOCOL_MANIFEST, direction=direction, wire_bytes=2000,
                         artifact=ART, request=request)
            for i in range(4):
                led.transfer(peer=peer, protocol=PROTOCOL_CHUNKS, direction=direction, wire_bytes=30_000,
                             raw_bytes=40_000, artifact=ART, chunk=str(Cid.of(b"chunk%d" % i)), request=request)
        # two hosted generations served to peerC: prompt suffix in, tokens out
        for request, n_in, n_out in (("g1", 300, 500), ("g2", 200, 600)):
            led.transfer(peer="peerC", protocol=PROTOCOL_GENERATE, direction="in", wire_bytes=n_in, artifact=ART,
                         request=request)
            led.transfer(peer="peerC", protocol=PROTOCOL_GENERATE, direction="out", wire_bytes=n_out, artifact=ART,
                         request=request)


def test_measure_derives_medians_ratio_sizes_and_bytes_per_request(tmp_path):
    populate(tmp_path)
    with Ledger(ledger_path(tmp_path)) as led:
        m = measure(led, home=tmp_path)
    assert m.artifact == ART and m.artifact_choice == "most measured"
    assert (m.prefill_events, m.load_events, m.generate_events) == (3, 2, 4)
    assert m.prefill_s == pytest.approx(2.0) and m.prefill_tokens == 100
    assert m.prefill_s_per_token == pytest.approx(0.02)
    assert m.load_s == pytest.approx(0.2)
    assert m.step_s == pytest.approx(0.05)
    assert m.reuse_ratio == pytest.approx(40.0)
    assert (m.raw_bytes, m.stored_bytes, m.size_source) == (160_000, 120_000, "chunk transfers")
    # this node fetched the artifact once and served it once: per-request figures describe its own fetch
    assert (m.ship.requests, m.ship.mean_wire_bytes, m.ship.total_wire_bytes) == (1, 122_000, 122_000)
    assert m.ship.egress_out_bytes == 122_000
    assert (m.host.requests, m.host.mean_wire_bytes, m.host.egress_out_bytes) == (2, 800, 1100)
    assert (m.model, m.dtype, m.device) == ("tiny-qwen3", "bf16", "cpu")


def test_rows_without_request_ids_group_by_fetch_and_by_row(tmp_path):
    with Ledger(ledger_path(tmp_path)) as led:
        for peer in ("a", "a", "b"):
            led.transfer(peer=peer, protocol=PROTOCOL_CHUNKS, direction="out", wire_bytes=10, artifact=ART)
        for _ in range(3):
            led.transfer(peer="c", protocol=PROTOCOL_GENERATE, direction="out", wire_bytes=7)
        m = measure(led)
    assert (m.ship.requests, sorted([m.ship.median_wire_bytes, m.ship.mean_wire_bytes])) == (2, [15, 15])
    assert (m.host.requests, m.host.mean_wire_bytes) == (3, 7)


def scenario(report: dict, key: str) -> dict:
    return next(r for r in report["scenarios"] if r["key"] == key)


def test_report_from_measured_ledger_priced_by_tokens(tmp_path):
    populate(tmp_path)
    rep = make_report(tmp_path, options=ReportOptions(readers=1000))
    ins = rep["inputs"]
    assert rep["ledger_empty"] is False
    assert ins["tokens"]["value"] == 100
    assert ins["c_prefill"]["value"] == pytest.approx(100 * 5 / 1e6)
    assert ins["reuse_ratio"]["value"] == pytest.approx(40.0)
    assert ins["c_load"]["value"] == pytest.approx(100 * 5 / 1e6 / 40)
    assert ins["stored_bytes"]["value"] == 120_000 and ins["raw_bytes"]["value"] == 160_000
    c_prefill, c_load = ins["c_prefill"]["value"], ins["c_load"]["value"]
    egress = 0.09 / BYTES_PER_GB
    codec = scenario(rep, "ship_codec")
    assert codec["per_reader"] == pytest.approx(c_load + egress * 120_000)
    assert codec["total"] == pytest.approx(codec["fixed"] + 1000 * codec["per_reader"])
    assert scenario(rep, "reprefill")["total"] == pytest.approx(1000 * c_prefill)
    # hosting is charged the measured generate traffic (mean 800 bytes per request) at the egress price
    assert ins["hosted_wire_bytes"]["value"] == 800
    assert scenario(rep, "hosted_physical")["per_reader"] == pytest.approx(c_load + egress * 800)
    assert scenario(rep, "hosted_tariff")["per_reader"] == pytest.approx(0.1 * c_prefill + egress * 800)
    assert rep["break_even"]["readers_paper_formula"] == pytest.approx(c_prefill / (c_prefill - c_load))
    assert rep["measured"]["ship_over_host_bytes"] == pytest.approx(122_000 / 800)
    text = render_terminal(rep)
    assert "ship with lossless codec (1.33x)" in text and "ledger: median prefill" in text


def test_report_priced_by_measured_time(tmp_path):
    populate(tmp_path)
    rep = make_report(tmp_path, options=ReportOptions(readers=10, basis="time"), price_overrides={"gpu_per_hour": 3.6})
    assert rep["inputs"]["c_prefill"]["value"] == pytest.approx(2.0 * 3.6 / 3600)
    assert rep["inputs"]["c_load"]["value"] == pytest.approx(0.05 * 3.6 / 3600)
    assert rep["inputs"]["gpu_per_hour"]["source"] == "flag"


def test_time_basis_needs_measurements(tmp_path):
    with pytest.raises(UsageError):
        make_report(tmp_path, options=ReportOptions(basis="time"))


def test_empty_home_gives_the_papers_example_and_creates_nothing(tmp_path):
    home = tmp_path / "fresh"
    rep = make_report(home)
    assert not home.exists()
    assert rep["ledger_empty"] is True
    assert any("ledger is empty" in n for n in rep["notes"])
    assert rep["inputs"]["tokens"]["value"] == 3774 and rep["readers"] == 80_000_000
    assert scenario(rep, "reprefill")["total"] == pytest.approx(1_509_600)
    assert scenario(rep, "hosted_tariff")["total"] == pytest.approx(150_960, rel=1e-3)
    assert scenario(rep, "hosted_physical")["total"] == pytest.approx(30_370, rel=1e-3)
    assert scenario(rep, "ship_raw")["total"] == pytest.approx(3.9e6, rel=0.05)
    assert scenario(rep, "ship_int8")["total"] == pytest.approx(2.0e6, rel=0.05)
    assert rep["break_even"]["ship_raw_beats_reprefill"] is False
    assert rep["break_even"]["cheapest"] == "hosted_physical"


def test_prices_from_config_then_flags(tmp_path):
    (tmp_path / "config.toml").write_text("[prices]\negress_per_gb = 0.05\ngpu_per_hour = 4\n")
    prices, sources = resolve_prices(tmp_path, {"gpu_per_hour": 2.0, "input_per_mtok": None})
    assert prices.egress_per_gb == 0.05 and sources["egress_per_gb"].startswith("config:")
    assert prices.gpu_per_hour == 2.0 and sources["gpu_per_hour"] == "flag"
    assert prices.input_per_mtok == 5.0 and sources["input_per_mtok"].startswith("default")
    assert prices.egress_per_byte == pytest.approx(0.05 / BYTES_PER_GB)


@pytest.mark.parametrize("text", ["[prices]\negres_per_gb = 1\n", "[prices]\negress_per_gb = -1\n",
                                  "[prices]\negress_per_gb = 'cheap'\n", "[prices\n", "prices = 3\n"])
def test_bad_price_config_is_a_usage_error(tmp_path, text):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(UsageError):
        resolve_prices(tmp_path)


def test_sizes_come_from_the_store_manifest_when_it_has_the_artifact(tmp_path):
    from kvswap.artifact.pipeline import publish_kv
    from kvswap.kvtensors import KvLayout, KvTensors
    from kvswap.store import Store

    rng = np.random.default_rng(0)
    lay = KvLayout(layers=2, kv_heads=2, head_dim=16, dtype="bf16")
    n = 128
    arrays = lambda: [rng.integers(0x3F00, 0x3F10, size=(2, n, 16)).astype("<u2") for _ in range(2)]  # noqa: E731
    kv = KvTensors(layout=lay, token_ids=list(range(n)), keys=arrays(), values=arrays())
    manifest, chunks = publish_kv(kv, model_id="test", model_fingerprint="ab" * 32, tokenizer_fingerprint="cd" * 32,
                                  document_hash="ef" * 32, codec="auto", block_tokens=64)
    with Store.for_home(tmp_path) as store:
        store.put_artifact(manifest, [], chunks)
    cid = str(manifest.cid)
    with Ledger(ledger_path(tmp_path)) as led:
        led.compute(kind="prefill", seconds=1.0, tokens=n, artifact=cid)
    rep = make_report(tmp_path, artifact=cid, options=ReportOptions(readers=100))
    m = rep["measured"]
    assert m["size_source"] == "store manifest"
    kv_chunks = manifest.chunks
    assert (m["raw_bytes"], m["stored_bytes"]) == (sum(c.raw_size for c in kv_chunks),
                                                   sum(c.stored_size for c in kv_chunks))
    assert m["stored_bytes"] < m["raw_bytes"]  # the codec paid on this low-entropy KV
    assert rep["inputs"]["stored_bytes"]["value"] == pytest.approx(m["stored_bytes"])
    assert rep["inputs"]["tokens"]["value"] == n


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVSWAP_HOME=str(home), MPLCONFIGDIR=str(home / "mpl"))
    return subprocess.run([sys.executable, "-m", "kvswap", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_cli_ledger_json_matches_the_rows(tmp_path):
    populate(tmp_path)
    proc = run_cli("ledger", "--json", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["transfers"]) == 14 and len(out["computes"]) == 9
    totals = {(t["protocol"], t["direction"]): t["wire_bytes"] for t in out["totals"]}
    assert totals[(PROTOCOL_CHUNKS, "in")] == 120_000 and totals[(PROTOCOL_GENERATE, "out")] == 1100
    assert sum(totals.values()) == sum(t["wire_bytes"] for t in out["transfers"])

    proc = run_cli("ledger", "--json", "--direction", "out", "--peer", "peerB", home=tmp_path)
    out = json.loads(proc.stdout)
    assert {t["peer"] for t in out["transfers"]} == {"peerB"} and out["computes"] == []
    proc = run_cli("ledger", "--json", "--kind", "generate", "--limit", "2", home=tmp_path)
    out = json.loads(proc.stdout)
    assert [c["seconds"] for c in out["computes"]] == [0.7, 0.3] and out["transfers"] == []
    proc = run_cli("ledger", "--since", "1h", home=tmp_path)
    assert proc.returncode == 0 and "Transfers (14)" in proc.stdout and "Compute events (9)" in proc.stdout
    proc = run_cli("ledger", "--since", "yesterday-ish", home=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --since")


def test_cli_report_json_and_pages(tmp_path):
    populate(tmp_path)
    out_dir = tmp_path / "out"
    proc = run_cli("report", "--json", "--readers", "1000", "--egress-per-gb", "0.02", "--out", str(out_dir),
                   home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    for name in ("report.md", "report.html", "report.json", "cost_vs_readers.png", "egress_per_request.png"):
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0
    assert (out_dir / "cost_vs_readers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["inputs"]["egress_per_gb"] == {"value": 0.02, "unit": "$/GB", "source": "flag"}
    assert rep["measured"]["prefill_s"] == pytest.approx(2.0)
    assert rep["measured"]["ship"]["mean_wire_bytes"] == 122_000
    raw = scenario(rep, "ship_raw")
    assert raw["per_reader"] == pytest.approx(rep["inputs"]["c_load"]["value"] + 0.02e-9 * 160_000)
    on_disk = json.loads((out_dir / "report.json").read_text())
    assert on_disk["scenarios"] == rep["scenarios"]
    md = (out_dir / "report.md").read_text()
    assert "| ship raw artifact |" in md and "![Total cost vs readers (log-log)](cost_vs_readers.png)" in md
    html = (out_dir / "report.html").read_text()
    assert "<img src='egress_per_request.png'" in html and "re-prefill every time" in html


def test_cli_report_text_on_empty_home_and_bad_flag(tmp_path):
    proc = run_cli("report", home=tmp_path / "none")
    assert proc.returncode == 0, proc.stderr
    assert "$1,509,600" in proc.stdout and "the ledger is empty" in proc.stdout
    proc = run_cli("report", "--readers", "-5", home=tmp_path / "none")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: report: readers")


def test_parse_since_forms():
    from kvswap.cli.report_cmds import parse_since

    assert parse_since("15m", now=10_000.0) == 10_000.0 - 900
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("1.5d", now=200_000.0) == 200_000.0 - 129_600
    assert parse_since("1763892000") == 1763892000.0
    assert parse_since("2026-11-23T10:00:00") == parse_since("2026-11-23T10:00:00+00:00") == 1795428000.0
    with pytest.raises(UsageError):
        parse_since("last tuesday")


def test_money_never_uses_exponents():
    from kvswap.report.render import money

    assert [money(v) for v in (1_509_600, 0.01887, 1.25e-5, 0.0, None)] == [
        "$1,509,600", "$0.01887", "$0.00001250", "$0", "-"]
