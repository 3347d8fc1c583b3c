"""The payment format's limits, beside the parsers that enforce them (terms.py, vouchers.py, statement.py).
FORMAT.md ("Payments") lists the same values; tests/test_limits_doc.py checks that they agree.

A price, a budget or a voucher's amount is an integer count of the unit the terms name; these bounds keep
every product of bytes and prices inside 64 bits, so no peer can make an amount wrap or a sum overflow.
"""

from __future__ import annotations

#: Bytes of one voucher on the wire and on disk: provider key 32, consumer key 32, artifact CID 36, terms
#: digest 32, four u64 counters (sequence, amount, bytes, tokens) 32, Ed25519 signature 64.
VOUCHER_BYTES = 228
#: Largest encoded terms (bytes): a canonical msgpack map of seven fields plus a 64-byte signature is ~180.
MAX_TERMS_BYTES = 512
#: Longest unit name in terms (chars), e.g. "micro-usd": a name, not a description.
MAX_UNIT_CHARS = 16
#: Largest price per MB or per token (units): at 2**32 units per MB a petabyte costs ~4.3e18 units, still under
#: a voucher's 2**63 - 1, so no amount a series can reach wraps.
MAX_PRICE = 2**32
#: Largest counter a voucher carries (sequence, amount, bytes, tokens): a signed 64-bit integer, what SQLite stores.
MAX_COUNTER = 2**63 - 1
#: Largest credit window terms may offer (bytes): 4 GiB, far more than any sane provider extends.
MAX_CREDIT_BYTES = 2**32
#: Largest settlement statement `kvswap receipts verify` reads (bytes): ~1 KB per voucher, 64k vouchers.
MAX_STATEMENT_BYTES = 64 * 1024 * 1024
