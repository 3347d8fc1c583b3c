"""Buying KV on real daemons (`kvswap node start` processes, real libp2p on 127.0.0.1), issue 25: a priced
publisher (per MB and per hosted token, a small credit window), light consumers with and without a budget, a
reseller that buys and then sells cheaper (one of its chunks corrupted on disk), and a hostile consumer that
accepts the terms and never pays. Every figure is read back from the nodes' own books and ledgers, through
the CLI."""

from __future__ import annotations

import json

import pytest

from kvswap.ledger import Ledger
from kvswap.payments.book import PaymentBook
from kvswap.payments.rules import BYTES_PER_MB
from kvswap.protocol.cid import Cid
from kvswap.protocol.names import CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL

from bench.harness import hostile
from bench.harness.nodes import NodeProc, cli, cli_json, error_lines, finish_cli, spawn_cli

DOC = ("The harbour master kept one chart of the channel and lent it out by the hour: a captain who had it "
       "copied once could sail by his copy for a season, and the master was paid for every hour it was out. ") * 9
PRICE_MB, PRICE_TOKEN, RESALE_MB = 7000, 3, 5000
CREDIT_BYTES, CREDIT_TOKENS = 40_000, 8  # about two of the tiny model's 16 KB chunks; eight hosted tokens


def _key(home) -> bytes:
    return bytes.fromhex(cli_json(home, "id")["public_key"])


def _book(home) -> PaymentBook:
    return PaymentBook.for_home(home, _key(home))


def _sent_to(home, peer: str) -> dict[str, int]:
    """Chunk CID -> stored bytes this node sent `peer` (either path; rationed answers carry no bytes)."""
    rows = Ledger.for_home(home).transfers(protocols=(CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL), direction="out")
    out: dict[str, int] = {}
    for r in rows:
        if r.peer == peer and r.chunk and (r.raw_bytes or 0) > 0:
            out[r.chunk] = out.get(r.chunk, 0) + r.raw_bytes
    return out


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    started: list[NodeProc] = []
    try:
        pub = NodeProc(root / "pub", extra_args=["--price-per-mb", str(PRICE_MB), "--price-per-token", str(PRICE_TOKEN),
                                                 "--credit-bytes", str(CREDIT_BYTES),
                                                 "--credit-tokens", str(CREDIT_TOKENS)])
        started.append(pub)
        nodes = {"pub": pub}
        for name, extra in (("buyer", []), ("broke", []), ("reseller", ["--price-per-mb", str(RESALE_MB)]),
                            ("buyer2", [])):
            # buyer2 also joins through the reseller: a connected peer is a candidate from the first second
            # (a DHT record of what the reseller bought could come too late for the fetch to ask it)
            boot = [pub.addr] + ([nodes["reseller"].addr] if name == "buyer2" else [])
            nodes[name] = NodeProc(root / name, model=None, bootstrap=boot, accept_any=True, extra_args=extra)
            started.append(nodes[name])
        pub.wait_model()
        doc = root / "doc.txt"
        doc.write_text(DOC)
        published = cli_json(pub.home, "publish", str(doc))
        inspected = cli_json(pub.home, "inspect", published["cid"])
        sizes = {c["cid"]: c["stored_size"] for c in inspected["chunks"]}
        if inspected.get("tail"):
            sizes[inspected["tail"]["cid"]] = inspected["tail"]["stored_size"]
        yield nodes, published["cid"], sizes
    finally:
        for node in started:
            node.stop()


def test_a_consumer_without_budget_is_refused_before_any_chunk_moves(market):
    # first: while the priced publisher is the only holder (a buyer later re-shares for free, as a swarm does)
    nodes, cid, _ = market
    pub, broke = nodes["pub"], nodes["broke"]
    proc = cli(broke.home, "get", cid, "--no-progress", check=False, timeout=120)
    assert proc.returncode != 0
    errors = error_lines(proc)
    assert len(errors) == 1 and "budget" in errors[0] and f"{PRICE_MB} micro-usd/MB" in errors[0], proc.stderr[-1500:]
    assert _sent_to(pub.home, broke.peer_id) == {}  # not one chunk byte went out to it
    over = cli(broke.home, "get", cid, "--no-progress", "--budget", "1000000", "--max-price", "10", check=False)
    assert over.returncode != 0 and len(error_lines(over)) == 1
    assert over.returncode != 0 and "--max-price" in error_lines(over)[0]
    assert _sent_to(pub.home, broke.peer_id) == {}


