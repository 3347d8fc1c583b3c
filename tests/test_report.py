"""The report end to end: measured inputs from a real ledger, prices, pages and plots, and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import UsageError
from kvswap.ledger import Ledger, ledger_path
from kvswap.protocol.names import CHUNKS_PROTOCOL as PROTOCOL_CHUNKS
from kvswap.protocol.names import GENERATE_PROTOCOL as PROTOCOL_GENERATE
from kvswap.protocol.names import MANIFEST_PROTOCOL as PROTOCOL_MANIFEST
from kvswap.reporting import ReportOptions, make_report, resolve_prices
from kvswap.reporting.costmodel import BYTES_PER_GB
from kvswap.reporting.measured import measure
from kvswap.reporting.render import render_terminal

ART = str(Cid.of(b"the document's artifact"))
CHUNKS = [str(Cid.of(b"chunk%d" % i)) for i in range(4)]
REPO = Path(__file__).resolve().parents[1]


def populate(home: Path) -> None:
    """A small, fully known history, with the rows a real node writes (node/fetch.py, node/exchange.py):
    3 prefills, 2 loads, 3 generations and 1 hosted one; one fetch by this node; two peers fetching from it
    (one over three streams); one hosted generation it asked for and two it served."""
    with Ledger(ledger_path(home)) as led:
        for s in (2.0, 2.4, 1.6):
            led.compute(kind="prefill", seconds=s, tokens=100, model="tiny-qwen3", dtype="bf16", device="cpu", artifact=ART)
        for s in (0.1, 0.3):
            led.compute(kind="load", seconds=s, tokens=100, model="tiny-qwen3", dtype="bf16", device="cpu", artifact=ART)
        for s in (0.5, 0.7, 0.3):  # 10 new tokens each: 0.05, 0.07, 0.03 s/token
            led.compute(kind="generate", seconds=s, tokens=10, model="tiny-qwen3", dtype="bf16", device="cpu", artifact=ART)
        led.compute(kind="hosted_generate", seconds=1.0, tokens=20, model="tiny-qwen3", dtype="bf16", device="cpu",
                    artifact=ART)  # 0.05 s/token
        # f1: this node fetched ART from peerA; the manifest exchange is logged before the CID is known
        led.transfer(peer="peerA", protocol=PROTOCOL_MANIFEST, direction="out", wire_bytes=120, request="f1")
        led.transfer(peer="peerA", protocol=PROTOCOL_MANIFEST, direction="in", wire_bytes=2000, request="f1")
        for i in range(4):
            led.transfer(peer="peerA", protocol=PROTOCOL_CHUNKS, direction="out", wire_bytes=90, artifact=ART,
                         request="f1")
            led.transfer(peer="peerA", protocol=PROTOCOL_CHUNKS, direction="in", wire_bytes=30_000,
                         raw_bytes=40_000, artifact=ART, chunk=CHUNKS[i], request="f1")
        # peerB fetched ART from this node over three streams (manifest, two chunk batches), peerD over two;
        # a provider gives every served stream its own id and logs the request frame before parsing it
        for peer, batches in (("peerB", [[0, 1], [2, 3]]), ("peerD", [[0, 1, 2, 3]])):
            sid = f"{peer}-m"
            led.transfer(peer=peer, protocol=PROTOCOL_MANIFEST, direction="in", wire_bytes=120, request=sid)
            led.transfer(peer=peer, protocol=PROTOCOL_MANIFEST, direction="out", wire_bytes=2000, artifact=ART,
                         request=sid)
            for n, batch in enumerate(batches):
                sid = f"{peer}-c{n}"
                led.transfer(peer=peer, protocol=PROTOCOL_CHUNKS, direction="in", wire_bytes=90, request=sid)
                for i in batch:
                    led.transfer(peer=peer, protocol=PROTOCOL_CHUNKS, direction="out", wire_bytes=30_000,
                                 raw_bytes=40_000, artifact=ART, chunk=CHUNKS[i], request=sid)
        # hosted: this node asked peerC once (h1: prompt suffix out, tokens in); it served peerE twice
        led.transfer(peer="peerC", protocol=PROTOCOL_GENERATE, direction="out", wire_bytes=300, artifact=ART,
                     request="h1")
        led.transfer(peer="peerC", protocol=PROTOCOL_GENERATE, direction="in", wire_bytes=500, artifact=ART,
                     request="h1")
        for request, n_in, n_out in (("g1", 200, 600), ("g2", 100, 900)):
            led.transfer(peer="peerE", protocol=PROTOCOL_GENERATE, direction="in", wire_bytes=n_in, request=request)
            led.transfer(peer="peerE", protocol=PROTOCOL_GENERATE, direction="out", wire_bytes=n_out, artifact=ART,
                         request=request)


#: wire bytes of the fetch f1, of peerB's three streams and of peerD's two
F1_BYTES = 120 + 2000 + 4 * 90 + 4 * 30_000
PEER_B_BYTES = 120 + 2000 + 2 * 90 + 4 * 30_000
PEER_D_BYTES = 120 + 2000 + 90 + 4 * 30_000


def test_measure_derives_timings_ratio_sizes_and_bytes_per_reader(tmp_path):
    populate(tmp_path)
    with Ledger(ledger_path(tmp_path)) as led:
        m = measure(led, home=tmp_path)
    assert m.artifact == ART and m.artifact_choice == "most measured"
    assert (m.prefill_events, m.load_events, m.generate_events) == (3, 2, 4)
    assert (m.prefill_source, m.step_source) == ("ledger", "ledger")
    assert m.prefill_s == pytest.approx(2.0) and m.prefill_tokens == 100
    assert m.prefill_s_per_token == pytest.approx(0.02)
    assert m.load_s == pytest.approx(0.2)
    assert m.step_s == pytest.approx(0.05)
    assert m.reuse_ratio == pytest.approx(40.0)
    # every timing carries its spread and count
    t = m.timings["prefill_s"]
    assert (t.n, t.min, t.max, t.noisy) == (3, 1.6, 2.4, False) and t.spread == pytest.approx(1.5)
    assert m.timings["step_s"].n == 4 and m.timings["step_s"].q1 is not None
    assert (m.raw_bytes, m.stored_bytes, m.size_source) == (160_000, 120_000, "chunk transfers")
    # bytes per reader: this node's one fetch (one request id, manifest rows without the CID included) ...
    assert (m.ship.readers, m.ship.requests, m.ship.median_wire_bytes) == (1, 1, F1_BYTES)
    assert m.ship.egress_out_bytes == 120 + 4 * 90
    # ... and the two peers it served: peerB's three streams are one reader, not three
    assert (m.ship_served.readers, m.ship_served.requests) == (2, 5)
    assert (m.ship_served.min_wire_bytes, m.ship_served.max_wire_bytes) == (PEER_D_BYTES, PEER_B_BYTES)
    assert m.ship_served.median_wire_bytes == pytest.approx((PEER_B_BYTES + PEER_D_BYTES) / 2)
    assert m.ship_served.egress_out_bytes == 2 * 2000 + 8 * 30_000
    assert (m.host.readers, m.host.median_wire_bytes, m.host.egress_out_bytes) == (1, 800, 300)
    assert (m.host_served.readers, m.host_served.mean_wire_bytes, m.host_served.egress_out_bytes) == (2, 900, 1500)
    assert m.transfer_events == len(led_rows(tmp_path))
    assert (m.model, m.dtype, m.device) == ("tiny-qwen3", "bf16", "cpu")


def led_rows(home: Path) -> list:
    with Ledger(ledger_path(home)) as led:
        return led.transfers()


def test_a_served_peer_is_one_reader_per_artifact(tmp_path):
    """The provider's view of a real fetch: one stream per chunk batch, each its own request id."""
    other = str(Cid.of(b"another artifact"))
    with Ledger(ledger_path(tmp_path)) as led:
        for n in range(6):  # six chunk batches of ART to peerX: one reader
            led.transfer(peer="peerX", protocol=PROTOCOL_CHUNKS, direction="in", wire_bytes=90, request=f"x{n}")
            led.transfer(peer="peerX", protocol=PROTOCOL_CHUNKS, direction="out", wire_bytes=1000, artifact=ART,
                         request=f"x{n}")
        led.transfer(peer="peerX", protocol=PROTOCOL_CHUNKS, direction="in", wire_bytes=90, request="y")
        led.transfer(peer="peerX", protocol=PROTOCOL_CHUNKS, direction="out", wire_bytes=500, artifact=other,
                     request="y")
        every = measure(led)
        only_art = measure(led, artifact=ART)
    assert (every.ship_served.readers, every.ship_served.requests) == (2, 7)
    assert (only_art.ship_served.readers, only_art.ship_served.requests) == (1, 6)
    assert only_art.ship_served.median_wire_bytes == 6 * 1090
    assert only_art.ship.readers == 0 and only_art.transfer_events == 12


