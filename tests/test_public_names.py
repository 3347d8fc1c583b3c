"""Public names are what the docs promise, whatever was imported first, in a fresh interpreter each time.

Python binds a package's attribute to a submodule when the submodule is imported, over whatever the package's
__init__ bound there: `kvswap.audit` was the function after `import kvswap` and the module after
`from kvswap.audit import ...`, so `kvswap audit` crashed for every user while in-process tests passed. So: no
public name of a package equals one of its submodules, and in a fresh interpreter that first imports the CLI,
the daemon, or any module of the package, every name of `kvswap.__all__` (and `kvswap.ops.__all__`) is the
object defined where the docs say.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import kvswap
import kvswap.ops

#: public name -> the module that defines it (README "Python", ARCHITECTURE.md "Python surface")
PROMISED = {
    "AuditFailed": "kvswap.protocol.errors", "Cid": "kvswap.protocol.cid", "Document": "kvswap.document",
    "FormatError": "kvswap.protocol.errors", "Home": "kvswap.home", "IntegrityError": "kvswap.protocol.errors",
    "KvLayout": "kvswap.kvtensors", "KvTensors": "kvswap.kvtensors", "KvswapError": "kvswap.protocol.errors",
    "LimitExceeded": "kvswap.protocol.errors", "LoadedCache": "kvswap.engine.loaded",
    "LocalProtocolError": "kvswap.protocol.errors", "ModelMismatch": "kvswap.protocol.errors",
    "NotFound": "kvswap.protocol.errors", "ProtocolError": "kvswap.protocol.errors",
    "RemoteProtocolError": "kvswap.protocol.errors", "UntrustedSigner": "kvswap.protocol.errors",
    "UsageError": "kvswap.protocol.errors", "audit": "kvswap.ops.auditing", "generate": "kvswap.ops.generation",
    "get": "kvswap.ops.fetching", "load_cache": "kvswap.ops.loading", "publish": "kvswap.ops.publishing",
    "report": "kvswap.ops.costs",
}

_CHECK = """
import importlib, json, sys
first = sys.argv[1]
importlib.import_module(first)
import kvswap, kvswap.ops
promised = json.loads(sys.argv[2])
wrong = []
for package in (kvswap, kvswap.ops):
    for name in package.__all__:
        obj = getattr(package, name)
        where = promised.get(name) if package is kvswap else getattr(obj, "__module__", None)
        home = importlib.import_module(where) if where else None
        if type(obj).__name__ == "module" or home is None or getattr(home, name, None) is not obj:
            wrong.append(f"{package.__name__}.{name} is {obj!r:.60}")
print(json.dumps(wrong))
"""


def _first_imports() -> list[str]:
    """What a process may import first: the package, the CLI, `python -m kvswap`'s entry, the daemon, and every
    direct submodule of kvswap and of kvswap.ops (a name shadowed by one of them breaks after that import)."""
    firsts = ["kvswap", "kvswap.cli", "kvswap.node.daemon", "kvswap.node.net", "kvswap.protocol.messages"]
    for package in (kvswap, kvswap.ops):
        firsts += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
                   if m.name not in ("__main__", "node", "protocol", "integrations")]
    return firsts


def test_no_public_name_is_also_a_submodule():
    for package in (kvswap, kvswap.ops, kvswap.engine):
        submodules = {m.name for m in pkgutil.iter_modules(package.__path__)}
        assert not set(package.__all__) & submodules, package.__name__


def test_all_is_what_the_docs_promise():
    assert sorted(kvswap.__all__) == sorted(PROMISED)


@pytest.mark.parametrize("first", _first_imports())
def test_public_names_hold_whatever_was_imported_first(first):
    proc = subprocess.run([sys.executable, "-c", _CHECK, first, json.dumps(PROMISED)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == []
