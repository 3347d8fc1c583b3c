"""Payments on the node (trio side): the provider's till and the consumer's payer (kvswap/payments/ is the
format, the rules and the book; this module applies them to live peers).

Provider (`Till`), when its terms price anything:
- a chunk or generate request must name the digest of its current terms (the asker has read and accepted
  them from a manifest answer); otherwise it is refused with `payment` before anything is sent;
- each chunk goes out only while what the consumer has been sent and not paid for, over all its artifacts,
  stays within the terms' credit window (`credit_bytes`; a chunk alone larger than the window goes when
  nothing is owed). Otherwise the sender waits up to pay.voucher_wait_s for a voucher, then answers "come
  back" (a rationed answer naming nobody): a consumer that stops signing gets at most the window, then nothing;
- hosted generations the same, in tokens (`credit_tokens`), before the generation starts;
- vouchers arrive on /kvswap/pay/1 and are stored through the book's rules (a replay counts once).

Consumer (`Payer`): it learns each provider's terms from its manifest answers (checked: signed by the key of
the peer that served them), signs a cumulative voucher in the payment domain for every chunk that verified
(never for one that did not), and sends the latest voucher of each series as soon as it can, one at a time per
series (a newer voucher supersedes one not yet sent). A fetch waits up to pay.flush_timeout_s at its end for
its last vouchers to be acked.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any, Awaitable, Callable

import trio

from kvswap.artifact.signing import NodeKey
from kvswap.config import key_of_peer_id
from kvswap.payments import rules
from kvswap.payments.book import PaymentBook
from kvswap.payments.terms import Terms, decode_terms
from kvswap.payments.vouchers import Voucher, decode_voucher, sign_voucher
from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import IntegrityError, KvswapError, OverBudget, PaymentRequired
from kvswap.protocol.messages import GenerateRequest, GenerateResponse, ManifestRequest

from .tuning import PayTuning

log = logging.getLogger(__name__)

_BYTES, _TOKENS = 0, 1


def peer_key(peer: str) -> bytes:
    """The Ed25519 key inside a peer id (PaymentRequired when it holds none: such a peer cannot pay)."""
    key = key_of_peer_id(peer)
    if key is None:
        raise PaymentRequired(f"peer {peer[:16]} has no Ed25519 peer id: it cannot sign vouchers")
    return bytes.fromhex(key)


class Till:
    """The provider's side: its terms, the credit each consumer holds, the vouchers it was paid with."""

    def __init__(self, book: PaymentBook | None, terms: Terms | None, tuning: PayTuning = PayTuning()) -> None:
        self.book = book
        self.terms = terms if terms is not None and not terms.free else None
        self.tuning = tuning
        self.terms_blob = self.terms.encode() if self.terms is not None else b""
        if self.terms is not None and book is not None:
            book.add_terms(self.terms)
        self._unpaid: dict[bytes, list[int]] = {}  # consumer key -> [bytes, tokens] sent (or being sent), unpaid
        self._paid: dict[bytes, trio.Event] = {}  # consumer key -> set when its next voucher lands
        self.held_back = 0  # chunks and generations held back for vouchers that did not come (status, tests)
        self.vouchers = 0  # vouchers that advanced a series here
        self.waits = 0  # sends that waited for a voucher first (the credit window was full)
        self.waited_s = 0.0  # seconds they waited in all

    @property
    def prices_bytes(self) -> bool:
        return self.terms is not None and self.terms.price_per_mb > 0

    @property
    def prices_tokens(self) -> bool:
        return self.terms is not None and self.terms.price_per_token > 0

    def check_terms(self, digest: bytes | None, artifact: Cid | None, peer: str) -> None:
        """PaymentRequired unless the request accepted this provider's current terms (and names its artifact)."""
        t = self.terms
        if t is None:
            return
        if digest != t.digest:
            raise PaymentRequired(f"this provider charges {t.price_per_mb} {t.unit}/MB and {t.price_per_token} "
                                  f"{t.unit}/token: accept its terms (from its manifest answer) to be served")
        if artifact is None:
            raise PaymentRequired("a priced request names its artifact (vouchers are per artifact)")
        peer_key(peer)

    def _counters(self, key: bytes) -> list[int]:
        found = self._unpaid.get(key)
        if found is None:
            if len(self._unpaid) >= self.tuning.max_consumers:  # bounded: forget consumers who owe nothing
                self._unpaid = {k: v for k, v in self._unpaid.items() if v != [0, 0]}
            found = self._unpaid[key] = list(self.book.unpaid(key)) if self.book is not None else [0, 0]
        return found

    async def _admit(self, peer: str, index: int, amount: int, credit: int) -> bool:
        key = peer_key(peer)
        started = None
        try:
            with trio.move_on_after(self.tuning.voucher_wait_s):
                while True:
                    owed = self._counters(key)
                    if owed[index] + amount <= credit or owed[index] <= 0:
                        owed[index] += amount
                        return True
                    if started is None:
                        started = trio.current_time()
                        self.waits += 1
                    event = self._paid.setdefault(key, trio.Event())
                    await event.wait()
            self.held_back += 1
            return False
        finally:
            if started is not None:
                self.waited_s += trio.current_time() - started

    async def admit_chunk(self, peer: str, size: int) -> bool:
        """True: send this chunk now (its bytes count as owed); False: the consumer's vouchers lag."""
        if not self.prices_bytes:
            return True
        return await self._admit(peer, _BYTES, size, self.terms.credit_bytes)

    async def chunk_done(self, peer: str, artifact: Cid | None, size: int, sent: bool) -> None:
        """After an admitted chunk: delivered (booked in a worker thread, shielded: it happened even if the
        request is being cancelled), or not (its bytes no longer count as owed)."""
        if not self.prices_bytes:
            return
        key = peer_key(peer)
        if sent:
            if self.book is not None and artifact is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(lambda: self.book.delivered(key, artifact, nbytes=size))
        else:
            self._counters(key)[_BYTES] -= size

    async def admit_generation(self, peer: str, max_tokens: int) -> None:
        """Before a hosted generation: PaymentRequired when its tokens would pass the credit window."""
        if not self.prices_tokens:
            return
        if max_tokens > self.terms.credit_tokens:
            raise PaymentRequired(f"ask for at most {self.terms.credit_tokens} tokens at a time (the credit window)")
        if not await self._admit(peer, _TOKENS, max_tokens, self.terms.credit_tokens):
            raise PaymentRequired("vouchers for earlier hosted tokens have not come: pay them first")

    def generation_done(self, peer: str, artifact: Cid, reserved: int, delivered: int) -> None:
        if not self.prices_tokens:
            return
        key = peer_key(peer)
        self._counters(key)[_TOKENS] -= reserved - delivered
        if self.book is not None and delivered:
            self.book.delivered(key, artifact, tokens=delivered)

    def receive(self, peer: str, blob: bytes) -> tuple[int, tuple[int, int]]:
        """A voucher from `peer` (worker thread): checked, stored through the rules. The sequence now held and
        the (bytes, tokens) it newly paid for; PaymentRequired / FormatError / IntegrityError when it does not
        count (the voucher held stays)."""
        voucher = decode_voucher(blob)
        if self.book is None or self.terms is None:
            raise PaymentRequired("this node charges nothing: it takes no vouchers")
        if voucher.provider != self.book.me:
            raise PaymentRequired("voucher pays another provider")
        if voucher.consumer != peer_key(peer):
            raise IntegrityError("voucher is signed by another key than the peer that sent it")
        terms = self.book.terms(voucher.terms)
        if terms is None or terms.provider != self.book.me:
            raise PaymentRequired("voucher names terms this provider never offered")
        advanced, held = self.book.advance(voucher, terms)
        if advanced:
            self.vouchers += 1
            before = (0, 0) if held is None else (held.bytes, held.tokens)
            return voucher.sequence, (voucher.bytes - before[0], voucher.tokens - before[1])
        return voucher.sequence, (0, 0)

    def credited(self, peer: str, paid: tuple[int, int]) -> None:
        """On the trio loop, after `receive`: what the voucher paid no longer counts as owed; waiters wake."""
        key = peer_key(peer)
        owed = self._counters(key)
        owed[_BYTES] -= paid[0]
        owed[_TOKENS] -= paid[1]
        event = self._paid.pop(key, None)
        if event is not None:
            event.set()

    def snapshot(self) -> dict:
        t = self.terms
        return {"terms": t.summary() if t else None, "vouchers_taken": self.vouchers, "held_back": self.held_back,
                "credit_waits": self.waits, "credit_waited_s": round(self.waited_s, 3),
                "consumers_owing": sum(1 for v in self._unpaid.values() if v[0] > 0 or v[1] > 0)}


