"""Wire protocol of kvswap, sans-I/O: frozen message types, a length-prefixed frame codec and the limits.

Nothing here opens a socket or imports asyncio, trio or libp2p: node/ moves bytes between libp2p streams
and the decoder in this package (the h11 pattern).
"""
