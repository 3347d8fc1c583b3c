"""The report's payments section: what this node paid against the prefill it saved, what it earned against its
egress, and where the break-even price and the paper's 0.1x cache-read tariff lie on one per-MB scale.

Two halves:
- `read_book(home, ledger)`: the I/O. Opens `<home>/payments.sqlite` (kvswap/payments/book.py) only when it
  exists (a report never creates files), with this node's key (`<home>/identity.key`, read, never created) to
  tell earned vouchers (this node the provider) from owed ones (this node the consumer); and the token count
  of every artifact bought, from the store's manifest or this node's ledger.
- `payment_section(book, inputs, prices, measured)`: pure. The report's own inputs (tokens, stored size,
  prices, C_prefill) priced against the vouchers; every figure a `{"value", "unit", "source", "origin"}` like
  the report's inputs (origin "book": summed from the payment book's vouchers).

Formulas (docs/report.md "Payments"):
- c_token, the prefill cost of one token on this node: C_prefill / tokens when C_prefill is a flag or a
  measured time (`--basis time`); else the median measured prefill (ledger, else calibration) seconds x
  GPU $/hour / its tokens; else, with no timing, the report's C_prefill / tokens (input-token price), warned.
- paid: the sum of the latest owed voucher per series, per unit; in USD for the unit "micro-usd" (1e-6 USD).
- saved: over the distinct artifacts bought, tokens(artifact) x c_token (one prefill each: buying an artifact
  from several providers in a swarm still saves one prefill).
- revenue: the sum of the latest earned voucher per series, per unit; egress: bytes sold x egress $/byte.
- break-even per MB: C_prefill(artifact) / (stored bytes / 10**6) = c_token x 10**6 / bytes per token; per
  token: c_token. Buying pays below it.
- tariff: cache_read_tariff x input price per token; per MB: that x 10**6 / stored bytes per token.
"""

from __future__ import annotations

import sqlite3
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..ledger import Ledger
from ..protocol.errors import KvswapError
from .costmodel import cost_from_seconds
from .measured import FROM_CALIBRATION, FROM_LEDGER, Measured, is_calibration, sizes_from_store
from .prices import Prices

#: payments.sqlite in a home (kvswap/payments/book.py BOOK_FILE; named here so a missing book is not opened)
BOOK_FILE = "payments.sqlite"
IDENTITY_FILE = "identity.key"
#: USD per unit, for the units the report converts; any other unit is shown as its own integer amounts
UNIT_USD = {"micro-usd": 1e-6}
#: the scale the section places prices on
MICRO = "micro-usd"
BYTES_PER_MB = 1_000_000  # as kvswap/payments/rules.py: prices are quoted per 10**6 stored bytes
#: origin of a figure summed from the payment book
FROM_BOOK = "book"


@dataclass
class BookFacts:
    """What the payment book holds, read once (None fields where there is no book or no key)."""

    path: Path
    present: bool = False
    problem: str | None = None  # why the book was not read (in words)
    me: bytes | None = None
    owed: list[Any] = field(default_factory=list)  # Voucher, latest per series, this node the consumer
    earned: list[Any] = field(default_factory=list)  # Voucher, latest per series, this node the provider
    terms: dict[bytes, Any] = field(default_factory=dict)  # digest -> Terms (None when the book lacks them)
    deliveries: dict[tuple[bytes, str], tuple[int, int]] = field(default_factory=dict)
    #: artifact CID -> (tokens, source in words, origin) for the artifacts bought
    artifact_tokens: dict[str, tuple[int, str, str]] = field(default_factory=dict)

    @property
    def vouchers(self) -> int:
        return len(self.owed) + len(self.earned)


def _tokens_from_ledger(ledger: Ledger | None, artifact: str) -> tuple[int, str, str] | None:
    """Median tokens of this node's prefill and load events of `artifact` (real work first)."""
    if ledger is None:
        return None
    rows = [c for c in ledger.computes(artifact=artifact) if c.kind in ("prefill", "load") and c.tokens > 0]
    real = [c for c in rows if not is_calibration(c)]
    use, origin = (real, FROM_LEDGER) if real else (rows, FROM_CALIBRATION)
    if not use:
        return None
    n = int(round(statistics.median(float(c.tokens) for c in use)))
    return n, f"{origin}: median tokens of {len(use)} prefill/load events of the artifact", origin