def test_a_priced_node_that_lacks_the_chunks_says_so_instead_of_asking_for_payment(market):
    """Before it bought anything, the priced reseller holds none of the chunks: a request without its terms is
    answered "missing" (so a swarm moves on), not `payment` (which would send askers after terms for nothing)."""
    nodes, cid, sizes = market
    reseller = nodes["reseller"]

    async def body(ready, stop):
        from kvswap.protocol.messages import ChunkMissing

        answers = []

        async def on_chunk(chunk, answer):
            answers.append(isinstance(answer, ChunkMissing) and not answer.rationed)

        async with hostile.hostile_host() as h:
            await h.p2p.connect(reseller.addr)
            ready.set()
            await h.exchange.request_chunks(reseller.peer_id, [Cid.parse(c) for c in sizes], on_chunk,
                                            artifact=Cid.parse(cid))
        return {"missing": answers}

    got = hostile.AttackThread(body).start().wait(timeout=60)
    assert got["missing"] == [True] * len(sizes)


def test_a_priced_fetch_pays_exactly_the_verified_bytes_and_a_freeloader_gets_only_the_credit(market):
    nodes, cid, sizes = market
    pub, buyer = nodes["pub"], nodes["buyer"]
    # a hostile consumer accepts the terms and never signs, while an honest one buys at the same time
    freeloader = hostile.AttackThread(_freeload(pub, cid, list(sizes)))
    freeloader.start()
    got = finish_cli(spawn_cli(buyer.home, "get", cid, "--no-progress", "--json", "--max-price", str(PRICE_MB),
                               "--budget", "1000000"), timeout=180)
    stolen = freeloader.wait(timeout=120)
    assert got.returncode == 0, got.stderr[-2000:]
    result = json.loads(got.stdout)
    total = sum(sizes.values())
    assert result["complete"] and result["bytes"] == total
    assert result["paid"] == total * PRICE_MB // BYTES_PER_MB and result["unit"] == "micro-usd"

    # the provider's book: one series from the buyer, its amount the verified bytes times the price, and the
    # bytes exactly what the provider's ledger says it sent that peer
    earned = [v for v in _book(pub.home).vouchers("earned") if v.consumer == _key(buyer.home)]
    assert len(earned) == 1
    v = earned[0]
    assert v.artifact == Cid.parse(cid) and v.bytes == total and v.amount == total * PRICE_MB // BYTES_PER_MB
    assert v.sequence >= len(sizes)  # one voucher per verified chunk, the latest kept
    assert sum(_sent_to(pub.home, buyer.peer_id).values()) == v.bytes
    owed = _book(buyer.home).vouchers("owed")
    assert owed == [v]  # the buyer holds the same receipt
    again = cli(buyer.home, "get", cid, "--no-progress")  # already complete: nothing fetched, nothing paid
    assert "paid" not in again.stdout

    # the freeloader got at most the credit window, then nothing
    assert stolen["ended"] == "held back", stolen
    assert 0 < stolen["bytes"] <= CREDIT_BYTES and stolen["chunks"] < len(sizes)
    status = cli_json(pub.home, "node", "status")["payments"]
    assert status["held_back"] >= 1 and status["terms"]["price_per_mb"] == PRICE_MB


def _freeload(pub, cid: str, chunks: list[str]):
    async def body(ready, stop):
        async with hostile.hostile_host() as h:
            await h.p2p.connect(pub.addr)
            ready.set()
            return await hostile.freeload(h, pub.peer_id, Cid.parse(cid), [Cid.parse(c) for c in chunks], max_s=60)

    return body


