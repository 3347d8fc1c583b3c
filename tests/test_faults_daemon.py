"""Fault tests on real daemons (separate `kvswap node start` processes, real libp2p on 127.0.0.1, tiny-qwen3,
real stores), driven through the real CLI. The net layer's own fault tests (tests/test_fetch.py,
tests/test_p2p.py) cover corrupted chunks, dying providers and bad frames on in-process nodes; these show
the same faults end to end: processes killed with SIGKILL, chunk files corrupted on a provider's disk.

Starting a daemon costs seconds (each loads its model), so one swarm serves the whole module and the
scenarios run in file order (each one says which nodes it expects):
  A publishes a ~1,700-token document in 4-token blocks (~420 chunks, a fetch takes a few seconds here).
  1. consumer C SIGKILLed mid-fetch -> stale node.json reported, restart, fsck clean, fetch resumes;
     C now holds a full copy, so two providers hold it.
  2. consumer D fetches from A and C; C SIGKILLed mid-transfer -> D completes from A.
  3. D's chunk files are corrupted on disk; E fetches from A and D -> D penalised, E verified.
     Then with A and E stopped, D is the only provider: F's get fails with one error line, F's store clean.
  4. CLI bad input: malformed CID, unknown document hash, wrong dtype for an artifact, no daemon.
"""

from __future__ import annotations

import json
import time

import pytest

from bench.harness.nodes import NodeProc, chunk_files, cli, cli_json, error_lines, finish_cli, spawn_cli

DOC = "The keeper walked the cliff path at dusk, counting the gulls and the lamps of the boats below. " * 80
#: tokens per chunk at publish: small, so a fetch has hundreds of chunks and lasts long enough to interrupt
BLOCK_TOKENS = "4"
#: bound on the polling loops below (a whole fetch takes a few seconds here)
POLL_LIMIT_S = 120.0


class Swarm:
    """The module's daemons by name (a restarted node replaces its entry) and the published artifact."""

    def __init__(self, root):
        self.root = root
        self.nodes: dict[str, NodeProc] = {}

    def start(self, name: str, **kw) -> NodeProc:
        node = NodeProc(self.root / name, **kw)
        self.nodes[name] = node
        return node

    def trust_publisher(self, node: NodeProc) -> None:
        cli(node.home, "trust", "add", self.publisher_key)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.proc.poll() is None:
                node.stop()
            elif not node.log.closed:
                node.log.close()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("faults"))
    try:
        doc = s.root / "doc.txt"
        doc.write_text(DOC)
        a = s.start("a")
        a.wait_model()
        s.pub = cli_json(a.home, "publish", str(doc), "--block-tokens", BLOCK_TOKENS)
        s.cid = s.pub["cid"]
        s.publisher_key = cli_json(a.home, "id")["public_key"]
        s.total_chunks = len(chunk_files(a.home))  # distinct blobs (chunks + tail), as `get` counts them
        assert s.total_chunks >= 100, s.total_chunks
        yield s
    finally:
        s.stop_all()


def kill_when_partial(get_proc, watched: NodeProc, victim: NodeProc, total: int) -> int:
    """SIGKILL `victim` as soon as `watched`'s store holds some but not all chunks; return the count then."""
    deadline = time.monotonic() + POLL_LIMIT_S
    while time.monotonic() < deadline:
        assert get_proc.poll() is None or victim is not watched, "the fetch ended before it could be interrupted"
        n = len(chunk_files(watched.home))
        if n > 0:
            victim.kill()
            assert n < total, f"fetch already finished ({n}/{total} chunks) before the kill"
            return n
        time.sleep(0.005)
    raise AssertionError("no chunk arrived in time")


def assert_fsck_clean(home) -> dict:
    report = cli_json(home, "fsck")
    assert report["ok"] and not report["problems"], report
    return report


def test_consumer_sigkilled_mid_fetch_restarts_consistent_and_resumes(swarm):
    a = swarm.nodes["a"]
    c = swarm.start("c", bootstrap=[a.addr])
    swarm.trust_publisher(c)
    get = spawn_cli(c.home, "get", swarm.cid, "--no-progress", "--json")
    at_kill = kill_when_partial(get, c, c, swarm.total_chunks)
    out = finish_cli(get, timeout=60)
    assert out.returncode != 0 and len(error_lines(out)) == 1, out.stderr[-2000:]  # its daemon vanished
    print(error_lines(out)[0])
    assert len(chunk_files(c.home)) < swarm.total_chunks

    # the killed daemon left node.json behind: the CLI says so instead of hanging, and start works again
    status = cli(c.home, "node", "status", check=False, timeout=60)
    assert status.returncode != 0
    assert error_lines(status) and "not running any more" in error_lines(status)[0], status.stderr
    print(error_lines(status)[0])
    c.log.close()
    # store consistent before the daemon touches it again (a stray temp file is garbage, not a problem)
    assert_fsck_clean(c.home)
    held = len(chunk_files(c.home))
    assert held >= at_kill

    c = swarm.start("c", bootstrap=[a.addr])  # same home, same identity
    got = cli_json(c.home, "get", swarm.cid, "--no-progress")
    assert got["complete"] and got["cid"] == swarm.cid
    assert got["chunks"] == swarm.total_chunks
    assert got["chunks_fetched"] == swarm.total_chunks - held < swarm.total_chunks  # only the missing ones
    assert cli_json(c.home, "verify", swarm.cid)["ok"]
    assert_fsck_clean(c.home)


