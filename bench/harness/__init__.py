"""The harness that tests and benchmarks share (never shipped in the product): real daemons in processes
(nodes.py), synthetic networks of trio nodes (netharness.py), hostile peers (hostile.py), poisoned artifacts
(poison.py) and the namespace testnet of real hosts behind shaped links and NATs (netns.py, `python -m bench
testnet`). tests/ imports it as `bench.harness`; bench/ never imports tests/.
"""