def test_rows_without_request_ids_are_one_reader_per_peer_and_artifact(tmp_path):
    with Ledger(ledger_path(tmp_path)) as led:
        for peer in ("a", "a", "b"):
            led.transfer(peer=peer, protocol=PROTOCOL_CHUNKS, direction="out", wire_bytes=10, artifact=ART)
        for _ in range(3):
            led.transfer(peer="c", protocol=PROTOCOL_GENERATE, direction="in", wire_bytes=7)
        m = measure(led)
    # more out than in: served; a's two rows are one reader
    assert (m.ship_served.readers, sorted([m.ship_served.min_wire_bytes, m.ship_served.max_wire_bytes])) == (2, [10, 20])
    assert m.ship.readers == 0
    assert (m.host.readers, m.host.mean_wire_bytes) == (1, 21)


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
    assert rep["measured"]["ship_over_host_bytes"] == pytest.approx(F1_BYTES / 800)
    assert rep["warnings"] == [] and rep["provenance"] == {
        "prefill": "ledger", "reuse_step": "ledger", "reuse_ratio": "ledger", "borrowed": []}
    assert {k: v["origin"] for k, v in ins.items() if k in ("tokens", "c_prefill", "reuse_ratio", "raw_bytes")} == {
        "tokens": "ledger", "c_prefill": "derived", "reuse_ratio": "ledger", "raw_bytes": "ledger"}
    text = render_terminal(rep)
    assert "ship with lossless codec (1.33x)" in text and "ledger: median prefill" in text
    assert "WARNING" not in text and "PAPER" not in text


