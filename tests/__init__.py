"""kvswap's tests. The harness they share with the benchmarks (real daemons, synthetic networks, hostile peers,
poisoned artifacts, the namespace testnet) is bench/harness/, imported as `bench.harness`."""
