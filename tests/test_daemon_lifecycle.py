"""The daemon's life on its own: persistent identity, a private log, gossip announcements reach a peer,
control-API auth, clean and bounded shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request

import pytest

from kvswap.node.tuning import DaemonTuning

SHUTDOWN_TIMEOUT_S = DaemonTuning.shutdown_timeout_s

from bench.harness.nodes import NodeProc, cli, cli_json


def _wait_for(predicate, timeout: float = 60.0, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError("condition not met in time")


def test_identity_announce_auth_and_shutdown(tmp_path, tiny_engine):
    a = NodeProc(tmp_path / "a")
    b = NodeProc(tmp_path / "b", bootstrap=[a.addr])
    try:
        a.wait_model()
        b.wait_model()
        # the libp2p peer id and the manifest signer are one key
        status = cli_json(a.home, "node", "status")
        assert status["public_key"] == cli_json(a.home, "id")["public_key"]
        assert (a.home / "node.log").stat().st_mode & 0o777 == 0o600  # private, like the keys

        doc = tmp_path / "doc.txt"
        doc.write_text("A lamp already lit costs a few drops an hour; relighting costs a pint. " * 4)
        pub = cli_json(a.home, "publish", str(doc))
        heard = _wait_for(lambda: [x for x in cli_json(b.home, "node", "status")["announcements"]
                                   if x["cid"] == pub["cid"]])
        assert heard[0]["from"] == a.peer_id and heard[0]["n_tokens"] == pub["n_tokens"]

        # the control API refuses a request without the token
        req = urllib.request.Request(a.info["api"] + "/status")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
    finally:
        t0 = time.monotonic()
        b.proc.send_signal(signal.SIGINT)
        a.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(SHUTDOWN_TIMEOUT_S + 15) == 0
        assert a.proc.wait(SHUTDOWN_TIMEOUT_S + 15) == 0
        assert time.monotonic() - t0 < SHUTDOWN_TIMEOUT_S + 15
        a.stop(), b.stop()
    assert not (a.home / "node.json").exists()
    gone = cli(a.home, "node", "status", check=False)
    assert gone.returncode != 0 and gone.stderr.strip().startswith("error: no node is running")

    # restart on the same home: same identity, the artifact is still there and still provided
    again = NodeProc(tmp_path / "a")
    try:
        assert again.peer_id == a.peer_id
        listed = cli_json(again.home, "ls")
        assert [x["cid"] for x in listed["artifacts"]] == [pub["cid"]]
    finally:
        again.stop()