def test_provider_sigkilled_mid_transfer_fetch_completes_from_the_other(swarm):
    a, c = swarm.nodes["a"], swarm.nodes["c"]
    assert c.proc.poll() is None, "needs C from the previous scenario (a full copy)"
    d = swarm.start("d", bootstrap=[a.addr, c.addr])
    swarm.trust_publisher(d)
    get = spawn_cli(d.home, "get", swarm.cid, "--no-progress", "--json")
    kill_when_partial(get, d, c, swarm.total_chunks)
    out = finish_cli(get, timeout=300)
    log = (d.home / "node.log").read_text(errors="replace")
    # D was using C when C died (or tried it after): the request failed (penalised), or, when C stalled before its
    # connection dropped, D gave C's chunks to A first (late); a loaded machine gives either (both seen)
    assert f"provider {c.peer_id[:16]} penalised" in log or f"provider {c.peer_id[:16]} late" in log, log[-3000:]
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["complete"] and got["chunks"] == swarm.total_chunks
    assert a.peer_id in got["providers"] and set(got["providers"]) <= {a.peer_id, c.peer_id}
    assert cli_json(d.home, "verify", swarm.cid)["ok"]


def _corrupt(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash check can catch it
    path.write_bytes(bytes(data))


def test_corrupted_chunks_on_a_provider_are_rejected_and_taken_elsewhere(swarm):
    a, d = swarm.nodes["a"], swarm.nodes["d"]
    assert d.proc.poll() is None, "needs D from the previous scenario (a full copy)"
    files = chunk_files(d.home)
    assert len(files) == swarm.total_chunks
    for path in files:  # every chunk D serves is bad, so any batch E asks of D fails verification
        _corrupt(path)

    e = swarm.start("e", bootstrap=[a.addr, d.addr])
    swarm.trust_publisher(e)
    got = cli_json(e.home, "get", swarm.cid, "--no-progress")
    assert got["complete"] and got["chunks"] == swarm.total_chunks
    assert d.peer_id not in got["providers"] and a.peer_id in got["providers"]
    assert cli_json(e.home, "verify", swarm.cid)["ok"]
    assert_fsck_clean(e.home)
    log = (e.home / "node.log").read_text(errors="replace")
    assert f"provider {d.peer_id[:16]} penalised" in log

    # D alone: nobody serves good bytes, so the fetch fails cleanly and stores nothing bad
    for name in ("a", "e"):  # SIGTERM both, then wait: a clean stop takes seconds
        swarm.nodes[name].proc.terminate()
    for name in ("a", "e"):
        swarm.nodes[name].stop()
    f = swarm.start("f", bootstrap=[d.addr])
    swarm.trust_publisher(f)
    out = cli(f.home, "get", swarm.cid, "--no-progress", check=False, timeout=240)
    assert out.returncode != 0
    errors = error_lines(out)
    assert len(errors) == 1, out.stderr[-2000:]
    print(errors[0])
    assert_fsck_clean(f.home)  # every chunk file there (if any) hashes to its name
    rows = cli_json(f.home, "ls")["artifacts"]  # registered before its chunks, never marked complete
    assert [(r["cid"], r["complete"]) for r in rows] in ([], [(swarm.cid, False)])
    refused = cli(f.home, "verify", swarm.cid, check=False, timeout=60)
    assert refused.returncode != 0 and len(error_lines(refused)) == 1, refused.stderr
    print(error_lines(refused)[0])


def test_cli_bad_input_gives_one_clear_error(swarm, tmp_path):
    f = swarm.nodes["f"]
    assert f.proc.poll() is None, "needs F from the previous scenario"

    bad_cid = cli(f.home, "get", "not-a-cid", "--no-progress", check=False, timeout=60)
    assert bad_cid.returncode != 0 and len(error_lines(bad_cid)) == 1, bad_cid.stderr
    print(error_lines(bad_cid)[0])

    f.wait_model()  # --doc-hash keys on the node's model
    unknown = cli(f.home, "get", "--doc-hash", "ab" * 32, "--no-progress", check=False, timeout=120)
    assert unknown.returncode != 0 and len(error_lines(unknown)) == 1, unknown.stderr
    print(error_lines(unknown)[0])
    assert "no provider" in error_lines(unknown)[0] or "not found" in error_lines(unknown)[0].lower()

    # C (killed in scenario 2) holds the verified bf16 artifact; asking for fp32 generation from it is a ModelMismatch
    c_home = swarm.nodes["c"].home
    mismatch = cli(c_home, "generate", swarm.cid, "--prompt", " Why?", "--dtype", "fp32", "--max-new-tokens", "2",
                   check=False, timeout=120)
    assert mismatch.returncode != 0 and len(error_lines(mismatch)) == 1, mismatch.stderr
    print(error_lines(mismatch)[0])
    assert "bf16" in error_lines(mismatch)[0] and "fp32" in error_lines(mismatch)[0]

    # no daemon in this home at all
    empty = tmp_path / "nobody"
    empty.mkdir()
    status = cli(empty, "node", "status", check=False, timeout=60)
    assert status.returncode != 0 and len(error_lines(status)) == 1
    print(error_lines(status)[0])
    assert "no node is running" in error_lines(status)[0]
