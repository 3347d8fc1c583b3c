"""What a fresh clone installs is what the code imports: pyproject's package list names every package folder,
and every third-party module the shipped code imports belongs to a declared dependency.

Both once broke a fresh `make setup` while the suite stayed green on a machine whose venv had been built
before the change (a renamed package, and `blake3` installed by hand)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHIPPED = {"kvswap": "kvswap", "node": "kvswap.node", "protocol": "kvswap.protocol"}
# imported only where the optional extra is installed (kvswap.integrations.vllm, behind a guarded import)
OPTIONAL = {"vllm"}
# installed with a declared dependency and imported under its own name: (module, the dependency that brings it)
BROUGHT_BY = {"multiaddr": "libp2p", "trio": "libp2p", "google": "libp2p", "yaml": "pyyaml",
              "huggingface_hub": "transformers", "tokenizers": "transformers"}


def _package_dirs() -> set[str]:
    found = set()
    for folder, dotted in SHIPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((dotted, *rel)))
    return found


def _declared() -> set[str]:
    deps = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["test"]
    return {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}


def _imported_top_modules() -> set[str]:
    names = set()
    for folder in SHIPPED:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(SHIPPED) - OPTIONAL - {"__future__"}


def test_pyproject_lists_every_package_folder():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = _package_dirs()
    assert listed == on_disk, f"not listed: {sorted(on_disk - listed)}; listed but absent: {sorted(listed - on_disk)}"


def test_every_third_party_import_is_a_declared_dependency():
    declared = _declared()
    owners = metadata.packages_distributions()
    missing = []
    for module in sorted(_imported_top_modules()):
        if module in BROUGHT_BY:
            assert BROUGHT_BY[module] in declared, module
            continue
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} (from {sorted(dists)})")
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"
