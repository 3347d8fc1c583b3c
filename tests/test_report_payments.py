"""The report's payments section from a real home: a payment book of real signed terms and vouchers
(kvswap/payments/), a real ledger, and `kvswap report --json` in a fresh interpreter. Every number is checked
against the same inputs computed by hand (docs/report.md "Payments")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvswap.artifact.signing import NodeKey
from kvswap.ledger import Ledger, ledger_path
from kvswap.payments.book import PaymentBook
from kvswap.payments.rules import BYTES_PER_MB, next_totals
from kvswap.payments.terms import sign_terms
from kvswap.payments.vouchers import sign_voucher
from kvswap.protocol.cid import Cid
from kvswap.reporting import make_report
from kvswap.reporting.render import render_markdown, render_terminal

REPO = Path(__file__).resolve().parents[1]
ART1 = Cid.of(b"artifact one: prefilled here once, then bought")
ART2 = Cid.of(b"artifact two: loaded here, bought in part hosted")
ART3 = Cid.of(b"artifact three: unknown here but for its bytes")
GPU_PER_HOUR = 2.99  # the report's default
EGRESS_PER_GB = 0.09  # the report's default
INPUT_PER_MTOK = 5.0  # the report's default
#: ART1's size as a publish event's extra records it: 100 tokens, 400,000 raw bytes, 300,000 stored
TOKENS, RAW, STORED = 100, 400_000, 300_000


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, KVSWAP_HOME=str(home), MPLCONFIGDIR=str(home.parent / "mpl"))
    return subprocess.run([sys.executable, "-m", "kvswap", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def terms_of(key: NodeKey, mb: int, token: int, unit: str = "micro-usd"):
    return sign_terms(key, unit=unit, price_per_mb=mb, price_per_token=token, credit_bytes=1 << 20,
                      credit_tokens=64, issued=1_700_000_000)


def pay(book: PaymentBook, terms, consumer: NodeKey, artifact: Cid, steps: list[tuple[int, int]]):
    """A consumer's series of cumulative vouchers for `steps` of (bytes, tokens), each accepted by `book`."""
    book.add_terms(terms)
    held = None
    for add_bytes, add_tokens in steps:
        seq, amount, nbytes, tokens = next_totals(terms, held, add_bytes, add_tokens)
        held = sign_voucher(consumer, provider=terms.provider, artifact=artifact, terms=terms.digest,
                            sequence=seq, amount=amount, nbytes=nbytes, tokens=tokens)
        assert book.accept(held, terms)
    return held


def priced_home(home: Path) -> dict:
    """A node that bought ART1 from two providers (a swarm: one artifact), ART2 hosted and shipped, ART3
    shipped, and sold ART1 to a fourth node; its ledger holds three real prefills of ART1 and two loads of
    ART2. Returns the keys and the latest vouchers."""
    me = NodeKey.load_or_create(home / "identity.key")
    p1, p2, buyer = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    with Ledger(ledger_path(home)) as led:
        for s in (2.0, 2.4, 1.6):
            led.compute(kind="prefill", seconds=s, tokens=TOKENS, model="tiny-qwen3", dtype="bf16", device="cpu",
                        artifact=str(ART1), extra={"raw_bytes": RAW, "stored_bytes": STORED})
        for s in (0.1, 0.2):
            led.compute(kind="load", seconds=s, tokens=250, model="tiny-qwen3", dtype="bf16", device="cpu",
                        artifact=str(ART2))
    book = PaymentBook.for_home(home, me.public_bytes)
    t1, t2, mine = terms_of(p1, 7000, 3), terms_of(p2, 9000, 5), terms_of(me, 5000, 2)
    out = {
        "me": me, "buyer": buyer, "t1": t1, "t2": t2, "mine": mine,
        "owed": [pay(book, t1, me, ART1, [(100_000, 0), (50_000, 0)]),       # ART1, half from p1
                 pay(book, t2, me, ART1, [(150_000, 0)]),                     # the other half from p2
                 pay(book, t2, me, ART2, [(0, 16), (0, 24)]),                 # ART2 hosted: 40 tokens
                 pay(book, t1, me, ART3, [(123_456, 0)])],                    # ART3: only its bytes known
        "earned": [pay(book, mine, buyer, ART1, [(200_000, 0), (100_000, 0)])],
    }
    book.delivered(buyer.public_bytes, ART1, 320_000)  # 20,000 bytes sent beyond what was paid
    book.close()
    return out


