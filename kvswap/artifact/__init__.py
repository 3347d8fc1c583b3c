"""KV artifacts: KvTensors -> token-block chunks -> lossless codecs -> canonical manifest -> signatures,
and back, verifying every byte before a tensor reaches a model. FORMAT.md is the byte-level spec.

    chunking.py   token blocks, chunk byte layout, chained prefix keys
    codecs.py     raw / zstd / byte-plane zstd, bounded decoding        (zstandard errors mapped here)
    manifest.py   Manifest, canonical msgpack, the validator             (msgpack errors mapped here)
    signing.py    node key, envelopes, trust policy                      (cryptography errors mapped here)
    pipeline.py   publish_kv, assemble_kv, check_compatible
    loader.py     the load path: chunks into an engine's buffers, every chunk verified, on many threads
    attestation.py  signed audit verdicts (their own signature domain)
    audit.py      audit rules: which blocks, which mode (exact or tolerance), the verdict, the bound
    limits.py     the format's limits (FORMAT.md "Limits")

The operations over a home that use these (publish, generate, audit, verify) are kvswap/ops/.

Submodules are imported explicitly (`from kvswap.artifact.pipeline import ...`) so that importing one does
not pull in the others; nothing here imports torch.
"""