def read_book(home: Path | None, ledger: Ledger | None = None) -> BookFacts:
    """The payment book of the node at `home`, or why there is none; nothing is created."""
    home = Path(home) if home is not None else None
    path = (home / BOOK_FILE) if home is not None else Path(BOOK_FILE)
    facts = BookFacts(path=path)
    if home is None or not path.is_file():
        facts.problem = f"no payment book ({path}): this node has bought and sold nothing"
        return facts
    key_path = home / IDENTITY_FILE
    if not key_path.is_file():
        facts.problem = f"no identity key ({key_path}): cannot tell this node's vouchers from others'"
        return facts
    from ..artifact.signing import NodeKey
    from ..payments.book import PaymentBook

    try:
        facts.me = NodeKey.load_or_create(key_path).public_bytes  # the file exists: read, not created
        book = PaymentBook(path, facts.me)
        try:
            facts.owed, facts.earned = book.vouchers("owed"), book.vouchers("earned")
            for v in (*facts.owed, *facts.earned):
                if v.terms not in facts.terms:
                    facts.terms[v.terms] = book.terms(v.terms)
            facts.deliveries = book.deliveries()
        finally:
            book.close()
    except (KvswapError, OSError, sqlite3.Error) as exc:  # an unreadable book is reported, not fatal
        facts.problem = f"payment book {path} could not be read: {exc}"
        facts.owed, facts.earned = [], []
        return facts
    facts.present = True
    for artifact in sorted({str(v.artifact) for v in facts.owed}):
        sizes = sizes_from_store(home, artifact)
        if sizes and sizes[2]:
            facts.artifact_tokens[artifact] = (int(sizes[2]), "store manifest: artifact token count", "store")
            continue
        found = _tokens_from_ledger(ledger, artifact)
        if found:
            facts.artifact_tokens[artifact] = found
    return facts


def fig(value: Any, unit: str, source: str, origin: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "source": source, "origin": origin}


def _worst(*origins: str) -> str:
    """The weakest origin of a figure computed from several (paper < default < calibration < the rest)."""
    for weak in ("paper", "default", FROM_CALIBRATION):
        if weak in origins:
            return weak
    return "derived"


def prefill_per_token(inputs: dict[str, dict[str, Any]], prices: Prices, measured: Measured
                      ) -> tuple[dict[str, Any], bool]:
    """c_token in $ per token, and whether it rests on this node's own timing (or a flag)."""
    c_prefill, tokens = inputs["c_prefill"], inputs["tokens"]["value"]
    if c_prefill["origin"] in ("flag", FROM_LEDGER, FROM_CALIBRATION):
        return fig(c_prefill["value"] / tokens, "$ per token",
                   f"C_prefill ({c_prefill['source']}) / {tokens} tokens", c_prefill["origin"]), True
    if measured.prefill_s and measured.prefill_tokens:
        cost = cost_from_seconds(measured.prefill_s, prices.gpu_per_hour)
        return fig(cost / measured.prefill_tokens, "$ per token",
                   f"{measured.prefill_source}: median prefill {measured.prefill_s:.4g} s x "
                   f"${prices.gpu_per_hour:g}/GPU-hour / median {measured.prefill_tokens:.0f} tokens "
                   f"({measured.prefill_events} events)", measured.prefill_source or FROM_LEDGER), True
    return fig(c_prefill["value"] / tokens, "$ per token",
               f"no prefill timing on this node: C_prefill ({c_prefill['source']}) / {tokens} tokens",
               c_prefill["origin"]), False


