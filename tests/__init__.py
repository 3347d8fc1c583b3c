"""kvswap's tests, a package so tests and benchmarks import the shared helpers (tests/nodes.py,
tests/netharness.py) by name, e.g. `from tests.nodes import NodeProc`, without touching sys.path."""
