"""A swarm on real daemons (`kvswap node start` processes, real libp2p on 127.0.0.1): one publisher with
tiny-qwen3 and four light consumers (`--no-model`) that fetch the same artifact at the same moment. With
upload slots and super-seeding (issue 24) the publisher sends each chunk once, and the consumers trade the
rest among themselves; a light node never imports torch, serves what it fetched, and answers a hosted
request with one clear line."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from kvswap.ledger import Ledger
from kvswap.protocol.names import CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL

from bench.harness.nodes import NodeProc, cli, cli_json, error_lines, finish_cli, spawn_cli

DOC = ("Every spring the ferry company published its tide tables, and every captain copied them by hand, line "
       "by line, into the log he kept on the bridge. A table copied once and passed along saved the others the "
       "trouble; a table copied by every captain cost the company a week of ink. ") * 8
CONSUMERS = 4


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("swarm")
    started: list[NodeProc] = []
    try:
        pub = NodeProc(root / "pub")
        started.append(pub)
        consumers = []
        for i in range(CONSUMERS):
            node = NodeProc(root / f"c{i}", model=None, bootstrap=[pub.addr], accept_any=True)
            started.append(node)
            consumers.append(node)
        pub.wait_model()
        doc = root / "doc.txt"
        doc.write_text(DOC)
        published = cli_json(pub.home, "publish", str(doc))
        gets = [spawn_cli(c.home, "get", published["cid"], "--no-progress", "--json") for c in consumers]
        results = [finish_cli(g, timeout=240) for g in gets]
        yield pub, consumers, published, results
    finally:
        for node in started:
            node.stop()


def _chunks_sent(home) -> Counter:
    """Chunk CID -> times its bytes went out (ChunkData on either path; rationed answers carry no bytes)."""
    rows = Ledger.for_home(home).transfers(protocols=(CHUNKS_PROTOCOL, DATAPLANE_PROTOCOL), direction="out")
    return Counter(r.chunk for r in rows if r.chunk and (r.raw_bytes or 0) > 0)


def _late_chunks(nodes) -> int:
    """Chunks the nodes' fetches took from a late request and gave to a faster peer (their node.log)."""
    logs = [(node.home / "node.log").read_text(errors="replace") for node in nodes]
    return sum(int(n) for log in logs for n in re.findall(r"late \([\d.]+ s for (\d+) chunks\)", log))


def test_four_consumers_at_once_cost_the_publisher_one_copy_of_each_chunk(swarm):
    pub, consumers, published, results = swarm
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    inspected = cli_json(pub.home, "inspect", published["cid"])
    blobs = {c["cid"] for c in inspected["chunks"]} | ({inspected["tail"]["cid"]} if inspected.get("tail") else set())
    sent = _chunks_sent(pub.home)
    assert set(sent) == blobs
    assert max(sent.values()) == 1, sent  # super-seeding: one copy of each chunk, the consumers trade the rest
    reshared = sum(sum(_chunks_sent(c.home).values()) for c in consumers)
    # each consumer took every chunk the publisher did not send it from another; a copy more only where a consumer
    # gave a late request's chunk to a faster peer while the first copy was still coming (a loaded CI machine
    # did, once in a few runs: the duplicate arrived in full)
    assert 0 <= reshared - (CONSUMERS - 1) * len(blobs) <= _late_chunks(consumers), (reshared, len(blobs))
    for c in consumers:
        assert cli_json(c.home, "verify", published["cid"], "--accept-any")["ok"]


def test_light_nodes_never_import_torch_and_show_their_upload_rules(swarm):
    _, consumers, _, _ = swarm
    for c in consumers:
        status = cli_json(c.home, "node", "status")
        assert status["light"] is True and status["torch_imported"] is False
        uploads = status["uploads"]
        assert uploads["swarm"] == "superseed" and uploads["slots"] > 0 and uploads["sending"] == 0


def test_a_hosted_request_to_a_light_node_gets_one_clear_line(swarm):
    pub, consumers, published, _ = swarm
    proc = cli(pub.home, "generate", published["cid"], "--prompt", " Who copied the tables?",
               "--max-new-tokens", "4", "--host", consumers[0].addr, check=False)
    assert proc.returncode != 0
    (line,) = error_lines(proc)
    assert "without a model" in line and "Traceback" not in proc.stderr


def test_the_publishers_metrics_count_its_rationed_answers_and_idle_slots(swarm):
    import urllib.request

    from kvswap.control.runfiles import api_token

    pub, _, _, _ = swarm
    req = urllib.request.Request(pub.info["api"] + "/metrics", headers={"Authorization": f"Bearer {api_token(pub.home)}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        text = resp.read().decode()
    values = {line.split(" ")[0]: float(line.split(" ")[-1]) for line in text.splitlines()
              if line.startswith("kvswap_upload") or line.startswith("kvswap_rationed")}
    status = cli_json(pub.home, "node", "status")["uploads"]
    assert values["kvswap_rationed_answers_total"] == status["rationed_answers"] > 0  # the others were pointed on
    assert values["kvswap_uploads_sending"] == 0 and values["kvswap_uploads_waiting"] == 0  # the swarm is over
    assert values["kvswap_upload_slot_timeouts_total"] == status["slot_timeouts"]
