"""The payment format and rules alone (kvswap/payments/): terms, vouchers, their signing domains, which voucher
counts, a consumer's purse, the book in a real SQLite file, and statements checked offline. No network: the
daemons are tests/test_payments_nodes.py."""

from __future__ import annotations

import json

import pytest

from kvswap.artifact.attestation import signed_message as attestation_message
from kvswap.artifact.signing import NodeKey, signed_message as manifest_message
from kvswap.payments import terms as terms_mod
from kvswap.payments import vouchers as vouchers_mod
from kvswap.payments.book import PaymentBook
from kvswap.payments.limits import VOUCHER_BYTES
from kvswap.payments.rules import BYTES_PER_MB, Purse, accept, amount_for, next_totals
from kvswap.payments.statement import build_statement, verify_statement
from kvswap.payments.terms import decode_terms, sign_terms
from kvswap.payments.vouchers import Voucher, decode_voucher, sign_voucher
from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import FormatError, IntegrityError, OverBudget, PaymentRequired

ART = Cid.of(b"an artifact's manifest")


@pytest.fixture
def keys():
    return NodeKey.generate(), NodeKey.generate()  # provider, consumer


def _terms(provider, mb=7000, token=3):
    return sign_terms(provider, unit="micro-usd", price_per_mb=mb, price_per_token=token, credit_bytes=40_000,
                      credit_tokens=8, issued=1_700_000_000)


def _series(terms, consumer, steps):
    """Vouchers a consumer signs for `steps` of (bytes, tokens) verified, each after the one before."""
    out, held = [], None
    for add_bytes, add_tokens in steps:
        seq, amount, nbytes, tokens = next_totals(terms, held, add_bytes, add_tokens)
        held = sign_voucher(consumer, provider=terms.provider, artifact=ART, terms=terms.digest, sequence=seq,
                            amount=amount, nbytes=nbytes, tokens=tokens)
        out.append(held)
    return out


def test_terms_round_trip_and_any_changed_byte_fails(keys):
    provider, _ = keys
    t = _terms(provider)
    blob = t.encode()
    assert decode_terms(blob) == t and len(blob) <= terms_mod.MAX_TERMS_BYTES
    for i in range(len(blob)):
        changed = bytearray(blob)
        changed[i] ^= 0x01
        with pytest.raises((FormatError, IntegrityError)):
            decode_terms(bytes(changed))


def test_voucher_is_228_bytes_and_round_trips(keys):
    provider, consumer = keys
    v = _series(_terms(provider), consumer, [(16_000, 0)])[0]
    blob = v.encode()
    assert len(blob) == VOUCHER_BYTES and decode_voucher(blob) == v
    with pytest.raises(FormatError):
        decode_voucher(blob[:-1])


def test_amounts_are_the_cumulative_bytes_times_the_price_with_no_rounding_drift(keys):
    provider, consumer = keys
    t = _terms(provider, mb=7, token=3)
    series = _series(t, consumer, [(333_333, 0)] * 9 + [(0, 5)])
    last = series[-1]
    assert last.bytes == 9 * 333_333 and last.tokens == 5 and last.sequence == 10
    # summed per chunk, each floor would lose up to a unit; cumulative, the amount is exact
    assert last.amount == 9 * 333_333 * 7 // BYTES_PER_MB + 5 * 3 == amount_for(t, last.bytes, last.tokens)