Sender = Callable[[str, bytes], Awaitable[int]]


class Payer:
    """The consumer's side: the providers' terms as learnt, and its vouchers, signed and sent."""

    def __init__(self, book: PaymentBook | None, key: NodeKey | None, tuning: PayTuning = PayTuning()) -> None:
        self.book = book
        self.key = key
        self.tuning = tuning
        self.terms: dict[str, Terms | None] = {}  # peer -> its terms (None: it said it is free)
        self._lock = threading.Lock()  # one series is signed one voucher at a time
        self._pending: dict[tuple[str, Cid], Voucher] = {}  # (peer, artifact) -> newest voucher not yet acked
        self._sending: set[tuple[str, Cid]] = set()
        self._nursery: trio.Nursery | None = None
        self.send: Sender | None = None
        self.failed_sends = 0

    @property
    def unsent(self) -> int:
        """Series whose newest voucher has not been acked yet."""
        return len(self._pending)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def learn(self, peer: str, blob: bytes) -> Terms | None:
        """The terms `peer` served (b"": free), checked to be signed by the peer's own key (IntegrityError)."""
        if not blob:
            self._remember(peer, None)
            return None
        terms = decode_terms(blob)
        if terms.provider != peer_key(peer):
            raise IntegrityError(f"peer {peer[:16]} served terms signed by another key")
        if self.book is not None:
            self.book.add_terms(terms)
        self._remember(peer, terms)
        return terms

    async def ask_terms(self, exchange: Any, peer: str, artifact: Cid) -> Terms | None:
        """`peer`'s terms, read from its manifest answer for `artifact` (None: it serves for free). The peer's
        refusal (it lacks the artifact) or forged terms come out as its KvswapError."""
        reply = await exchange.request_manifest(peer, ManifestRequest(artifact))
        return self.learn(peer, reply.terms)

    def _remember(self, peer: str, terms: Terms | None) -> None:
        if len(self.terms) >= self.tuning.max_providers and peer not in self.terms:
            self.terms.pop(next(iter(self.terms)))
        self.terms[peer] = terms

    def priced(self, peer: str) -> Terms | None:
        t = self.terms.get(peer)
        return t if t is not None and not t.free else None

    def sign(self, peer: str, artifact: Cid, terms: Terms, purse: rules.Purse, add_bytes: int = 0,
             add_tokens: int = 0, reservation: rules.Reservation | None = None) -> Voucher:
        """Sign (worker thread) the next voucher of (this node, `peer`, `artifact`) for what just verified, book
        it as owed and spend it from `purse` (out of `reservation` first). OverBudget, signing nothing, when it
        would pass the purse."""
        if self.book is None or self.key is None:
            raise OverBudget("this node keeps no payment book: it cannot pay")
        with self._lock:
            held = self.book.latest(terms.provider, self.key.public_bytes, artifact)
            seq, amount, nbytes, tokens = rules.next_totals(terms, held, add_bytes, add_tokens)
            cost = amount - (held.amount if held is not None else 0)
            if cost > purse.left + (reservation.held if reservation is not None else 0):
                raise OverBudget(f"paying {cost} {terms.unit} to {peer[:16]} would pass the budget ({purse.budget})")
            voucher = sign_voucher(self.key, provider=terms.provider, artifact=artifact, terms=terms.digest,
                                   sequence=seq, amount=amount, nbytes=nbytes, tokens=tokens)
            self.book.accept(voucher, terms)
            purse.spend(reservation, cost)
        return voucher

    def post(self, peer: str, voucher: Voucher) -> None:
        """Send `voucher` (on the trio loop): it supersedes any voucher of its series not yet sent."""
        key = (peer, voucher.artifact)
        self._pending[key] = voucher
        if key not in self._sending and self._nursery is not None:
            self._sending.add(key)
            self._nursery.start_soon(self._send_loop, key)

    async def _send_loop(self, key: tuple[str, Cid]) -> None:
        peer = key[0]
        failures = 0
        try:
            while key in self._pending:
                voucher = self._pending[key]
                try:
                    with trio.fail_after(self.tuning.voucher_send_timeout_s):
                        await self.send(peer, voucher.encode())
                except (KvswapError, trio.TooSlowError) as exc:
                    failures += 1
                    self.failed_sends += 1
                    if failures > self.tuning.voucher_send_retries:
                        log.warning("voucher %d for %s not delivered to %s: %s", voucher.sequence,
                                    voucher.artifact.short(), peer[:16], exc)
                        return  # the book holds it as owed; the provider can settle from the next one
                    await trio.sleep(self.tuning.voucher_retry_s)
                    continue
                failures = 0
                if self._pending.get(key) is voucher:
                    del self._pending[key]
        finally:
            self._sending.discard(key)

    async def flush(self, artifact: Cid) -> bool:
        """Wait until every voucher for `artifact` was acked (True), or pay.flush_timeout_s passed (False). A
        series whose sender gave up (its provider refused the stream, or was slow) is sent again meanwhile."""
        with trio.move_on_after(self.tuning.flush_timeout_s):
            while True:
                left = [k for k in self._pending if k[1] == artifact]
                if not left:
                    return True
                for key in left:
                    if key not in self._sending and self._nursery is not None:
                        self._sending.add(key)
                        self._nursery.start_soon(self._send_loop, key)
                await trio.sleep(0.02)
        log.warning("vouchers for %s not acked within %g s (the book holds them as owed)", artifact.short(),
                    self.tuning.flush_timeout_s)
        return False


