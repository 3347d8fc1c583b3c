"""Every `kvswap` command, the way a user meets it: a fresh interpreter per command, against real homes with
tiny-qwen3, with and without a running node where a command has both paths. Each runs with good input (exit 0)
and with bad input (a non-zero exit, exactly one `error: ...` line, nothing lost: the homes' stores, configs
and ledgers are as they were); no stderr ever holds a traceback. One module, two daemons (a node to go
through, and a second one to fetch from it), shared by every case.

The matrix covers every subcommand `kvswap --help` lists (`test_the_matrix_covers_every_command` fails the
day a command is added without a row here).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from bench.harness.nodes import NodeProc
from tests.conftest import DOC_TEXT, QUESTION_TEXT

pytestmark = pytest.mark.timeout(900)


def run(home: Path | None, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "kvswap", *args] + (["--home", str(home)] if home is not None else [])
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@dataclass
class World:
    root: Path
    doc: Path
    doc2: Path
    solo: Path  # no node runs here: commands work in their own process
    a: NodeProc  # a node runs here: commands go through it
    b: NodeProc  # a second node, bootstrapped through a, that fetches from it
    ids: dict = field(default_factory=dict)

    def home(self, which: str) -> Path:
        return {"solo": self.solo, "a": self.a.home, "b": self.b.home}[which]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    doc, doc2 = root / "doc.txt", root / "doc2.txt"
    doc.write_text(DOC_TEXT, encoding="utf-8")
    doc2.write_text(DOC_TEXT + " A second edition followed within the year.", encoding="utf-8")
    a = NodeProc(root / "a")
    b = NodeProc(root / "b", bootstrap=[a.addr])
    try:
        a.wait_model()
        b.wait_model()
        w = World(root, doc, doc2, root / "solo", a, b)
        pub = json.loads(run(w.solo, "publish", str(doc), "--model", "tiny-qwen3", "--block-tokens", "16",
                             "--json").stdout)
        w.ids["solo_cid"] = pub["cid"]
        w.ids["a_cid"] = json.loads(run(a.home, "publish", str(doc), "--json").stdout)["cid"]
        w.ids["a_key"] = json.loads(run(a.home, "id", "--json").stdout)["public_key"]
        assert run(b.home, "trust", "add", w.ids["a_key"]).returncode == 0
        yield w
    finally:
        b.stop()
        a.stop()


def _fingerprint(home: Path) -> str:
    """What bad input must not change in a home: the store's artifacts, config.toml, and the ledger's rows."""
    h = hashlib.sha256()
    listed = run(home, "ls", "--json")
    h.update(json.dumps(sorted((a["cid"], a["complete"], a["pinned"]) for a in json.loads(listed.stdout)["artifacts"]))
             .encode())
    cfg = home / "config.toml"
    h.update(cfg.read_bytes() if cfg.exists() else b"")
    ledger = json.loads(run(home, "ledger", "--json").stdout)
    h.update(json.dumps([len(ledger.get("transfers", [])), len(ledger.get("computes", []))]).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Case:
    command: str  # the subcommand it exercises (the first word after `kvswap`)
    where: str  # solo | a | b | none (no --home)
    argv: Callable[[World], list[str]]
    check: Callable[[dict | str], bool] = lambda out: True
    timeout: float = 300


def _json(proc: subprocess.CompletedProcess) -> dict | str:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return proc.stdout


GOOD = [
    Case("--version", "none", lambda w: ["--version"], lambda out: "kvswap" in out),
    Case("--help", "none", lambda w: ["--help"], lambda out: "publish" in out),
    Case("models", "solo", lambda w: ["models", "--json"], lambda out: any(m["name"] == "tiny-qwen3" for m in out["models"])),
    Case("exact", "solo", lambda w: ["exact", "--doc", str(w.doc), "--model", "tiny-qwen3", "--tokens", "8", "--json"],
         lambda out: out["exact"] is True),
    Case("publish", "solo", lambda w: ["publish", str(w.doc2), "--model", "tiny-qwen3", "--json"],
         lambda out: out["n_tokens"] > 0),
    Case("publish", "a", lambda w: ["publish", str(w.doc2), "--json"], lambda out: out["n_tokens"] > 0),
    Case("generate", "solo", lambda w: ["generate", w.ids["solo_cid"], "--prompt", QUESTION_TEXT, "--max-new-tokens",
                                        "3", "--json"], lambda out: out["mode"] == "local" and len(out["tokens"]) <= 3),
    Case("generate", "a", lambda w: ["generate", "--doc", str(w.doc), "--prompt", QUESTION_TEXT, "--max-new-tokens",
                                     "3", "--json"], lambda out: out["mode"] == "local"),
    Case("generate", "b", lambda w: ["generate", w.ids["a_cid"], "--prompt", QUESTION_TEXT, "--max-new-tokens", "3",
                                     "--host", w.a.addr, "--json"], lambda out: out["mode"] == "hosted"),
    Case("audit", "solo", lambda w: ["audit", w.ids["solo_cid"], "--blocks", "1", "--no-sign", "--json"],
         lambda out: out["passed"] and out["mode"] == "exact"),
    Case("audit", "a", lambda w: ["audit", w.ids["a_cid"], "--blocks", "1", "--json"], lambda out: out["passed"]),
    Case("ls", "solo", lambda w: ["ls", "--json"], lambda out: len(out["artifacts"]) >= 1),
    Case("ls", "a", lambda w: ["ls"], lambda out: "complete" in out),
    Case("inspect", "solo", lambda w: ["inspect", w.ids["solo_cid"][:24], "--json"],
         lambda out: out["compute"]["device"] == "cpu"),
    Case("verify", "solo", lambda w: ["verify", w.ids["solo_cid"], "--json"], lambda out: out["ok"]),
    Case("export", "solo", lambda w: ["export", w.ids["solo_cid"], str(w.root / "x.kvx"), "--json"],
         lambda out: out["blobs"] > 0),
    Case("import", "b", lambda w: ["import", str(w.root / "x.kvx"), "--accept-any", "--json"],
         lambda out: out["cid"].startswith("b")),
    Case("pin", "b", lambda w: ["pin", w.ids["solo_cid"], "--json"], lambda out: out["pinned"] is True),
    Case("unpin", "b", lambda w: ["unpin", w.ids["solo_cid"], "--json"], lambda out: out["pinned"] is False),
    Case("rm", "b", lambda w: ["rm", w.ids["solo_cid"], "--json"], lambda out: out["freed"] > 0),
    Case("gc", "solo", lambda w: ["gc", "--budget", "100GiB", "--json"], lambda out: out["evicted"] == []),
    Case("fsck", "solo", lambda w: ["fsck", "--json"], lambda out: out["ok"]),
    Case("trust", "b", lambda w: ["trust", "ls", "--json"], lambda out: out["trusted"] == [w_key()]),
    Case("trust", "solo", lambda w: ["trust", "policy", "--accept-audited", "0", "--json"],
         lambda out: out["accept_audited"] == 0),
    Case("id", "solo", lambda w: ["id", "--json"], lambda out: len(out["public_key"]) == 64),
    Case("node", "a", lambda w: ["node", "status", "--json"], lambda out: out["model"] == "tiny-qwen3"),
    Case("node", "a", lambda w: ["node", "addr"], lambda out: "/p2p/" in out),
    Case("peers", "a", lambda w: ["peers", "--json"], lambda out: len(out) >= 1),
    Case("get", "b", lambda w: ["get", "--doc", str(w.doc), "--no-progress", "--json"],
         lambda out: out["complete"] and out["audit"]["mode"] == "exact"),
    Case("ledger", "solo", lambda w: ["ledger", "--json"], lambda out: len(out["computes"]) >= 1),
    Case("ledger", "solo", lambda w: ["ledger", "tabs", "--json"], lambda out: out["tabs"] == []),
    Case("ledger", "solo", lambda w: ["ledger", "settle", "--out", str(w.root / "statement.json"), "--json"],
         lambda out: out["vouchers"] == 0),
    Case("receipts", "none", lambda w: ["receipts", "verify", str(w.root / "statement.json"), "--json"],
         lambda out: out["valid"] and out["vouchers"] == 0),
    Case("report", "b", lambda w: ["report", "--json"], lambda out: "n_star" in json.dumps(out)),
    Case("config", "solo", lambda w: ["config", "show", "--json"], lambda out: "node.listen" in out["settings"]),
    Case("config", "solo", lambda w: ["config", "set", "store.budget", "30GiB", "--json"],
         lambda out: out["value"] == "30GiB"),
    Case("demo", "none", lambda w: ["demo", "--model", "tiny-qwen3", "--max-new-tokens", "4", "--json"],
         lambda out: out["exact"]["exact"] and out["ship_equals_host"], timeout=600),
]

_A_KEY: list[str] = []


def w_key() -> str:
    return _A_KEY[0]


BAD = [
    Case("--version", "none", lambda w: ["--no-such-flag"]),
    Case("models", "solo", lambda w: ["models", "extra-argument"]),
    Case("exact", "solo", lambda w: ["exact", "--doc", str(w.root / "missing.txt"), "--model", "tiny-qwen3"]),
    Case("exact", "solo", lambda w: ["exact", "--doc", str(w.doc), "--model", "nosuchmodel"]),
    Case("publish", "solo", lambda w: ["publish", str(w.root / "empty.txt"), "--model", "tiny-qwen3"]),
    Case("publish", "a", lambda w: ["publish", str(w.doc), "--model", "smollm2-135m"]),  # not the node's model
    Case("publish", "solo", lambda w: ["publish", str(w.doc), "--codec", "brotli"]),
    Case("generate", "solo", lambda w: ["generate", "bafkreinosuchartifactbafkreinosuchartifact", "--prompt", "x"]),
    Case("generate", "solo", lambda w: ["generate", w.ids["solo_cid"], "--prompt", "x", "--host", w.a.addr]),
    Case("generate", "a", lambda w: ["generate", w.ids["a_cid"], "--prompt", "x", "--max-new-tokens", "-3"]),
    Case("audit", "solo", lambda w: ["audit", w.ids["solo_cid"], "--exact", "--tolerance"]),
    Case("audit", "a", lambda w: ["audit", "no-such-cid"]),
    Case("ls", "solo", lambda w: ["ls", "--bogus"]),
    Case("inspect", "solo", lambda w: ["inspect", "bafkreinosuch"]),
    Case("verify", "solo", lambda w: ["verify", "not-a-cid"]),
    Case("export", "solo", lambda w: ["export", "not-a-cid", str(w.root / "y.kvx")]),
    Case("import", "solo", lambda w: ["import", str(w.root / "missing.kvx")]),
    Case("import", "solo", lambda w: ["import", str(w.doc)]),  # not an export file
    Case("pin", "solo", lambda w: ["pin", "not-a-cid"]),
    Case("unpin", "solo", lambda w: ["unpin", "not-a-cid"]),
    Case("rm", "solo", lambda w: ["rm", "not-a-cid"]),
    Case("gc", "solo", lambda w: ["gc", "--budget", "lots"]),
    Case("fsck", "solo", lambda w: ["fsck", "--bogus"]),
    Case("trust", "solo", lambda w: ["trust", "add", "not-a-key"]),
    Case("trust", "solo", lambda w: ["trust", "rm", "ab" * 32]),
    Case("id", "solo", lambda w: ["id", "extra"]),
    Case("node", "solo", lambda w: ["node", "status"]),  # no node runs here
    Case("node", "solo", lambda w: ["node", "start", "--model", "nosuchmodel", "--listen", "/ip4/127.0.0.1/tcp/0"]),
    Case("node", "solo", lambda w: ["node", "start", "--listen", "not-a-multiaddr", "--no-model"]),
    Case("node", "a", lambda w: ["node", "start", "--listen", "/ip4/127.0.0.1/tcp/0"]),  # one runs already
    Case("peers", "solo", lambda w: ["peers"]),
    Case("get", "b", lambda w: ["get", "--doc-hash", "xyz", "--no-progress"]),
    Case("get", "b", lambda w: ["get", "not-a-cid", "--no-progress"]),
    Case("get", "solo", lambda w: ["get", "--doc", str(w.doc), "--no-progress"]),  # fetching needs a node
    Case("ledger", "solo", lambda w: ["ledger", "--kind", "bogus"]),
    Case("ledger", "solo", lambda w: ["ledger", "settle", "--out", str(w.root)]),  # a folder, not a file
    Case("receipts", "none", lambda w: ["receipts", "verify", str(w.doc)]),  # not a statement
    Case("receipts", "none", lambda w: ["receipts", "verify", str(w.root / "missing.json")]),
    Case("report", "solo", lambda w: ["report", "--artifact", "not-a-cid"]),
    Case("config", "solo", lambda w: ["config", "set", "no.such", "1"]),
    Case("config", "solo", lambda w: ["config", "set", "node.audit_fraction", "2"]),
    # both before any node starts (the check sees stderr: the demo's progress lines go there)
    Case("demo", "none", lambda w: ["demo", "--doc", str(w.root / "missing.txt"), "--model", "tiny-qwen3"],
         check=lambda err: "starting node" not in err),
    Case("demo", "none", lambda w: ["demo", "--model", "nosuchmodel"], check=lambda err: "starting node" not in err),
]


def test_the_matrix_covers_every_command():
    out = run(None, "--help").stdout
    listed = set(re.findall(r"^    (\w+) ", out, flags=re.M))
    assert listed and {c.command for c in GOOD} >= listed and {c.command for c in BAD} >= listed


def _ids(cases):
    return [f"{c.command}-{c.where}-{i}" for i, c in enumerate(cases)]


@pytest.mark.parametrize("case", GOOD, ids=_ids(GOOD))
def test_good_input_exits_zero(world, case):
    if not _A_KEY:
        _A_KEY.append(world.ids["a_key"])
    proc = run(None if case.where == "none" else world.home(case.where), *case.argv(world), timeout=case.timeout)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert case.check(_json(proc)), proc.stdout[-2000:]


@pytest.mark.parametrize("case", BAD, ids=_ids(BAD))
def test_bad_input_is_one_line_and_loses_nothing(world, case):
    (world.root / "empty.txt").write_text("  \n", encoding="utf-8")
    home = None if case.where == "none" else world.home(case.where)
    before = _fingerprint(home) if home is not None and home.exists() else None
    proc = run(home, *case.argv(world), timeout=case.timeout)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, (proc.returncode, proc.stderr[-2000:])
    assert case.check(proc.stderr), proc.stderr[-2000:]
    if before is not None:
        assert _fingerprint(home) == before, "bad input changed the home"