def test_replayed_reordered_underpaying_and_forged_vouchers_are_refused(keys):
    provider, consumer = keys
    t = _terms(provider)
    v1, v2, v3 = _series(t, consumer, [(16_000, 0), (16_000, 0), (16_000, 0)])
    assert accept(None, v1, t) and accept(v1, v2, t)
    assert accept(v2, v2, t) is False  # a replay of the one held: counted once
    with pytest.raises(PaymentRequired, match="replayed or reordered"):
        accept(v3, v2, t)
    under = sign_voucher(consumer, provider=t.provider, artifact=ART, terms=t.digest, sequence=4,
                         amount=v3.amount, nbytes=v3.bytes + 100_000, tokens=0)
    with pytest.raises(PaymentRequired, match="pays"):
        accept(v3, under, t)
    other_terms = _terms(provider, mb=1)
    with pytest.raises(PaymentRequired, match="other terms"):
        accept(None, v1, other_terms)
    forged = Voucher(**{**v1.__dict__, "amount": v1.amount + 1})  # same signature, another amount
    with pytest.raises(IntegrityError):
        decode_voucher(forged.encode())
    stranger = NodeKey.generate()  # signed by someone who is not the consumer it names
    fake = Voucher(**{**v1.__dict__, "signature": stranger.sign_bytes(v1.signed_message())})
    with pytest.raises(IntegrityError):
        decode_voucher(fake.encode())


def test_signatures_never_cross_domains(keys):
    """A manifest envelope, an audit attestation and terms are signed over other domains: none of their
    signatures makes a voucher, and a voucher's signature makes none of them."""
    provider, consumer = keys
    t = _terms(provider)
    v = _series(t, consumer, [(16_000, 0)])[0]
    domains = {vouchers_mod.DOMAIN, terms_mod.DOMAIN, b"kvswap/manifest-signature/v1\n",
               b"kvswap/audit-attestation/v1\n", b"kvswap/settlement-statement/v1\n"}
    assert len(domains) == 5
    # the consumer signs a manifest envelope and an attestation over the very bytes a voucher would carry
    env = consumer.sign_manifest(ART, time=1)
    att = consumer.sign_bytes(attestation_message(ART, consumer.public_bytes, 1, v.signed_part()))
    for signature in (env.signature, att, consumer.sign_bytes(terms_mod.signed_message(v.signed_part())),
                      consumer.sign_bytes(v.signed_part())):  # no domain at all
        with pytest.raises(IntegrityError):
            decode_voucher(v.signed_part() + signature)
    # and the voucher's signature is no manifest envelope of its consumer
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    with pytest.raises(InvalidSignature):
        Ed25519PublicKey.from_public_bytes(consumer.public_bytes).verify(v.signature, manifest_message(ART, consumer.public_bytes, 1))


def test_the_purse_refuses_over_its_caps_and_never_spends_past_its_budget(keys):
    provider, _ = keys
    t = _terms(provider)
    assert "budget is 0" in Purse(unit="micro-usd", max_price_mb=10_000).refusal(t, "p")
    assert "--max-price 10" in Purse(unit="micro-usd", max_price_mb=10, budget=100).refusal(t, "p")
    assert "--max-price-token 2" in Purse(unit="micro-usd", max_price_token=2, budget=100).refusal(t, "p", tokens=True)
    assert "pays in usd" in Purse(unit="usd", max_price_mb=10**6, budget=100).refusal(t, "p")
    purse = Purse(unit="micro-usd", max_price_mb=7000, max_price_token=3, budget=100)
    assert purse.refusal(t, "p") is None and purse.refusal(_terms(provider, mb=0, token=0), "p") is None
    r = purse.reserve(60)
    assert r is not None and purse.reserve(41) is None and purse.left == 40
    purse.spend(r, 50)
    purse.release(r)
    assert purse.spent == 50 and purse.reserved == 0 and purse.left == 50
    assert purse.tokens_affordable(t) == 16


def test_the_book_counts_a_series_once_and_reconciles_deliveries(tmp_path, keys):
    provider, consumer = keys
    t = _terms(provider)
    book = PaymentBook(tmp_path / "payments.sqlite", provider.public_bytes)
    book.add_terms(t)
    v1, v2 = _series(t, consumer, [(16_000, 0), (16_000, 0)])
    book.delivered(consumer.public_bytes, ART, nbytes=32_000)
    assert book.unpaid(consumer.public_bytes) == (32_000, 0)
    assert book.accept(v1, t) and book.accept(v2, t) and not book.accept(v2, t)
    assert book.advance(v2, t) == (False, v2)  # the one held comes back, read in the same transaction
    with pytest.raises(PaymentRequired):
        book.accept(v1, t)  # older: refused, the newer one stays
    assert book.vouchers("earned") == [v2] and book.vouchers("owed") == []
    assert book.unpaid(consumer.public_bytes) == (0, 0)
    book.close()
    reopened = PaymentBook(tmp_path / "payments.sqlite", provider.public_bytes)  # durable
    [tab] = reopened.tabs()
    assert tab["earned"] == v2.amount and tab["bytes_sold"] == 32_000 and tab["unit"] == "micro-usd"
    reopened.close()