__all__ = ["Payer", "Till", "peer_key"]


async def paid_generate(exchange: Any, payer: Payer | None, peer: str, request: GenerateRequest,
                        purse: rules.Purse | None, limiter: trio.CapacityLimiter) -> GenerateResponse:
    """Hosted generation on `peer`, paid per token when its terms price tokens: at most the tokens the purse
    and the host's credit window allow are asked for (none left: OverBudget, nothing asked), the delivered
    tokens are paid with one voucher, acked before this returns. A host that answers `payment` has its terms
    read from its manifest answer, then is asked once more."""
    purse = purse if purse is not None else rules.Purse(unit="")
    for attempt in range(2):
        terms = payer.priced(peer) if payer is not None else None
        terms = terms if terms is not None and terms.price_per_token > 0 else None
        asked, reservation = request, None
        if terms is not None:
            why = purse.refusal(terms, peer[:16], tokens=True)
            if why is not None:
                raise OverBudget(why)
            n = min(request.max_new_tokens, purse.tokens_affordable(terms), terms.credit_tokens)
            if n <= 0 < request.max_new_tokens:
                raise OverBudget(f"this generation's budget ({purse.budget} {terms.unit}) is spent: host {peer[:16]} "
                                 f"charges {terms.price_per_token} {terms.unit}/token")
            reservation = purse.reserve(n * terms.price_per_token)
            asked = replace(request, max_new_tokens=n, terms=terms.digest)
        try:
            response = await exchange.remote_generate(peer, asked)
        except PaymentRequired:
            purse.release(reservation)
            if attempt == 0 and payer is not None:
                learnt = await payer.ask_terms(exchange, peer, request.artifact_cid)
                if learnt is not None and learnt.price_per_token > 0 and (terms is None or learnt.digest != terms.digest):
                    continue
            raise
        if terms is not None:
            try:
                voucher = await trio.to_thread.run_sync(payer.sign, peer, request.artifact_cid, terms, purse, 0,
                                                        len(response.tokens), reservation, limiter=limiter)
            finally:
                purse.release(reservation)
            payer.post(peer, voucher)
            await payer.flush(request.artifact_cid)
        return response
    raise PaymentRequired(f"host {peer[:16]} kept asking for payment")  # unreachable: the loop returns or raises


__all__ += ["paid_generate"]
