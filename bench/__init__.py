"""Benchmarks: scripts that print measured figures and ratios (never assertions on speed in tests)."""
