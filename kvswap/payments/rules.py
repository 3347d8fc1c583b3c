"""The payment rules, pure (no I/O, no clock): what an amount is, which voucher counts, what a budget allows.

- An amount is a function of a series' totals under its terms: floor(bytes x price_per_mb / 10**6) +
  tokens x price_per_token. Computed from the cumulative totals, never summed per chunk, so rounding never
  accumulates: after any number of chunks the amount is exactly the verified bytes times the price.
- A new voucher of a series counts when its sequence is higher than the one held and none of its totals went
  down, and the amount grew by at least what the totals' growth costs under the voucher's terms. A voucher equal
  to the one held is a replay: accepted, counted once. Anything else is refused; the one held stays.
- A consumer never signs above its budget or for a provider whose prices exceed its caps (`Purse`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..protocol.errors import OverBudget, PaymentRequired
from .limits import MAX_COUNTER
from .terms import Terms
from .vouchers import Voucher

#: bytes in the "MB" prices are quoted per (decimal, as network and cloud egress prices are)
BYTES_PER_MB = 1_000_000


def amount_for(terms: Terms, nbytes: int, tokens: int) -> int:
    """Units owed under `terms` for `nbytes` stored bytes and `tokens` hosted tokens, in all."""
    return nbytes * terms.price_per_mb // BYTES_PER_MB + tokens * terms.price_per_token


def next_totals(terms: Terms, held: Voucher | None, add_bytes: int, add_tokens: int) -> tuple[int, int, int, int]:
    """(sequence, amount, bytes, tokens) of the voucher that follows `held` once `add_bytes` more bytes and
    `add_tokens` more tokens verified: the amount grows by what the totals' growth costs under `terms`."""
    seq, amount, nbytes, tokens = (0, 0, 0, 0) if held is None else (held.sequence, held.amount, held.bytes,
                                                                     held.tokens)
    new_bytes, new_tokens = nbytes + add_bytes, tokens + add_tokens
    new_amount = amount + amount_for(terms, new_bytes, new_tokens) - amount_for(terms, nbytes, tokens)
    if max(new_bytes, new_tokens, new_amount, seq + 1) > MAX_COUNTER:
        raise OverBudget("a voucher series would pass 2**63 - 1: settle and start afresh")
    return seq + 1, new_amount, new_bytes, new_tokens


def accept(held: Voucher | None, new: Voucher, terms: Terms) -> bool:
    """True when `new` (signature already checked) advances the series `held` belongs to; False when it is a
    replay of `held`. PaymentRequired with the reason when it is refused (older, reordered, or underpaying)."""
    if held is not None:
        if new.series != held.series:
            raise PaymentRequired("voucher belongs to another series")
        if new == held:
            return False
        if new.sequence <= held.sequence:
            raise PaymentRequired(f"voucher sequence {new.sequence} is not after {held.sequence} (replayed or reordered)")
        if new.bytes < held.bytes or new.tokens < held.tokens or new.amount < held.amount:
            raise PaymentRequired("voucher totals went down")
    if new.terms != terms.digest:
        raise PaymentRequired("voucher pays under other terms")
    base_bytes, base_tokens, base_amount = (0, 0, 0) if held is None else (held.bytes, held.tokens, held.amount)
    owed = amount_for(terms, new.bytes, new.tokens) - amount_for(terms, base_bytes, base_tokens)
    if new.amount - base_amount < owed:
        raise PaymentRequired(f"voucher pays {new.amount - base_amount} units for what costs {owed}")
    return True


@dataclass
class Reservation:
    """Part of a purse set aside for one request, until it is spent or released."""

    held: int


@dataclass
class Purse:
    """One operation's spending limits on the consumer side (`--max-price`, `--budget`, config.toml [pay]).

    `refusal(terms)` says why a provider is refused before anything is asked of it; `reserve` sets aside the
    cost of what is about to be asked, `spend` turns it into what was signed, `release` gives back what did not
    arrive or did not verify. Nothing is ever signed past `budget`."""

    unit: str
    max_price_mb: int = 0
    max_price_token: int = 0
    budget: int = 0
    spent: int = 0
    reserved: int = 0
    refusals: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # trio + signing threads

    @classmethod
    def of(cls, config, max_price_mb: int | None = None, max_price_token: int | None = None,
           budget: int | None = None) -> "Purse":
        """One operation's purse: a home's config ([pay] in config.toml, kvswap/config.py), overridden per call."""
        pick = lambda given, name: config[name] if given is None else given  # noqa: E731
        return cls(unit=config["pay.unit"], max_price_mb=pick(max_price_mb, "pay.max_price_mb"),
                   max_price_token=pick(max_price_token, "pay.max_price_token"), budget=pick(budget, "pay.budget"))

    def refusal(self, terms: Terms, who: str, tokens: bool = False) -> str | None:
        """Why this purse will not pay `terms` for chunks (or, `tokens`, for hosted tokens); None if it will."""
        price = terms.price_per_token if tokens else terms.price_per_mb
        per, cap, flag, setting = (("token", self.max_price_token, "--max-price-token", "pay.max_price_token") if tokens
                                   else ("MB", self.max_price_mb, "--max-price", "pay.max_price_mb"))
        if price == 0:
            return None
        charges = f"provider {who} charges {price} {terms.unit}/{per}"
        if terms.unit != self.unit:
            return f"{charges}; this node pays in {self.unit or 'nothing'} (pay.unit)"
        if self.budget - self.spent <= 0:
            return f"{charges} and this operation's budget is {'spent' if self.spent else 0} (--budget, pay.budget)"
        if price > cap:
            return f"{charges}, over {flag} {cap} ({setting})"
        return None

    @property
    def left(self) -> int:
        return self.budget - self.spent - self.reserved

    def reserve(self, amount: int) -> "Reservation | None":
        """Set `amount` aside for what is about to be asked (None when the budget left is smaller)."""
        with self._lock:
            if amount > self.left:
                return None
            self.reserved += amount
            return Reservation(amount)

    def spend(self, reservation: "Reservation | None", cost: int) -> None:
        """`cost` was signed for: it comes out of `reservation` first, the rest out of the budget left."""
        with self._lock:
            take = 0 if reservation is None else min(reservation.held, cost)
            if reservation is not None:
                reservation.held -= take
            self.reserved -= take
            self.spent += cost

    def release(self, reservation: "Reservation | None") -> None:
        """Give back what `reservation` still holds (a request ended, its chunks arrived or not)."""
        with self._lock:
            if reservation is not None:
                self.reserved -= reservation.held
                reservation.held = 0

    def tokens_affordable(self, terms: Terms) -> int:
        """Most hosted tokens the budget left pays for under `terms` (unbounded when they are free)."""
        if terms.price_per_token == 0:
            return MAX_COUNTER
        return max(0, self.left) // terms.price_per_token


__all__ = ["BYTES_PER_MB", "Purse", "Reservation", "accept", "amount_for", "next_totals"]