def test_report_priced_by_measured_time(tmp_path):
    populate(tmp_path)
    rep = make_report(tmp_path, options=ReportOptions(readers=10, basis="time"), price_overrides={"gpu_per_hour": 3.6})
    assert rep["inputs"]["c_prefill"]["value"] == pytest.approx(2.0 * 3.6 / 3600)
    assert rep["inputs"]["c_load"]["value"] == pytest.approx(0.05 * 3.6 / 3600)
    assert rep["inputs"]["gpu_per_hour"]["source"] == "flag"


def test_time_basis_needs_a_prefill_timing_and_says_how_to_get_one(tmp_path):
    with pytest.raises(UsageError, match=r"no prefill .*--calibrate"):
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
    # ... and every input it borrowed from the paper is a warning saying why
    borrowed = {w["input"]: w["message"] for w in rep["warnings"] if w["kind"] == "borrowed"}
    assert set(borrowed) == set(rep["provenance"]["borrowed"]) == {
        "readers", "tokens", "reuse_ratio", "raw_bytes", "hosted_wire_bytes"}
    assert all(w["level"] == "warning" for w in rep["warnings"])
    assert "no prefill or reuse-step timing" in borrowed["reuse_ratio"] and "--calibrate" in borrowed["reuse_ratio"]
    assert rep["inputs"]["c_load"]["origin"] == "paper" and rep["break_even"]["n_star_borrowed"] is True
    text = render_terminal(rep)
    assert text.index("WARNING: reuse_ratio = 49.7 is borrowed from the paper") < text.index("Inputs")