def test_a_provider_that_sends_corrupted_bytes_is_not_paid_for_them(market):
    nodes, cid, sizes = market
    pub, reseller, buyer2 = nodes["pub"], nodes["reseller"], nodes["buyer2"]
    bought = cli_json(reseller.home, "get", cid, "--no-progress", "--max-price", str(PRICE_MB), "--budget", "1000000")
    assert bought["complete"]
    bad = sorted(c for c in sizes if c != max(sizes, key=sizes.get))[0]  # a KV chunk, not the tail
    for holder in (nodes["buyer"], reseller):  # every holder cheaper than the publisher serves this one corrupted
        path = holder.home / "store" / "chunks" / bad
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    got = cli_json(buyer2.home, "get", cid, "--no-progress", "--max-price", str(PRICE_MB), "--budget", "1000000")
    assert got["complete"]
    assert cli_json(buyer2.home, "verify", cid, "--accept-any")["ok"]
    from_reseller = _sent_to(reseller.home, buyer2.peer_id)
    assert bad in from_reseller, "the reseller, cheaper than the publisher, was asked for it and sent it corrupted"
    earned = [v for v in _book(reseller.home).vouchers("earned") if v.consumer == _key(buyer2.home)]
    good = sum(n for c, n in from_reseller.items() if c != bad)
    assert sum(v.bytes for v in earned) == good  # paid for what verified, not for the corrupted chunk
    assert sum(v.amount for v in earned) == good * RESALE_MB // BYTES_PER_MB
    # what the reseller did not serve came from the publisher, paid at its price
    from_pub = [v for v in _book(pub.home).vouchers("earned") if v.consumer == _key(buyer2.home)]
    assert from_pub and from_pub[0].bytes == sum(_sent_to(pub.home, buyer2.peer_id).values())
    assert bad in _sent_to(pub.home, buyer2.peer_id)  # the good copy came from the publisher
    assert got["paid"] == sum(v.amount for v in earned) + from_pub[0].amount


def test_hosted_generation_is_paid_per_token_and_stops_at_the_budget(market):
    nodes, cid, _ = market
    pub, buyer = nodes["pub"], nodes["buyer"]
    out = cli_json(buyer.home, "generate", cid, "--prompt", "", "--host", pub.addr, "--max-new-tokens", "24",
                   "--max-price-token", str(PRICE_TOKEN), "--budget", str(5 * PRICE_TOKEN))
    assert 0 < len(out["tokens"]) <= 5  # the budget buys five tokens, not the 24 asked for
    assert out["paid"] == len(out["tokens"]) * PRICE_TOKEN
    series = [v for v in _book(pub.home).vouchers("earned") if v.consumer == _key(buyer.home)]
    assert len(series) == 1 and series[0].tokens == len(out["tokens"])  # the same series as the chunks bought
    assert series[0].amount == series[0].bytes * PRICE_MB // BYTES_PER_MB + series[0].tokens * PRICE_TOKEN
    spent = cli(buyer.home, "generate", cid, "--prompt", "", "--host", pub.addr, "--max-price-token",
                str(PRICE_TOKEN), "--budget", str(PRICE_TOKEN - 1), check=False)
    assert spent.returncode != 0 and "budget" in error_lines(spent)[0]


def test_tabs_settle_and_an_offline_verify_that_fails_on_any_changed_byte(market, tmp_path):
    nodes, _, _ = market
    pub = nodes["pub"]
    tabs = cli_json(pub.home, "ledger", "tabs")["tabs"]
    assert tabs and all(t["owed"] == 0 for t in tabs) and sum(t["earned"] for t in tabs) > 0
    assert {nodes["buyer"].peer_id, nodes["buyer2"].peer_id} <= {t["peer_id"] for t in tabs}
    assert "12D3KooW" in cli(pub.home, "ledger", "tabs").stdout  # the human table names peers by peer id
    statement = tmp_path / "statement.json"
    settled = cli_json(pub.home, "ledger", "settle", "--out", str(statement))
    assert settled["earned"]["micro-usd"] == sum(t["earned"] for t in tabs)
    checked = cli_json(tmp_path, "receipts", "verify", str(statement))  # no node, another home: offline
    assert checked["valid"] and checked["earned"] == settled["earned"]
    data = statement.read_bytes()
    for at in (10, len(data) // 3, len(data) // 2, len(data) - 80):
        changed = bytearray(data)
        changed[at] = ord("0") if changed[at] != ord("0") else ord("1")
        statement.write_bytes(bytes(changed))
        proc = cli(tmp_path, "receipts", "verify", str(statement), check=False)
        assert proc.returncode != 0 and len(error_lines(proc)) == 1, (at, proc.stderr[-500:])
