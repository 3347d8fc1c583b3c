"""The ledger on real SQLite: round trips, filters, totals, threads, and durability across SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from kvswap.protocol.cid import Cid
from kvswap.protocol.errors import FormatError, UsageError
from kvswap.ledger import Ledger, ledger_path
from kvswap.protocol.names import CHUNKS_PROTOCOL as PROTOCOL_CHUNKS
from kvswap.protocol.names import GENERATE_PROTOCOL as PROTOCOL_GENERATE
from kvswap.protocol.names import MANIFEST_PROTOCOL as PROTOCOL_MANIFEST

ART = str(Cid.of(b"artifact"))
CHUNK = str(Cid.of(b"chunk-0"))


@pytest.fixture
def ledger(tmp_path):
    with Ledger(ledger_path(tmp_path)) as led:
        yield led


def test_transfer_round_trip(ledger):
    rid = ledger.transfer(peer="12D3KooWpeer", protocol=PROTOCOL_CHUNKS, direction="out", wire_bytes=1000,
                          raw_bytes=1500, artifact=Cid.of(b"artifact"), chunk=CHUNK, request="r1", at=123.5)
    (row,) = ledger.transfers()
    assert row.id == rid
    assert row.to_dict() == {"id": rid, "at": 123.5, "peer": "12D3KooWpeer", "protocol": PROTOCOL_CHUNKS,
                             "direction": "out", "wire_bytes": 1000, "raw_bytes": 1500, "artifact": ART,
                             "chunk": CHUNK, "request": "r1"}


def test_compute_round_trip_with_extra(ledger):
    ledger.compute(kind="prefill", seconds=1.25, tokens=300, model="tiny-qwen3", dtype="bf16", device="cpu",
                   artifact=ART, extra={"raw_bytes": 4096, "note": "x"}, at=10.0)
    ledger.compute(kind="load", seconds=0.01)
    first, second = ledger.computes()
    assert (first.kind, first.seconds, first.tokens, first.model, first.dtype, first.device, first.artifact) == (
        "prefill", 1.25, 300, "tiny-qwen3", "bf16", "cpu", ART)
    assert first.extra == {"note": "x", "raw_bytes": 4096}
    assert second.extra == {} and second.artifact is None and second.at > 1e9


def test_rows_persist_across_reopen(tmp_path):
    path = ledger_path(tmp_path)
    with Ledger(path) as led:
        led.transfer(peer="p", protocol=PROTOCOL_MANIFEST, direction="in", wire_bytes=7)
    with Ledger(path) as led:
        assert [r.wire_bytes for r in led.transfers()] == [7]


def _populate(led: Ledger) -> None:
    for i in range(6):
        led.transfer(peer=f"peer{i % 2}", protocol=PROTOCOL_CHUNKS, direction="out" if i % 3 else "in",
                     wire_bytes=100 * (i + 1), raw_bytes=200 * (i + 1), artifact=ART if i < 4 else "other",
                     chunk=f"c{i}", at=1000.0 + i)
    led.transfer(peer="peer0", protocol=PROTOCOL_GENERATE, direction="out", wire_bytes=50, at=2000.0)
    for i, kind in enumerate(["prefill", "load", "generate", "generate", "hosted_generate"]):
        led.compute(kind=kind, seconds=0.1 * (i + 1), tokens=10, artifact=ART if i < 3 else None, at=1000.0 + i)


def test_filters(ledger):
    _populate(ledger)
    assert len(ledger.transfers()) == 7
    assert [r.chunk for r in ledger.transfers(artifact=ART)] == ["c0", "c1", "c2", "c3"]
    assert {r.peer for r in ledger.transfers(peer="peer1")} == {"peer1"}
    assert [r.chunk for r in ledger.transfers(direction="in")] == ["c0", "c3"]
    assert [r.protocol for r in ledger.transfers(protocol=PROTOCOL_GENERATE)] == [PROTOCOL_GENERATE]
    assert len(ledger.transfers(protocols=[PROTOCOL_CHUNKS, PROTOCOL_GENERATE])) == 7
    assert ledger.transfers(protocols=[]) == []
    assert [r.chunk for r in ledger.transfers(since=1004.0)] == ["c4", "c5", None]
    assert [r.chunk for r in ledger.transfers(since=1001.0, until=1003.0)] == ["c1", "c2"]
    assert [r.chunk for r in ledger.transfers(limit=2)] == ["c5", None]  # the newest two, oldest first
    assert [c.kind for c in ledger.computes(kind="generate")] == ["generate", "generate"]
    assert [c.kind for c in ledger.computes(artifact=ART)] == ["prefill", "load", "generate"]
    assert [c.kind for c in ledger.computes(since=1003.0, limit=1)] == ["hosted_generate"]


def test_totals(ledger):
    _populate(ledger)
    by_pd = ledger.totals()
    assert by_pd == [
        {"protocol": PROTOCOL_CHUNKS, "direction": "in", "events": 2, "wire_bytes": 100 + 400, "raw_bytes": 200 + 800},
        {"protocol": PROTOCOL_CHUNKS, "direction": "out", "events": 4, "wire_bytes": 200 + 300 + 500 + 600,
         "raw_bytes": 400 + 600 + 1000 + 1200},
        {"protocol": PROTOCOL_GENERATE, "direction": "out", "events": 1, "wire_bytes": 50, "raw_bytes": 0},
    ]
    per_peer = {t["peer"]: t["wire_bytes"] for t in ledger.totals(("peer",))}
    assert per_peer == {"peer0": 100 + 300 + 500 + 50, "peer1": 200 + 400 + 600}
    per_art = ledger.totals(("artifact",), direction="out")
    assert {t["artifact"]: t["events"] for t in per_art} == {ART: 2, "other": 2, None: 1}
    assert ledger.totals((), protocol=PROTOCOL_CHUNKS) == [{"events": 6, "wire_bytes": 2100, "raw_bytes": 4200}]
    assert ledger.totals(peer="nobody") == []
    with pytest.raises(UsageError):
        ledger.totals(("wire_bytes; DROP TABLE transfers",))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(peer="p", protocol="x", direction="sideways", wire_bytes=1),
        dict(peer="p", protocol="x", direction="in", wire_bytes=-1),
        dict(peer="p", protocol="x", direction="in", wire_bytes=1.5),
        dict(peer="p", protocol="x", direction="in", wire_bytes=1, raw_bytes=-2),
        dict(peer="", protocol="x", direction="in", wire_bytes=1),
    ],
)
def test_bad_transfers_are_refused(ledger, kwargs):
    with pytest.raises(UsageError):
        ledger.transfer(**kwargs)
    assert ledger.transfers() == []


@pytest.mark.parametrize(
    "kwargs",
    [dict(kind="train", seconds=1.0), dict(kind="load", seconds=-1.0), dict(kind="load", seconds=float("nan")),
     dict(kind="load", seconds=1.0, tokens=-3), dict(kind="load", seconds=1.0, extra={"x": object()})],
)
def test_bad_computes_are_refused(ledger, kwargs):
    with pytest.raises(UsageError):
        ledger.compute(**kwargs)
    assert ledger.computes() == []


def test_closed_ledger_refuses_and_close_is_idempotent(tmp_path):
    led = Ledger(ledger_path(tmp_path))
    led.close()
    led.close()
    with pytest.raises(UsageError):
        led.transfers()


def test_not_a_database_is_a_format_error(tmp_path):
    path = ledger_path(tmp_path)
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FormatError):
        Ledger(path)


def test_wal_and_full_sync(ledger):
    conn = ledger._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_many_threads_share_one_ledger(ledger):
    threads, per_thread = 8, 40
    errors: list[BaseException] = []
    ids: list[int] = []
    ids_lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(per_thread):
                if i % 2:
                    rid = ledger.transfer(peer=f"peer{n}", protocol=PROTOCOL_CHUNKS, direction="out", wire_bytes=n + 1)
                else:
                    rid = ledger.compute(kind="generate", seconds=0.001, tokens=n)
                ledger.totals()  # reads interleaved with writes
                with ids_lock:
                    ids.append(rid)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not errors
    assert len(ids) == threads * per_thread
    assert len(ledger.transfers()) == threads * per_thread // 2
    assert len(ledger.computes()) == threads * per_thread // 2
    (total,) = ledger.totals(())
    assert total["wire_bytes"] == sum((n + 1) * per_thread // 2 for n in range(threads))


_WRITER = textwrap.dedent(
    """
    import sys
    from kvswap.ledger import Ledger
    led = Ledger(sys.argv[1])
    for i in range(1_000_000):   # bounded; the parent kills us long before
        kind = i % 2
        if kind:
            rid = led.transfer(peer="p", protocol="/kvswap/chunks/1", direction="in", wire_bytes=i, request=str(i))
        else:
            rid = led.compute(kind="prefill", seconds=float(i), tokens=i)
        print(f"{kind} {rid} {i}", flush=True)   # the acknowledgement: the row is committed
    """
)


def test_acknowledged_rows_survive_sigkill(tmp_path):
    path = ledger_path(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acked = []
    try:
        for line in proc.stdout:
            acked.append(tuple(int(x) for x in line.split()))
            if len(acked) >= 60:
                break
        os.kill(proc.pid, signal.SIGKILL)  # right after the 60th acknowledgement, mid-stream
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) == 60
    with Ledger(path) as led:
        transfers = {r.id: r for r in led.transfers()}
        computes = {r.id: r for r in led.computes()}
    for kind, rid, i in acked:
        if kind:
            assert transfers[rid].wire_bytes == i and transfers[rid].request == str(i)
        else:
            assert computes[rid].tokens == i and computes[rid].seconds == float(i)
