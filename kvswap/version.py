"""kvswap's version: what `kvswap --version` prints and attestations name as their tool."""

__version__ = "0.1.0"