def test_a_statement_verifies_offline_and_any_changed_byte_fails(tmp_path, keys):
    provider, consumer = keys
    t = _terms(provider)
    book = PaymentBook(tmp_path / "payments.sqlite", provider.public_bytes)
    book.add_terms(t)
    for v in _series(t, consumer, [(16_000, 0), (5_000, 4)]):
        book.accept(v, t)
    data = build_statement(book, provider, issued=1)
    summary = verify_statement(data)
    assert summary["earned"] == {"micro-usd": amount_for(t, 21_000, 4)} and summary["series"] == 1
    for i in range(0, len(data), 7):
        changed = bytearray(data)
        changed[i] = (changed[i] + 1) % 128 or 1
        with pytest.raises((FormatError, IntegrityError)):
            verify_statement(bytes(changed))
    # re-signed by someone else, or with a doctored total: refused
    obj = json.loads(data)
    obj["statement"]["totals"][0]["earned"] += 1
    with pytest.raises(IntegrityError):
        verify_statement((json.dumps(obj, sort_keys=True, indent=2) + "\n").encode())
    book.close()


def test_a_series_cannot_pass_the_largest_counter(keys):
    provider, consumer = keys
    t = _terms(provider)
    held = Voucher(provider.public_bytes, consumer.public_bytes, ART, t.digest, 1, 0, 2**63 - 2, 0)
    with pytest.raises(OverBudget):
        next_totals(t, held, 10, 0)


def test_the_till_sends_within_the_credit_window_and_a_voucher_reopens_it(tmp_path, keys):
    """node/payments.py's Till on trio, with a real book and a real consumer key (no network): chunks go while
    the unpaid bytes fit the window; the next one waits for a voucher, and without one it is held back."""
    import dataclasses

    import trio

    from kvswap.node.p2p import peer_id_of_seed
    from kvswap.node.payments import Till
    from kvswap.node.tuning import PayTuning

    provider, consumer = keys
    t = _terms(provider)  # credit_bytes 40_000
    book = PaymentBook(tmp_path / "payments.sqlite", provider.public_bytes)
    till = Till(book, t, dataclasses.replace(PayTuning(), voucher_wait_s=0.5))
    peer = peer_id_of_seed(consumer.seed)
    v1 = _series(t, consumer, [(32_000, 0)])[0]

    async def main():
        assert await till.admit_chunk(peer, 16_000) and await till.admit_chunk(peer, 16_000)
        await till.chunk_done(peer, ART, 16_000, True)
        await till.chunk_done(peer, ART, 16_000, True)
        assert not await till.admit_chunk(peer, 16_000)  # 48_000 would pass the window: held back
        assert till.held_back == 1
        admitted = []

        async def third():
            admitted.append(await till.admit_chunk(peer, 16_000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.sleep(0.1)
            assert admitted == []  # still waiting for payment
            seq, paid = till.receive(peer, v1.encode())
            till.credited(peer, paid)
        assert seq == 1 and paid == (32_000, 0) and admitted == [True]
        with pytest.raises(IntegrityError):  # a voucher must come from the consumer it names
            till.receive(peer_id_of_seed(NodeKey.generate().seed), v1.encode())

    trio.run(main)
    assert book.unpaid(consumer.public_bytes) == (0, 0)  # 32_000 delivered, 32_000 paid (the third not yet sent)
    book.close()