def consumer_ledger(home: Path, step_seconds: tuple[float, ...] = (0.66,)) -> None:
    """What a consumer's ledger holds after fetching ART and generating from it: loads and generations,
    no prefill (the demo's node B)."""
    with Ledger(ledger_path(home)) as led:
        for s in step_seconds:
            led.compute(kind="load", seconds=0.003, tokens=660, model="tiny-qwen3", dtype="bf16", device="cpu",
                        artifact=ART)
            led.compute(kind="generate", seconds=s, tokens=24, model="tiny-qwen3", dtype="bf16", device="cpu",
                        artifact=ART)


def test_a_consumer_without_prefill_events_is_told_loudly_and_where_its_tokens_came_from(tmp_path):
    consumer_ledger(tmp_path)
    rep = make_report(tmp_path, artifact=ART)
    assert rep["provenance"] == {"prefill": None, "reuse_step": "ledger", "reuse_ratio": None,
                                 "borrowed": ["hosted_wire_bytes", "raw_bytes", "readers", "reuse_ratio"]}
    ratio = next(w for w in rep["warnings"] if w.get("input") == "reuse_ratio")
    assert ratio["level"] == "warning"
    assert f'no prefill timing (this node\'s ledger has no \'prefill\' events for artifact {ART})' in ratio["message"]
    assert "kvswap report --calibrate" in ratio["message"]
    # the token count is the load events', and says so (not "median prefill tokens (0 events)")
    assert rep["inputs"]["tokens"]["value"] == 660
    assert rep["inputs"]["tokens"]["source"] == "ledger: median tokens of load events (1 events)"
    single = [w for w in rep["warnings"] if w["kind"] == "single"]
    assert [w["timing"] for w in single] == ["step_s"] and single[0]["level"] == "info"
    text = render_terminal(rep)
    assert "PAPER (borrowed)" in text and "NOTE: reuse step timed once" in text


def calibration_event(led: Ledger, kind: str, seconds: float, tokens: int) -> int:
    return led.compute(kind=kind, seconds=seconds, tokens=tokens, model="tiny-qwen3", dtype="bf16", device="cpu",
                       artifact=ART, extra={"calibration": True})


