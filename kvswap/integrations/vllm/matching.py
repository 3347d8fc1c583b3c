"""Which leading tokens of a prompt a stored artifact covers, at a granularity vLLM and kvswap agree on.

Pure logic (no torch, no vLLM), so it is tested in the main suite.

kvswap cuts an artifact into blocks of `block_tokens` and gives block i the chained key
sha256(key[i-1] || token ids of block i) (FORMAT.md "Prefix keys"): equal keys mean equal token prefixes.
The scheduler computes the same chain over a prompt, for each block size its candidates use, and looks the
keys up: the deepest equal key is the longest shared prefix, in whole artifact blocks (plus the artifact's
short last block when the prompt contains all of it). The manifest's token ids are then compared with the
prompt (the hash only finds the candidate; equality of the ids decides).

vLLM then needs the count in whole blocks of ITS block size (it allocates and caches in pages of
`block_size` slots) and must compute at least the prompt's last token itself, because its forward pass is
what produces the logits of the first new token (artifacts made by vLLM carry no logits). So the usable
count is the shared prefix, capped at len(prompt) - 1, rounded down to a multiple of vLLM's block size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ...artifact.chunking import prefix_keys


@dataclass(frozen=True)
class Candidate:
    """A complete, trusted, compatible artifact the scheduler may match prompts against."""

    cid: str
    block_tokens: int
    token_ids: tuple[int, ...]
    prefix_keys: tuple[bytes, ...]
    document_hash: str


@dataclass(frozen=True)
class Match:
    """`n_tokens` leading prompt tokens whose KV artifact `cid` holds (already usable by vLLM)."""

    cid: str
    n_tokens: int
    shared_tokens: int  # the whole shared prefix, before vLLM's rounding


def full_block_keys(prompt: Sequence[int], block_tokens: int) -> list[bytes]:
    """The prompt's prefix keys (the artifact format's chain) for its full blocks only."""
    whole = len(prompt) - len(prompt) % block_tokens
    return prefix_keys(list(prompt[:whole]), block_tokens) if whole else []


def shared_prefix(candidate: Candidate, prompt: Sequence[int], prompt_keys: list[bytes] | None = None) -> int:
    """How many leading tokens of `prompt` the artifact holds, by its prefix keys, confirmed on the ids."""
    bt = candidate.block_tokens
    keys = full_block_keys(prompt, bt) if prompt_keys is None else prompt_keys
    depth = 0  # full blocks with equal keys
    for mine, theirs in zip(keys, candidate.prefix_keys):
        if mine != theirs:
            break
        depth += 1
    shared = depth * bt
    n_art = len(candidate.token_ids)
    # the artifact's short last block: covered when the prompt holds all of it
    if depth < len(candidate.prefix_keys) and shared + bt > n_art and len(prompt) >= n_art:
        if prefix_keys(list(prompt[:n_art]), bt)[depth] == candidate.prefix_keys[depth]:
            shared = n_art
    shared = min(shared, n_art)
    # the keys found the candidate; the ids decide (a hash collision cannot load a wrong prefix)
    if shared and tuple(prompt[:shared]) != candidate.token_ids[:shared]:
        return 0
    return shared


def usable_tokens(shared: int, prompt_len: int, vllm_block_size: int) -> int:
    """Tokens vLLM can take from the artifact: whole vLLM blocks, leaving the last prompt token to compute."""
    return min(shared, prompt_len - 1) // vllm_block_size * vllm_block_size


def best_match(candidates: Iterable[Candidate], prompt: Sequence[int], vllm_block_size: int,
               only_cid: str | None = None) -> Match | None:
    """The candidate giving vLLM the most tokens (ties: the first listed), or None when none gives any."""
    prompt = list(prompt)
    if len(prompt) < 2:
        return None
    chains: dict[int, list[bytes]] = {}
    best: Match | None = None
    for cand in candidates:
        if only_cid is not None and cand.cid != only_cid:
            continue
        keys = chains.get(cand.block_tokens)
        if keys is None:
            keys = chains[cand.block_tokens] = full_block_keys(prompt, cand.block_tokens)
        shared = shared_prefix(cand, prompt, keys)
        usable = usable_tokens(shared, len(prompt), vllm_block_size)
        if usable > 0 and (best is None or usable > best.n_tokens):
            best = Match(cand.cid, usable, shared)
    return best
