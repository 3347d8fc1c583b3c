"""Buying and selling KV: a provider's signed terms, the consumer's pay-as-you-go vouchers, the book both keep of
them, and the signed statements an outside payment system settles (FORMAT.md "Payments", SECURITY.md).

    terms.py      what a provider charges (per MB shipped, per hosted token), signed in its own domain
    vouchers.py   a consumer's cumulative, signed promise to pay one provider for one artifact
    rules.py      the pure rules: amounts, which voucher counts, a consumer's budget (no I/O)
    book.py       the SQLite book of terms, vouchers and what a provider delivered (<home>/payments.sqlite)
    statement.py  `kvswap ledger settle` writes, `kvswap receipts verify` checks, offline

No money moves inside kvswap: a statement is what an outside payment system would settle.
"""