def test_a_calibration_stands_in_only_where_real_work_is_missing_and_says_so(tmp_path):
    consumer_ledger(tmp_path)
    with Ledger(ledger_path(tmp_path)) as led:
        calibration_event(led, "prefill", 0.9, 660)
    # a calibrated prefill and a real decode timed at another moment: used, but called mixed
    rep = make_report(tmp_path, artifact=ART)
    m = rep["measured"]
    assert (m["prefill_source"], m["step_source"], m["ratio_source"]) == ("calibration", "ledger", "mixed")
    assert rep["inputs"]["reuse_ratio"]["value"] == pytest.approx(0.9 / (0.66 / 24))
    assert rep["inputs"]["reuse_ratio"]["origin"] == "calibration"
    assert any("timed at different moments" in n for n in rep["notes"])

    with Ledger(ledger_path(tmp_path)) as led:
        calibration_event(led, "generate", 0.001, 1)  # the calibration's own reuse step
    rep = make_report(tmp_path, artifact=ART)
    m = rep["measured"]
    assert (m["prefill_source"], m["step_source"], m["calibration_events"]) == ("calibration", "ledger", 2)
    # the real decode timing is what the report shows as the reuse step ...
    assert m["prefill_s"] == pytest.approx(0.9) and m["step_s"] == pytest.approx(0.66 / 24)
    # ... but the ratio pairs the timings taken together
    assert m["ratio_source"] == "calibration" and m["timings"]["ratio_step_s"]["median"] == pytest.approx(0.001)
    assert "ratio_prefill_s" not in m["timings"]  # the same rows as the prefill shown: not repeated
    ratio = rep["inputs"]["reuse_ratio"]
    assert ratio["origin"] == "calibration" and ratio["value"] == pytest.approx(900)
    assert ratio["source"] == ("calibration: median prefill 0.9 s / median reuse step 0.001 s "
                               "(timed together by a calibration)")
    assert "reuse_ratio" not in rep["provenance"]["borrowed"]
    notes = [w for w in rep["warnings"] if w["kind"] == "calibration"]
    assert [w["timing"] for w in notes] == ["prefill", "reuse ratio"] and all(w["level"] == "info" for w in notes)
    assert "is a calibration" in notes[0]["message"]
    text = render_terminal(rep)
    assert "900 (calibration)" in text and "reuse ratio's step" in text
    # priced by time, C_prefill and C_load are the same pair, each at the GPU price
    rep = make_report(tmp_path, artifact=ART, options=ReportOptions(basis="time"))
    assert rep["inputs"]["c_prefill"]["value"] == pytest.approx(0.9 * 2.99 / 3600)
    assert rep["inputs"]["c_load"]["value"] == pytest.approx(0.001 * 2.99 / 3600)
    assert rep["inputs"]["c_prefill"]["origin"] == rep["inputs"]["c_load"]["origin"] == "calibration"

    # a prefill of real work, once there is one, replaces the calibration
    with Ledger(ledger_path(tmp_path)) as led:
        led.compute(kind="prefill", seconds=2.0, tokens=660, model="tiny-qwen3", dtype="bf16", device="cpu",
                    artifact=ART)
    rep = make_report(tmp_path, artifact=ART)
    m = rep["measured"]
    assert (m["prefill_source"], m["prefill_s"], m["ratio_source"]) == ("ledger", 2.0, "ledger")
    assert m["reuse_ratio"] == pytest.approx(2.0 / (0.66 / 24))
    assert not [w for w in rep["warnings"] if w["kind"] == "calibration"]


def test_a_noisy_timing_is_reported_with_its_spread_and_the_outlier_named(tmp_path):
    # the case: one 0.79 s/token decode next to 0.037 s/token repeats of the same generation
    consumer_ledger(tmp_path, step_seconds=(0.037 * 24, 0.79 * 24, 0.040 * 24))
    with Ledger(ledger_path(tmp_path)) as led:
        slow_id = next(c.id for c in led.computes(kind="generate") if c.seconds == pytest.approx(0.79 * 24))
    rep = make_report(tmp_path, artifact=ART, options=ReportOptions(readers=10))
    step = rep["measured"]["timings"]["step_s"]
    assert (step["n"], step["noisy"]) == (3, True)
    assert (step["min"], step["median"], step["max"]) == pytest.approx((0.037, 0.040, 0.79))
    assert step["outlier"]["event"] == slow_id and step["outlier"]["ratio"] == pytest.approx(0.79 / 0.0385)
    spread = [w for w in rep["warnings"] if w["kind"] == "spread"]
    assert len(spread) == 1 and spread[0]["level"] == "warning" and spread[0]["timing"] == "step_s"
    assert f"outlier: ledger compute event #{slow_id}" in spread[0]["message"]
    assert "20.5x slower than the median of the others" in spread[0]["message"]
    text = render_terminal(rep)
    assert "WARNING: reuse step (decode s/token) is noisy: 3 events range 0.037-0.79 s" in text
    assert "median 0.04 s/token (min 0.037, max 0.79; 3 events) NOISY" in text


