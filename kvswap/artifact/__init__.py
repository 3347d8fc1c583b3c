"""KV artifacts: KvTensors -> token-block chunks -> lossless codecs -> canonical manifest -> signatures,
and back, verifying every byte before a tensor reaches a model. FORMAT.md is the byte-level spec.

    chunking.py   token blocks, chunk byte layout, chained prefix keys
    codecs.py     raw / zstd / byte-plane zstd, bounded decoding        (zstandard errors mapped here)
    manifest.py   Manifest, canonical msgpack, the validator             (msgpack errors mapped here)
    signing.py    node key, envelopes, trust policy                      (cryptography errors mapped here)
    pipeline.py   publish_kv, assemble_kv, check_compatible
    service.py    publish_document, generate_from_store, verify_artifact (shared by CLI and daemon)

Submodules are imported explicitly (`from kvswap.artifact.pipeline import ...`) so that importing one does
not pull in the others; nothing here imports torch.
"""
