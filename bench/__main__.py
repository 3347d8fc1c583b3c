"""`python -m bench <name> [args]` runs bench/<name>.py; `python -m bench all` runs every benchmark with defaults."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def _names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m bench <{'|'.join(_names())}|all> [args]")
        return 0 if argv else 2
    names = _names() if argv[0] == "all" else [argv[0]]
    for name in names:
        if name not in _names():
            print(f"error: no benchmark named {name!r} (have: {', '.join(_names())})", file=sys.stderr)
            return 2
        rc = importlib.import_module(f"bench.{name}").main([] if argv[0] == "all" else argv[1:])
        if isinstance(rc, int) and rc and argv[0] != "all":
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