def test_one_break_even_reader_count_the_papers_n_star(tmp_path):
    populate(tmp_path)
    rep = make_report(tmp_path, options=ReportOptions(readers=1000))
    c_prefill, c_load = rep["inputs"]["c_prefill"]["value"], rep["inputs"]["c_load"]["value"]
    assert rep["break_even"]["n_star"] == pytest.approx(c_prefill / (c_prefill - c_load))
    # no scenario carries a reader count of its own, so no page can show a second "break-even N"
    assert all(set(r) & {"break_even_readers", "break_even_n"} == set() for r in rep["scenarios"])
    text = render_terminal(rep)
    assert text.count("N* =") == 1 and "break-even N " not in text.replace("Break-even readers N*", "")
    assert f"N* = C_prefill / (C_prefill - C_load) = {rep['break_even']['n_star']:.4g}" in text
    # N* never breaks even when a reuse call costs as much as a prefill
    rep = make_report(tmp_path, options=ReportOptions(readers=10, prefill_cost=1.0, load_cost=1.0))
    assert rep["break_even"]["n_star"] is None and "N* = C_prefill / (C_prefill - C_load) = never" in \
        render_terminal(rep)


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
    from kvswap.home import Home

    rng = np.random.default_rng(0)
    lay = KvLayout(layers=2, kv_heads=2, head_dim=16, dtype="bf16")
    n = 128
    arrays = lambda: [rng.integers(0x3F00, 0x3F10, size=(2, n, 16)).astype("<u2") for _ in range(2)]  # noqa: E731
    kv = KvTensors(layout=lay, token_ids=list(range(n)), keys=arrays(), values=arrays())
    manifest, chunks = publish_kv(kv, model_id="test", model_fingerprint="ab" * 32, tokenizer_fingerprint="cd" * 32,
                                  document_hash="ef" * 32, codec="auto", block_tokens=64)
    with Home(tmp_path) as _home:
        store = _home.store
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
    assert len(out["transfers"]) == 31 and len(out["computes"]) == 9
    totals = {(t["protocol"], t["direction"]): t["wire_bytes"] for t in out["totals"]}
    assert totals[(PROTOCOL_CHUNKS, "in")] == 4 * 30_000 + 3 * 90 and totals[(PROTOCOL_GENERATE, "out")] == 1800
    assert sum(totals.values()) == sum(t["wire_bytes"] for t in out["transfers"])

    proc = run_cli("ledger", "--json", "--direction", "out", "--peer", "peerB", home=tmp_path)
    out = json.loads(proc.stdout)
    assert {t["peer"] for t in out["transfers"]} == {"peerB"} and out["computes"] == []
    proc = run_cli("ledger", "--json", "--kind", "generate", "--limit", "2", home=tmp_path)
    out = json.loads(proc.stdout)
    assert [c["seconds"] for c in out["computes"]] == [0.7, 0.3] and out["transfers"] == []
    proc = run_cli("ledger", "--since", "1h", home=tmp_path)
    assert proc.returncode == 0 and "Transfers (31)" in proc.stdout and "Compute events (9)" in proc.stdout
    with Ledger(ledger_path(tmp_path)) as led:
        calibration_event(led, "prefill", 0.9, 660)
    proc = run_cli("ledger", "--kind", "prefill", home=tmp_path)
    assert proc.stdout.count("prefill (calibration)") == 1 and "Compute events (4)" in proc.stdout
    proc = run_cli("ledger", "--since", "yesterday-ish", home=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --since")


def test_cli_report_json_and_pages(tmp_path):
    populate(tmp_path)
    out_dir = tmp_path / "out"
    proc = run_cli("report", "--json", "--readers", "1000", "--egress-per-gb", "0.02", "--out", str(out_dir),
                   home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    for name in ("report.md", "report.html", "report.json", "cost_vs_readers.png", "bytes_per_reader.png"):
        assert (out_dir / name).is_file() and (out_dir / name).stat().st_size > 0
    assert (out_dir / "cost_vs_readers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["inputs"]["egress_per_gb"] == {"value": 0.02, "unit": "$/GB", "source": "flag", "origin": "flag"}
    assert rep["measured"]["prefill_s"] == pytest.approx(2.0)
    assert rep["measured"]["timings"]["prefill_s"]["n"] == 3
    assert rep["measured"]["ship"]["mean_wire_bytes"] == F1_BYTES
    raw = scenario(rep, "ship_raw")
    assert raw["per_reader"] == pytest.approx(rep["inputs"]["c_load"]["value"] + 0.02e-9 * 160_000)
    on_disk = json.loads((out_dir / "report.json").read_text())
    assert on_disk["scenarios"] == rep["scenarios"]
    md = (out_dir / "report.md").read_text()
    assert "| ship raw artifact |" in md and "![Total cost vs readers (log-log)](cost_vs_readers.png)" in md
    assert "reader, ship (manifest + chunks), served by this node: one (peer, artifact) pair" in md
    html = (out_dir / "report.html").read_text()
    assert "<img src='bytes_per_reader.png'" in html and "re-prefill every time" in html
    assert "Warnings" not in md and "class='warn'" not in html  # nothing borrowed, nothing noisy


def test_cli_pages_carry_the_warnings(tmp_path):
    consumer_ledger(tmp_path)
    out_dir = tmp_path / "out"
    proc = run_cli("report", "--artifact", ART, "--out", str(out_dir), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: reuse_ratio = 49.7 is borrowed from the paper" in proc.stdout
    md = (out_dir / "report.md").read_text()
    assert md.index("## Warnings") < md.index("## Result")
    assert "**WARNING: reuse_ratio = 49.7 is borrowed from the paper" in md
    html = (out_dir / "report.html").read_text()
    assert "<ul class='warn'><li>WARNING: readers = 80,000,000 is borrowed" in html.replace("\n", "")
    on_disk = json.loads((out_dir / "report.json").read_text())
    assert "reuse_ratio" in on_disk["provenance"]["borrowed"]


def test_cli_report_text_on_empty_home_and_bad_flag(tmp_path):
    proc = run_cli("report", home=tmp_path / "none")
    assert proc.returncode == 0, proc.stderr
    assert "$1,509,600" in proc.stdout and "the ledger is empty" in proc.stdout
    proc = run_cli("report", "--readers", "-5", home=tmp_path / "none")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: report: readers")
    proc = run_cli("report", "--model", "tiny-qwen3", home=tmp_path / "none")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: report: --model and --repeats belong to --calibrate"
    assert not (tmp_path / "none").exists()


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
    from kvswap.reporting.render import money

    assert [money(v) for v in (1_509_600, 0.01887, 1.25e-5, 0.0, None)] == [
        "$1,509,600", "$0.01887", "$0.00001250", "$0", "-"]


def test_timing_summary_counts_quartiles_and_names_the_slower_of_two():
    from kvswap.reporting.stats import Sample, describe, spread_warning, summarize

    assert summarize([]) is None
    one = summarize([Sample(2.0, event=7)])
    assert (one.n, one.median, one.spread, one.noisy, one.outlier) == (1, 2.0, None, False, None)
    assert describe(one.to_dict()) == "2 s (1 event: no spread)"
    five = summarize(Sample(v) for v in (5.0, 1.0, 3.0, 2.0, 4.0))
    assert (five.median, five.min, five.max, five.q1, five.q3) == (3.0, 1.0, 5.0, 2.0, 4.0)
    assert five.noisy is True and five.spread == 5.0 and five.outlier.value == 1.0  # 3.5x below the others
    five = summarize([Sample(v) for v in (5.0, 1.0, 3.0, 2.0, 4.0)], warn_ratio=6.0)
    assert five.noisy is False
    # with two samples the median is their midpoint; the warning names the slower one, 21x the other
    two = summarize([Sample(0.79, event=3, at=0.0), Sample(0.037, event=4, at=1.0)])
    assert two.noisy and two.outlier.event == 3 and two.outlier.ratio == pytest.approx(0.79 / 0.037)
    assert "21.4x slower than the other sample (0.037 s)" in spread_warning("step", two)
    # a zero among positive timings is an unbounded spread: noisy, the ratio written as null
    zero = summarize([Sample(0.0), Sample(0.5)])
    assert zero.noisy and zero.spread is None and zero.to_dict()["outlier"]["ratio"] is None
    assert summarize([Sample(0.0), Sample(0.0)]).noisy is False
