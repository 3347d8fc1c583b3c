"""What kvswap promises for each way of reusing KV, in one place (no torch: `kvswap exact --help` and the
docs read it). docs/exactness.md tables these with the figures measured on each machine.

Bits are promised only where both sides run the same computation on the same kind of machine (same CPU
instruction set or GPU, same torch, same thread count): kvswap prefills in block-aligned steps
(kvswap/engine/core.py), so the whole artifact, the artifact plus a suffix and any prefix of it are each the
same computation as the corresponding fresh prefill. Everything else is promised as tokens matching with the
logit difference reported: matrix-multiply kernels choose their blocking by row count, thread count, CPU
instruction set and device, so the same mathematics rounds differently.
"""

from __future__ import annotations

#: way of reuse -> what kvswap promises for it (printed by `kvswap exact`, tabled in docs/exactness.md)
GUARANTEES = {
    "whole": "bits: reloaded KV == stored KV, first token from the stored logits, the same decode steps",
    "suffix_two_phase": "bits: the same computation as 'prefill D, then prefill the suffix over it'",
    "prefix": "bits: the prefix's whole prefill steps are the artifact's KV and its cut last step is re-run, "
              "the same computation as a fresh prefill of the prefix",
    "monolithic": "tokens usually, logit diff reported: one forward over the whole document (plain transformers) "
                  "is another computation than kvswap's block-aligned prefill",
    "suffix_monolithic": "tokens usually, logit diff reported: one D+suffix prefill is a different "
                         "computation (bf16/fp16 with sdpa can diverge where logits nearly tie)",
    "other_machine": "no bits, tokens usually, logit diff reported: another CPU instruction set, thread count "
                     "or device runs other kernels",
    "decode_modes": "bits within one decode mode (eager, static, compiled: the prompt part is the same computation "
                    "in all three); across modes tokens usually, logit diff reported",
}
