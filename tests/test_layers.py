"""The layers the tree shows, checked on the code's own imports (every import, at module level or inside a
function: a lazy import is still a dependency).

    kvswap/cli/                 the command line: the top; the only part of kvswap/ that may import node/
    node/                       the daemon (libp2p, control API); imports kvswap/ (the library) and protocol/
    kvswap/ (all but cli/)      the library: engine, artifact format, store, ledger, ops, control-API client
    protocol/                   the wire, sans-I/O: the bottom; imports nothing of kvswap/ or node/

pyproject maps node/ to `kvswap.node` and protocol/ to `kvswap.protocol`, so a relative import can cross a
top-level folder without looking like it; imports are resolved to files here, so none can hide. And no two
modules import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: installed package -> folder (pyproject.toml's package-dir)
FOLDERS = {"kvswap.node": ROOT / "node", "kvswap.protocol": ROOT / "protocol", "kvswap": ROOT / "kvswap"}


def _module_files() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "kvswap" and parts[:1] in (["node"], ["protocol"]):
                continue
            out[name] = path
    return out


MODULES = _module_files()


def _resolve(importer: str, node: ast.AST) -> list[str]:
    """The kvswap modules an import statement in module `importer` names."""
    is_package = MODULES[importer].name == "__init__.py"
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            names.append(sub if sub in MODULES else module)
    out = []
    for name in names:
        while name and name not in MODULES:  # `import kvswap.engine.core` names that module; a name in one, its module
            name = name.rpartition(".")[0]
        if name and name != importer:
            out.append(name)
    return out


def _imports() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        graph[name] = {dep for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for dep in _resolve(name, node)}
    return graph


GRAPH = _imports()


def _layer(module: str) -> str:
    if module.startswith("kvswap.protocol"):
        return "protocol"
    if module.startswith("kvswap.node"):
        return "node"
    if module.startswith("kvswap.cli") or module == "kvswap.__main__":
        return "cli"
    return "library"


def test_the_graph_is_read():
    assert len(MODULES) > 80 and "kvswap.node.daemon" in GRAPH["kvswap.cli.node_cmds"]
    assert "kvswap.protocol.cid" in GRAPH["kvswap.protocol.messages"]


def test_protocol_is_the_bottom():
    bad = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if _layer(m) == "protocol"
                 for d in deps if _layer(d) != "protocol")
    assert not bad, bad


def test_the_library_never_imports_node_and_only_the_cli_does():
    bad = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if _layer(m) == "library"
                 for d in deps if _layer(d) in ("node", "cli"))
    assert not bad, bad


def test_node_imports_the_library_and_protocol_never_the_cli():
    bad = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if _layer(m) == "node" for d in deps if _layer(d) == "cli")
    assert not bad, bad
    assert any(_layer(d) == "library" for d in GRAPH["kvswap.node.daemon"])


def test_no_import_cycle_between_modules():
    """Tarjan's strongly connected components: any component of more than one module is a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not loops, loops