def _by_unit(vouchers: list[Any], terms: dict[bytes, Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for v in vouchers:
        t = terms.get(v.terms)
        unit = t.unit if t is not None else "unknown"
        row = out.setdefault(unit, {"amount": 0, "bytes": 0, "tokens": 0, "series": 0})
        row["amount"] += v.amount
        row["bytes"] += v.bytes
        row["tokens"] += v.tokens
        row["series"] += 1
    return out


def _in_usd(by_unit: dict[str, dict[str, int]]) -> tuple[float, list[str]]:
    """The USD value of the convertible units, and the units left unconverted."""
    usd = sum(row["amount"] * UNIT_USD[unit] for unit, row in by_unit.items() if unit in UNIT_USD)
    return usd, sorted(u for u in by_unit if u not in UNIT_USD)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def payment_section(book: BookFacts, inputs: dict[str, dict[str, Any]], prices: Prices, measured: Measured
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report's "payments" dict, and the warnings it adds to the report's."""
    section: dict[str, Any] = {"book": str(book.path), "present": book.present and book.vouchers > 0,
                               "vouchers": book.vouchers}
    if not section["present"]:
        section["message"] = book.problem or f"no vouchers in the payment book ({book.path})"
        return section, []
    warnings: list[dict[str, Any]] = []
    notes: list[str] = []
    section["me"] = book.me.hex() if book.me else None
    tokens = inputs["tokens"]["value"]
    stored = inputs["stored_bytes"]
    c_token, measured_here = prefill_per_token(inputs, prices, measured)
    if not measured_here:
        warnings.append({"level": "warning", "kind": "payments", "input": "prefill_per_token",
                         "message": "payments: the prefill compute saved and the break-even price rest on the "
                                    f"input-token price (${prices.input_per_mtok:g}/M), not on a prefill timed on "
                                    "this node (its ledger has no 'prefill' events); run `kvswap report "
                                    "--calibrate` to time one"})
    per_token_usd = c_token["value"]
    bpt = stored["value"] / tokens
    section["prefill_per_token"] = c_token
    section["bytes_per_token"] = fig(bpt, "stored bytes per token",
                                     f"stored_bytes ({stored['source']}) / {tokens} tokens",
                                     _worst(stored["origin"], inputs["tokens"]["origin"]))
    be_origin = _worst(c_token["origin"], section["bytes_per_token"]["origin"])
    be_mb = per_token_usd / UNIT_USD[MICRO] * BYTES_PER_MB / bpt
    be_token = per_token_usd / UNIT_USD[MICRO]
    section["break_even"] = {
        "per_mb": fig(be_mb, f"{MICRO}/MB", "prefill_per_token x 10**6 / bytes_per_token: the price per MB at "
                      "which buying the artifact costs what prefilling it here costs", be_origin),
        "per_token": fig(be_token, f"{MICRO}/token", "prefill_per_token: the price per document token at which "
                         "buying costs what prefilling costs", c_token["origin"]),
        "prefill_cost": fig(per_token_usd * tokens, "$ per prefill",
                            f"prefill_per_token x {tokens} tokens", c_token["origin"]),
    }
    tariff = prices.cache_read_tariff
    tariff_token = tariff * prices.input_per_mtok / 1e6 / UNIT_USD[MICRO]
    price_origin = inputs["input_per_mtok"]["origin"]
    section["tariff"] = {
        "fraction": fig(tariff, "x input price", inputs["cache_read_tariff"]["source"],
                        inputs["cache_read_tariff"]["origin"]),
        "per_token": fig(tariff_token, f"{MICRO}/token",
                         f"{tariff:g} x ${prices.input_per_mtok:g}/M input tokens (the paper's cache-read tariff)",
                         _worst(price_origin, inputs["cache_read_tariff"]["origin"])),
        "per_mb": fig(tariff_token * BYTES_PER_MB / bpt, f"{MICRO}/MB",
                      f"tariff per token x 10**6 / {bpt:,.0f} stored bytes per token",
                      _worst(price_origin, section["bytes_per_token"]["origin"])),
    }
    section["tariff"]["vs_break_even"] = _ratio(section["tariff"]["per_mb"]["value"], be_mb)
    egress_mb = prices.egress_per_byte * BYTES_PER_MB / UNIT_USD[MICRO]
    section["egress_per_mb"] = fig(egress_mb, f"{MICRO}/MB", f"${prices.egress_per_gb:g}/GB egress / 1000",
                                   inputs["egress_per_gb"]["origin"])

    # consumer: paid against the prefill saved
    consumer = None
    if book.owed:
        paid = _by_unit(book.owed, book.terms)
        paid_usd, unconverted = _in_usd(paid)
        bought: dict[str, int] = {}
        for v in book.owed:
            bought[str(v.artifact)] = bought.get(str(v.artifact), 0) + v.bytes
        saved_rows = []
        for artifact, nbytes in sorted(bought.items()):
            known = book.artifact_tokens.get(artifact)
            if known is None and artifact == measured.artifact:
                known = (int(tokens), f"the report's tokens ({inputs['tokens']['source']})",
                         inputs["tokens"]["origin"])
            if known is None:
                n = int(round(nbytes / bpt))
                known = (n, f"{nbytes:,} bytes bought / {bpt:,.0f} stored bytes per token", "derived")
                notes.append(f"payments: artifact {artifact}'s token count is not in this node's store or ledger: "
                             f"estimated from the bytes bought")
            n, src, origin = known
            saved_rows.append({"artifact": artifact, "tokens": fig(n, "tokens", src, origin),
                               "prefill_cost": fig(n * per_token_usd, "$", f"{n} tokens x prefill_per_token",
                                                   _worst(origin, c_token["origin"]))})
        saved = sum(r["prefill_cost"]["value"] for r in saved_rows)
        consumer = {
            "series": len(book.owed), "artifacts": len(bought),
            "paid": {unit: fig(row["amount"], unit, f"book: sum of the latest owed voucher of {row['series']} "
                               f"series ({row['bytes']:,} bytes, {row['tokens']:,} hosted tokens)", FROM_BOOK)
                     for unit, row in sorted(paid.items())},
            "bytes": sum(r["bytes"] for r in paid.values()), "tokens": sum(r["tokens"] for r in paid.values()),
            "paid_usd": fig(paid_usd, "$", " + ".join(f"{u} x {UNIT_USD[u]:g}" for u in sorted(paid)
                                                     if u in UNIT_USD) or "no convertible unit", FROM_BOOK),
            "unconverted_units": unconverted,
            "saved": fig(saved, "$", f"{len(saved_rows)} distinct artifacts bought x their tokens x "
                         "prefill_per_token (one prefill each)", _worst(*(r["prefill_cost"]["origin"]
                                                                          for r in saved_rows))),
            "saved_artifacts": saved_rows,
            "net_usd": None if unconverted else saved - paid_usd,
            "saved_over_paid": None if unconverted else _ratio(saved, paid_usd),
        }
        if unconverted:
            notes.append(f"payments: amounts in {', '.join(unconverted)} are shown as they are, not converted "
                         f"to $ (the report converts {', '.join(UNIT_USD)} only), so paid and saved are not "
                         "compared for them")
    section["consumer"] = consumer

    # provider: revenue against egress
    provider = None
    if book.earned:
        earned = _by_unit(book.earned, book.terms)
        revenue_usd, unconverted = _in_usd(earned)
        sold = sum(r["bytes"] for r in earned.values())
        delivered = sum(b for b, _ in book.deliveries.values())
        egress = sold * prices.egress_per_byte
        provider = {
            "series": len(book.earned), "artifacts": len({str(v.artifact) for v in book.earned}),
            "revenue": {unit: fig(row["amount"], unit, f"book: sum of the latest earned voucher of "
                                  f"{row['series']} series ({row['bytes']:,} bytes, {row['tokens']:,} hosted "
                                  "tokens)", FROM_BOOK) for unit, row in sorted(earned.items())},
            "bytes_sold": sold, "tokens_sold": sum(r["tokens"] for r in earned.values()),
            "bytes_delivered": fig(delivered, "bytes", "book: stored bytes this node sent, paid or not",
                                   FROM_BOOK),
            "revenue_usd": fig(revenue_usd, "$", " + ".join(f"{u} x {UNIT_USD[u]:g}" for u in sorted(earned)
                                                           if u in UNIT_USD) or "no convertible unit", FROM_BOOK),
            "unconverted_units": unconverted,
            "egress": fig(egress, "$", f"{sold:,} bytes sold x ${prices.egress_per_gb:g}/GB",
                          inputs["egress_per_gb"]["origin"]),
            "net_usd": None if unconverted else revenue_usd - egress,
            "revenue_over_egress": None if unconverted else _ratio(revenue_usd, egress),
        }
        if unconverted:
            notes.append(f"payments: revenue in {', '.join(unconverted)} is shown as it is, not converted to $, "
                         "so it is not compared with egress")
    section["provider"] = provider

    # the prices met, on the same scale
    prices_met = []
    for role, vouchers in (("owed", book.owed), ("earned", book.earned)):
        for digest in sorted({v.terms for v in vouchers}):
            t = book.terms.get(digest)
            if t is None:
                prices_met.append({"role": role, "terms": digest.hex(), "unit": "unknown"})
                notes.append(f"payments: terms {digest.hex()[:16]} are not in the payment book")
                continue
            row = {"role": role, "terms": digest.hex(), "provider": t.provider.hex(), "unit": t.unit,
                   "price_per_mb": t.price_per_mb, "price_per_token": t.price_per_token}
            if t.unit in UNIT_USD:
                per_mb = t.price_per_mb * UNIT_USD[t.unit] / UNIT_USD[MICRO]
                row["price_per_mb_vs_break_even"] = _ratio(per_mb, be_mb)
                row["price_per_mb_vs_tariff"] = _ratio(per_mb, section["tariff"]["per_mb"]["value"])
                row["price_per_mb_vs_egress"] = _ratio(per_mb, egress_mb)
            prices_met.append(row)
    section["prices"] = prices_met
    section["notes"] = notes
    return section, warnings


__all__ = ["BOOK_FILE", "BookFacts", "payment_section", "prefill_per_token", "read_book"]