def test_report_json_prices_the_vouchers_against_measured_prefill_and_egress(tmp_path):
    home = tmp_path / "node"
    made = priced_home(home)
    proc = run_cli("report", "--json", "--artifact", str(ART1), "--home", str(home), home=home)
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)["payments"]
    assert p["present"] and p["vouchers"] == 5 and p["me"] == made["me"].public_hex

    # this node's prefill cost per token: the median measured prefill (2.0 s of 100 tokens) at $2.99/GPU-hour
    c_token = 2.0 * GPU_PER_HOUR / 3600 / TOKENS
    assert p["prefill_per_token"]["value"] == pytest.approx(c_token)
    assert p["prefill_per_token"]["origin"] == "ledger"
    bpt = STORED / TOKENS  # 3000 stored bytes per token
    assert p["bytes_per_token"]["value"] == pytest.approx(bpt)

    # break-even: the artifact's prefill cost / its stored MB, in micro-usd/MB; and per token
    be_mb = (c_token * TOKENS) / (STORED / 1e6) * 1e6
    assert p["break_even"]["per_mb"]["value"] == pytest.approx(be_mb)
    assert p["break_even"]["per_mb"]["unit"] == "micro-usd/MB"
    assert p["break_even"]["per_token"]["value"] == pytest.approx(c_token * 1e6)
    assert p["break_even"]["prefill_cost"]["value"] == pytest.approx(c_token * TOKENS)

    # the paper's 0.1x cache-read tariff on the same scale
    tariff_token = 0.1 * INPUT_PER_MTOK  # micro-usd per token: 0.1 x $5/M
    assert p["tariff"]["per_token"]["value"] == pytest.approx(tariff_token)
    assert p["tariff"]["per_mb"]["value"] == pytest.approx(tariff_token * 1e6 / bpt)
    assert p["tariff"]["vs_break_even"] == pytest.approx(tariff_token * 1e6 / bpt / be_mb)
    assert p["egress_per_mb"]["value"] == pytest.approx(EGRESS_PER_GB / 1e9 * 1e6 * 1e6)

    # consumer: what it paid, by hand from the terms, against the prefills it saved
    paid = (150_000 * 7000 // BYTES_PER_MB + 150_000 * 9000 // BYTES_PER_MB + 40 * 5
            + 123_456 * 7000 // BYTES_PER_MB)
    assert paid == sum(v.amount for v in made["owed"])
    c = p["consumer"]
    assert c["series"] == 4 and c["artifacts"] == 3
    assert c["paid"]["micro-usd"]["value"] == paid and c["paid"]["micro-usd"]["origin"] == "book"
    assert c["paid_usd"]["value"] == pytest.approx(paid * 1e-6)
    assert c["bytes"] == 150_000 + 150_000 + 123_456 and c["tokens"] == 40
    tokens = {r["artifact"]: r["tokens"] for r in c["saved_artifacts"]}
    assert tokens[str(ART1)]["value"] == TOKENS and tokens[str(ART1)]["origin"] == "ledger"
    assert tokens[str(ART2)]["value"] == 250 and tokens[str(ART2)]["origin"] == "ledger"
    assert tokens[str(ART3)]["value"] == round(123_456 / bpt) and tokens[str(ART3)]["origin"] == "derived"
    saved = (TOKENS + 250 + round(123_456 / bpt)) * c_token  # ART1 once, though bought from two providers
    assert c["saved"]["value"] == pytest.approx(saved)
    assert c["net_usd"] == pytest.approx(saved - paid * 1e-6)
    assert c["saved_over_paid"] == pytest.approx(saved / (paid * 1e-6))

    # provider: revenue against the egress of the bytes it sold
    s = p["provider"]
    earned = 300_000 * 5000 // BYTES_PER_MB
    assert s["revenue"]["micro-usd"]["value"] == earned == made["earned"][0].amount
    assert s["revenue_usd"]["value"] == pytest.approx(earned * 1e-6)
    assert s["bytes_sold"] == 300_000 and s["bytes_delivered"]["value"] == 320_000
    egress = 300_000 * EGRESS_PER_GB / 1e9
    assert s["egress"]["value"] == pytest.approx(egress) and s["egress"]["origin"] == "default"
    assert s["net_usd"] == pytest.approx(earned * 1e-6 - egress)
    assert s["revenue_over_egress"] == pytest.approx(earned * 1e-6 / egress)

    # every price met, on the scale
    prices = {(t["role"], t["provider"]): t for t in p["prices"]}
    met = prices[("owed", made["t2"].provider.hex())]
    assert met["price_per_mb"] == 9000 and met["price_per_mb_vs_break_even"] == pytest.approx(9000 / be_mb)
    assert met["price_per_mb_vs_tariff"] == pytest.approx(9000 / (tariff_token * 1e6 / bpt))
    assert prices[("earned", made["me"].public_hex)]["price_per_mb"] == 5000
    assert not p["notes"][1:] and "estimated from the bytes bought" in p["notes"][0]  # ART3 only

    # every figure says where it came from
    figures = [p["prefill_per_token"], p["bytes_per_token"], *p["break_even"].values(), p["egress_per_mb"],
               p["tariff"]["per_mb"], p["tariff"]["per_token"], c["saved"], c["paid_usd"], s["egress"]]
    assert all(set(f) == {"value", "unit", "source", "origin"} and f["source"] for f in figures)

    text = run_cli("report", "--artifact", str(ART1), "--home", str(home), home=home)
    assert text.returncode == 0, text.stderr
    assert "Payments (buying KV" in text.stdout and "break-even price per MB" in text.stdout
    assert f"{paid:,} micro-usd" in text.stdout and "revenue - egress" in text.stdout


def test_a_home_without_a_payment_book_reports_and_creates_none(tmp_path):
    home = tmp_path / "node"
    with Ledger(ledger_path(home)) as led:
        led.compute(kind="prefill", seconds=1.0, tokens=50, model="tiny-qwen3", dtype="bf16", device="cpu",
                    artifact=str(ART1))
    before = sorted(p.name for p in home.iterdir())
    proc = run_cli("report", "--json", "--home", str(home), home=home)
    assert proc.returncode == 0, proc.stderr
    p = json.loads(proc.stdout)["payments"]
    assert p["present"] is False and p["vouchers"] == 0 and "no payment book" in p["message"]
    proc = run_cli("report", "--home", str(home), home=home)
    assert proc.returncode == 0 and "Payments: none (no payment book" in proc.stdout
    assert not (home / "payments.sqlite").exists() and not (home / "identity.key").exists()
    assert sorted(p.name for p in home.iterdir()) == before
    proc = run_cli("report", "--json", home=tmp_path / "none")  # no home at all
    assert proc.returncode == 0 and json.loads(proc.stdout)["payments"]["present"] is False
    assert not (tmp_path / "none").exists()


def test_an_empty_book_says_it_holds_no_vouchers(tmp_path):
    me = NodeKey.load_or_create(tmp_path / "identity.key")
    PaymentBook.for_home(tmp_path, me.public_bytes).close()
    p = make_report(tmp_path)["payments"]
    assert p["present"] is False and "no vouchers" in p["message"]


def test_other_units_are_not_converted_and_an_unmeasured_prefill_is_warned(tmp_path):
    """A consumer that never prefilled: saved compute rests on the input-token price, loudly; a unit other than
    micro-usd is shown as it is and never compared with dollars."""
    me = NodeKey.load_or_create(tmp_path / "identity.key")
    p1 = NodeKey.generate()
    book = PaymentBook.for_home(tmp_path, me.public_bytes)
    credits = terms_of(p1, 40, 0, unit="credits")
    v = pay(book, credits, me, ART1, [(250_000, 0)])
    book.close()
    rep = make_report(tmp_path, artifact=str(ART1))
    p = rep["payments"]
    c = p["consumer"]
    assert c["paid"]["credits"]["value"] == v.amount == 250_000 * 40 // BYTES_PER_MB
    assert c["paid_usd"]["value"] == 0 and c["unconverted_units"] == ["credits"]
    assert c["net_usd"] is None and c["saved_over_paid"] is None
    assert any("credits are shown as they are, not converted" in n for n in p["notes"])
    assert "price_per_mb_vs_break_even" not in p["prices"][0]
    # no prefill here: C_prefill / tokens at the input price (3774 paper tokens: nothing else to count)
    tokens = rep["inputs"]["tokens"]["value"]
    assert p["prefill_per_token"]["value"] == pytest.approx(rep["inputs"]["c_prefill"]["value"] / tokens)
    assert p["prefill_per_token"]["value"] == pytest.approx(INPUT_PER_MTOK / 1e6)
    assert any(w["kind"] == "payments" and "not on a prefill timed on this node" in w["message"]
               for w in rep["warnings"])
    # with the input price as the prefill cost, the break-even per token is the input price and the tariff 0.1x
    assert p["tariff"]["vs_break_even"] == pytest.approx(0.1)
    assert "WARNING: payments:" in render_terminal(rep) and "## Payments" in render_markdown(rep)
